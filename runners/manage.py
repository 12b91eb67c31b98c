"""Snapshot commands: inspect, lookup, verify, list, rollback, gc. Thin wrappers over ``store``."""

from __future__ import annotations

import sys

import click

from runners import views
from runners.common import UserError, echo_json
from store import Snapshot, SnapshotError, current_id, gc, list_snapshots, normalize, rollback
from store.format import check_files, read_manifest
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
    click.echo(views.inspect(manifest, current=_is_current(path, manifest["snapshot_id"])))


def _is_current(path: str, snapshot_id: str) -> bool | None:
    try:
        return current_id(path) == snapshot_id
    except (SnapshotError, OSError):
        return None


def _manifest(path: str) -> dict:
    try:
        return read_manifest(resolve(path))
    except SnapshotError as err:
        raise UserError(str(err)) from None


@click.command()
@click.argument("path", type=click.Path())
@click.argument("queries", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help='One JSON object per query: {"query", "key", "hit", "result"}.')
def lookup(path: str, queries: tuple[str, ...], as_json: bool) -> None:
    """Look queries up: hit or miss, the key each normalised to, and a compact result.

    \b
    Example:
      querycache lookup /data/qc "Cheap Flights to Paris" "weather berlin"
      querycache lookup /data/qc "weather berlin" --json
    """
    try:
        snap = Snapshot.open(path)
    except SnapshotError as err:
        raise UserError(str(err)) from None
    with snap:
        for query in queries:
            result = snap.get(query)
            key = normalize(query)
            if as_json:
                echo_json({"query": query, "key": key, "hit": result is not None, "result": result})
            else:
                click.echo(views.lookup_line(query, key, result))


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
        directory = resolve(path)
        problems = check_files(directory, read_manifest(directory), checksums=True)
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
    snapshots = list_snapshots(root)
    if as_json:
        echo_json(snapshots)
        return
    click.echo(views.snapshot_table(snapshots))


def _snapshot_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a snapshot id: the published snapshots of the ROOT already typed."""
    try:
        return [s["id"] for s in list_snapshots(ctx.params["root"]) if s["id"].startswith(incomplete)]
    except (KeyError, OSError, SnapshotError):
        return []


@click.command("rollback")
@click.argument("root", type=click.Path())
@click.argument("snapshot_id", required=False, shell_complete=_snapshot_ids)
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
    deleted = gc(root, keep)
    if as_json:
        echo_json({"deleted": deleted})
        return
    for snapshot_id in deleted:
        click.echo(f"deleted {snapshot_id}")
    if not deleted:
        click.echo(f"nothing to delete: {keep} or fewer snapshots")
