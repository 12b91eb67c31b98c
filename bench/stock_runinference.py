"""What a user would write instead of querycache: a stock Beam RunInference job, as a whole process.

    python bench/stock_runinference.py --logs queries.txt --out /tmp/stock

Read query lines, deduplicate, tokenize one query per element, RunInference with
PytorchModelHandlerKeyedTensor (default batching, padding inside each batch), mean-pool and
normalise as all-MiniLM-L6-v2 does, write (query, embedding bytes) as a Parquet file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor
from apache_beam.options.pipeline_options import PipelineOptions
from transformers import AutoConfig, AutoModel, AutoTokenizer

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as a script, bench/ would shadow the inference package
from querycache.inference.model import default_model_dir  # noqa: E402

logging.getLogger("apache_beam").setLevel(logging.ERROR)


def inference_fn(batch, model, device, inference_args, model_id=None):
    ids = torch.nn.utils.rnn.pad_sequence([b["input_ids"] for b in batch], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([b["attention_mask"] for b in batch], batch_first=True)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=1)
    return [PredictionResult(x, y) for x, y in zip(batch, pooled.numpy())]


def handler(model_dir: Path, tmp: Path) -> PytorchModelHandlerKeyedTensor:
    state = tmp / "model.pt"
    torch.save(AutoModel.from_pretrained(model_dir).state_dict(), state)
    return PytorchModelHandlerKeyedTensor(
        state_dict_path=str(state),
        model_class=AutoModel.from_config,
        model_params={"config": AutoConfig.from_pretrained(model_dir)},
        inference_fn=inference_fn,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(query):
        enc = tokenizer(query, truncation=True, max_length=256, return_tensors="pt")
        return query, {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}

    def row(keyed):
        return {"query": keyed[0], "embedding": keyed[1].inference.tobytes()}

    with tempfile.TemporaryDirectory() as tmp, beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = (
            p
            | beam.io.ReadFromText(args.logs)
            | beam.Map(str.strip)
            | beam.Distinct()
            | beam.Map(tokenize)
            | RunInference(KeyedModelHandler(handler(model_dir, Path(tmp))))
            | beam.Map(row)
            | beam.io.WriteToParquet(args.out, pa.schema([("query", pa.string()), ("embedding", pa.binary())]))
        )


if __name__ == "__main__":
    main()
