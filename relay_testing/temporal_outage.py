"""A Temporal dev server that can be stopped and started again with its workflows intact, for outage tests.

`temporal server start-dev` keeps its state in memory unless given a database file; this one always has one
(in the test's folder) and keeps its port, so a worker or controller started against it sees the same server
come back after `outage(seconds)`, as after a real Temporal outage.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

from controller.devserver import DevServer
from relay_testing.control_plane import free_port


class RestartableTemporal:
    """One dev server on a fixed 127.0.0.1 port and database file; a context manager that always stops it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log_file = folder / "temporal-server.log"
        self.server = DevServer(f"127.0.0.1:{free_port()}", folder / "temporal.db", log_file=self.log_file)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> RestartableTemporal:
        self.server.start()
        return self

    def stop(self) -> None:
        """SIGTERM, as an outage or a server upgrade would; the database file keeps every workflow."""
        self.server.stop()

    def outage(self, seconds: float) -> float:
        """Stop the server, stay down `seconds`, start it again on the same port and file; the seconds it was
        unreachable (down plus the restart until its frontend answers)."""
        down_at = time.monotonic()
        self.stop()
        time.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
        self.start()
        return time.monotonic() - down_at

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> RestartableTemporal:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
