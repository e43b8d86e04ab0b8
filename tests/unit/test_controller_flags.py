"""`relay controller` flags for scale: out-of-range values are refused naming the flag."""

from __future__ import annotations

import pytest

from controller.kubernetes.main import build_parser


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--status-interval", "0"), ("--status-interval", "-5"), ("--max-concurrent-activities", "0")],
)
def test_non_positive_scale_flags_are_refused_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: '{value}' is not a positive" in capsys.readouterr().err


def test_scale_flags_are_taken_as_given() -> None:
    args = build_parser().parse_args(["--status-interval", "12.5", "--max-concurrent-activities", "2000"])
    assert (args.status_interval, args.max_concurrent_activities) == (12.5, 2000)
