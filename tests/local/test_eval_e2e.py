"""Evaluation during training end to end (issue 15): `relay run` on the embedded Temporal server with
evalEverySteps, metricForBest, loadBestAtEnd and earlyStoppingPatience; the run succeeds early, and the status
says why (condition reason EarlyStopped) and which step's model final/ holds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The demo data's accuracy stays at 0.6667 for the first evaluations: patience 2 ends the run at step 15, and
# the best (the earliest of equal values) is step 5.
RUN = """\
apiVersion: relay.dev/v1alpha1
kind: TrainingRun
metadata:
  name: eval-run
spec:
  model: tiny
  dataset: {source: demo, maxRows: 300}
  training:
    maxSteps: 80
    batchSize: 8
    maxSeqLength: 32
    checkpointEverySteps: 50
    keepLast: 1
    evalEverySteps: 5
    metricForBest: accuracy
    earlyStoppingPatience: 2
    loadBestAtEnd: true
  resources: {cpu: "1"}
"""


def relay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_relay_run_stops_early_and_says_so(tmp_path: Path) -> None:
    volume, address = tmp_path / "volume", f"127.0.0.1:{_free_port()}"
    file = tmp_path / "run.yaml"
    file.write_text(RUN, encoding="utf-8")
    result = relay("run", str(file), "--volume", str(volume), "--address", address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Succeeded: finished (EarlyStopped at step 15)" in result.stdout
    status = relay("status", "eval-run", "--volume", str(volume), "--address", address, "--json")
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    succeeded = next(c for c in document["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("True", "EarlyStopped")
    assert document["phase"] == "Succeeded" and document["step"] == 15
    metrics = document["metrics"]
    assert (metrics["stopped_at_step"], metrics["best_step"], metrics["model_step"]) == (15, 5, 5)
    run_dir = volume / "runs" / "default" / "eval-run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000005", "step-000000015"]
