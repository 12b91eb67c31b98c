"""Beyond one machine: builds to a real S3 API server (moto), pull, retries, races, runners.

The S3 server is moto in server mode on loopback, started once per session; Beam reaches it through
its own S3 filesystem and the store through pyarrow, both configured by the same flags.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest

from querycache.store import Snapshot, current_id
from querycache.store import fs as store_fs
from querycache.store.publish import SNAPSHOTS
from tests.conftest import build_args, free_port, use_s3, wait_for_port
from tests.store_helpers import make_snapshot
from tests.test_build import make_records, run_build, write_log

SCHEMA = {"encoding": "float32", "dim": 4}


def remote_snapshot(tmp_path: Path, root: str, values: dict, s3: dict, publish: bool = True) -> str:
    """Write a small snapshot with the store writer and put it under the remote ``root``; return its id."""
    from querycache.store import remote

    use_s3(s3["options"])
    local = make_snapshot(tmp_path / f"w{time.monotonic_ns()}", values, SCHEMA, do_publish=False)
    manifest = json.loads((local / "manifest.json").read_text())
    snapshot_id = manifest["snapshot_id"]
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            store_fs.write_bytes(store_fs.join(root, SNAPSHOTS, snapshot_id, rel), path.read_bytes())
    if publish:
        remote.publish(root, snapshot_id, remote.current(root))
    return snapshot_id


def vectors(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"query {i}": rng.standard_normal(4).astype(np.float32) for i in range(n)}


def table(root) -> dict:
    """key -> (count, rank, result) of the current snapshot under a local root."""
    import pyarrow.parquet as pq

    snap = Snapshot.open(root)
    rows = [r for rel in snap.manifest["parquet"] for r in pq.read_table(snap.directory / rel).to_pylist()]
    return {r["key"]: (r["count"], r["rank"], snap.get_key(r["key"])) for r in rows}


def same_answers(a: dict, b: dict) -> None:
    assert {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}
    for key, (_, _, x) in a.items():
        y = b[key][2]
        assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) >= 0.9999, key


def same_figures(root, summary: dict, reference_root, reference: dict) -> None:
    """Summaries and manifests agree field by field, timings and ids aside; the invariant holds."""
    timing = {"snapshot_id", "seconds", "peak_rss_mib", "inference_queries_per_second"}
    assert {k: v for k, v in summary.items() if k not in timing} == {
        k: v for k, v in reference.items() if k not in timing
    }
    with Snapshot.open(root) as snap, Snapshot.open(reference_root) as ref:
        stats, ref_stats = dict(snap.manifest["stats"]), dict(ref.manifest["stats"])
        inference, ref_inference = stats.pop("inference"), ref_stats.pop("inference")
        assert stats == ref_stats
        assert [inference[k] for k in ("queries", "tokens")] == [ref_inference[k] for k in ("queries", "tokens")]
        assert inference["seconds"] > 0 and snap.manifest["inference_cost"]["seconds_per_query"] > 0
        assert snap.manifest["selection"] == ref.manifest["selection"] and len(snap) == len(ref)
        assert stats["lines_read"] == stats["accepted"] + stats["rejected"] > 0


@pytest.fixture(scope="module")
def direct_build(tiny_bert, tmp_path_factory):
    """One log and its build on the in-process runner (``direct``) to a local root: ``(log, root, summary)``."""
    from click.testing import CliRunner

    from querycache.runners.cli import main

    tmp = tmp_path_factory.mktemp("direct")
    log = write_log(tmp, "jsonl", make_records(150))
    result = CliRunner().invoke(
        main, build_args(str(log), str(tmp / "local"), str(tiny_bert), "--count-field", "count")
    )
    assert result.exit_code == 0, result.output
    return log, tmp / "local", json.loads(result.stdout.strip().splitlines()[-1])


def test_build_to_s3_pulls_to_the_same_snapshot_reuses_and_takes_a_model_from_s3(
    cli, tiny_bert, tmp_path, s3, monkeypatch, direct_build
):
    log, local_root, local = direct_build
    logs = tmp_path / "logs"
    logs.mkdir()
    root = f"{s3['bucket']}/builds/root"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = set(tmp_path.iterdir())
    first = run_build(cli, *build_args(log, root, tiny_bert, "--count-field", "count", "--", *s3["options"]))
    assert set(tmp_path.iterdir()) == before and not list(cwd.iterdir())  # nothing local outside temp dirs
    assert first["model_fingerprint"] == local["model_fingerprint"]

    pulled = cli("pull", root, tmp_path / "served", "--json", "--", *s3["options"])
    assert pulled.exit_code == 0, pulled.output
    report = json.loads(pulled.stdout)
    assert report["snapshot_id"] == first["snapshot_id"] and report["pulled"] and report["bytes"] > 0
    same_answers(table(tmp_path / "served"), table(local_root))
    hit = json.loads(cli("lookup", tmp_path / "served", next(iter(table(local_root))), "--json").stdout)
    assert hit["hit"]
    again = json.loads(cli("pull", root, tmp_path / "served", "--json", "--", *s3["options"]).stdout)
    assert (again["pulled"], again["bytes"]) == (False, 0)

    use_s3(s3["options"])
    model_root = f"{s3['bucket']}/models/tiny"
    for path in sorted(Path(tiny_bert).rglob("*")):
        if path.is_file():
            store_fs.write_bytes(store_fs.join(model_root, path.relative_to(tiny_bert).as_posix()), path.read_bytes())
    more = write_log(logs, "csv", [*make_records(150), {"query": "weather tomorrow in tokyo", "count": 1, "user": "z"}])
    args = build_args([log, more], root, model_root, "--count-field", "count", "--", *s3["options"])
    second = run_build(cli, *args)
    assert second["model_fingerprint"] == first["model_fingerprint"]
    assert second["reused"] == first["head_size"] and second["computed"] == 1

    listing = json.loads(cli("list", root, "--json", "--", *s3["options"]).stdout)
    assert [s["current"] for s in listing] == [False, True]
    assert cli("verify", root, "--", *s3["options"]).exit_code == 0
    assert (
        json.loads(cli("inspect", root, "--json", "--", *s3["options"]).stdout)["stats"]["reused"] == second["reused"]
    )
    assert cli("lookup", root, "x").exit_code == 2
    rolled = cli("rollback", root, "--json", "--", *s3["options"])
    assert json.loads(rolled.stdout)["current"] == first["snapshot_id"]


def test_a_shard_written_twice_commits_one_correct_shard(tmp_path, s3):
    from apache_beam.io.filesystems import FileSystems

    from querycache.store import remote
    from querycache.store.format import new_manifest
    from querycache.transforms.write_snapshot import WriteSnapshot, commit, spill_record

    use_s3(s3["options"])
    directory = f"{s3['bucket']}/twice/snapshots/s1"
    rows = [(f"key {i}", i + 1, None, i + 1, np.full(4, i, np.float32).tobytes()) for i in range(50)]
    spills = [f"{directory}/spill/00000-{part}.rows" for part in ("a", "b")]  # two bundles' spill files
    for path, part in zip(spills, (rows[:20], rows[20:])):
        with FileSystems.create(path) as out:
            out.write(b"".join(map(spill_record, part)))
    writer = WriteSnapshot(directory, None, SCHEMA)
    writes = [writer._write(0, spills, 1), writer._write(0, [None, *reversed(spills)], 1)]  # a retried shard write
    assert writes[0].attempt != writes[1].attempt and writes[0].files == writes[1].files
    manifest = commit(directory, new_manifest("s1", "embed", SCHEMA, {"fingerprint": "f" * 64}, stats={}), writes, {})
    assert remote.check_files(directory, remote.read_manifest(directory), checksums=True) == []
    assert manifest["rows"] == 50 and not store_fs.list_dir(f"{directory}/attempts")
    assert not store_fs.list_dir(f"{directory}/spill")
    assert sorted(rel for rel, _ in store_fs.walk_files(directory)) == sorted([*manifest["files"], "manifest.json"])


def test_a_racing_publish_loses_with_a_clear_message(tmp_path, s3):
    from querycache.store import SnapshotError, remote

    root = f"{s3['bucket']}/race"
    base = remote_snapshot(tmp_path, root, vectors(5, 0), s3)
    seen = remote.current(root)  # both builds read CURRENT when they start
    winner = remote_snapshot(tmp_path, root, vectors(5, 1), s3, publish=False)
    loser = remote_snapshot(tmp_path, root, vectors(5, 2), s3, publish=False)
    remote.publish(root, winner, seen)
    with pytest.raises(SnapshotError, match=f"another build published {winner}.*{loser} is left unpublished"):
        remote.publish(root, loser, seen)
    assert remote.current_id(root) == winner != base


def test_a_flipped_byte_fails_pull_and_keeps_the_local_current(cli, tmp_path, s3):
    root = f"{s3['bucket']}/flip"
    good = remote_snapshot(tmp_path, root, vectors(20, 3), s3)
    assert cli("pull", root, tmp_path / "served", "--", *s3["options"]).exit_code == 0
    bad = remote_snapshot(tmp_path, root, vectors(20, 4), s3)
    data = f"{root}/snapshots/{bad}/lmdb/shard-00000-of-00001/data.mdb"
    raw = bytearray(store_fs.read_bytes(data))
    raw[len(raw) // 2] ^= 1
    store_fs.write_bytes(data, bytes(raw))
    result = cli("pull", root, tmp_path / "served", "--", *s3["options"])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output and "data.mdb" in result.output
    assert current_id(tmp_path / "served") == good
    assert [p.name for p in (tmp_path / "served" / SNAPSHOTS).iterdir()] == [good]


def test_pull_refuses_a_current_that_names_a_path(cli, tmp_path, s3):
    use_s3(s3["options"])
    root = f"{s3['bucket']}/hostile"
    store_fs.write_bytes(f"{root}/CURRENT", b"../../etc\n")
    result = cli("pull", root, tmp_path / "served", "--", *s3["options"])
    assert result.exit_code == 2 and "not a snapshot id" in result.output


def test_pull_watch_picks_up_a_second_snapshot(tmp_path, s3):
    root = f"{s3['bucket']}/watch"
    first = remote_snapshot(tmp_path, root, vectors(10, 5), s3)
    served = tmp_path / "served"
    command = [
        sys.executable,
        "-m",
        "querycache",
        "pull",
        root,
        str(served),
        "--watch",
        "0.2",
        "--json",
        "--keep",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    watcher = subprocess.Popen([*command, "--", *s3["options"]], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert json.loads(watcher.stdout.readline())["snapshot_id"] == first
        second = remote_snapshot(tmp_path, root, vectors(10, 6), s3)
        report = json.loads(watcher.stdout.readline())
        assert report["snapshot_id"] == second and report["pulled"]
        assert current_id(served) == second and [p.name for p in (served / SNAPSHOTS).iterdir()] == [second]
    finally:
        watcher.terminate()
        watcher.wait(10)


def _portable_services(workdir: Path) -> tuple[list[subprocess.Popen], list[str]]:
    """Beam's job service and an external worker pool, started in ``workdir``; their runner flags."""
    job_port, pool_port = free_port(), free_port()
    beam = "apache_beam.runners"
    services = [
        subprocess.Popen([sys.executable, "-m", f"{beam}.worker.worker_pool_main", f"--service_port={pool_port}"],
                         cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", f"{beam}.portability.local_job_service_main", f"--port={job_port}"],
                         cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    wait_for_port(pool_port, services[0])
    wait_for_port(job_port, services[1])
    return services, [
        "--runner", "portable", "--", f"--job_endpoint=localhost:{job_port}",
        "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}",
    ]  # fmt: skip


def test_the_portable_runner_with_workers_elsewhere_gives_the_same_snapshot(
    cli, tiny_bert, tmp_path, monkeypatch, direct_build
):
    log, local_root, reference = direct_build
    (tmp_path / "log.jsonl").write_bytes(log.read_bytes())
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    services, flags = _portable_services(elsewhere)
    try:
        monkeypatch.chdir(tmp_path)  # relative paths on the driver must mean the same on the workers
        summary = run_build(cli, *build_args("log.jsonl", "portable", tiny_bert, "--count-field", "count", *flags))
    finally:
        for service in services:
            service.terminate()
            service.wait(10)
    assert not list(elsewhere.iterdir())
    same_answers(table(tmp_path / "portable"), table(local_root))
    same_figures(tmp_path / "portable", summary, local_root, reference)


def test_the_multiprocess_runner_gives_the_same_snapshot_and_figures(cli, tiny_bert, tmp_path, direct_build):
    log, local_root, reference = direct_build
    flags = ["--count-field", "count", "--runner", "multiprocess", "--", "--direct_num_workers=2"]
    summary = run_build(cli, *build_args(log, tmp_path / "multi", tiny_bert, *flags))
    same_answers(table(tmp_path / "multi"), table(local_root))
    same_figures(tmp_path / "multi", summary, local_root, reference)


def test_one_bundle_at_a_time_in_memory_gives_the_same_snapshot_and_figures(cli, tiny_bert, tmp_path, direct_build):
    """``direct`` runs bundles on two harness threads where there are two cores; Beam's in-memory
    runner, one bundle at a time, must publish the same snapshot."""
    log, local_root, reference = direct_build
    flags = ["--count-field", "count", "--", "--runner=FnApiRunner", "--direct_num_workers=1"]
    summary = run_build(cli, *build_args(log, tmp_path / "one", tiny_bert, *flags))
    same_answers(table(tmp_path / "one"), table(local_root))
    same_figures(tmp_path / "one", summary, local_root, reference)


def test_multiprocess_workers_log_in_the_drivers_format_without_beams_start_up_lines(tiny_bert, tmp_path):
    """The workers are forks of a server that set their logging up before Beam's import: their
    progress reaches stderr as the driver's does, and nothing of Beam's harness start-up does."""
    log = write_log(tmp_path, "jsonl", make_records(40))
    args = build_args(log, tmp_path / "root", tiny_bert, "--runner", "multiprocess", "--", "--direct_num_workers=2")
    args.remove("--quiet")
    done = subprocess.run([sys.executable, "-m", "querycache", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d INFO read \d+ lines from \S+log\.jsonl", done.stderr, re.M), done.stderr
    assert re.search(r"^\d\d:\d\d:\d\d INFO inferred \d+ queries in this worker", done.stderr, re.M)
    driver = "INFO running the pipeline on", "INFO publishing snapshot"
    beam = [line for line in done.stderr.splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert beam == [] and all(d in done.stderr for d in driver)


class _KillsItsWorker(beam.DoFn):
    """Ends the worker process it runs in at its fourth element, as the out-of-memory killer would."""

    def process(self, element):
        if element == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield element


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # Beam's, on the lost channel
@pytest.mark.parametrize(
    ("cannot_start", "ended"), [(False, "was killed by SIGKILL (the signal of"), (True, "exited with status 1,")]
)
def test_a_worker_lost_in_a_bundle_or_at_its_start_fails_the_pipeline_naming_it(monkeypatch, cannot_start, ended):
    """Beam's runner would wait for the lost worker's answer forever; it fails at once, saying why."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from querycache.runners.multiprocess import MultiprocessRunner, WorkerLost

    if cannot_start:  # the workers get the driver's environment: Beam's harness fails to read its options
        monkeypatch.setenv("PIPELINE_OPTIONS_FILE", "/nonexistent/options.json")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with beam.Pipeline(runner=MultiprocessRunner(), options=PipelineOptions(["--direct_num_workers=2"])) as p:
                _ = p | beam.Create(range(10)) | beam.ParDo(_KillsItsWorker())
        except BaseException as err:  # noqa: BLE001 (what ended it is the assertion)
            failures.append(err)

    pipeline = threading.Thread(target=run, daemon=True)
    pipeline.start()
    pipeline.join(120)
    assert not pipeline.is_alive(), "the pipeline still waits for its lost worker"
    assert len(failures) == 1 and isinstance(failures[0], WorkerLost), failures
    assert re.fullmatch(rf"worker_\d+ of --runner multiprocess {re.escape(ended)} .*", str(failures[0]))


def test_a_worker_stages_a_remote_model_once_and_names_a_file_that_differs(tiny_bert, tmp_path, s3, monkeypatch):
    from querycache.inference import EngineConfig
    from querycache.inference.fingerprint import model_files
    from querycache.inference.model import ModelError
    from querycache.transforms import model_stage

    use_s3(s3["options"])
    monkeypatch.setattr(model_stage, "CACHE", str(tmp_path / "cache"))
    source = f"{s3['bucket']}/models/staged"
    for path in sorted(Path(tiny_bert).rglob("*")):
        if path.is_file():
            store_fs.write_bytes(store_fs.join(source, path.relative_to(tiny_bert).as_posix()), path.read_bytes())
    files = model_files(tiny_bert)
    model = model_stage.ShippedModel(source, files, "a" * 64, EngineConfig(model_dir=source))
    local = model_stage.stage(model)
    assert model_files(local) == files and model_stage.stage(model) == local
    tampered = model._replace(files={**files, "config.json": "0" * 64}, fingerprint="b" * 64)
    with pytest.raises(ModelError, match="model file config.json"):
        model_stage.stage(tampered)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a" * 64]


def test_a_pattern_that_matches_nothing_on_the_workers_is_an_error_naming_it(cli, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr("querycache.pipelines.build.check_logs", lambda patterns, fields: [])  # the driver saw files
    result = cli(*build_args(tmp_path / "gone-*.jsonl", tmp_path / "out", tiny_bert))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--logs {tmp_path}/gone-*.jsonl matched files on the driver but none on the workers" in result.output
    assert not list((tmp_path / "out" / "snapshots").iterdir())


WORKERS_SEE_NOTHING = """
import sys
if __name__ == "__main__":  # the workers of multiprocess import this script
    from querycache.runners.common import setup_logging
    setup_logging(quiet=True)  # as the command does, before Beam's import warns
    import querycache.pipelines.build as build
    from querycache.runners.cli import entry
    build.check_logs = lambda patterns, fields: []  # the driver saw files; the workers will not
    sys.argv = ["querycache", *sys.argv[1:]]
    entry()
"""


@pytest.mark.parametrize("runner", ["direct", "multiprocess"])
def test_a_failure_in_the_workers_is_one_line_on_stderr_without_their_traceback(tiny_bert, tmp_path, runner):
    """Beam's harness prints each failed bundle's traceback; ours answer the runner without it, and the
    command says the failure once (on a terminal the tracebacks of every worker came before it)."""
    script = tmp_path / "workers_see_nothing.py"
    script.write_text(WORKERS_SEE_NOTHING)
    args = build_args(str(tmp_path / "gone-*.jsonl"), str(tmp_path / "out"), str(tiny_bert), "--runner", runner)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"Error: --logs {tmp_path}/gone-*.jsonl matched files on the driver but none on the workers; pass a path "
        "every worker can read (object storage, or a disk they share)"
    ]
