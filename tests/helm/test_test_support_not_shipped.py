"""The test support (envtest control plane, process kubelet, stand-in trainers) stays out of the product: not in
the wheel's packages, not copied into an image, never imported by the controller or the trainer; the drill's
Kubernetes backend takes a node harness through its own small interface instead."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUPPORT = "relay_testing"


def test_the_wheel_lists_no_test_support_package() -> None:
    packages = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if p.startswith(SUPPORT) or "envtest" in p], packages
    assert (REPO / SUPPORT / "__init__.py").is_file() and not (REPO / "controller" / "envtest").exists()


def test_no_image_copies_the_test_support() -> None:
    for dockerfile in (REPO / "controller" / "Dockerfile", REPO / "trainer_image" / "Dockerfile"):
        copies = [line for line in dockerfile.read_text(encoding="utf-8").splitlines() if line.startswith("COPY")]
        assert copies and not [line for line in copies if SUPPORT in line or " . " in line], (dockerfile, copies)
    ignore = (REPO / "controller" / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("*") + 1 :] and f"!{SUPPORT}/" not in ignore  # an allow-list that leaves it out


def test_neither_the_controller_nor_the_trainer_imports_the_test_support() -> None:
    offenders = []
    for root in (REPO / "controller", REPO / "trainer_image" / "trainer"):
        for source in root.rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{source.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == SUPPORT]
    assert not offenders, offenders


def test_the_wheel_lists_every_product_package() -> None:
    """A package missing from the list is missing from the installed wheel and the controller image: the image's
    `relay --help` then fails on the import (seen with controller.sweep)."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    found = {
        ".".join((prefix, *init.parent.relative_to(root).parts))
        for prefix, root in (("controller", REPO / "controller"), ("trainer", REPO / "trainer_image" / "trainer"))
        for init in root.rglob("__init__.py")
    }
    assert sorted(found - set(packages)) == [], "packages missing from pyproject.toml [tool.setuptools] packages"
