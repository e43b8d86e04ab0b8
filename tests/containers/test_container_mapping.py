"""What the container kubelet hands the engine for a leg's pod, checked without an engine: every field a kubelet
honours becomes its `docker run` flag, and a root-made claim gets the pod's fsGroup."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import kubernetes

from controller.kubernetes.jobs import build_leg_job
from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec
from relay_testing.container_kubelet import ContainerKubelet, apply_fs_group
from relay_testing.process_kubelet import LocalPod


def leg_pod() -> dict[str, Any]:
    spec = TrainingRunSpec.model_validate(
        {"dataset": {"source": "demo"}, "resources": {"cpu": "2", "memory": "3Gi"}, "terminationGracePeriodSeconds": 45}
    )
    leg = LegSpec(namespace="ml", name="bert", leg=1, run_path="runs/ml/bert", snapshot_path="snapshots/abc", spec=spec)
    template = build_leg_job(leg)["spec"]["template"]
    return {"metadata": {"namespace": "ml", "name": "bert-leg-1-x", "uid": "u1"}, "spec": template["spec"]}


def kubelet(tmp_path: Path) -> ContainerKubelet:
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://127.0.0.1:6443"
    configuration.ssl_ca_cert = str(tmp_path / "ca.crt")
    return ContainerKubelet(kubernetes.client.ApiClient(configuration), tmp_path / "volume", tmp_path / "work")


def test_a_leg_pod_becomes_a_restricted_docker_run_of_its_image(tmp_path: Path) -> None:
    harness = kubelet(tmp_path)
    pod = LocalPod("ml", "bert-leg-1-x", "u1", tmp_path / "work" / "u1")
    pod.workdir.mkdir(parents=True)
    obj = leg_pod()
    args = harness._docker_run_args(pod, obj)
    joined = " ".join(args)
    container = obj["spec"]["containers"][0]
    image = args.index(container["image"])
    assert args[:3] == ["run", "--name", "relay-u1"] and "--network host" in joined
    assert "--user 1000:1000" in joined and "--group-add 1000" in joined and "--read-only" in args
    assert "--cap-drop ALL" in joined and "--security-opt no-new-privileges" in joined
    assert "--cpu-shares 2048" in joined and "--cpus" not in args, "the Job requests CPUs and limits memory only"
    assert f"--memory {3 * 2**30} --memory-swap {3 * 2**30}" in joined
    assert "--tmpfs /dev/shm:rw,nosuid,nodev,mode=1777" in joined
    volume = tmp_path / "volume"
    assert f"{volume / 'runs/ml/bert'}:/relay-volume/runs/ml/bert" in args
    assert f"{volume / 'snapshots/abc'}:/relay-volume/snapshots/abc:ro" in args
    assert f"{pod.workdir / 'volumes' / 'tmp'}:/tmp" in args
    assert f"{pod.workdir / 'termination-log'}:{container['terminationMessagePath']}" in args
    assert stat.S_IMODE((pod.workdir / "termination-log").stat().st_mode) == 0o666
    assert "-e KUBERNETES_SERVICE_HOST=127.0.0.1" in joined and "-e KUBERNETES_SERVICE_PORT=6443" in joined
    assert "-e OMP_NUM_THREADS=2" in joined
    # command[0] is the entrypoint (the image's CMD is dropped, as in Kubernetes); the rest follow the image.
    assert args[args.index("--entrypoint") + 1] == container["command"][0]
    assert args[image + 1 :] == container["command"][1:]


def test_the_fs_group_makes_a_root_made_claim_writable_by_the_group(tmp_path: Path) -> None:
    root = tmp_path / "claim"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "config.json").write_text("{}")
    (root / "runs").chmod(0o755)
    (root / "runs" / "config.json").chmod(0o644)
    apply_fs_group(root, 1000)
    folder, file = (root / "runs").stat(), (root / "runs" / "config.json").stat()
    assert folder.st_gid == file.st_gid == 1000
    assert stat.S_IMODE(folder.st_mode) & 0o2070 == 0o2070, "group rwx and setgid on folders"
    assert stat.S_IMODE(file.st_mode) & 0o060 == 0o060
    assert folder.st_uid == file.st_uid == os.getuid(), "the owner stays"
