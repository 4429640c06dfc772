"""Stopping a child stops everything in its session, also what left its process group."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from infra.local.processes import (
    free_port_block,
    pid_alive,
    session_pids,
    start_process,
    stop_group,
)

# A parent that starts a child in a process group of its own (as Ray does for its workers,
# whose children, HAProxy among them, inherit it) and then ignores SIGTERM.
ESCAPING_CHILD = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
                         preexec_fn=os.setpgrp)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_group_leaves_nothing_of_the_session(tmp_path: Path) -> None:
    process = start_process("escaper", [sys.executable, "-c", ESCAPING_CHILD], tmp_path, {"PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not process.log_path.read_text().strip():
        time.sleep(0.1)
    child = int(process.log_path.read_text().split()[0])
    assert child in session_pids(process.pid)

    stop_group(process.pid, grace_s=1)

    assert not pid_alive(process.pid)
    assert not running(child), "a process that left the group outlived the stop"
    assert session_pids(process.pid) == []


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_port_block_is_consecutive_and_free() -> None:
    import socket

    first = free_port_block(3)
    sockets = []
    try:
        for port in range(first, first + 3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", port))
            sockets.append(s)
    finally:
        for s in sockets:
            s.close()
