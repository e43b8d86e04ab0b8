"""Attack tier, issue 11 "Scheduling fields are open": `priorityClassName: system-node-critical` and a toleration
`{operator: Exists}` (no key) were accepted from any TrainingRun, and so was any image. `check_policy` is the pure
rule the create handler and `relay validate --policy` apply; a table of specs and policies, and the refusal lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.cli import run_command
from controller.policy import Policy, PolicyError, check_policy, image_repository
from controller.spec import TrainingRunSpec

CHART_DEFAULT = Policy(image_registries=["ghcr.io/relay-ml"])


def spec(**fields: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, **fields})


def scheduling(**fields: Any) -> TrainingRunSpec:
    return spec(scheduling=fields)


CASES = [
    # (case, spec, policy, refused fields)
    ("defaults pass", spec(), CHART_DEFAULT, []),
    (
        "a keyed toleration passes by default",
        scheduling(tolerations=[{"key": "spot", "operator": "Exists"}]),
        Policy(),
        [],
    ),
    (
        "system-node-critical is refused",
        scheduling(priorityClassName="system-node-critical"),
        Policy(priority_classes=["system-node-critical"]),
        ["spec.scheduling.priorityClassName"],
    ),
    (
        "no priority class is allowed by default",
        scheduling(priorityClassName="batch"),
        Policy(),
        ["spec.scheduling.priorityClassName"],
    ),
    ("a listed priority class passes", scheduling(priorityClassName="batch"), Policy(priority_classes=["batch"]), []),
    (
        "the fallback profile is checked too",
        scheduling(fallback={"priorityClassName": "high", "tolerations": [{"operator": "Exists"}]}),
        Policy(priority_classes=["batch"]),
        ["spec.scheduling.fallback.priorityClassName", "spec.scheduling.fallback.tolerations.0"],
    ),
    (
        "operator Exists without a key is refused",
        scheduling(tolerations=[{"operator": "Exists"}]),
        Policy(),
        ["spec.scheduling.tolerations.0"],
    ),
    (
        "unless the policy lists a key-less toleration",
        scheduling(tolerations=[{"operator": "Exists"}]),
        Policy.model_validate({"tolerations": [{"operator": "Exists"}]}),
        [],
    ),
    (
        "a listed key passes, another is refused",
        scheduling(
            tolerations=[
                {"key": "spot", "operator": "Exists"},
                {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
            ]
        ),
        Policy.model_validate({"tolerations": [{"key": "spot"}]}),
        ["spec.scheduling.tolerations.1"],
    ),
    (
        "a rule's effect must match",
        scheduling(tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}]),
        Policy.model_validate({"tolerations": [{"key": "gpu", "effect": "NoSchedule"}]}),
        ["spec.scheduling.tolerations.0"],
    ),
    ("another registry is refused", spec(image="evil.example.com/miner:1"), CHART_DEFAULT, ["spec.image"]),
    ("a look-alike host is refused", spec(image="ghcr.io.evil.com/relay-ml/trainer:1"), CHART_DEFAULT, ["spec.image"]),
    ("a look-alike org is refused", spec(image="ghcr.io/relay-ml-evil/trainer:1"), CHART_DEFAULT, ["spec.image"]),
    ("docker hub is refused unless listed", spec(image="ubuntu"), CHART_DEFAULT, ["spec.image"]),
    (
        "a listed registry passes",
        spec(image="registry.corp:5000/ml/trainer@sha256:ab"),
        Policy(image_registries=["registry.corp:5000/ml"]),
        [],
    ),
    ("no registry list: the bare controller allows any", spec(image="ubuntu:24.04"), Policy(), []),
]


@pytest.mark.parametrize(("case", "run", "policy", "fields"), CASES, ids=[c[0] for c in CASES])
def test_policy_table(case: str, run: TrainingRunSpec, policy: Policy, fields: list[str]) -> None:
    problems = check_policy(run, policy)
    assert [line.split(": ", 1)[0] for line in problems] == fields, problems


def test_the_refusal_line_says_what_is_allowed() -> None:
    (line,) = check_policy(scheduling(priorityClassName="system-node-critical"), Policy())
    assert line.startswith("spec.scheduling.priorityClassName: 'system-node-critical' is reserved")
    (line,) = check_policy(scheduling(priorityClassName="high"), Policy(priority_classes=["batch", "low"]))
    assert line.endswith("(allowed: batch, low)")


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("bert", "docker.io/library/bert"),
        ("org/bert:1", "docker.io/org/bert"),
        ("ghcr.io/relay-ml/relay-trainer:0.1.0", "ghcr.io/relay-ml/relay-trainer"),
        ("localhost/trainer", "localhost/trainer"),
        ("registry:5000/t@sha256:00", "registry:5000/t"),
    ],
)
def test_image_repository_spells_out_the_registry(image: str, repository: str) -> None:
    assert image_repository(image) == repository


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not valid JSON"),
        ('{"priorityClass": []}', "priorityClass"),
        ('{"tolerations": [{"operator": "Any"}]}', "tolerations.0.operator"),
    ],
)
def test_a_bad_policy_names_its_field(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        Policy.from_json(text)


def test_relay_validate_checks_the_policy_the_controller_enforces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "greedy", "namespace": "ml"},
        "spec": {"dataset": {"source": "demo"}, "scheduling": {"priorityClassName": "system-node-critical"}},
    }
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(document))
    assert run_command(["validate", str(run_file)]) == 0  # the document itself is valid
    capsys.readouterr()
    assert run_command(["validate", str(run_file), "--policy", "{}"]) == 2
    assert "  spec.scheduling.priorityClassName: 'system-node-critical' is reserved" in capsys.readouterr().err
    assert run_command(["validate", str(run_file), "--policy", '{"priority": 1}']) == 2
    assert "--policy: priority" in capsys.readouterr().err
