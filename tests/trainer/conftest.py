"""Session fixtures for the trainer tests: one small dataset snapshot shared by all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import build_snapshot, make_rows


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 train rows, 48 eval rows, two labels."""
    folder = tmp_path_factory.mktemp("snapshot")
    return build_snapshot(folder, {"train": make_rows(160, seed=1), "eval": make_rows(48, seed=2)})
