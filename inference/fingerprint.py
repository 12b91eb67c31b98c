"""Model fingerprints: a digest of every file that shapes an answer and every answer-changing setting.

Two builds with the same fingerprint give interchangeable answers. Contents are hashed, never
paths or timestamps; documentation files and non-safetensors weights are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ENGINE_VERSION = 1  # bump when querycache's own pre- or post-processing changes an answer
_IGNORED_NAMES = ("finetune.json",)  # training report: no answer depends on it
_IGNORED_SUFFIXES = (".md", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".ckpt")
_file_digests: dict[tuple[str, int, int, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    # ctime too: a rewrite that keeps size and mtime (cp -p, os.utime) still changes the inode's ctime.
    cache_key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if cache_key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _file_digests[cache_key] = digest.hexdigest()
    return _file_digests[cache_key]


def model_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file in the model directory that can change an answer, by relative path."""
    root = Path(model_dir)
    return {
        path.relative_to(root).as_posix(): _file_digest(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and not path.name.startswith(".")
        and path.name not in _IGNORED_NAMES
        and not path.name.lower().endswith(_IGNORED_SUFFIXES)
    }


def fingerprint(model_dir: str | os.PathLike, settings: dict) -> str:
    """Hex digest over the model files and the resolved, answer-changing ``settings``."""
    payload = {"engine_version": ENGINE_VERSION, "files": model_files(model_dir), "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
