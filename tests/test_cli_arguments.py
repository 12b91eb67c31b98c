"""Options passed on to Beam or the filesystem come after ``--``; a stray word is refused, never dropped."""

from __future__ import annotations

import os

import pytest

from querycache.runners.common import stray_argument

LOGS = ["examples/logs/a.jsonl", "examples/logs/b.jsonl"]  # what the shell makes of examples/logs/*.jsonl


@pytest.mark.parametrize(
    ("args", "stray"),
    [
        ((), None),
        (("--direct_num_workers=2", "--job_endpoint", "localhost:8099", "--save_main_session"), None),
        (("--flag", "--name", "value"), None),
        (("b.jsonl",), "b.jsonl"),
        (("b.jsonl", "--direct_num_workers=2"), "b.jsonl"),
        (("--name=value", "b.jsonl"), "b.jsonl"),
        (("--name", "value", "b.jsonl"), "b.jsonl"),
        (("--", "x"), "--"),
        (("-x",), "-x"),
    ],
)
def test_stray_argument(args, stray):
    assert stray_argument(args) == stray


@pytest.mark.parametrize(
    "command",
    [
        lambda out: ["build", "--logs", *LOGS, "--out", out],
        lambda out: ["build", "--logs", LOGS[0], "--out", out, "--", LOGS[1]],
        lambda out: ["build", "--logs", *LOGS, "--out", out, "--", "--direct_num_workers=2"],
        lambda out: ["replay", out, "--logs", *LOGS],
        lambda out: ["finetune", "--logs", *LOGS, "--out", out],
    ],
    ids=["build", "build-after-dashes", "build-with-options", "replay", "finetune"],
)
def test_an_unquoted_glob_is_refused_with_one_line(cli, tmp_path, command):
    out = tmp_path / "out"
    result = cli(*command(str(out)))
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert f"unexpected argument '{LOGS[1]}'" in line and "quote it (--logs 'logs/*.jsonl')" in line
    assert not out.exists()


def test_snapshot_commands_refuse_a_second_root(cli, tmp_path):
    result = cli("verify", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 2
    assert (
        result.output.strip() == f"Error: unexpected argument '{tmp_path / 'b'}': one root or snapshot per command; "
        "options for the filesystem go after --, as --name=value"
    )


def test_worker_processes_of_this_machine_share_its_cores(monkeypatch):
    from querycache.runners.presets import beam_args

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    beam_args("direct", [])
    assert "OMP_NUM_THREADS" not in os.environ
    beam_args("multiprocess", ["--direct_num_workers=4"])
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting stays
    beam_args("multiprocess", [])
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_worker_processes_log_what_querycache_says_and_the_user_wins():
    from querycache.runners.presets import PRESETS, beam_args

    assert beam_args("direct", ["--x=1"]) == [*PRESETS["direct"], "--x=1"]
    args = beam_args("multiprocess", ["--default_sdk_harness_log_level=DEBUG"], quiet=True)
    assert args.index("--default_sdk_harness_log_level=WARNING") < args.index("--default_sdk_harness_log_level=DEBUG")
    assert '--sdk_harness_log_level_overrides={"querycache": "WARNING"}' in args
    assert '--sdk_harness_log_level_overrides={"querycache": "INFO"}' in beam_args("multiprocess", [])


def test_the_command_exits_with_its_status_and_all_its_output(tmp_path):
    """The command skips the interpreter's teardown: its status and every line of output still come out."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "querycache", *args], capture_output=True, text=True, timeout=120)

    refused = run("build", "--logs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "qc"))
    assert refused.returncode == 2 and "matches no non-empty file" in refused.stderr
    version = run("--version")
    assert version.returncode == 0 and version.stdout.rstrip().endswith("nfkc-casefold-collapse v1")


@pytest.mark.parametrize(
    ("env", "fail", "skipped", "status"), [("1", False, True, 0), ("1", True, False, 1), ("", False, False, 0)]
)
def test_local_workers_skip_the_teardown_unless_they_fail(tmp_path, env, fail, skipped, status):
    """A worker process of --runner multiprocess ends at its exit handlers' start (os._exit), unless an
    exception ended it; a process that is no such worker (no mark from the preset) exits as usual."""
    import subprocess
    import sys

    marker = tmp_path / "teardown-ran"
    code = f"""
import atexit, sys, types
atexit.register(lambda: open({str(marker)!r}, "w").close())  # runs last: only if nothing ends the exit first
sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="apache_beam.runners.worker.sdk_worker_main")
from querycache.transforms.process_exit import exit_workers_quickly
exit_workers_quickly()
if {fail}:
    raise RuntimeError("the harness failed")
"""
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | {"QUERYCACHE_LOCAL_WORKERS": env}, timeout=60)
    assert done.returncode == status and marker.exists() is not skipped
