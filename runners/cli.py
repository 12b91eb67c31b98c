"""``querycache``: build, inspect, look up and manage snapshots. Thin commands over the library."""

from __future__ import annotations

from typing import Any

import click

from runners import manage, replay
from runners.common import UserError, echo_json, setup_logging
from runners.inputs import log_fields, log_input_options
from store import SnapshotError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Precompute BERT answers for the head of your query logs and serve them from disk.

    \b
    Example:
      querycache build --logs 'examples/logs/*.jsonl' --out /tmp/qc
      querycache lookup /tmp/qc "cheap flights to paris"
    """


def _fraction(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"{value} is outside (0, 1]; for example --coverage 0.8")
    return value


@main.command(context_settings={"ignore_unknown_options": False})
@log_input_options
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
@click.option("--top-k", type=click.IntRange(1), help="Keep the K most frequent queries.")
@click.option("--min-count", type=click.IntRange(1), help="Keep queries seen at least N times (default 1).")
@click.option(
    "--coverage", type=float, callback=_fraction, help="Keep the fewest queries covering this fraction of traffic."
)
@click.option("--min-users", type=click.IntRange(1), help="Keep queries issued by at least K distinct users.")
@click.option(
    "--scrub-pii/--no-scrub-pii",
    default=True,
    show_default=True,
    help="Drop queries with e-mails, phones, cards, IPs, long digit runs.",
)
@click.option("--max-query-chars", default=512, show_default=True, type=click.IntRange(1))
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default="auto", show_default=True)
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
    help="direct, multiprocess, portable, flink, spark, dataflow, or a Beam runner.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.argument("beam_options", nargs=-1, type=click.UNPROCESSED)
def build(**kw: Any) -> None:
    """Build a snapshot from query logs and publish it.

    \b
    Example:
      querycache build --logs 'logs/2026-11-*.jsonl.gz' --out /data/qc --top-k 100000
      querycache build --logs q.csv --query-field q --out /data/qc --runner multiprocess -- --direct_num_workers=4
    """
    setup_logging(kw["quiet"])
    picked = [name for name in ("top_k", "min_count", "coverage") if kw[name] is not None]
    if len(picked) > 1:
        raise UserError(
            "choose one of --top-k, --min-count, --coverage (got "
            + ", ".join("--" + p.replace("_", "-") for p in picked)
            + ")"
        )
    if kw["min_users"] and not kw["user_field"]:
        raise UserError("--min-users needs --user-field, the field that identifies users")
    from inference.model import ModelError
    from pipelines.build import build as run_build
    from pipelines.checks import BuildError
    from runners.presets import beam_args

    options = _build_options(kw, picked)
    try:
        summary = run_build(options, beam_args(kw["runner"], list(kw["beam_options"])))
    except (BuildError, ModelError, SnapshotError) as err:
        raise UserError(str(err)) from None
    except OSError as err:  # disk full, permissions: the environment, not querycache
        raise click.ClickException(f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")) from None
    if kw["as_json"]:
        echo_json(summary)
    else:
        _print_summary(summary)


def _build_options(kw: dict, picked: list[str]):
    """Map the command line onto BuildOptions (imports deferred: `querycache lookup` needs no torch)."""
    from inference.engine import EngineConfig
    from pipelines.build import BuildOptions
    from transforms.selection import Selection

    mode = picked[0] if picked else "min_count"
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
        selection=Selection(mode, kw[mode] if picked else 1),
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


def _print_summary(s: dict) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped_for_privacy"].items())) or "none"
    click.echo(
        f"snapshot {s['snapshot_id']} published in {s['seconds']:.1f}s\n"
        f"  lines read        {s['lines_read']} = accepted {s['accepted']} + rejected {s['rejected']} ({reasons})\n"
        f"  distinct queries  {s['distinct_queries']}\n"
        f"  head              {s['head_size']} queries covering {s['traffic_covered']:.1%} of traffic\n"
        f"  privacy drops     {dropped}\n"
        f"  results           {s['computed']} computed ({s['inference_queries_per_second']:.0f} queries/s), "
        f"{s['reused']} reused\n"
        f"  fidelity          {s['fidelity']}"
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
    setup_logging(True)
    from inference.engine import describe_model
    from inference.model import ModelError

    try:
        info = describe_model(model_dir)
    except ModelError as err:
        raise UserError(str(err)) from None
    if as_json:
        echo_json(info)
        return
    click.echo(f"model  {info['model_dir']}")
    for task, t in info["tasks"].items():
        click.echo(
            f"  {task:<10} "
            + (f"ok  fingerprint {t['fingerprint']}  {t['settings']}" if t["ok"] else f"no  {t['error']}")
        )


for command in (manage.inspect, manage.lookup, manage.verify, manage.list_, manage.rollback_, manage.gc_, manage.pull_):
    main.add_command(command)
main.add_command(replay.replay)

if __name__ == "__main__":  # pragma: no cover
    main()
