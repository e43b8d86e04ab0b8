"""Training data: load and check a dataset snapshot, tokenize it once, and lay out the deterministic batch order.

The batches of epoch `e` come from a private `torch.Generator().manual_seed(seed * 1_000_003 + e)`: a
permutation of the rows, grouped by length in windows and cut into micro-batches of `batch_size`, whose
order is shuffled again (see `epoch_batches`). They are re-derived from (seed, epoch) in every leg, so no
generator state needs saving and the global RNG is never touched by it. Each batch is padded to its own
longest sequence (dynamic padding), which is deterministic for a given order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainerConfig
from trainer.errors import InvalidInput
from trainer.volume import SNAPSHOT_DATA_DIR, SNAPSHOT_SPLITS, CheckpointInvalid, SnapshotInfo, read_snapshot

if TYPE_CHECKING:
    import torch

_ORDER_SEED_STRIDE = 1_000_003
GROUP_WINDOW = 50  # batches per length-grouping window


@dataclass(frozen=True)
class Split:
    """One split's raw texts and labels, checked."""

    name: str
    texts: list[str]
    labels: list[int]


@dataclass(frozen=True)
class SnapshotData:
    info: SnapshotInfo
    train: Split
    eval: Split


def load_snapshot(snapshot: Path, config: TrainerConfig) -> SnapshotData:
    """Read and verify the snapshot, check the configured fields and labels; InvalidInput names what is wrong."""
    if not snapshot.is_dir():
        raise InvalidInput(f"snapshot {snapshot}: no such directory")
    try:
        info = read_snapshot(snapshot, verify_hashes=True)
    except CheckpointInvalid as exc:
        raise InvalidInput(f"snapshot {exc}") from exc
    for name in SNAPSHOT_SPLITS:  # an empty split cannot even be loaded back by datasets: check the manifest
        if info.rows.get(name) == 0:
            raise InvalidInput(f"snapshot {snapshot}: split '{name}' has no rows")
    import datasets  # heavy; only once the manifest is good

    data_dir = snapshot / SNAPSHOT_DATA_DIR
    try:
        dataset_dict = datasets.load_from_disk(str(data_dir))
    except Exception as exc:  # datasets raises several types for unreadable folders
        raise InvalidInput(f"snapshot {data_dir}: unreadable dataset ({type(exc).__name__}: {exc})") from exc
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise InvalidInput(f"snapshot {data_dir}: not a DatasetDict with splits {', '.join(SNAPSHOT_SPLITS)}")
    train, evaluation = (_read_split(dataset_dict, name, snapshot, config) for name in SNAPSHOT_SPLITS)
    return SnapshotData(info, train, evaluation)


def _read_split(dataset_dict: Any, name: str, snapshot: Path, config: TrainerConfig) -> Split:
    if name not in dataset_dict:
        raise InvalidInput(f"snapshot {snapshot}: split '{name}' missing (has: {', '.join(dataset_dict)})")
    split = dataset_dict[name]
    columns = list(split.column_names)
    for field, alias in ((config.text_field, "textField"), (config.label_field, "labelField")):
        if field not in columns:
            raise InvalidInput(
                f"{alias}: column '{field}' not in snapshot split '{name}' (columns: {', '.join(columns)})"
            )
    if split.num_rows == 0:
        raise InvalidInput(f"snapshot {snapshot}: split '{name}' has no rows")
    texts = split[config.text_field]
    labels = split[config.label_field]
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(
                f"textField: '{config.text_field}' in split '{name}' row {row} is {type(text).__name__}, not text"
            )
    checked: list[int] = []
    for row, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, int):
            raise InvalidInput(
                f"labelField: '{config.label_field}' in split '{name}' row {row} is {label!r}, not an integer label"
            )
        if not 0 <= label < config.num_labels:
            raise InvalidInput(
                f"labelField: label {label} in split '{name}' row {row} outside [0, numLabels={config.num_labels})"
            )
        checked.append(label)
    return Split(name, list(texts), checked)


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (truncated, unpadded) and labels: what batches are cut from."""

    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int

    @property
    def rows(self) -> int:
        return len(self.labels)


def encode(tokenizer: Any, split: Split, max_seq_length: int) -> Encoded:
    """Tokenize a split once (fast tokenizer, batched), truncated to max_seq_length, no padding."""
    encoded = tokenizer(split.texts, truncation=True, max_length=max_seq_length, padding=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded([list(ids) for ids in encoded["input_ids"]], list(split.labels), int(pad_id))


def micro_batches_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps per epoch; the last step of an epoch may accumulate fewer micro-batches."""
    return math.ceil(micro_batches_per_epoch(rows, batch_size) / accumulation)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of `epoch` (row indices), from a private generator seeded by (seed, epoch).

    Rows are shuffled, then grouped by length within windows of GROUP_WINDOW batches (sorted longest
    first, ties by shuffled position) and cut into batches whose order is shuffled again: batches of
    similar lengths pad little, which is most of the CPU cost with dynamic padding. Only the last
    batch of an epoch can be short, so there are always ceil(rows / batch_size) batches.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * _ORDER_SEED_STRIDE + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        ranked = sorted(range(len(chunk)), key=lambda i: (-lengths[chunk[i]], i))
        chunk = [chunk[i] for i in ranked]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return shuffled + short


def collate(data: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """One batch, padded to its longest sequence: input_ids, attention_mask, labels (CPU tensors)."""
    import torch

    sequences = [data.input_ids[i] for i in indices]
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(data: Encoded, batch_size: int) -> list[list[int]]:
    """Evaluation batches in dataset order."""
    return [list(range(start, min(start + batch_size, data.rows))) for start in range(0, data.rows, batch_size)]
