"""``querycache``: build, inspect, look up and manage snapshots. Thin commands over the library."""

from __future__ import annotations

import atexit
import sys
import threading
from pathlib import Path
from typing import Any

import click

from querycache.runners import finetune, manage, replay, serve, views
from querycache.runners.common import (
    GLOB_HINT,
    UserError,
    echo_json,
    environment_error,
    passed_on,
    print_version,
    require_pipelines,
    setup_logging,
)
from querycache.runners.inputs import check_inputs, head_selection, input_options, log_fields
from querycache.runners.progress import progress_display
from querycache.store import SnapshotError
from querycache.transforms.process_exit import exit_now


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Versions of querycache, Beam, torch, transformers and the key function.",
)
def main() -> None:
    """Precompute BERT answers for the head of your query logs and serve them from disk.

    \b
    Example:
      querycache build --logs 'examples/logs/*.jsonl' --out /tmp/qc
      querycache lookup /tmp/qc "cheap flights to paris"

    \b
    Shell completion (bash; zsh_source and fish_source for the others):
      eval "$(_QUERYCACHE_COMPLETE=bash_source querycache)"
    """


@main.command(context_settings={"ignore_unknown_options": False})
@input_options
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Snapshot root (CURRENT and snapshots/ live here)."
)
@click.option(
    "--model", help="Model directory, local or on any Beam filesystem (default: the shipped all-MiniLM-L6-v2)."
)
@click.option("--task", type=click.Choice(["embed", "fill-mask", "classify"]), default="embed", show_default=True)
@click.option(
    "--template", default="{query} [MASK]", show_default=True, help="Fill-mask input; [MASK] is the model's mask token."
)
@click.option(
    "--fill-top-k", default=5, show_default=True, type=click.IntRange(1, 1000), help="Fill-mask predictions per mask."
)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "cls", "max"]),
    help="Embedding pooling (default: the model's own, else mean).",
)
@click.option(
    "--normalize/--no-normalize",
    "normalize_embeddings",
    default=None,
    help="L2-normalise embeddings (default: the model's own).",
)
@click.option("--max-length", type=click.IntRange(2), help="Token limit per query (default: the model's).")
@click.option(
    "--token-budget", type=click.IntRange(16), help="Padded tokens per batch (default: 1024 on CPU, 16384 on GPU)."
)
@click.option(
    "--streams",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="CPU batches in flight per worker process, one torch thread each (0: one per core; 1 with multiprocess).",
)
@click.option("--store-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option(
    "--shards",
    type=click.IntRange(1),
    help="LMDB/Parquet shards, written in parallel (default: about 128 MiB of values per shard, at least 1).",
)
@click.option(
    "--reuse",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="Copy results of the current snapshot of the same model version.",
)
@click.option("--fidelity-sample", default=256, show_default=True, type=click.IntRange(0))
@click.option("--min-cosine", default=0.999, show_default=True, help="Fidelity gate for embeddings.")
@click.option("--min-agreement", default=0.99, show_default=True, help="Fidelity gate for fill-mask top-1.")
@click.option("--max-prob-diff", default=0.01, show_default=True, help="Fidelity gate for classification.")
@click.option(
    "--runner",
    default="direct",
    show_default=True,
    help="direct, multiprocess, portable, flink, spark, dataflow, or a Beam runner. On 2 cores multiprocess is faster "
    "from ~10M lines (README, Runners).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@passed_on("beam_options", to="Beam", hint=GLOB_HINT)
def build(**kw: Any) -> None:
    """Build a snapshot from query logs and publish it.

    \b
    Example:
      querycache build --logs 'logs/2026-11-*.jsonl.gz' --out /data/qc --top-k 100000
      querycache build --logs q.csv --query-field q --out /data/qc --runner multiprocess -- --direct_num_workers=4
    """
    require_pipelines("build")
    setup_logging(kw["quiet"])
    picked = check_inputs(kw)
    from querycache.runners.presets import beam_args, in_process, prestart_workers

    args = beam_args(kw["runner"], list(kw["beam_options"]), kw["quiet"])
    prestart_workers(args, "querycache.pipelines.build")
    from querycache.inference.model import ModelError
    from querycache.pipelines.build import build as run_build
    from querycache.pipelines.checks import BuildError

    options = _build_options(kw, picked)
    try:
        with progress_display(kw["quiet"], live=in_process(args)):
            summary = run_build(options, args)
    except (BuildError, ModelError, SnapshotError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise environment_error(err) from None
    if kw["as_json"]:
        echo_json(summary)
    else:
        click.echo(views.build_summary(summary, _published_manifest(kw["out"], summary["snapshot_id"])))


def _published_manifest(root: str, snapshot_id: str) -> dict | None:
    """The manifest the summary came from, for the words of the head selection (None where unreadable)."""
    from querycache.store.format import read_manifest
    from querycache.store.publish import SNAPSHOTS

    try:
        return read_manifest(Path(root) / SNAPSHOTS / snapshot_id)
    except (SnapshotError, OSError):
        return None


def _build_options(kw: dict, picked: list[str]):
    """Map the command line onto BuildOptions (imports deferred: `querycache lookup` needs no torch)."""
    from querycache.inference.engine import EngineConfig
    from querycache.pipelines.build import BuildOptions

    return BuildOptions(
        logs=tuple(kw["logs"]),
        out=kw["out"],
        engine=EngineConfig(
            model_dir=kw["model"],
            task=kw["task"],
            dtype=kw["dtype"],
            device=kw["device"],
            pooling=kw["pooling"],
            normalize=kw["normalize_embeddings"],
            max_length=kw["max_length"],
            template=kw["template"],
            top_k=kw["fill_top_k"],
            token_budget=kw["token_budget"],
            streams=kw["streams"] or (1 if kw["runner"] == "multiprocess" else 0),
        ),
        fields=log_fields(kw),
        selection=head_selection(kw, picked),
        min_users=kw["min_users"],
        scrub_pii=kw["scrub_pii"],
        max_query_chars=kw["max_query_chars"],
        shards=kw["shards"],
        reuse=kw["reuse"] == "auto",
        store_dtype=kw["store_dtype"],
        fidelity_sample=kw["fidelity_sample"],
        min_cosine=kw["min_cosine"],
        min_agreement=kw["min_agreement"],
        max_prob_diff=kw["max_prob_diff"],
    )


@main.command("model-info")
@click.argument("model_dir", type=click.Path(), required=False)
@click.option("--json", "as_json", is_flag=True)
def model_info(model_dir: str | None, as_json: bool) -> None:
    """Which tasks a model directory supports, its heads, pooling and fingerprints.

    \b
    Example:
      querycache model-info ./models/my-bert
    """
    require_pipelines("model-info")
    setup_logging(True)
    from querycache.inference.engine import describe_model
    from querycache.inference.model import ModelError

    try:
        info = describe_model(model_dir)
    except ModelError as err:
        raise UserError(str(err)) from None
    if as_json:
        echo_json(info)
        return
    click.echo(views.model_info(info))


for command in (
    manage.inspect, manage.lookup, manage.verify, manage.list_, manage.rollback_, manage.gc_, manage.pull_,
    finetune.finetune, replay.replay, serve.serve,
):  # fmt: skip
    main.add_command(command)


def entry() -> None:
    """The ``querycache`` command: :func:`main`, then an exit without the interpreter's teardown.

    The exit does what a normal one does for the outside world (waits for threads, runs exit
    handlers, flushes logs and output) and ends the process with the command's status, without the
    ~1.1 s teardown of torch, transformers and Beam (:mod:`transforms.process_exit`). An exception
    other than an exit propagates as usual.
    """
    try:
        main(prog_name="querycache")
        code = 0
    except SystemExit as done:
        code = done.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # noqa: SLF001 - what Py_Finalize does first: join non-daemon threads
    atexit._run_exitfuncs()  # noqa: SLF001
    exit_now(code or 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
