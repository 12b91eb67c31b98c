"""querycache finetune: the build's input half feeds training; held-out figures before and after."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, BertModel

from querycache.inference import Engine, EngineConfig
from querycache.pipelines.finetune import FinetuneOptions, prepare_examples
from querycache.store import Snapshot
from querycache.training import Example, TrainConfig, train
from querycache.training.data import held_out_score, split
from querycache.training.heads import load_for_training
from querycache.training.masking import IGNORE, mask_batch
from querycache.transforms.records import LogFields
from tests.conftest import build_args, write_jsonl
from tests.tiny_bert import WORDS, label_of

FAST = ["--dtype", "fp32", "--threads", "1", "--lr", "1e-2", "--warmup", "0.1", "--batch-tokens", "1024"]
PII = ["call +1 (555) 123-4567", "mail jane.doe@example.com"]


def chain_queries(words: int = 20, seed: int = 3) -> list[str]:
    """A pattern the tiny BERT does not know: each word is always followed by the same other word."""
    rng = random.Random(seed)
    vocab = sorted(set(WORDS))[:words]
    following = dict(zip(vocab, rng.sample(vocab, len(vocab))))
    queries = []
    for first in vocab:
        chain = [first]
        for _ in range(3):
            chain.append(following[chain[-1]])
            queries.append(" ".join(chain))
    return queries


def chain_logs(path: Path, lines: int = 1500) -> Path:
    rng = random.Random(1)
    queries = chain_queries()
    records = [{"query": rng.choice(queries), "user": f"u{rng.randrange(40)}"} for _ in range(lines)]
    records += [{"query": q, "user": f"p{i}"} for i, q in enumerate(PII * 30)]  # frequent, many users, personal
    records += [{"query": "secret project codename", "user": "u1"}] * 5  # frequent, one user
    return write_jsonl(path, records)


def finetune_args(logs, out, model, *extra) -> list:
    return ["finetune", "--logs", logs, "--out", out, "--model", model, "--json", "--quiet", *FAST, *extra]


@pytest.fixture(scope="module")
def tuned(tiny_bert, tmp_path_factory, cli_module):
    """One finetune run of the tiny BERT on chain logs: (logs, output directory, report)."""
    directory = tmp_path_factory.mktemp("finetune")
    logs = chain_logs(directory / "logs.jsonl")
    args = finetune_args(logs, directory / "tuned", tiny_bert, "--steps", "150", "--eval-fraction", "0.25")
    result = cli_module(*args, "--user-field", "user", "--min-users", "2")
    assert result.exit_code == 0, result.output
    return logs, directory / "tuned", json.loads(result.stdout)


@pytest.fixture(scope="module")
def cli_module():
    from click.testing import CliRunner

    from querycache.runners.cli import main

    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_finetune_raises_held_out_masked_accuracy(tuned):
    _, out, report = tuned
    before, after = report["before"], report["after"]
    assert before["positions"] == after["positions"] > 20  # the same masked positions, scored twice
    assert after["masked_accuracy"] >= before["masked_accuracy"] + 0.3, report
    assert after["pseudo_perplexity"] < before["pseudo_perplexity"] / 3
    written = json.loads((out / "finetune.json").read_text())
    assert written["after"] == after and written["data"]["fingerprint"] == report["data"]["fingerprint"]
    assert written["config"]["steps"] == 150 and written["config"]["lr"] == 1e-2


def test_output_loads_and_builds_a_snapshot_of_a_new_model_version(tuned, tiny_bert, cli, tmp_path):
    logs, out, _ = tuned
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not (out / ".checkpoint").exists()
    result = cli(*build_args(logs, tmp_path / "root", out, "--task", "fill-mask", "--fidelity-sample", "0"))
    assert result.exit_code == 0, result.output
    snapshot = Snapshot.open(tmp_path / "root")
    base = Engine(EngineConfig(model_dir=str(tiny_bert), task="fill-mask", dtype="fp32", device="cpu"))
    assert snapshot.manifest["model"]["fingerprint"] != base.fingerprint
    query = chain_queries()[0]  # "w1 w2": the model now fills in the word that follows w2
    first, second = query.split()
    third = next(q.split()[2] for q in chain_queries() if q.startswith(query + " "))
    assert snapshot.get(query)[0][0]["token"] == third, (first, second, snapshot.get(query))


def test_personal_and_rare_user_queries_never_reach_training(tuned, tmp_path):
    logs, _, report = tuned
    assert report["logs"]["dropped_for_privacy"] == {"phone": 1, "email": 1, "min_users": 1}
    options = FinetuneOptions(logs=(str(logs),), out=str(tmp_path / "o"), fields=LogFields(user="user"), min_users=2)
    examples, stats = prepare_examples(options, ["--runner=FnApiRunner"])
    keys = {e.key for e in examples}
    assert keys == set(chain_queries()) and stats["examples"] == len(keys)
    assert not keys & {*PII, "secret project codename"}
    assert report["data"]["train_queries"] + report["data"]["held_out_queries"] == len(keys)


def test_held_out_split_is_stable_and_disjoint():
    examples = [Example(f"query {i}", i % 7 + 1) for i in range(2000)]
    train_set, held_out = split(examples, 0.1)
    again = split(random.Random(5).sample(examples, len(examples)), 0.1)
    assert (train_set, held_out) == again  # order of the input does not matter
    assert not {e.key for e in train_set} & {e.key for e in held_out}
    assert len(train_set) + len(held_out) == len(examples) and 150 < len(held_out) < 250
    more = split([*examples, *(Example(f"new {i}", 1) for i in range(500))], 0.1)[1]
    assert set(held_out) <= set(more)  # more logs never move a held-out query into training
    assert all(held_out_score(e.key) < 0.1 for e in held_out)


def test_resumed_run_matches_an_uninterrupted_one(tiny_bert, tmp_path):
    examples = [Example(q, i % 5 + 1) for i, q in enumerate(chain_queries())]
    config = TrainConfig(steps=12, checkpoint_every=5, lr=1e-2, batch_tokens=256, dtype="fp32", threads=1)

    def stop_at_8(step):
        if step.step == 8:
            raise KeyboardInterrupt

    train(tiny_bert, examples, config, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_bert, examples, config, tmp_path / "killed", progress=stop_at_8)
    assert (tmp_path / "killed/.checkpoint/state.pt").is_file() and not (tmp_path / "killed/config.json").exists()
    report = train(tiny_bert, examples, config, tmp_path / "killed", resume=True)
    assert report["resumed_from_step"] == 5
    whole = load_file(tmp_path / "whole/model.safetensors")
    resumed = load_file(tmp_path / "killed/model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    different = train(tiny_bert, examples, TrainConfig(**{**config.__dict__, "seed": 1}), tmp_path / "seed1")
    assert different["after"] != report["after"]


def test_classifier_learns_labels_from_the_label_field(tiny_bert, cli, tmp_path):
    rng = random.Random(2)
    names = ["go", "buy", "misc"]  # not the tiny BERT's own labels: a new head
    queries = sorted({" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(300)})
    records = [{"query": q, "intent": names[label_of(q)]} for q in queries for _ in range(2)]
    logs = write_jsonl(tmp_path / "labelled.jsonl", [*records, {"query": "no label"}])
    args = finetune_args(logs, tmp_path / "clf", tiny_bert, "--task", "classify", "--label-field", "intent")
    result = cli(*args, "--steps", "40", "--eval-fraction", "0.2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["logs"]["rejected_by_reason"] == {"missing_label": 1}
    assert report["after"]["accuracy"] >= 0.8 and report["after"]["macro_f1"] > report["before"]["macro_f1"]
    config = json.loads((tmp_path / "clf/config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(names)
    engine = Engine(EngineConfig(model_dir=str(tmp_path / "clf"), task="classify", dtype="fp32", device="cpu"))
    assert engine(["cheap flights to paris"])[0]["label"] == "go"


def test_an_encoder_without_a_masked_lm_head_gets_one_tied_to_its_embeddings(tiny_bert, tmp_path):
    BertModel.from_pretrained(tiny_bert).save_pretrained(tmp_path / "encoder")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_bert / name).exists():
            (tmp_path / "encoder" / name).write_bytes((tiny_bert / name).read_bytes())
    model, _, notes = load_for_training(tmp_path / "encoder", "fill-mask")
    assert notes == ["masked-LM head initialised from the word embeddings (decoder tied)"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.cls.predictions.transform.dense.weight, torch.eye(32))


def test_masking_replaces_80_10_10_and_masks_every_row():
    rows, length = 400, 12
    ids = torch.randint(5, 50, (rows, length))
    special = torch.zeros(rows, length, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_batch(ids, special, 4, 50, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    assert chosen.any(dim=1).all() and not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs[chosen] == 4).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.16
    words = torch.arange(length).div(2, rounding_mode="floor").expand(rows, length).clone()  # two pieces a word
    _, labels = mask_batch(ids, special, 4, 50, 0.15, torch.Generator().manual_seed(0), words)
    chosen = (labels != IGNORE)[:, 2:10]
    assert torch.equal(chosen[:, 0::2], chosen[:, 1::2])  # both pieces of a word, or neither


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "classify"], "--task classify needs --label-field"),
        (["--eval-fraction", "1.5"], "--eval-fraction"),
        (["--top-k", "3", "--coverage", "0.5"], "choose one of"),
        (["--min-users", "2"], "--min-users needs --user-field"),
        (["--resume"], "holds no checkpoint"),
        (["--model", "/nowhere/model"], "/nowhere/model does not exist"),
        (["--steps", "0"], "--steps"),
        (["--sampling", "often"], "--sampling"),
    ],
)
def test_bad_flags_exit_2_with_one_line(cli, tiny_bert, tmp_path, extra, message):
    logs = write_jsonl(tmp_path / "logs.jsonl", [{"query": "cheap flights"}])
    args = finetune_args(logs, tmp_path / "out", tiny_bert)
    if "--model" in extra:
        args = args[: args.index("--model")] + args[args.index("--model") + 2 :]
    result = cli(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3


def test_a_non_empty_out_needs_resume(cli, tiny_bert, tmp_path):
    logs = write_jsonl(tmp_path / "logs.jsonl", [{"query": "cheap flights"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    result = cli(*finetune_args(logs, tmp_path / "out", tiny_bert))
    assert result.exit_code == 2 and "is not empty" in result.output
