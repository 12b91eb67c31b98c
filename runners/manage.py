"""Snapshot commands: inspect, lookup, verify, list, rollback, gc. Thin wrappers over ``store``."""

from __future__ import annotations

import json
import sys

import click

from runners.common import UserError, echo_json
from store import Snapshot, SnapshotError, gc, list_snapshots, normalize, rollback
from store.format import read_manifest, verify_snapshot
from store.publish import resolve


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Show a snapshot's manifest and statistics.

    \b
    Example:
      querycache inspect /data/qc
    """
    manifest = _manifest(path)
    if as_json:
        echo_json(manifest)
        return
    model = manifest["model"]
    lines = {
        "snapshot": f"{manifest['snapshot_id']} (created {manifest['created']})",
        "task": f"{manifest['task']}, result {json.dumps(manifest['result'])}",
        "model": f"{model['fingerprint']} {model.get('architecture', '')} {model.get('dtype', '')}",
        "model dir": model.get("model_dir"),
        "key function": f"{manifest['key_function']['name']} v{manifest['key_function']['version']}",
        "rows": f"{manifest['rows']} in {manifest['lmdb']['shards']} shard(s)",
        "selection": manifest.get("selection") and json.dumps(manifest["selection"]),
        **{name.replace("_", " "): json.dumps(value) for name, value in manifest.get("stats", {}).items()},
        "fidelity": manifest.get("fidelity") and json.dumps(manifest["fidelity"]),
    }
    click.echo("\n".join(f"{name:<20} {value}" for name, value in lines.items() if value is not None))


def _manifest(path: str) -> dict:
    try:
        return read_manifest(resolve(path))
    except SnapshotError as err:
        raise UserError(str(err)) from None


@click.command()
@click.argument("path", type=click.Path())
@click.argument("queries", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry: the output is always JSON lines.")
def lookup(path: str, queries: tuple[str, ...], as_json: bool) -> None:
    """Look queries up; print one JSON object per query.

    \b
    Example:
      querycache lookup /data/qc "Cheap Flights to Paris" "weather berlin"
    """
    try:
        snap = Snapshot.open(path)
    except SnapshotError as err:
        raise UserError(str(err)) from None
    with snap:
        for query in queries:
            result = snap.get(query)
            echo_json({"query": query, "key": normalize(query), "hit": result is not None, "result": result})


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def verify(path: str, as_json: bool) -> None:
    """Check the manifest and every file's sha256; exit 1 naming what failed.

    \b
    Example:
      querycache verify /data/qc && echo intact
    """
    try:
        directory, problems = resolve(path), []
        verify_snapshot(directory)
    except SnapshotError as err:
        problems, directory = [str(err)], path
    if as_json:
        echo_json({"snapshot": str(directory), "ok": not problems, "problems": problems})
    else:
        for problem in problems:
            click.echo(f"FAILED {problem}", err=True)
        if not problems:
            click.echo(f"OK {directory}")
    if problems:
        sys.exit(1)


@click.command("list")
@click.argument("root", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def list_(root: str, as_json: bool) -> None:
    """List the snapshots of a root, oldest first; * marks the current one.

    \b
    Example:
      querycache list /data/qc
    """
    try:
        snapshots = list_snapshots(root)
    except SnapshotError as err:
        raise UserError(str(err)) from None
    if as_json:
        echo_json(snapshots)
        return
    for s in snapshots:
        mark = "*" if s["current"] else " "
        detail = f"{s['rows']:>9} rows  {s['task']:<9} {s['fingerprint'][:12]}" if s["ok"] else s["error"]
        click.echo(f"{mark} {s['id']}  {detail}")


@click.command("rollback")
@click.argument("root", type=click.Path())
@click.argument("snapshot_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def rollback_(root: str, snapshot_id: str | None, as_json: bool) -> None:
    """Point CURRENT at SNAPSHOT_ID, or at the snapshot before the current one.

    \b
    Example:
      querycache rollback /data/qc
    """
    try:
        current = rollback(root, snapshot_id)
    except SnapshotError as err:
        raise UserError(str(err)) from None
    if as_json:
        echo_json({"current": current})
    else:
        click.echo(f"CURRENT -> {current}")


@click.command("gc")
@click.argument("root", type=click.Path())
@click.option("--keep", required=True, type=click.IntRange(1), help="Snapshots to keep, the current one included.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def gc_(root: str, keep: int, as_json: bool) -> None:
    """Delete old snapshots, keeping the current one and the newest others.

    \b
    Example:
      querycache gc /data/qc --keep 3
    """
    try:
        deleted = gc(root, keep)
    except SnapshotError as err:
        raise UserError(f"{err}; nothing was deleted") from None
    if as_json:
        echo_json({"deleted": deleted})
        return
    for snapshot_id in deleted:
        click.echo(f"deleted {snapshot_id}")
