"""The workflow code loads no implementation: importing controller.workflows brings in models and decisions only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What workflow code must never load: activities and what they drive (processes, Kubernetes, datasets, torch).
IMPLEMENTATION = ("controller.activities", "controller.snapshot", "controller.kubernetes", "controller.backends.local",
                  "kubernetes", "kopf", "datasets", "torch", "transformers")  # fmt: skip


def test_importing_the_workflows_loads_no_implementation():
    probe = "import sys, controller.workflows; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = done.stdout.split()
    assert "controller.messages" in loaded and "controller.decisions" in loaded
    assert [m for m in loaded if m.startswith(IMPLEMENTATION)] == []
