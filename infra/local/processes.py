"""Child processes of the local stack: started in their own process group so
that stopping one also stops everything it spawned (gcloud's Java emulator,
Ray's raylet and workers)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Ports the kernel never hands out on its own (below the ephemeral range) are where
# free_port looks first.
_RESERVABLE_SPAN = 10_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(avoid: frozenset[int] = frozenset()) -> int:
    """An unused TCP port on 127.0.0.1, other than those in ``avoid``.

    A port is chosen and bound later by another process. Taken from the ephemeral
    range, it could meanwhile go to any of the sockets that Ray's processes open
    on port 0 while the stack starts; below that range only an explicit bind
    takes it, so it is picked from there when one is free. A port this process
    handed out recently is not handed out again: the stack picks all its ports
    before its processes bind them, so one still free may already be promised.
    """
    low = _ephemeral_low()
    first = max(1024, low - _RESERVABLE_SPAN)
    for _ in range(100):
        port = random.randrange(first, low)
        if port not in avoid and port not in _handed_out and _binds(port):
            return _hand_out(port)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid and port not in _handed_out:
            return _hand_out(port)


# Ports free_port handed out, newest last (bounded: the oldest are forgotten).
_handed_out: dict[int, None] = {}
_HANDED_OUT_KEPT = 256


def _hand_out(port: int) -> int:
    _handed_out[port] = None
    while len(_handed_out) > _HANDED_OUT_KEPT:
        del _handed_out[next(iter(_handed_out))]
    return port


def free_port_block(count: int, avoid: frozenset[int] = frozenset()) -> int:
    """The first of ``count`` consecutive unused ports (a per-node range for Serve's ingress replicas)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    for _ in range(200):
        first = free_port(avoid)
        block = range(first, first + count)
        if all(p not in avoid and p < 65536 and (p == first or (p not in _handed_out and _binds(p))) for p in block):
            for port in block:
                _hand_out(port)
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A started child: its name, process (group) id and log file."""

    name: str
    pid: int
    log_path: Path
    popen: subprocess.Popen | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_process(
    name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str], cwd: Path | None = None
) -> ManagedProcess:
    """Start ``argv`` in a new session (its own process group), logging to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, popen.pid, log_path, popen)


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, process: ManagedProcess | None = None
) -> None:
    """Poll ``check`` until true; fail early if ``process`` died, with its log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
        time.sleep(0.2)
    tail = f":\n{process.log_tail()}" if process is not None else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")


def stop_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL whatever is left.

    ``pid`` also leads a session (see :func:`start_process`): processes that moved
    to a group of their own inside it (Ray gives workers their own groups; HAProxy
    is a child of one) are SIGKILLed last, so none outlives the stack.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _group_alive(pid):
            kill_session(pid)
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    kill_session(pid)


def kill_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGKILL every process left in session ``sid`` and wait (bounded) until they are gone."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (zombies excluded), from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields: state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return sorted(found)


def process_command_line(pid: int) -> str:
    """``pid``'s command line (its process title for Ray workers), or "" once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
