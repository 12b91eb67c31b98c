"""The package as users install it: one namespace, a light install for services, a wheel that works.

The sdist and the wheel are built from this checkout; the wheel goes into fresh virtual environments
with pip (dependencies from the package index, or pip's cache), never into the one the suite runs in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.store_helpers import make_snapshot

ROOT = Path(__file__).parents[1]
ROOMS = ("store", "inference", "training", "transforms", "pipelines", "runners", "serve")
HEAVY = ("apache_beam", "torch", "transformers")


def _run(*command, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel that ``python -m build`` makes from the sdist of this checkout."""
    out = tmp_path_factory.mktemp("dist")
    done = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("querycache-*.tar.gz"))) == 1
    (found,) = out.glob("querycache-*.whl")
    return found


@pytest.fixture(scope="session")
def light(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment with ``pip install querycache`` (no extras); its bin directory."""
    env = tmp_path_factory.mktemp("light") / "venv"
    venv.create(env, with_pip=True)
    done = _run(env / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert done.returncode == 0, done.stderr[-2000:]
    return env / "bin"


@pytest.fixture(scope="session")
def snapshot_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("light-root")
    make_snapshot(root, {"hotels in rome": np.arange(4, dtype=np.float32)}, {"encoding": "float32", "dim": 4})
    return root


def test_the_wheel_installs_the_querycache_namespace_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"querycache", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for room in ROOMS:
        assert f"querycache/{room}/__init__.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "querycache = querycache.runners.cli:entry" in entry


def test_the_light_install_has_neither_beam_nor_torch(light):
    installed = {line.split("==")[0].lower() for line in _run(light / "pip", "freeze").stdout.split()}
    assert {"lmdb", "pyarrow", "numpy", "click", "rich"} <= installed
    assert not {"apache-beam", "torch", "transformers"} & installed


def test_a_service_reads_a_snapshot_with_the_light_install(light, snapshot_root):
    code = f"""
import sys
from querycache.store import Snapshot, ReadThroughCache
import querycache
assert querycache.Snapshot is Snapshot
snap = Snapshot.open({str(snapshot_root)!r})
print(snap.get("Hotels  in ROME").tolist(), snap.get("no such query"))
cache = ReadThroughCache({str(snapshot_root)!r}, fallback=lambda qs: [None] * len(qs))
cache.get_many(["hotels in rome", "elsewhere"])
print(cache.metrics()["hits"], sorted(set({HEAVY!r}) & set(sys.modules)))
"""
    done = _run(light / "python", "-c", code, cwd=snapshot_root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[0.0, 1.0, 2.0, 3.0] None", "1 []"]


@pytest.mark.parametrize("command", ["inspect", "verify", "list", "lookup"])
def test_the_snapshot_commands_run_in_the_light_install(light, snapshot_root, command):
    extra = ["hotels in rome"] if command == "lookup" else []
    done = _run(light / "querycache", command, snapshot_root, *extra, "--json", cwd=snapshot_root)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    first = json.loads(done.stdout.splitlines()[0])
    assert first  # every snapshot command speaks JSON with --json


@pytest.mark.parametrize(
    "args",
    [
        ["build", "--logs", "q.jsonl", "--out", "root"],
        ["build", "--logs", "q.jsonl", "--out", "root", "--since", "2026-11-01"],
        ["replay", "root", "--logs", "q.jsonl"],
        ["finetune", "--logs", "q.jsonl", "--out", "model"],
        ["model-info"],
        ["serve", "root"],
    ],
    ids=["build", "build-since", "replay", "finetune", "model-info", "serve"],
)
def test_heavy_commands_name_their_extra_in_the_light_install(light, tmp_path, args):
    done = _run(light / "querycache", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    extra = "serve" if args[0] == "serve" else "pipelines"
    assert f"querycache {args[0]} needs the {extra} extra" in line
    assert f"pip install 'querycache[{extra}]'" in line


@pytest.fixture(scope="session")
def full(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment with ``pip install 'querycache[all]'``; its bin directory.

    The extra's dependencies are the ones this suite runs on, seen through a ``.pth`` line (no
    download of torch again): pip resolves the extra against them and installs only the wheel.
    """
    import sysconfig

    env = tmp_path_factory.mktemp("full") / "venv"
    venv.create(env, with_pip=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "suite-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run(env / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[all]")
    assert done.returncode == 0, done.stderr[-2000:]
    return env / "bin"


def test_the_full_install_builds_on_worker_processes_from_outside_the_checkout(full, tiny_bert, tmp_path):
    """Beam pickles DoFns by module path: worker processes must import them as querycache.* from the wheel."""
    (tmp_path / "q.jsonl").write_text('{"query": "hotels in rome"}\n{"query": "rome"}\n{"query": "hotels in rome"}\n')
    where = _run(full / "python", "-c", "import querycache.transforms as t; print(t.__file__)", cwd=tmp_path)
    assert "site-packages/querycache/transforms" in where.stdout, where.stdout + where.stderr
    args = ["build", "--logs", "q.jsonl", "--out", "root", "--model", tiny_bert, "--dtype", "fp32", "--json", "--quiet"]
    done = _run(full / "querycache", *args, "--runner", "multiprocess", "--", "--direct_num_workers=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # --quiet: no line of the workers' start-up either
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["lines_read"], summary["head_size"]) == (3, 2)
    inspect = _run(full / "querycache", "inspect", "root", "--json", cwd=tmp_path)
    assert json.loads(inspect.stdout)["rows"] == 2
