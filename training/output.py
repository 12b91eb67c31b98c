"""Write a trained model as a standard transformers directory, with ``finetune.json`` beside it.

    save_model(model, tokenizer, base_dir, out, report)

safetensors weights, config and tokenizer; a sentence-transformers base keeps its pooling files,
so ``build --model OUT`` embeds the way the base model did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_SENTENCE_TRANSFORMERS = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def save_model(model, tokenizer, base_dir: str | Path, out: str | Path, report: dict) -> Path:
    """Save ``model`` and ``tokenizer`` into ``out``; copy the base's pooling files; write ``finetune.json``."""
    out, base = Path(out), Path(base_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in _SENTENCE_TRANSFORMERS:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    if (base / "modules.json").is_file():
        for module in json.loads((base / "modules.json").read_text("utf-8")):
            source = base / module.get("path", "")
            if module.get("path") and source.is_dir():
                shutil.copytree(source, out / module["path"], dirs_exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", "utf-8")
    return out
