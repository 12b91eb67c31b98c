"""Build a tiny BERT with trained masked-LM and classification heads sharing one encoder."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast

WORDS = [
    "cheap",
    "flights",
    "to",
    "paris",
    "london",
    "rome",
    "berlin",
    "tokyo",
    "hotels",
    "in",
    "weather",
    "today",
    "tomorrow",
    "buy",
    "shoes",
    "red",
    "blue",
    "shirt",
    "cat",
    "dog",
    "food",
    "pizza",
    "recipe",
    "near",
    "me",
    "best",
    "how",
    "make",
    "coffee",
    "tea",
    "train",
    "tickets",
    "news",
    "sports",
    "score",
    "football",
    "music",
    "song",
    "lyrics",
    "movie",
    "times",
    "open",
    "now",
    "car",
    "rental",
]
LABELS = ["travel", "shopping", "other"]
TRAVEL = {"flights", "paris", "london", "rome", "berlin", "tokyo", "hotels", "train", "tickets", "car", "rental"}
SHOPPING = {"buy", "shoes", "red", "blue", "shirt", "cheap"}
SENTENCES = [
    "cheap flights to paris",
    "cheap flights to london",
    "cheap flights to rome",
    "hotels in berlin",
    "hotels in tokyo",
    "weather today",
    "weather tomorrow",
    "buy red shoes",
    "buy blue shirt",
    "pizza recipe",
    "pizza near me",
    "best coffee near me",
    "how to make tea",
    "train tickets to rome",
    "football score today",
    "song lyrics",
    "movie times near me",
    "car rental in paris",
    "cat food",
    "dog food",
]


def label_of(sentence: str) -> int:
    words = set(sentence.split())
    return 0 if words & TRAVEL else 1 if words & SHOPPING else 2


def build_tiny_bert(directory: Path, steps: int = 300, seed: int = 0) -> Path:
    """Write a model directory (config, safetensors, tokenizer) and return it."""
    torch.manual_seed(seed)
    random.seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(directory, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
        max_position_embeddings=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={lab: i for i, lab in enumerate(LABELS)},
    )
    classifier = BertForSequenceClassification(config)
    mlm = BertForMaskedLM(config)
    mlm.bert = classifier.bert  # one encoder, two heads
    _train(tokenizer, mlm, classifier, steps)
    state = {k: v.detach().clone().contiguous() for k, v in classifier.state_dict().items()}
    state |= {k: v.detach().clone().contiguous() for k, v in mlm.state_dict().items() if k.startswith("cls.")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["BertForMaskedLM", "BertForSequenceClassification"]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _train(tokenizer, mlm, classifier, steps: int) -> None:
    params = list({id(p): p for p in [*mlm.parameters(), *classifier.parameters()]}.values())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    mlm.train()
    classifier.train()
    for _ in range(steps):
        batch = random.sample(SENTENCES, 8)
        enc = tokenizer(batch, padding=True, return_tensors="pt")
        labels = enc["input_ids"].clone()
        masked = enc["input_ids"].clone()
        choose = (torch.rand(labels.shape) < 0.3) & (enc["attention_mask"] == 1) & (labels > 4)
        masked[choose] = tokenizer.mask_token_id
        labels[~choose] = -100
        loss = mlm(input_ids=masked, attention_mask=enc["attention_mask"], labels=labels).loss
        target = torch.tensor([label_of(s) for s in batch])
        loss = loss + classifier(**enc, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mlm.eval()
    classifier.eval()
