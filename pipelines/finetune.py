"""The finetune pipeline: query logs -> the privacy-filtered head -> training examples -> a trained model.

    report = finetune(FinetuneOptions(logs=("logs/*.jsonl",), out="models/ours"), beam_args=["--runner=FnApiRunner"])

``prepare_pipeline`` is the input half of the build (read, normalise, count, select the head with
its privacy filters), so a query a build would keep out never reaches training; ``finetune`` is the
driver: checks, examples, then :func:`training.train` (no Beam there).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from querycache.inference.model import check_model_dir, default_model_dir
from querycache.pipelines.checks import BuildError, check_logs
from querycache.training import Example, Step, TrainConfig, train
from querycache.training.checkpoint import Checkpoint
from querycache.transforms.count import CountQueries
from querycache.transforms.normalize import NormalizeQueries
from querycache.transforms.read_logs import ReadQueryLogs, Truncations, lines_read
from querycache.transforms.records import LogFields
from querycache.transforms.select_head import SelectHead
from querycache.transforms.selection import Selection
from querycache.transforms.stats import BY_VALUE, COUNT, ITEMS, MERGE, SUM, GatherStats

log = logging.getLogger(__name__)
STATISTICS = {
    "lines_read": SUM, "accepted": ITEMS, "distinct_queries": ITEMS, "examples": COUNT,
    "rejected_by_reason": BY_VALUE, "dropped_for_privacy": MERGE, "truncated_files": MERGE,
}  # fmt: skip
DATA_DIR = ".finetune-data"


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything a finetune run needs besides the Beam runner options."""

    logs: tuple[str, ...]
    out: str
    model_dir: str | None = None
    fields: LogFields = field(default_factory=LogFields)
    selection: Selection = field(default_factory=Selection)
    min_users: int | None = None
    scrub_pii: bool = True
    max_query_chars: int = 512
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False


def _key_labels(keys) -> list:
    """A table of keys -> ``((key, label), weight)`` summed per key and label."""
    sums = keys.group_by(["key", "label"], use_threads=False).aggregate([("weight", "sum")])
    return [
        ((k, label), w) for k, label, w in zip(*(sums.column(n).to_pylist() for n in ("key", "label", "weight_sum")))
    ]


class LabelHead(beam.PTransform):
    """``head | LabelHead(keys)`` -> ``(key, count, label)``: each head key with its most frequent label.

    Labels are weighted by count; a tie goes to the label that sorts first.
    """

    def __init__(self, keys):
        super().__init__()
        self.keys = keys

    def expand(self, head):
        labels = (
            self.keys
            | "KeyLabel" >> beam.FlatMap(_key_labels)
            | "SumLabels" >> beam.CombinePerKey(sum)
            | "ByKey" >> beam.MapTuple(lambda kl, weight: (kl[0], (-weight, kl[1])))
            | "TopLabel" >> beam.CombinePerKey(min)
        )
        return (
            {"head": head | "HeadByKey" >> beam.Map(lambda r: (r[0], r[1])), "label": labels}
            | "Join" >> beam.CoGroupByKey()
            | "Labelled" >> beam.FlatMapTuple(lambda key, g: [(key, c, g["label"][0][1]) for c in g["head"]])
        )


def prepare_pipeline(p: beam.Pipeline, options: FinetuneOptions, data_dir: str) -> None:
    """The input half of the build's data path, writing examples and statistics into ``data_dir``."""
    labelled = options.fields.label is not None
    records, unreadable, parts = p | "ReadQueryLogs" >> ReadQueryLogs(list(options.logs), options.fields)
    lines = lines_read(parts)
    keys, invalid = records | "NormalizeQueries" >> NormalizeQueries(options.max_query_chars)
    users = options.fields.user is not None
    counts = keys | "CountQueries" >> CountQueries(users)
    head, _plan, dropped = counts | "SelectHead" >> SelectHead(options.selection, options.min_users, options.scrub_pii)
    if labelled:
        examples = head | "LabelHead" >> LabelHead(keys)
    else:
        examples = head | "Examples" >> beam.Map(lambda r: (r[0], r[1], None))
    _ = examples | "ToJson" >> beam.Map(json.dumps) | "WriteExamples" >> _write(data_dir, "examples.jsonl")
    rejected = (unreadable, invalid) | "DeadLetters" >> beam.Flatten()
    stats = {
        "lines_read": lines, "accepted": keys, "distinct_queries": counts, "examples": examples,
        "rejected_by_reason": rejected | "Reasons" >> beam.Map(lambda r: r["reason"]), "dropped_for_privacy": dropped,
        "truncated_files": unreadable | "Truncations" >> Truncations(),
    } | "GatherStats" >> GatherStats(STATISTICS)  # fmt: skip
    _ = stats | "StatsJson" >> beam.Map(json.dumps) | "WriteStats" >> _write(data_dir, "stats.json")


def _write(directory: str, name: str) -> beam.PTransform:
    return beam.io.WriteToText(str(Path(directory) / name), shard_name_template="", num_shards=1)


def prepare_examples(options: FinetuneOptions, beam_args: list[str]) -> tuple[list[Example], dict]:
    """Run the input half; return the training examples (sorted by key) and the log statistics."""
    check_logs(options.logs, options.fields)
    data_dir = Path(options.out) / DATA_DIR
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            prepare_pipeline(p, options, str(data_dir))
        stats = json.loads((data_dir / "stats.json").read_text("utf-8"))
        with open(data_dir / "examples.jsonl", encoding="utf-8") as fh:
            examples = sorted(Example(*json.loads(line)) for line in fh)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    stats["rejected"] = sum(stats["rejected_by_reason"].values())
    return examples, stats


def check_out(out: str, resume: bool) -> None:
    """``out`` is new or empty, or (with ``--resume``) holds a checkpoint of an unfinished run."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BuildError(f"--out {out} is a file; pass a new directory for the trained model")
    busy = path.is_dir() and any(path.iterdir())
    has_checkpoint = Checkpoint(path / ".checkpoint", "").exists()
    if resume and not has_checkpoint:
        raise BuildError(f"--resume: {out} holds no checkpoint of an unfinished run; run without --resume")
    if busy and not resume:
        hint = "pass --resume to continue it" if has_checkpoint else "pass a new directory"
        raise BuildError(f"--out {out} is not empty; {hint}")


def finetune(options: FinetuneOptions, beam_args: list[str], progress: Callable[[Step], None] | None = None) -> dict:
    """Prepare examples with Beam, train, evaluate; return the report (also in ``OUT/finetune.json``)."""
    started = time.perf_counter()
    check_out(options.out, options.resume)
    model_dir = check_model_dir(options.model_dir or default_model_dir())
    if options.train.task == "classify" and options.fields.label is None:
        raise BuildError("--task classify needs --label-field, the field that holds each query's class")
    examples, stats = prepare_examples(options, beam_args)
    if not examples:
        top = max(stats["rejected_by_reason"], key=stats["rejected_by_reason"].get, default="none")
        raise BuildError(
            f"no query of {', '.join(options.logs)} is left to train on (accepted {stats['accepted']}, "
            f"most rejections: {top}, privacy drops: {stats['dropped_for_privacy'] or 'none'})"
        )
    log.info("training on %d distinct queries from %d log lines", len(examples), stats["lines_read"])
    extra = {
        "base_model": str(model_dir),
        "input": {
            "logs": list(options.logs),
            "selection": options.selection.describe(),
            "min_users": options.min_users,
            "scrub_pii": options.scrub_pii,
        },
        "logs": stats,
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }
    return train(model_dir, examples, options.train, options.out, resume=options.resume, progress=progress, extra=extra)
