"""``querycache finetune``: adapt a model to the queries it serves, measured before and after."""

from __future__ import annotations

import sys
from typing import Any

import click

from querycache.runners import human
from querycache.runners.common import (
    GLOB_HINT,
    UserError,
    echo_json,
    environment_error,
    passed_on,
    require_pipelines,
    setup_logging,
)
from querycache.runners.inputs import check_inputs, head_selection, input_options, log_fields


@click.command(context_settings={"ignore_unknown_options": False})
@input_options
@click.option("--model", type=click.Path(), help="Base model directory (default: the shipped all-MiniLM-L6-v2).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the trained model.")
@click.option("--task", type=click.Choice(["fill-mask", "classify"]), default="fill-mask", show_default=True)
@click.option("--label-field", help="Field holding each record's class (--task classify).")
@click.option("--steps", type=click.IntRange(1), help="Optimizer steps (wins over --epochs).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), help="Passes over the distinct queries [3].")
@click.option("--lr", default=5e-5, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--warmup", default=0.06, show_default=True, type=click.FloatRange(0), help="Fraction (<1) or steps.")
@click.option("--weight-decay", default=0.01, show_default=True, type=click.FloatRange(0))
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--mask-prob", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--whole-word", is_flag=True, help="Mask whole words rather than word pieces.")
@click.option("--batch-tokens", default=4096, show_default=True, type=click.IntRange(16), help="Padded tokens/batch.")
@click.option("--max-length", default=64, show_default=True, type=click.IntRange(4), help="Tokens per query.")
@click.option(
    "--sampling",
    type=click.Choice(["sqrt", "log", "uniform", "count"]),
    default="sqrt",
    show_default=True,
    help="How counts weight the drawing of training queries.",
)
@click.option("--eval-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--eval-max", default=2000, show_default=True, type=click.IntRange(1), help="Held-out queries scored.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default: torch's own).")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(1))
@click.option("--resume", is_flag=True, help="Continue the unfinished run whose checkpoint is in --out.")
@click.option("--runner", default="direct", show_default=True, help="Beam runner preset for the data preparation.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@passed_on("beam_options", to="Beam", hint=GLOB_HINT)
def finetune(**kw: Any) -> None:
    """Fine-tune a model on the queries of your logs (same parsing and privacy filters as build).

    \b
    Example:
      querycache finetune --logs 'logs/*.jsonl.gz' --user-field user --min-users 5 --out models/ours
      querycache finetune --logs labelled.csv --task classify --label-field intent --model base --out models/intent
      querycache build --logs 'logs/*.jsonl.gz' --model models/ours --task fill-mask --out /data/qc
    """
    require_pipelines("finetune")
    setup_logging(kw["quiet"])
    picked = check_inputs(kw)
    if kw["task"] == "classify" and not kw["label_field"]:
        raise UserError("--task classify needs --label-field, the field that holds each query's class")
    if kw["label_field"] and kw["task"] != "classify":
        raise UserError("--label-field is for --task classify")
    from querycache.runners.presets import beam_args, prestart_workers

    args = beam_args(kw["runner"], list(kw["beam_options"]), kw["quiet"])
    prestart_workers(args, "querycache.pipelines.finetune")
    from querycache.inference.model import ModelError
    from querycache.pipelines.checks import BuildError
    from querycache.pipelines.finetune import finetune as run_finetune
    from querycache.training import TrainingError
    from querycache.training.checkpoint import CheckpointError

    progress = ProgressBar() if sys.stderr.isatty() and not kw["quiet"] else None
    try:
        report = run_finetune(_options(kw, picked), args, progress)
    except (BuildError, ModelError, TrainingError, CheckpointError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise environment_error(err) from None
    finally:
        if progress is not None:
            progress.close()
    if kw["as_json"]:
        echo_json(report)
    else:
        _print_report(report, kw["out"])


def _options(kw: dict, picked: list[str]):
    from querycache.pipelines.finetune import FinetuneOptions
    from querycache.training import TrainConfig

    names = (
        "task", "steps", "epochs", "lr", "warmup", "weight_decay", "grad_clip", "mask_prob", "whole_word",
        "batch_tokens", "max_length", "sampling", "eval_fraction", "eval_max", "seed", "dtype", "device",
        "checkpoint_every", "threads",
    )  # fmt: skip
    return FinetuneOptions(
        logs=tuple(kw["logs"]),
        out=kw["out"],
        model_dir=kw["model"],
        fields=log_fields(kw, kw["label_field"]),
        selection=head_selection(kw, picked),
        min_users=kw["min_users"],
        scrub_pii=kw["scrub_pii"],
        max_query_chars=kw["max_query_chars"],
        train=TrainConfig(**{name: kw[name] for name in names}),
        resume=kw["resume"],
    )


class ProgressBar:
    """A tqdm bar on stderr with loss, rate and ETA."""

    def __init__(self):
        self.bar = None

    def __call__(self, step) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=step.total, initial=step.step - 1, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step.loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_report(r: dict, out: str) -> None:
    metrics = [k for k in r["after"] if k not in ("positions", "queries")]
    data, logs = r["data"], r["logs"]
    click.echo(f"trained model written to {out} in {r['seconds'] + r.get('prepare_seconds', 0):.1f}s")
    if logs.get("truncated_files"):
        click.echo(f"  cut short         {human.truncated(logs['truncated_files'])}")
    for note in r["notes"]:
        click.echo(f"  note              {note}")
    click.echo(
        f"  lines read        {logs['lines_read']} = accepted {logs['accepted']} + rejected {logs['rejected']}\n"
        f"  privacy drops     {logs['dropped_for_privacy'] or 'none'}\n"
        f"  queries           {data['train_queries']} trained on, {data['held_out_queries']} held out "
        f"({data['evaluated_queries']} scored)\n"
        f"  steps             {r['config']['steps']} ({r['config']['dtype']} on {r['config']['device']}), "
        f"final loss {r['final_loss']:.4f}"
    )
    for name in metrics:
        click.echo(f"  {name:<17} {r['before'][name]:.4f} -> {r['after'][name]:.4f}")
