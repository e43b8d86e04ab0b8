"""retries.nodeLostAfterSeconds and retries.progressStallSeconds (issue 13): defaults, and a threshold of 0 or a
negative one refused by `relay validate` naming the field, and by the generated CRD's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controller.cli import run_command
from controller.crd import OUTPUTS
from controller.spec import RetrySpec

DOCUMENT = """\
apiVersion: relay.dev/v1alpha1
kind: TrainingRun
metadata: {{name: sentiment, namespace: ml}}
spec:
  dataset: {{source: csv, path: data/reviews.csv}}
  retries: {{{field}: {value}}}
"""


def test_defaults_are_well_under_the_five_minute_eviction() -> None:
    retries = RetrySpec()
    assert retries.node_lost_after_seconds == 60 and retries.progress_stall_seconds == 600


@pytest.mark.parametrize("field", ["nodeLostAfterSeconds", "progressStallSeconds"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_relay_validate_refuses_a_threshold_of_zero_or_less_naming_it(
    field: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(DOCUMENT.format(field=field, value=value), encoding="utf-8")
    assert run_command(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"spec.retries.{field}" in err and "greater than 0" in err


def test_relay_validate_accepts_a_positive_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(DOCUMENT.format(field="nodeLostAfterSeconds", value="2.5"), encoding="utf-8")
    assert run_command(["validate", str(path)]) == 0


@pytest.mark.parametrize("field", ["nodeLostAfterSeconds", "progressStallSeconds"])
def test_the_crd_refuses_zero_on_the_api_server(field: str) -> None:
    for output in OUTPUTS:
        crd = yaml.safe_load(output.read_text(encoding="utf-8"))
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        schema = spec["properties"]["retries"]["properties"][field]
        assert schema["minimum"] == 0 and schema["exclusiveMinimum"] is True, output
