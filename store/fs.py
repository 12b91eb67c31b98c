"""The object-storage seam: one set of flags reaches files on local disk, S3, GCS and HDFS.

    fs.configure(["--s3_endpoint_url=http://127.0.0.1:9000", "--s3_region_name=us-east-1"])
    fs.read_bytes("s3://bucket/qc/CURRENT")

The flags are Beam's own filesystem options, so the list that follows ``--`` on the command line
configures both sides: pipelines hand it to Beam's ``FileSystems`` (through ``PipelineOptions``),
and ``store`` (a service's ``pull``, the snapshot commands) hands it to ``pyarrow.fs`` here. Without
flags, the usual environment variables (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``) apply.
Only ``CURRENT`` needs more than plain files: :func:`swap` is a compare-and-swap where the store
has conditional writes (S3 ``If-Match``/``If-None-Match``, through boto3 when it is installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import IO, NamedTuple

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3://", "gs://", "hdfs://")
_FLAGS = (
    "s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key", "s3_session_token", "s3_region_name",
    "s3_verify", "s3_disable_ssl", "project",
)  # fmt: skip
_options: dict[str, str] = {}
_cache: dict[str, pafs.FileSystem] = {}


class ConflictError(Exception):
    """A conditional write lost: the object changed since it was read."""


class Versioned(NamedTuple):
    """An object's content and the token a conditional write compares against (None: absent)."""

    data: bytes | None
    token: str | None


def configure(argv: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Take Beam's filesystem flags (``--s3_endpoint_url=URL`` or ``--s3_endpoint_url URL``) from ``argv``."""
    found: dict[str, str] = {}
    args = list(argv)
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("--") and name in _FLAGS:
            found[name] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    _options.clear()
    _options.update(found)
    _cache.clear()
    return dict(found)


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store and HDFS paths; local paths (and ``file://``) are not remote."""
    return str(path).startswith(REMOTE_SCHEMES)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` with forward slashes for remote paths, ``os.path.join`` for local ones."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    scheme = path.split("://", 1)[0] if "://" in path else "file"
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))
    inner = path.split("://", 1)[1]
    if scheme not in _cache:
        _cache[scheme] = _make(scheme, path)
    return _cache[scheme], inner


def _make(scheme: str, path: str) -> pafs.FileSystem:
    if scheme == "s3":
        o = _options
        endpoint = o.get("s3_endpoint_url")
        kwargs = {
            "access_key": o.get("s3_access_key_id"), "secret_key": o.get("s3_secret_access_key"),
            "session_token": o.get("s3_session_token"), "region": o.get("s3_region_name"),
            "endpoint_override": endpoint, "scheme": endpoint.split("://")[0] if "://" in (endpoint or "") else None,
        }  # fmt: skip
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v})
    if scheme == "gs":
        project = _options.get("project")
        return pafs.GcsFileSystem(project_id=project) if project else pafs.GcsFileSystem()
    return pafs.FileSystem.from_uri(path)[0]


def size(path: str) -> int | None:
    """Size of a file in bytes, or None when there is none."""
    fs, inner = _filesystem(str(path))
    info = fs.get_file_info(inner)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(path: str) -> bytes:
    """Whole content of a (small) file; FileNotFoundError when absent."""
    if size(path) is None:
        raise FileNotFoundError(path)
    fs, inner = _filesystem(str(path))
    with fs.open_input_stream(inner) as fh:
        return fh.read()


def write_bytes(path: str, data: bytes) -> None:
    """Create or replace a file (one PUT on object stores: readers see the old object or the new one)."""
    fs, inner = _filesystem(str(path))
    if not is_remote(path):
        fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as fh:
        fh.write(data)


def open_input(path: str) -> IO[bytes]:
    fs, inner = _filesystem(str(path))
    return fs.open_input_stream(inner)


def list_dir(path: str) -> list[str]:
    """Names directly under a directory (or prefix); empty when there is none."""
    fs, inner = _filesystem(str(path))
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(info.base_name for info in infos)


def walk_files(path: str) -> Iterator[tuple[str, int]]:
    """``(relative path, size)`` of every file under a directory."""
    fs, inner = _filesystem(str(path))
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            yield info.path[len(inner.rstrip("/")) + 1 :], info.size


def delete_dir(path: str) -> None:
    """Delete a directory (a prefix on object stores) and everything under it."""
    fs, inner = _filesystem(str(path))
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(inner)


def copy_verified(source: str, target: str, sha256: str, nbytes: int) -> None:
    """Stream ``source`` to the local file ``target``, hashing as it goes; ValueError names a mismatch."""
    digest, seen = hashlib.sha256(), 0
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open_input(source) as src, open(target, "wb") as dst:
        while block := src.read(1 << 22):
            digest.update(block)
            dst.write(block)
            seen += len(block)
        dst.flush()
        os.fsync(dst.fileno())
    if seen != nbytes or digest.hexdigest() != sha256:
        what = f"{seen} bytes, manifest says {nbytes}" if seen != nbytes else "sha256 mismatch"
        raise ValueError(f"{source}: {what}")


# -- compare-and-swap of small objects (CURRENT) --------------------------------------------------
def _s3_client():
    import boto3  # optional: installed with apache-beam[aws]

    o = _options
    kwargs = {
        "endpoint_url": o.get("s3_endpoint_url"), "aws_access_key_id": o.get("s3_access_key_id"),
        "aws_secret_access_key": o.get("s3_secret_access_key"), "aws_session_token": o.get("s3_session_token"),
        "region_name": o.get("s3_region_name"),
    }  # fmt: skip
    return boto3.client("s3", **{k: v for k, v in kwargs.items() if v})


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.removeprefix("s3://").partition("/")
    return bucket, key


def _has_boto3() -> bool:
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return True


def read_versioned(path: str) -> Versioned:
    """Content and version token of a small object; on stores without conditional writes the token is the content."""
    if str(path).startswith("s3://") and _has_boto3():
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(path)
        try:
            reply = _s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return Versioned(None, None)
            raise
        return Versioned(reply["Body"].read(), reply["ETag"])
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        return Versioned(None, None)
    return Versioned(data, hashlib.sha256(data).hexdigest())


def swap(path: str, data: bytes, expected: Versioned) -> None:
    """Replace ``path`` by ``data`` only if it is still what ``expected`` read; ConflictError otherwise.

    S3: one conditional PUT (``If-Match`` on the ETag, ``If-None-Match: *`` when it was absent), atomic
    on the server. Elsewhere (GCS and HDFS through pyarrow): read again, compare and write, which
    narrows the race to the gap between those two calls but cannot close it.
    """
    if str(path).startswith("s3://") and _has_boto3():
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(path)
        condition = {"IfMatch": expected.token} if expected.token else {"IfNoneMatch": "*"}
        try:
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise ConflictError(path) from None
            raise
        return
    if read_versioned(path).token != expected.token:
        raise ConflictError(path)
    write_bytes(path, data)
