"""Which paths on the volume a namespace may read: its own prefixes and the operator's shared area, never another's.

    runs/<ns>/...        the namespace's runs: checkpoints, final models, predictions (written by its legs)
    data/<ns>/...        the namespace's datasets, placed by its owners
    models/<ns>/...      the namespace's base models, placed by its owners
    snapshots/...        written by the controller only; read through a run's snapshot, never named in a spec
    anything else        the operator's shared, read-only area (e.g. `datasets/reviews.csv` in the examples)

`runs/`, `data/` and `models/` hold one folder per namespace; a path whose second part is another namespace
(`dataset.path: runs/other-ns/run/private.csv`, `modelPath: runs/other-ns/run/final`) is refused with
ForeignPath (issue 11). Call it with the path relative to the volume root *after* resolving symlinks, so a link
planted in a run folder cannot point the read elsewhere.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

NAMESPACED_ROOTS = ("runs", "data", "models")
CONTROLLER_ROOTS = ("snapshots",)


class ForeignPath(ValueError):
    """A path another namespace owns (or only the controller writes); the message names the field and the path."""


def check_namespace_read(namespace: str, relative: str, field: str) -> None:
    """Raise ForeignPath unless namespace `namespace` may read `relative` (a path under the volume root)."""
    parts = PurePosixPath(relative).parts
    if not parts or parts[0] in ("/", "..") or ".." in parts:
        raise ForeignPath(f"{field} {relative!r}: not a path inside the volume")
    if parts[0] in CONTROLLER_ROOTS:
        raise ForeignPath(f"{field} {relative!r}: {parts[0]}/ is written by the controller, not a source to name")
    if parts[0] in NAMESPACED_ROOTS and (len(parts) < 2 or parts[1] != namespace):
        raise ForeignPath(
            f"{field} {relative!r}: namespace {namespace!r} reads only {parts[0]}/{namespace}/ under {parts[0]}/"
        )


def check_resolved_read(namespace: str, volume_root: Path, path: str, field: str) -> Path:
    """Resolve `path` under the (resolved) `volume_root` as a read would, symlinks followed, and check that
    `namespace` may read where it leads; the resolved path, or ForeignPath naming `field`."""
    resolved = (volume_root / path).resolve()
    inside = resolved.relative_to(volume_root).as_posix() if resolved.is_relative_to(volume_root) else ".."
    check_namespace_read(namespace, inside, field)
    return resolved
