"""Start and stop a real Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler) on loopback.

The binaries come from KUBEBUILDER_ASSETS (default `.envtest` in the repository, made by `make envtest`).
Everything listens on 127.0.0.1 on free ports and lives in one folder; `stop()` kills what `start()` began,
and every process also dies with the one that started it (a parent-death signal), so a test session or
drill killed outright leaves no control plane behind. An admin token (system:masters) is written to a
kubeconfig the tests, the drill and the controller use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def assets_dir() -> Path:
    """KUBEBUILDER_ASSETS, else `.envtest` of the source checkout, else `.envtest` in the working folder."""
    if os.environ.get("KUBEBUILDER_ASSETS"):
        return Path(os.environ["KUBEBUILDER_ASSETS"])
    checkout = REPO_ROOT / ".envtest"
    return checkout if checkout.is_dir() else Path.cwd() / ".envtest"


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it ends (Linux prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def server_minor() -> int:
    """The minor version of the kube-apiserver binary (20 for v1.20.2); 99 when it does not say."""
    result = subprocess.run([str(assets_dir() / "kube-apiserver"), "--version"], capture_output=True, text=True)
    match = re.search(r"v1\.(\d+)\.", result.stdout)
    return int(match.group(1)) if match else 99


def missing_binaries() -> list[str]:
    folder = assets_dir()
    return [name for name in REQUIRED if not os.access(folder / name, os.X_OK)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kubeconfig(path: Path, server: str, token: str, ca_cert: Path, user: str = "admin") -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority": str(ca_cert)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user, "namespace": "default"}}],
        "current-context": "envtest",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


@dataclass
class ControlPlane:
    root: Path
    server: str = ""
    token: str = ""
    kubeconfig: Path = field(default_factory=Path)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ca_cert(self) -> Path:
        """The API server's self-signed serving certificate, trusted by every client here."""
        return self.root / "certs" / "apiserver.crt"

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A client of the official library, as admin or as the bearer of `token`."""
        configuration = kubernetes.client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_cert)
        configuration.api_key = {"authorization": f"Bearer {token or self.token}"}
        configuration.connection_pool_maxsize = 32
        return kubernetes.client.ApiClient(configuration)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.processes[name] = subprocess.Popen(
            [str(assets_dir() / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # the signal follows the starting thread: start from one that lives
        )

    def _wait_ready(self, timeout_s: float = 60) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the certificate is generated while the server starts
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout_s}s (logs in {self.root})")

    def start(self) -> ControlPlane:
        root = self.root
        self.token = secrets.token_hex(16)
        (root / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n", encoding="utf-8")
        subprocess.run(["openssl", "genrsa", "-out", root / "sa.key", "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", root / "sa.key", "-pubout", "-out", root / "sa.pub"],
            check=True,
            capture_output=True,
        )
        client_port, peer_port, api_port = free_port(), free_port(), free_port()
        # The insecure ports were turned off by flag until 1.24 removed the flags (and the ports) altogether.
        insecure_off = ["--insecure-port=0"] if server_minor() < 24 else []
        self._spawn(
            "etcd",
            [
                f"--data-dir={root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client_port}",
                f"--advertise-client-urls=http://127.0.0.1:{client_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{client_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={root / 'certs'}",
                f"--token-auth-file={root / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={root / 'sa.pub'}",
                f"--service-account-signing-key-file={root / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--enable-priority-and-fairness=false",
                *insecure_off,
            ],
        )
        self.kubeconfig = root / "kubeconfig"
        self._wait_ready()
        write_kubeconfig(self.kubeconfig, self.server, self.token, self.ca_cert)
        common = [f"--kubeconfig={self.kubeconfig}", "--bind-address=127.0.0.1", "--secure-port=0"]
        common += ["--port=0"] if insecure_off else []
        self._spawn(
            "kube-controller-manager",
            [
                *common,
                "--leader-elect=false",
                f"--service-account-private-key-file={root / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach",
            ],
        )
        self._spawn("kube-scheduler", [*common, "--leader-elect=false"])
        return self

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.root / "etcd", ignore_errors=True)
