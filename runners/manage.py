"""Snapshot commands: inspect, lookup, verify, list, rollback, gc. Thin wrappers over ``store``."""

from __future__ import annotations

import sys

import click

from querycache.runners import human, views
from querycache.runners.common import UserError, echo_json, passed_on
from querycache.store import Snapshot, SnapshotError, current_id, fs, gc, list_snapshots, normalize, remote, rollback
from querycache.store.format import check_files, read_manifest, stats_problems
from querycache.store.publish import resolve


def filesystem_options(command):
    """Accept Beam's filesystem flags after ``--`` (``-- --s3_endpoint_url=...``), for the store's fs seam."""

    def configure(ctx, param, value):
        ctx.meta["fs_options"] = list(value)
        fs.configure(list(value))
        return value

    passed = passed_on(
        "fs_options", to="the filesystem", hint="one root or snapshot per command", then=configure, expose_value=False
    )
    return passed(command)


def _snapshot(path: str) -> tuple[str, dict]:
    """Directory and manifest of ROOT (through CURRENT) or of a snapshot directory, on any filesystem."""
    try:
        if fs.is_remote(path):
            directory = remote.resolve(path)
            return directory, remote.read_manifest(directory)
        directory = resolve(path)
        return str(directory), read_manifest(directory)
    except SnapshotError as err:
        raise UserError(str(err)) from None


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@filesystem_options
def inspect(path: str, as_json: bool) -> None:
    """Show a snapshot's manifest and statistics.

    \b
    Example:
      querycache inspect /data/qc
    """
    _, manifest = _snapshot(path)
    if as_json:
        echo_json(manifest)
        return
    click.echo(views.inspect(manifest, current=_is_current(path, manifest["snapshot_id"])))


def _is_current(path: str, snapshot_id: str) -> bool | None:
    try:
        return (remote.current_id if fs.is_remote(path) else current_id)(path) == snapshot_id
    except (SnapshotError, OSError):
        return None


@click.command()
@click.argument("path", type=click.Path())
@click.argument("queries", nargs=-1, required=True)
@click.option(
    "--json/--text",
    "as_json",
    default=None,
    help='One JSON object per query: {"query", "key", "hit", "result"} (the default when stdout is not a terminal),'
    " or a line per query for people (the default on a terminal).",
)
def lookup(path: str, queries: tuple[str, ...], as_json: bool | None) -> None:
    """Look queries up: hit or miss, the key each normalised to, and a compact result.

    On a terminal each query gets a line for people; piped, each gets the JSON object scripts read.

    \b
    Example:
      querycache lookup /data/qc "Cheap Flights to Paris" "weather berlin"
      querycache lookup /data/qc "weather berlin" --json
    """
    if fs.is_remote(path):
        raise UserError(f"lookup memory-maps local files: `querycache pull {path} LOCAL_DIR` first, then look up there")
    try:
        snap = Snapshot.open(path)
    except SnapshotError as err:
        raise UserError(str(err)) from None
    if as_json is None:
        as_json = not sys.stdout.isatty()
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
@filesystem_options
def verify(path: str, as_json: bool) -> None:
    """Check the manifest and every file's sha256; exit 1 naming what failed.

    \b
    Example:
      querycache verify /data/qc && echo intact
    """
    try:
        if fs.is_remote(path):
            directory = remote.resolve(path)
            manifest = remote.read_manifest(directory)
            problems = remote.check_files(directory, manifest, checksums=True)
        else:
            directory = resolve(path)
            manifest = read_manifest(directory)
            problems = check_files(directory, manifest, checksums=True)
        problems = stats_problems(manifest) + problems
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
@filesystem_options
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
@filesystem_options
def rollback_(root: str, snapshot_id: str | None, as_json: bool) -> None:
    """Point CURRENT at SNAPSHOT_ID, or at the snapshot before the current one.

    \b
    Example:
      querycache rollback /data/qc
    """
    if snapshot_id and snapshot_id.startswith("--"):  # `rollback ROOT -- --s3_...`: no id, only options
        fs.configure([snapshot_id, *click.get_current_context().meta.get("fs_options", [])])
        snapshot_id = None
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
@filesystem_options
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
    if not deleted:
        click.echo(f"no snapshot to delete: {keep} or fewer")


@click.command("pull")
@click.argument("source_root")
@click.argument("local_root", type=click.Path(file_okay=False))
@click.option("--keep", type=click.IntRange(1), help="Afterwards, gc the local root down to N snapshots.")
@click.option("--watch", "every", type=click.FloatRange(0.1), help="Keep polling every SECONDS; pull each new one.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pull on stdout.")
@filesystem_options
def pull_(source_root: str, local_root: str, keep: int | None, every: float | None, as_json: bool) -> None:
    """Copy the current snapshot of SOURCE_ROOT (any filesystem) to LOCAL_ROOT, verified, published atomically.

    \b
    Example:
      querycache pull s3://bucket/qc /srv/qc --keep 2 -- --s3_region_name=eu-west-1
      querycache pull s3://bucket/qc /srv/qc --watch 60     # a sidecar; ReadThroughCache hot-reloads
    """
    from querycache.store.pull import pull, watch

    def report(result) -> None:
        if as_json:
            echo_json(result._asdict() | {"seconds": round(result.seconds, 3)})
        elif result.pulled:
            size, took = human.size(result.bytes), human.seconds(result.seconds)
            click.echo(f"pulled {result.snapshot_id}: {size} in {took}, verified -> {local_root}")
        else:
            click.echo(f"{result.snapshot_id} is already current in {local_root}")

    if every is not None:
        try:
            watch(source_root, local_root, every, keep, on_pull=report)
        except KeyboardInterrupt:
            return
    try:
        report(pull(source_root, local_root, keep))
    except SnapshotError as err:
        raise UserError(str(err)) from None
