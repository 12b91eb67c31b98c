"""Shared fixtures: the tiny BERT (built once per session) and a CLI runner."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import settings

settings.register_profile("querycache", deadline=None)  # a busy 2-core CI machine must not fail on timing
settings.load_profile("querycache")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("apache_beam").setLevel(logging.ERROR)

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
