"""The cluster's policy for TrainingRuns: which priority classes, tolerations and image registries a run may use.

A TrainingRun's author is not the cluster's administrator: `priorityClassName: system-node-critical` or a
toleration `{operator: Exists}` (no key: every taint, control-plane nodes included) would let any namespace
that may create a TrainingRun jump every queue or land on any node, and `image` runs whatever the author
names with the run's volume mounted. The chart's values list what is allowed (`policy.*`); `relay
controller --policy JSON` receives it; `check_policy(spec, policy)` is pure and returns one `field: message`
line per refusal, which the create handler turns into a Failed condition (`relay validate --policy` too).

Defaults, when a list is empty: no priority class at all; any toleration that names a key; any registry
(the bare controller; the chart always lists its own trainer image's registry). Whatever the lists say,
`system-*` priority classes are refused (they are the cluster's own, for node-critical pods) and a toleration
without a key is refused unless an allowed entry has no key either.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError

from controller.spec import SchedulingProfile, Toleration, TrainingRunSpec
from trainer.config import CamelModel

RESERVED_PRIORITY_PREFIX = "system-"
DEFAULT_REGISTRY = "docker.io"


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the field at fault."""


class TolerationRule(CamelModel):
    """One allowed toleration: a run's toleration matches when it has this key and every field set here."""

    key: str | None = Field(None, description="Taint key; none: a key-less toleration (tolerates every taint).")
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    def allows(self, toleration: Toleration) -> bool:
        if self.key != toleration.key:
            return False
        wanted = {"operator": self.operator, "value": self.value, "effect": self.effect}
        return all(want is None or getattr(toleration, field) == want for field, want in wanted.items())


class Policy(CamelModel):
    """What the cluster allows TrainingRuns to ask for; see the module docstring for what empty lists mean."""

    model_config = ConfigDict(frozen=True)  # merged with CamelModel's (extra="forbid": a misspelt key is an error)
    priority_classes: list[str] = Field(default_factory=list)
    tolerations: list[TolerationRule] = Field(default_factory=list)
    image_registries: list[str] = Field(default_factory=list)

    @classmethod
    def from_json(cls, text: str, source: str = "--policy") -> Policy:
        try:
            return cls.model_validate(json.loads(text or "{}"))
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{source}: not valid JSON: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '(policy)'}: {err['msg']}" for err in exc.errors(include_url=False)
            )
            raise PolicyError(f"{source}: {problems}") from None


def image_repository(image: str) -> str:
    """`image` without tag or digest, with its registry spelt out as the container runtime reads it
    ("bert" -> "docker.io/library/bert", "ghcr.io/org/img:1" -> "ghcr.io/org/img")."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"{DEFAULT_REGISTRY}/{name}" if rest else f"{DEFAULT_REGISTRY}/library/{name}"


def _registry_allowed(image: str, registries: list[str]) -> bool:
    repository = image_repository(image)
    for entry in registries:
        prefix = entry.rstrip("/")
        if repository == prefix or repository.startswith(prefix + "/"):
            return True
    return False


def _profile_problems(profile: SchedulingProfile, policy: Policy, where: str) -> list[str]:
    problems = []
    name = profile.priority_class_name
    if name is not None:
        if name.startswith(RESERVED_PRIORITY_PREFIX):
            problems.append(
                f"{where}.priorityClassName: {name!r} is reserved for the cluster's own critical pods; never allowed"
            )
        elif name not in policy.priority_classes:
            allowed = ", ".join(policy.priority_classes) or "none (leave it unset)"
            problems.append(
                f"{where}.priorityClassName: {name!r} is not allowed by the cluster's policy (allowed: {allowed})"
            )
    for index, toleration in enumerate(profile.tolerations):
        field = f"{where}.tolerations.{index}"
        if any(rule.allows(toleration) for rule in policy.tolerations):
            continue
        if toleration.key is None:
            problems.append(
                f"{field}: a toleration without a key tolerates every taint (control-plane nodes too); "
                "not allowed by the cluster's policy"
            )
        elif policy.tolerations:
            allowed = ", ".join(rule.model_dump_json(exclude_none=True) for rule in policy.tolerations)
            problems.append(
                f"{field}: key {toleration.key!r} is not allowed by the cluster's policy (allowed: {allowed})"
            )
    return problems


def check_policy(spec: TrainingRunSpec, policy: Policy) -> list[str]:
    """`field: message` for every part of `spec` the policy refuses; empty when the run may start."""
    problems = []
    if policy.image_registries and not _registry_allowed(spec.image, policy.image_registries):
        problems.append(
            f"spec.image: {spec.image!r} is not from an allowed registry ({', '.join(policy.image_registries)})"
        )
    problems += _profile_problems(spec.scheduling, policy, "spec.scheduling")
    if spec.scheduling.fallback is not None:
        problems += _profile_problems(spec.scheduling.fallback, policy, "spec.scheduling.fallback")
    return problems
