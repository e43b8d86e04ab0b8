"""Property-based checks of the trainer's config: any JSON document validates or is refused in one line naming a field.

In process through `trainer.train.load_config` (what every leg runs first), and through the real
`python -m trainer train` command for a few generated bad configs: exit 65 and nothing in checkpoints/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import TrainerConfig
from trainer.errors import InvalidInput
from trainer.train import load_config
from trainer.volume import ExitCode

FIELDS = sorted(TrainerConfig.model_json_schema(by_alias=True)["properties"])
VALID: dict[str, Any] = {"model": "tiny", "maxSteps": 5, "batchSize": 4, "checkpointEverySteps": 2}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=12))


def _check(text: str) -> TrainerConfig | None:
    """Validates, or InvalidInput with one line 'config <file>: <field>: <what>' naming a real field."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path)
        except InvalidInput as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"config {path}: "), message
            rest = message[len(f"config {path}: ") :]
            named = [*FIELDS, "(document)", *(document if isinstance(document, dict) else [])]
            named += [json.dumps(key) for key in named]
            assert any(rest.startswith(f"{field}: ") and len(rest) > len(field) + 2 for field in named), message
            return None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_mutated_configs_validate_or_name_a_field(changes: dict[str, Any]) -> None:
    document = {**VALID, **changes}
    config = _check(json.dumps(document))
    if config is not None:  # everything that validates round-trips to the same config
        assert TrainerConfig.model_validate_json(config.to_json_text()) == config
        assert config.batch_size >= 1 and 0 < config.learning_rate <= 1 and 0 <= config.warmup_ratio < 1


@settings(max_examples=100, deadline=None)
@given(st.one_of(values.map(json.dumps), st.text(max_size=40)))
def test_arbitrary_documents_never_raise_anything_else(text: str) -> None:
    _check(text)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batchSize": 0}, "batchSize"),
        ({"warmupRatio": 1.5}, "warmupRatio"),
        ({"learningRate": "fast"}, "learningRate"),
        ({"colour": "blue"}, "colour"),
        ({"checkpointEverySteps": None}, "(document)"),
    ],
)
def test_the_field_named_is_the_bad_one(change: dict[str, Any], field: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**VALID, **change}), encoding="utf-8")
    with pytest.raises(InvalidInput) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"config {path}: {field}: "), str(caught.value)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["batchSize", "learningRate", "warmupRatio", "maxSeqLength", "seed", "device"]),
    st.one_of(st.integers(max_value=-1), st.text(alphabet="xyz", min_size=1, max_size=5)),
)
def test_the_real_command_exits_65_and_writes_no_checkpoint(field: str, bad: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = root / "config.json"
        config.write_text(json.dumps({**VALID, field: bad}), encoding="utf-8")
        run_dir = root / "run"
        result = subprocess.run(
            [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir), "--snapshot", str(root / "snap"),
             "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == ExitCode.INVALID_INPUT, result.stderr[-1000:]
        errors = [line for line in result.stderr.splitlines() if "invalid input" in line]
        assert len(errors) == 1 and f"{field}: " in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        checkpoints = run_dir / "checkpoints"
        assert not checkpoints.exists() or not any(checkpoints.iterdir())
        assert json.loads((run_dir / "progress.json").read_text())["state"] == "invalid"
