"""free_port picks ports that no other process gets by binding port 0."""

from __future__ import annotations

import socket

from infra.local import processes as _processes
from infra.local.processes import free_port


def test_a_free_port_lies_below_the_ephemeral_range_and_can_be_bound() -> None:
    low = _processes._ephemeral_low()

    ports = {free_port() for _ in range(20)}

    assert all(1024 <= p < low for p in ports), ports
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_or_to_avoid_is_never_returned(monkeypatch) -> None:  # noqa: ANN001
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    picks = iter([busy, 2000, 2001])
    monkeypatch.setattr(_processes.random, "randrange", lambda a, b: next(picks))
    monkeypatch.setattr(_processes, "_ephemeral_low", lambda: max(busy + 1, 2002))
    try:
        assert free_port(avoid=frozenset({2000})) == 2001
    finally:
        taken.close()
