"""`relay drill`: a tiny TrainingRun under a seeded random sequence of real faults, then checks that nothing was lost.

core.py plans the faults, injects them and judges the run (its docstring lists the faults and the checks);
local.py runs the drill on the local backend, kubernetes.py on whatever cluster a kubeconfig names (a staging
cluster; the tests, `make drill` and the benchmarks point it at envtest through relay_testing.drill) with
`relay controller` as its own process.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.drill.core import Check, DrillError, DrillResult, FaultRecord, format_result, plan, steps_for

LOCAL_FAULTS = (
    "sigterm",
    "sigkill",
    "sigkill-in-write",
    "worker-restart",
    "server-restart",
    "enospc",
    "corrupt-newest",
)
KUBERNETES_FAULTS = tuple("controller-restart" if k == "worker-restart" else k for k in LOCAL_FAULTS)
# Asked for by name only (--kinds), never in the default mix: the seeded plans of `make drill` and the tests stay
# the same. stalled-leg (issue 13) waits retries.progressStallSeconds (core.STALL_S, 30 s) per fault; node-lost
# (issue 13, Kubernetes with a node harness that can partition a node) waits nodeLostAfterSeconds (core.NODE_LOST_S).
OPT_IN_FAULTS = ("stalled-leg", "node-lost")
NODE_LOST_LOCAL = (
    "'node-lost' needs a node: the local backend has none (its analogue is stalled-leg, a trainer alive but silent)"
)
ALL_FAULTS = LOCAL_FAULTS  # the local drill's, the default backend
FAULTS = {"local": LOCAL_FAULTS, "kubernetes": KUBERNETES_FAULTS}

if TYPE_CHECKING:
    from controller.drill.kubernetes import ClusterTarget, NodeAccess

__all__ = ["ALL_FAULTS", "FAULTS", "Check", "DrillResult", "FaultRecord", "format_result", "plan", "run_drill",
           "steps_for"]  # fmt: skip


def run_drill(
    seed: int,
    faults: int,
    volume: str | None,
    kinds: tuple[str, ...] | None = None,
    backend: str = "local",
    *,
    cluster: ClusterTarget | None = None,
    node: NodeAccess | None = None,
) -> tuple[int, DrillResult | None]:
    """Run one drill and print its table; (exit code, result). 0 only when every check passed.

    The Kubernetes backend needs `cluster`; `node` (a harness playing the node) adds the faults that need the
    trainer's process, which a real cluster does not offer (its default kinds are the API-level ones).
    """
    known = FAULTS.get(backend)
    if known is None:
        print(f"relay drill: --backend: unknown backend {backend!r} (known: local, kubernetes)", file=sys.stderr)
        return 2, None
    if backend == "local" and "node-lost" in (kinds or ()):
        print(f"relay drill: --kinds: {NODE_LOST_LOCAL}", file=sys.stderr)
        return 2, None
    if backend == "kubernetes" and "node-lost" in (kinds or ()) and not hasattr(node, "lose_node"):
        print("relay drill: --kinds: 'node-lost' needs a node harness that can cut a node off from the API server "
              "(relay_testing.drill's process kubelets); a real cluster's nodes are not the drill's to partition",
              file=sys.stderr)  # fmt: skip
        return 2, None
    if backend == "kubernetes" and node is None:
        from controller.drill.kubernetes import API_FAULTS

        needs_node = [k for k in kinds or () if k in known and k not in API_FAULTS]
        if needs_node:
            print(f"relay drill: --kinds: {needs_node[0]!r} needs the trainer's process on this machine (a test "
                  f"harness); on a cluster: {', '.join(API_FAULTS)}", file=sys.stderr)  # fmt: skip
            return 2, None
        known = API_FAULTS
    default, known = known, (*known, *OPT_IN_FAULTS)
    if backend == "kubernetes" and node is None:
        known = default  # stalled-leg needs the trainer's process too
    kinds = kinds or default
    unknown = [k for k in kinds if k not in known]
    if unknown:
        print(f"relay drill: --kinds: unknown fault {unknown[0]!r} for the {backend} backend (known: "
              f"{', '.join(known)})", file=sys.stderr)  # fmt: skip
        return 2, None
    if faults < 1:
        print("relay drill: --faults: must be at least 1", file=sys.stderr)
        return 2, None
    if backend == "kubernetes":
        problem = cluster.problem() if cluster is not None else "no cluster given"
        if problem:
            print(f"relay drill: --backend kubernetes: {problem}", file=sys.stderr)
            return 2, None
    workdir = Path(volume).resolve() if volume else Path(tempfile.mkdtemp(prefix="relay-drill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "volume").exists() and any((workdir / "volume").iterdir()):
        print(f"relay drill: --volume {workdir}: holds an earlier drill; give an empty folder", file=sys.stderr)
        return 2, None
    drill: Any
    if backend == "kubernetes":
        from controller.drill.kubernetes import KubernetesDrill

        assert cluster is not None
        drill = KubernetesDrill(workdir, seed, faults, kinds, cluster=cluster, node=node)
    else:
        from controller.drill.local import LocalDrill

        drill = LocalDrill(workdir, seed, faults, kinds)
    try:
        result = asyncio.run(drill.execute())
    except DrillError as exc:
        print(f"relay drill: FAILED: {exc} (logs in {workdir})", file=sys.stderr)
        return 1, None
    print(format_result(result))
    print(f"drill folder: {workdir}")
    return (0 if result.passed else 1), result
