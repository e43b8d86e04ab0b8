"""The container mode of the test kubelet: each pod runs as `docker run` of its own image.

The node, the watch, the pod status and the deletion handling are the process kubelet's (this is its subclass);
only how a container starts, stops and ends differs. What a kubelet honours for the pods Relay makes is mapped:

- command/args/env/workingDir: `--entrypoint` + arguments (a command drops the image's CMD, as in Kubernetes),
  `-e`, `-w`; KUBERNETES_SERVICE_HOST/PORT name the API server, as every pod gets.
- volumes: a claim -> its host folder (`volume_for_namespace`, else `volume_root`) with subPath and readOnly, after
  the pod's fsGroup is applied to it as a kubelet does for a volume that supports ownership (`fs_group_on_claims`;
  off = a hostPath or NFS volume, whose files keep their owner); emptyDir -> a 0777 host folder, medium Memory ->
  a tmpfs; a secret or a projected ServiceAccount token -> its files in a host folder, read-only.
- securityContext: runAsUser/runAsGroup (`--user`), fsGroup (`--group-add`), readOnlyRootFilesystem (`--read-only`),
  capabilities drop (`--cap-drop`), allowPrivilegeEscalation false (`--security-opt no-new-privileges`).
- resources: cpu request (`--cpu-shares`), cpu limit (`--cpus`), memory limit (`--memory`, no swap beyond it).
- terminationGracePeriodSeconds: `docker stop -t` (SIGTERM, the grace period, SIGKILL).
- terminationMessagePath: a 0666 host file bound there, read back as the kubelet does.
- the end: the runtime's exit code, and reason OOMKilled when the kernel killed it for its memory limit.

An image that is not present and cannot be pulled leaves the pod Pending, waiting with reason ErrImagePull and
the runtime's message, as a kubelet reports it. Every container runs with `--network host`: the envtest API server
and Temporal listen on 127.0.0.1, and the engine here has no bridge network (../shared/containers/README.md).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

import kubernetes
from kubernetes.utils import parse_quantity

from relay_testing.process_kubelet import LocalPod, ProcessKubelet

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LABEL = "relay.dev/test-kubelet"


def docker(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


def engine_problem() -> str:
    """Why containers cannot run here ("" when they can): no docker client, or no engine answering it."""
    if shutil.which("docker") is None:
        return "no `docker` client on PATH"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout_s=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 20 s"
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[-300:]}"
    return ""


def image_present(image: str) -> bool:
    return docker("image", "inspect", image).returncode == 0


class ContainerKubelet(ProcessKubelet):
    def __init__(
        self, api_client: kubernetes.client.ApiClient, volume_root: Path, work_root: Path, **kwargs: Any
    ) -> None:
        super().__init__(api_client, volume_root, work_root, **kwargs)
        self.server = str(api_client.configuration.host)
        self.ca_cert = Path(str(api_client.configuration.ssl_ca_cert))
        # A kubelet applies fsGroup to volumes that support ownership (block-backed PVs); off plays hostPath/NFS.
        self.fs_group_on_claims = True
        # The engine's own command of each started container, for a test that checks the mapping.
        self.docker_args: dict[str, list[str]] = {}

    # ------------------------------------------------------------ starting

    def _run(self, pod: LocalPod, obj: dict[str, Any]) -> None:
        container = obj["spec"]["containers"][0]
        problem = self._pull(container["image"], container.get("imagePullPolicy", "IfNotPresent"))
        if problem:
            reason, message = problem
            waiting = {"waiting": {"reason": reason, "message": message}}
            self._patch_status(pod, {"phase": "Pending", "containerStatuses": [self._container_status(obj, waiting)]})
            return
        super()._run(pod, obj)

    @staticmethod
    def _pull(image: str, policy: str) -> tuple[str, str] | None:
        """None when the image is present (or pulled); else the waiting reason and the runtime's message."""
        if policy != "Always" and image_present(image):
            return None
        if policy == "Never":
            return "ErrImageNeverPull", f'Container image "{image}" is not present with pull policy of Never'
        try:
            pulled = docker("pull", image, timeout_s=60)
        except subprocess.TimeoutExpired:
            return "ErrImagePull", f'pulling image "{image}": no answer from the registry in 60 s'
        if pulled.returncode != 0:
            return "ErrImagePull", f'pulling image "{image}": {pulled.stderr.strip()[-500:]}'
        return None

    def _launch(self, pod: LocalPod, obj: dict[str, Any], log: IO[bytes]) -> subprocess.Popen[bytes]:
        args = self._docker_run_args(pod, obj)
        self.docker_args[f"{pod.namespace}/{pod.name}"] = args
        # `docker run` is a client: signals reach the container through the engine (_kill, _terminate); its own
        # session lets the base class's stop() end the client alone.
        return subprocess.Popen(
            ["docker", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    @staticmethod
    def container_name(pod: LocalPod) -> str:
        return f"relay-{pod.uid}"

    def _docker_run_args(self, pod: LocalPod, obj: dict[str, Any]) -> list[str]:
        spec = obj["spec"]
        container = spec["containers"][0]
        pod_security = spec.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        args = ["run", "--name", self.container_name(pod), "--network", "host", "--label", f"{LABEL}={self.node_name}"]
        user, group = security.get("runAsUser"), security.get("runAsGroup")
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else 0}"]
        fs_group = pod_security.get("fsGroup")
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for capability in (security.get("capabilities") or {}).get("drop", []):
            args += ["--cap-drop", capability]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if "cpu" in requests:  # the kubelet's cgroup cpu.shares: 1024 per CPU requested
            args += ["--cpu-shares", str(max(2, int(float(parse_quantity(requests["cpu"])) * 1024)))]
        if "cpu" in limits:
            args += ["--cpus", f"{float(parse_quantity(limits['cpu'])):g}"]
        if "memory" in limits:
            memory = str(int(parse_quantity(limits["memory"])))
            args += ["--memory", memory, "--memory-swap", memory]  # equal: no swap, as on a kubelet's node
        args += self._volume_args(pod, obj, fs_group)
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, **self.extra_env}
        env.update({item["name"]: str(item.get("value", "")) for item in container.get("env", [])})
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        if container.get("workingDir"):
            args += ["-w", container["workingDir"]]
        command = list(container.get("command", []))
        if command:
            args += ["--entrypoint", command[0]]
        return [*args, container["image"], *command[1:], *container.get("args", [])]

    # ------------------------------------------------------------ volumes

    def _volume_args(self, pod: LocalPod, obj: dict[str, Any], fs_group: int | None) -> list[str]:
        spec = obj["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        args: list[str] = []
        claim_root = self.volume_for_namespace.get(pod.namespace, self.volume_root)
        claim_group = fs_group if self.fs_group_on_claims else None
        if claim_group is not None and any("persistentVolumeClaim" in v for v in volumes.values()):
            apply_fs_group(claim_root, claim_group)
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            target = mount["mountPath"]
            read_only = ":ro" if mount.get("readOnly") else ""
            if "persistentVolumeClaim" in volume:
                local = claim_root / mount.get("subPath", "")
                local.mkdir(parents=True, exist_ok=True)
                if claim_group is not None:
                    apply_fs_group(local, claim_group)  # a subPath the kubelet made is the pod's, like the rest
                args += ["-v", f"{local}:{target}{read_only}"]
            elif "emptyDir" in volume and (volume["emptyDir"] or {}).get("medium") == "Memory":
                args += ["--tmpfs", f"{target}:rw,nosuid,nodev,mode=1777"]
            elif "emptyDir" in volume:
                local = pod.workdir / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                local.chmod(0o777)  # the kubelet makes an emptyDir world-writable
                args += ["-v", f"{local}:{target}"]
            elif "secret" in volume or "projected" in volume:
                local = self._token_files(pod, spec, mount["name"], volume)
                args += ["-v", f"{local}:{target}:ro"]
        # The kubelet binds an empty, world-writable file at terminationMessagePath; the base class reads it back.
        termination_log = pod.workdir / "termination-log"
        termination_log.write_bytes(b"")
        termination_log.chmod(0o666)
        message_path = container.get("terminationMessagePath") or "/dev/termination-log"
        return [*args, "-v", f"{termination_log}:{message_path}"]

    def _token_files(self, pod: LocalPod, spec: dict[str, Any], name: str, volume: dict[str, Any]) -> Path:
        """The files of a secret volume, or of a projected one (ServiceAccount token, ca.crt, namespace)."""
        local = pod.workdir / "volumes" / name
        local.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        sources = volume["projected"].get("sources", []) if "projected" in volume else [{"secret": volume["secret"]}]
        for source in sources:
            if "secret" in source:
                secret_name = source["secret"].get("secretName") or source["secret"]["name"]
                secret = self.core.read_namespaced_secret(secret_name, pod.namespace)
                files.update({k: base64.b64decode(v) for k, v in (secret.data or {}).items()})
            elif "serviceAccountToken" in source:
                account = spec.get("serviceAccountName") or "default"
                request = {"spec": {"expirationSeconds": source["serviceAccountToken"].get("expirationSeconds", 3600)}}
                response: Any = self.core.create_namespaced_service_account_token(  # raw: _preload_content
                    account,
                    pod.namespace,
                    request,  # type: ignore[arg-type]  # the client takes plain dicts
                    _preload_content=False,
                )
                issued = json.loads(response.data)["status"]["token"]
                files[source["serviceAccountToken"].get("path", "token")] = issued.encode()
            elif "downwardAPI" in source:
                files["namespace"] = pod.namespace.encode()
        if "ca.crt" not in files:  # the controller-manager here runs without --root-ca-file
            files["ca.crt"] = self.ca_cert.read_bytes()
        files.setdefault("namespace", pod.namespace.encode())
        for key, value in files.items():
            (local / key).write_bytes(value)
            (local / key).chmod(0o644)
        return local

    # ------------------------------------------------------------ stopping and the end

    def _kill(self, pod: LocalPod, sig: Any) -> None:
        if pod.process is not None and pod.process.poll() is None:
            docker("kill", "--signal", str(int(sig)), self.container_name(pod))

    def _terminate(self, pod: LocalPod, grace_s: int) -> None:
        stopper = threading.Thread(
            target=docker, args=("stop", "-t", str(grace_s), self.container_name(pod)), daemon=True
        )
        stopper.start()

    def _before_restart(self, pod: LocalPod) -> None:
        docker("rm", "--force", self.container_name(pod))

    def _exit_reason(self, pod: LocalPod, exit_code: int) -> str:
        state = docker("inspect", "--format", "{{.State.OOMKilled}}", self.container_name(pod))
        if state.stdout.strip() == "true":
            return "OOMKilled"
        return super()._exit_reason(pod, exit_code)

    def _finish(self, pod: LocalPod, code: int | None, obj: dict[str, Any]) -> None:
        super()._finish(pod, code, obj)
        with contextlib.suppress(subprocess.TimeoutExpired):
            docker("rm", "--force", self.container_name(pod))

    def stop(self) -> None:
        listed = docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.node_name}")
        ids = listed.stdout.split()
        if ids:
            docker("rm", "--force", *ids)
        super().stop()


def apply_fs_group(root: Path, gid: int) -> None:
    """What a kubelet does to a volume for a pod's fsGroup: group `gid` on every file, group read/write (and search
    and setgid on folders), so a non-root container of that group can write a volume that root made."""
    for folder, dirs, names in os.walk(root):
        for path in [Path(folder), *(Path(folder) / d for d in dirs), *(Path(folder) / n for n in names)]:
            with contextlib.suppress(FileNotFoundError):
                info = path.lstat()
                if path.is_symlink():
                    continue
                if info.st_gid != gid:
                    os.chown(path, -1, gid)
                extra = 0o2070 if path.is_dir() else 0o060
                if info.st_mode & extra != extra:
                    path.chmod((info.st_mode | extra) & 0o7777)
