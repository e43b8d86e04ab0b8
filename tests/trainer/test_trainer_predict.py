"""`python -m trainer predict`: labels and probabilities from a final model or a checkpoint, and its bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, make_rows, trainer_env, write_config

from trainer.__main__ import main
from trainer.volume import ExitCode, RunLayout

EVAL_ROWS = make_rows(48, seed=2)  # the session snapshot's eval split


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    folder = tmp_path_factory.mktemp("predict")
    config = write_config(folder / "config.json", epochs=4, checkpointEverySteps=20)
    command = ["train", "--run-dir", str(folder / "run"), "--snapshot", str(snapshot), "--config", str(config)]
    assert main(command) == ExitCode.COMPLETE
    return folder / "run"


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "predict", *args],
        capture_output=True,
        text=True,
        env=trainer_env(),
        cwd=REPO,
        timeout=120,
    )


def test_predictions_reproduce_the_reported_eval_accuracy(finished: Path, tmp_path: Path) -> None:
    texts = tmp_path / "eval.txt"
    texts.write_text("".join(row["text"] + "\n" for row in EVAL_ROWS))
    result = predict("--model", str(finished / "final"), "--file", str(texts), "--json", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == [row["text"] for row in EVAL_ROWS]
    for line in lines:
        assert set(line) == {"text", "label", "probabilities"} and len(line["probabilities"]) == 2
        assert abs(sum(line["probabilities"]) - 1) < 1e-4
        assert line["label"] == max(range(2), key=lambda i: line["probabilities"][i])
    accuracy = sum(line["label"] == row["label"] for line, row in zip(lines, EVAL_ROWS, strict=True)) / len(lines)
    metrics = json.loads((finished / "final" / "metrics.json").read_text())
    assert accuracy == metrics["accuracy"]
    assert metrics["accuracy"] > 0.6, "the tiny model learns the synthetic sentiment words"


def test_checkpoint_of_the_last_step_predicts_like_the_final_model(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a superb and charming film", "dull tedious plot", ""]
    last = RunLayout(finished).checkpoints_dir / "step-000000080"
    assert main(["predict", "--model", str(finished / "final"), "--text", *texts, "--json"]) == 0
    from_final = capsys.readouterr().out
    assert main(["predict", "--model", str(last), "--text", *texts, "--json"]) == 0
    assert capsys.readouterr().out == from_final
    assert len(from_final.splitlines()) == 3


def test_plain_output_is_label_probability_text(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", str(finished / "final"), "--text", "lovely music"]) == 0
    label, probability, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert label in {"0", "1"} and 0.5 <= float(probability) <= 1 and text == "lovely music"


def run_main(arguments: list[str]) -> int:
    """The command line in this process; argparse's usage errors exit through SystemExit."""
    try:
        return main(arguments)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--model", "{tmp}/nowhere", "--text", "x"], "--model {tmp}/nowhere: no such directory"),
        (["--model", "{final}", "--file", "{tmp}/empty.txt"], "--file {tmp}/empty.txt: no texts"),
        (["--model", "{final}", "--file", "{tmp}/absent.txt"], "--file {tmp}/absent.txt: unreadable"),
        (["--model", "{tmp}", "--text", "x"], "--model {tmp}: not a loadable model"),
        (["--model", "{final}"], "one of the arguments --text --file is required"),
        (["--model", "{final}", "--text", "x", "--batch-size", "0"], "--batch-size: 0 must be at least 1"),
    ],
)
def test_bad_input_exits_65(
    arguments: list[str], expected: str, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    fill = {"tmp": str(tmp_path), "final": str(finished / "final")}
    assert run_main(["predict", *[a.format(**fill) for a in arguments]]) == ExitCode.INVALID_INPUT
    err = capsys.readouterr().err
    assert expected.format(**fill) in err and len(err.strip().splitlines()) == 1, err


def test_corrupt_checkpoint_is_refused(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    weights = RunLayout(copy).checkpoints_dir / "step-000000080" / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    assert main(["predict", "--model", str(weights.parent), "--text", "x"]) == ExitCode.INVALID_INPUT
    assert "model.safetensors: xxh3_128 does not match manifest" in capsys.readouterr().err


def test_texts_starting_with_a_dash_are_texts_not_options(finished: Path) -> None:
    texts = ["-- not an option", "-v", "a plain review"]
    result = predict("--model", str(finished / "final"), "--json", *[f"--text={t}" for t in texts])
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == texts


def test_output_file_holds_the_predictions_of_a_json_array_of_texts(finished: Path, tmp_path: Path) -> None:
    """What a predict Job runs: texts from a .json array (newlines and empty texts kept), results to --output."""
    texts = ["a superb\nand charming film", "", "-v"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    output = tmp_path / "out/predictions.json"
    texts_file = str(tmp_path / "texts.json")
    result = predict("--model", str(finished / "final"), "--file", texts_file, "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 3 predictions to {output}"
    rows = json.loads(output.read_text())["predictions"]
    assert [row["text"] for row in rows] == texts
    stdout = predict("--model", str(finished / "final"), "--json", *[f"--text={t}" for t in texts]).stdout
    assert rows == [json.loads(line) for line in stdout.splitlines()], "--output and --json give the same results"


def test_bad_input_is_written_to_the_output_file_too(finished: Path, tmp_path: Path) -> None:
    (tmp_path / "texts.json").write_text('{"not": "a list"}')
    output = tmp_path / "predictions.json"
    result = predict("--model", str(tmp_path), "--file", str(tmp_path / "texts.json"), "--output", str(output))
    assert result.returncode == ExitCode.INVALID_INPUT
    error = json.loads(output.read_text())
    assert error == {"error": f"invalid input: --file {tmp_path}/texts.json: must hold a JSON array of strings",
                     "exitCode": 65}  # fmt: skip
    assert error["error"] in result.stderr
    (tmp_path / "texts.json").write_text('["x"]')
    result = predict("--model", str(tmp_path), "--file", str(tmp_path / "texts.json"), "--output", str(output))
    assert result.returncode == ExitCode.INVALID_INPUT
    message = json.loads(output.read_text())["error"]
    assert message.startswith(f"invalid input: --model {tmp_path}: not a loadable model")
