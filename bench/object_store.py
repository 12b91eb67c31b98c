"""Write, commit, publish and pull a 200k-row snapshot to a local root and to an S3 API server (moto).

    python bench/object_store.py --rows 200000 --dim 384

Measures the parts of a build that object storage changes, with the build's own code: shard files
written by ``store.writer.write_shard`` in a local temp directory, uploaded with hashing by
``transforms.write_snapshot.upload`` to attempt paths, committed (``commit``: one attempt per shard
moved into place, manifest last), published (``os.replace`` locally; conditional PUT on S3), and
pulled back to a local root by ``store.pull``. Inference and the input half are not part of it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _moto() -> tuple[subprocess.Popen, list[str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    options = [f"--s3_endpoint_url=http://127.0.0.1:{port}", "--s3_access_key_id=k", "--s3_secret_access_key=s"]
    return server, [*options, "--s3_region_name=us-east-1"]


def _rows(n: int, dim: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return [(f"query number {i}", n - i, None, i + 1, vectors[i].tobytes()) for i in range(n)]


def _one(root: str, shards_rows: list[list], schema: dict, work: Path) -> dict:
    from querycache.store import fs, remote
    from querycache.store.format import new_manifest
    from querycache.store.publish import current_id, new_snapshot_id, new_staging, publish
    from querycache.store.pull import pull
    from querycache.store.writer import write_shard
    from querycache.transforms.write_snapshot import ATTEMPTS, ShardWrite, commit, upload

    figures: dict = {}
    snapshot_id = new_snapshot_id()
    directory = fs.join(root, "snapshots", snapshot_id) if fs.is_remote(root) else str(new_staging(root, snapshot_id))
    expected = remote.current(root) if fs.is_remote(root) else current_id(root)
    start = time.perf_counter()
    writes = []
    for index, rows in enumerate(shards_rows):
        local = work / f"shard-{index}-{snapshot_id}"
        info = write_shard(local, index, len(shards_rows), list(rows), schema, checksums=False)
        attempt = fs.join(directory, ATTEMPTS, f"{index:05d}-bench")
        files = {rel: upload(str(local / rel), fs.join(attempt, rel)) for rel in info["files"]}
        writes.append(ShardWrite(index, attempt, info["rows"], files))
    figures["write_and_upload_s"] = time.perf_counter() - start
    start = time.perf_counter()
    manifest = commit(directory, new_manifest(snapshot_id, "embed", schema, {"fingerprint": "f" * 64}), writes, {})
    figures["commit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if fs.is_remote(root):
        remote.publish(root, snapshot_id, expected)
    else:
        publish(root, directory, expected)
    figures["publish_s"] = time.perf_counter() - start
    figures["bytes"] = sum(meta["bytes"] for meta in manifest["files"].values())
    result = pull(root, str(work / f"pulled-{snapshot_id}"))
    figures["pull_s"] = result.seconds
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=0, help="0: the build's default sizing")
    args = parser.parse_args(argv)
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from querycache.store import fs
    from querycache.transforms.write_snapshot import shards_for

    schema = {"encoding": "float32", "dim": args.dim}
    shards = args.shards or shards_for(args.rows, schema)
    rows = _rows(args.rows, args.dim)
    from querycache.store.format import shard_of
    from querycache.store.keys import key_bytes

    by_shard: list[list] = [[] for _ in range(shards)]
    for row in rows:
        by_shard[shard_of(key_bytes(row[0]), shards)].append(row)
    server, options = _moto()
    try:
        fs.configure(options)
        FileSystems.set_options(PipelineOptions(options))
        fs._s3_client().create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            local = _one(str(work / "root"), by_shard, schema, work)
            s3 = _one("s3://bench/root", by_shard, schema, work)
    finally:
        server.terminate()
    print(f"{args.rows} rows of {args.dim} float32 in {shards} shards (2-core machine, shared; moto on loopback)")
    print(f"{'':24}{'local root':>12}{'S3 (moto)':>12}{'ratio':>8}")
    for name in ("write_and_upload_s", "commit_s", "publish_s", "pull_s", "bytes"):
        a, b = local[name], s3[name]
        print(f"{name:24}{a:>12.2f}{b:>12.2f}{b / a if a else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
