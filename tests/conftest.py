"""Shared fixtures: the tiny BERT (built once per session), a CLI runner, an S3 API server (moto) on loopback."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import settings

settings.register_profile("querycache", deadline=None)  # a busy 2-core CI machine must not fail on timing
settings.load_profile("querycache")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("apache_beam").setLevel(logging.ERROR)

from querycache.store import fs as store_fs  # noqa: E402
from tests.tiny_bert import build_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A BERT with hidden size 32 and trained masked-LM and classification heads."""
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def cli():
    """Run ``querycache`` in-process: ``cli("build", "--logs", ...)`` -> click Result."""
    from querycache.runners.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), "utf-8")
    return path


def build_args(logs, out, model, *extra) -> list[str]:
    """Arguments of a small, deterministic build on the tiny BERT (fp32, in-process runner)."""
    logs = logs if isinstance(logs, list | tuple) else [logs]
    args = ["build", *[x for log in logs for x in ("--logs", log)], "--out", out, "--model", model]
    return [*args, "--dtype", "fp32", "--json", "--quiet", *extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on loopback: ``{"options": [...Beam flags...], "bucket": "s3://qc-test"}``."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port(port, server)
        endpoint = f"http://127.0.0.1:{port}"
        options = [
            f"--s3_endpoint_url={endpoint}",
            "--s3_access_key_id=testing",
            "--s3_secret_access_key=testing",
            "--s3_region_name=us-east-1",
        ]
        use_s3(options)
        store_fs._s3_client().create_bucket(Bucket="qc-test")
        yield {"options": options, "bucket": "s3://qc-test", "endpoint": endpoint}
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def use_s3(options: list[str]) -> None:
    """Point this process's store seam and Beam's FileSystems at the test server (commands reset them)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    store_fs.configure(options)
    FileSystems.set_options(PipelineOptions(options))
