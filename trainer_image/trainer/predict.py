"""Inference: labels and class probabilities for texts, from a run's final model or one of its checkpoints.

`python -m trainer predict --model DIR (--text T ... | --file F) [--json] [--output FILE] [--device D]`.
DIR is a `final/` folder (save_pretrained model + tokenizer) or a verified `checkpoints/step-N/` folder
(weights + model_config.json, tokenizer from the run's `tokenizer/`). `--file` holds one text per line, or,
when it ends in `.json`, a JSON array of texts (any characters, newlines and empty texts included). With
--json each stdout line is {"text", "label", "probabilities"}. With --output the predictions go to FILE
instead, written atomically as {"predictions": [...]}; on failure FILE gets {"error", "exitCode"}, so a
caller that only sees the volume (the controller, for a predict Job) still reads the reason.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from trainer.errors import InvalidInput
from trainer.volume import (
    MANIFEST_NAME,
    CheckpointInvalid,
    ExitCode,
    atomic_write_json,
    model_folders,
    read_checkpoint,
)

log = logging.getLogger("trainer")


def read_texts(texts: list[str] | None, file: Path | None) -> list[str]:
    if texts is not None:
        return list(texts)
    assert file is not None
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--file {file}: unreadable ({exc})") from exc
    if file.suffix == ".json":
        try:
            found = json.loads(content)
        except ValueError as exc:
            raise InvalidInput(f"--file {file}: not valid JSON ({exc})") from exc
        if not isinstance(found, list) or not all(isinstance(text, str) for text in found):
            raise InvalidInput(f"--file {file}: must hold a JSON array of strings")
    else:
        found = [line for line in content.splitlines() if line.strip()]
    if not found:
        raise InvalidInput(f"--file {file}: no texts (one per line expected, or a JSON array in a .json file)")
    return found


def load_for_inference(model_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on `device`) from a final/ or checkpoint folder; InvalidInput if neither."""
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
        if len(model_folders(model_dir)) > 1:  # a training checkpoint
            from safetensors.torch import load_file

            raw = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
            config = AutoConfig.for_model(raw.pop("model_type"), **raw)
            model = AutoModelForSequenceClassification.from_config(config)
            model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
            tokenizer = AutoTokenizer.from_pretrained(str(model_folders(model_dir)[1]))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"--model {model_dir}: not a loadable model ({first})") from exc
    model.to(device)
    model.eval()
    return tokenizer, model


def resolve_device(device: str) -> str:
    """auto: CUDA when a device is visible, else CPU; cuda without one is invalid input."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device: cuda requested but no CUDA device is visible")
    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def predict(tokenizer: Any, model: Any, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """One {"text", "label", "probabilities"} per text, in order."""
    import torch

    # The run's maxSeqLength travels as the saved tokenizer's model_max_length.
    limit = min(int(getattr(model.config, "max_position_embeddings", 512)), int(tokenizer.model_max_length))
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = tokenizer(chunk, truncation=True, max_length=limit, padding=True, return_tensors="pt")
            encoded.pop("token_type_ids", None)
            probabilities = torch.softmax(model(**encoded.to(device)).logits.float(), dim=-1)
            for text, row in zip(chunk, probabilities.tolist(), strict=True):
                label = max(range(len(row)), key=row.__getitem__)
                results.append({"text": text, "label": label, "probabilities": [round(p, 6) for p in row]})
    return results


def run_predict(
    model_dir: Path,
    *,
    texts: list[str] | None,
    file: Path | None,
    as_json: bool,
    batch_size: int = 32,
    output: Path | None = None,
    device: str = "auto",
) -> ExitCode:
    try:
        if batch_size < 1:
            raise InvalidInput(f"--batch-size: {batch_size} must be at least 1")
        inputs = read_texts(texts, file)
        tokenizer, model = load_for_inference(model_dir, resolve_device(device))
        results = predict(tokenizer, model, inputs, batch_size)
    except InvalidInput as exc:
        print(f"invalid input: {exc}", file=sys.stderr)
        _write_output(output, {"error": f"invalid input: {exc}", "exitCode": int(ExitCode.INVALID_INPUT)})
        return ExitCode.INVALID_INPUT
    except Exception as exc:  # the trainer's own failure: the reason goes to --output too, then the traceback
        _write_output(output, {"error": f"{type(exc).__name__}: {exc}", "exitCode": int(ExitCode.FAILED)})
        raise
    if output is not None:
        atomic_write_json(output, {"predictions": results})
        print(f"wrote {len(results)} predictions to {output}")
    for result in results if output is None else []:
        if as_json:
            print(json.dumps(result), flush=False)
        else:
            probability = result["probabilities"][result["label"]]
            print(f"{result['label']}\t{probability:.4f}\t{result['text']}")
    sys.stdout.flush()
    return ExitCode.COMPLETE


def _write_output(output: Path | None, document: dict[str, Any]) -> None:
    if output is None:
        return
    try:
        atomic_write_json(output, document)
    except OSError as exc:
        print(f"--output {output}: not writable ({exc})", file=sys.stderr)
