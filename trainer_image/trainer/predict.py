"""Inference: labels and class probabilities for texts, from a run's final model or one of its checkpoints.

`python -m trainer predict --model DIR (--text T ... | --file F) [--json]`. DIR is a `final/` folder
(save_pretrained model + tokenizer) or a verified `checkpoints/step-N/` folder (weights + model_config.json,
tokenizer from the run's `tokenizer/`). With --json each line is {"text", "label", "probabilities"}.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from trainer.errors import InvalidInput
from trainer.volume import MANIFEST_NAME, CheckpointInvalid, ExitCode, read_checkpoint

log = logging.getLogger("trainer")


def read_texts(texts: list[str] | None, file: Path | None) -> list[str]:
    if texts is not None:
        return list(texts)
    assert file is not None
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--file {file}: unreadable ({exc})") from exc
    found = [line for line in lines if line.strip()]
    if not found:
        raise InvalidInput(f"--file {file}: no texts (one per line expected)")
    return found


def load_for_inference(model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode) from a final/ folder or a checkpoint folder; InvalidInput if neither."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from trainer import modeling

    modeling.quiet_transformers()
    if not model_dir.is_dir():
        raise InvalidInput(f"--model {model_dir}: no such directory")
    try:
        if (model_dir / MANIFEST_NAME).is_file():
            read_checkpoint(model_dir, verify_hashes=True)
    except CheckpointInvalid as exc:
        raise InvalidInput(f"--model {exc}") from exc
    try:
        if (model_dir / "model_config.json").is_file():  # a training checkpoint
            from safetensors.torch import load_file

            raw = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
            config = AutoConfig.for_model(raw.pop("model_type"), **raw)
            model = AutoModelForSequenceClassification.from_config(config)
            model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir.parent.parent / "tokenizer"))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"--model {model_dir}: not a loadable model ({first})") from exc
    model.eval()
    return tokenizer, model


def predict(tokenizer: Any, model: Any, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """One {"text", "label", "probabilities"} per text, in order."""
    import torch

    # The run's maxSeqLength travels as the saved tokenizer's model_max_length.
    limit = min(int(getattr(model.config, "max_position_embeddings", 512)), int(tokenizer.model_max_length))
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = tokenizer(chunk, truncation=True, max_length=limit, padding=True, return_tensors="pt")
            encoded.pop("token_type_ids", None)
            probabilities = torch.softmax(model(**encoded).logits.float(), dim=-1)
            for text, row in zip(chunk, probabilities.tolist(), strict=True):
                label = max(range(len(row)), key=row.__getitem__)
                results.append({"text": text, "label": label, "probabilities": [round(p, 6) for p in row]})
    return results


def run_predict(
    model_dir: Path, *, texts: list[str] | None, file: Path | None, as_json: bool, batch_size: int = 32
) -> ExitCode:
    try:
        if batch_size < 1:
            raise InvalidInput(f"--batch-size: {batch_size} must be at least 1")
        inputs = read_texts(texts, file)
        tokenizer, model = load_for_inference(model_dir)
    except InvalidInput as exc:
        print(f"invalid input: {exc}", file=sys.stderr)
        return ExitCode.INVALID_INPUT
    for result in predict(tokenizer, model, inputs, batch_size):
        if as_json:
            print(json.dumps(result), flush=False)
        else:
            probability = result["probabilities"][result["label"]]
            print(f"{result['label']}\t{probability:.4f}\t{result['text']}")
    sys.stdout.flush()
    return ExitCode.COMPLETE
