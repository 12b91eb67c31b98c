"""Hostile snapshots and models: refused with one line, and nothing outside ROOT is read or written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from querycache.inference.fingerprint import fingerprint
from querycache.inference.model import ModelError, check_model_dir
from querycache.store import Snapshot, SnapshotError, current_id
from querycache.store.format import verify_snapshot
from querycache.store.publish import CURRENT, SNAPSHOTS
from tests.store_helpers import make_snapshot

EMBED = {"encoding": "float32", "dim": 4}
DATA = "lmdb/shard-00000-of-00001/data.mdb"


def _vectors(n: int = 5) -> dict:
    return {f"query {i}": np.full(4, i, np.float32) for i in range(n)}


def _edit_manifest(directory, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _current_outside(root, outside):
    (root / CURRENT).write_text(os.path.relpath(outside / SNAPSHOTS / current_id(outside), root / SNAPSHOTS) + "\n")


def _current_absolute(root, outside):
    (root / CURRENT).write_text(str(outside / SNAPSHOTS / current_id(outside)) + "\n")


def _symlink_out(root, outside):
    link = root / SNAPSHOTS / "20990101T000000.000000Z-evil00"
    link.symlink_to(outside / SNAPSHOTS / current_id(outside), target_is_directory=True)
    (root / CURRENT).write_text(link.name + "\n")


def _manifest_parent(root, outside):
    def change(m):
        m["files"]["../../../outside/secret"] = m["files"].pop(DATA)

    _edit_manifest(root / SNAPSHOTS / current_id(root), change)


def _manifest_absolute(root, outside):
    def change(m):
        m["parquet"] = [str(outside / "x.parquet")]

    _edit_manifest(root / SNAPSHOTS / current_id(root), change)


def _data_symlink_out(root, outside):
    data = root / SNAPSHOTS / current_id(root) / DATA
    data.unlink()
    data.symlink_to(outside / SNAPSHOTS / current_id(outside) / DATA)


def _missing_file(root, outside):
    (root / SNAPSHOTS / current_id(root) / DATA).unlink()


def _truncated(root, outside):
    data = root / SNAPSHOTS / current_id(root) / DATA
    data.write_bytes(data.read_bytes()[:4096])


def _flipped_byte(root, outside):
    data = root / SNAPSHOTS / current_id(root) / DATA
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _unlisted_shard(root, outside):
    _edit_manifest(root / SNAPSHOTS / current_id(root), lambda m: m["files"].pop(DATA))


HOSTILE = {
    "current names ../..": (_current_outside, "not a snapshot id"),
    "current names an absolute path": (_current_absolute, "not a snapshot id"),
    "snapshot is a symlink out of ROOT": (_symlink_out, "outside"),
    "manifest names ../..": (_manifest_parent, "not a path inside"),
    "manifest names an absolute path": (_manifest_absolute, "not a path inside"),
    "data file is a symlink out": (_data_symlink_out, "outside the snapshot"),
    "listed file missing": (_missing_file, "missing"),
    "data file not listed": (_unlisted_shard, "not in the manifest"),
    "truncated data.mdb": (_truncated, "manifest says"),
    "flipped byte": (_flipped_byte, "sha256 mismatch"),
}

ROOT_LEVEL = (_current_outside, _current_absolute, _symlink_out)


@pytest.fixture
def roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_snapshot(outside, _vectors(), EMBED)
    make_snapshot(root, _vectors(), EMBED)
    return root, outside


def _tree(path) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_snapshots_are_refused_with_one_line(cli, roots, case):
    root, outside = roots
    damage, words = HOSTILE[case]
    damage(root, outside)
    before = _tree(outside)
    with pytest.raises(SnapshotError, match=words) as err:
        Snapshot.open(root)
    assert "\n" not in str(err.value)
    if damage not in ROOT_LEVEL:  # the reusable check (pull calls it on its copy) refuses the directory too
        with pytest.raises(SnapshotError, match=words):
            verify_snapshot(root / SNAPSHOTS / current_id(root))
    result = cli("verify", root)
    assert result.exit_code in (1, 2) and words in result.output and len(result.output.strip().splitlines()) == 1
    lookup = cli("lookup", root, "query 1")
    assert lookup.exit_code == 2 and len(lookup.output.strip().splitlines()) == 1
    assert _tree(outside) == before  # nothing outside ROOT was written (or followed into and changed)


@pytest.mark.parametrize("target", ["../../outside", "/etc", "..", ".staging-x", "no-such-snapshot"])
def test_rollback_to_what_is_not_a_snapshot_exits_2(cli, roots, target):
    root, _ = roots
    before = current_id(root)
    result = cli("rollback", root, target)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert current_id(root) == before


def test_gc_refuses_a_root_whose_current_is_not_a_snapshot(cli, roots):
    root, outside = roots
    make_snapshot(root, _vectors(), EMBED)
    (root / CURRENT).write_text("../../outside\n")
    snapshots = sorted(p.name for p in (root / SNAPSHOTS).iterdir())
    result = cli("gc", root, "--keep", "1")
    assert result.exit_code == 2 and "nothing was deleted" in result.output
    assert sorted(p.name for p in (root / SNAPSHOTS).iterdir()) == snapshots


def test_gc_removes_a_symlinked_snapshot_without_following_it(cli, roots):
    root, outside = roots
    link = root / SNAPSHOTS / "20000101T000000.000000Z-link00"
    link.symlink_to(outside / SNAPSHOTS / current_id(outside), target_is_directory=True)
    before = _tree(outside)
    assert cli("gc", root, "--keep", "1").exit_code == 0
    assert not link.is_symlink() and _tree(outside) == before


# -- hostile models ----------------------------------------------------------------------------
def test_a_pickle_only_model_is_refused_naming_safetensors(tiny_bert, tmp_path):
    model = shutil.copytree(tiny_bert, tmp_path / "pickled")
    for weights in model.glob("*.safetensors"):
        weights.rename(model / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors") as err:
        check_model_dir(model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_asking_for_remote_code_is_refused(tiny_bert, tmp_path, where):
    model = shutil.copytree(tiny_bert, tmp_path / "remote")
    config = json.loads((model / where).read_text()) if (model / where).exists() else {}
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (model / where).write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError, match="remote code"):
        check_model_dir(model)


def test_one_changed_weight_byte_changes_the_fingerprint(tiny_bert, tmp_path):
    model = shutil.copytree(tiny_bert, tmp_path / "flipped")
    weights = next(model.glob("*.safetensors"))
    settings = {"task": "embed", "dtype": "fp32"}
    before, stat = fingerprint(model, settings), weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x01  # tensor data, past the header
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: like `cp -p`
    assert fingerprint(model, settings) != before


@pytest.mark.parametrize(
    ("stats", "words"),
    [
        ({"lines_read": 0, "accepted": 5, "rejected": 0, "rejected_by_reason": {}}, "lines_read 0 != accepted 5"),
        ({"lines_read": 5, "accepted": 4, "rejected": 1, "rejected_by_reason": {}}, "rejected 1 != 0, the sum"),
        ({"lines_read": 1, "accepted": 2, "rejected": -1, "rejected_by_reason": {}}, "rejected is -1, not a count"),
        ({"lines_read": "7", "accepted": 7, "rejected": 0, "rejected_by_reason": {}}, "lines_read is '7'"),
    ],
)
def test_a_manifest_whose_statistics_do_not_add_up_fails_verify(cli, roots, stats, words):
    root, _ = roots
    directory = root / SNAPSHOTS / current_id(root)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps(manifest | {"stats": stats}))
    with pytest.raises(SnapshotError, match=words):
        verify_snapshot(directory)
    result = cli("verify", root)
    assert result.exit_code == 1 and f"FAILED stats: {words}" in result.output
    with Snapshot.open(root) as snap:  # services keep serving its answers: the counts are not the data
        assert len(snap) == len(_vectors())
