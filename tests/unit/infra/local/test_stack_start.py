"""LocalStack.start: a port taken while the stack starts means starting again on other ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.local.stack import PORT_TAKEN, START_ATTEMPTS, LocalStack, StackOptions


class Flaky(LocalStack):
    """A stack whose start fails with ``errors`` in turn, then succeeds; stops are counted."""

    def __init__(self, tmp: Path, errors: list[Exception]) -> None:
        super().__init__(StackOptions(state_dir=tmp))
        self.errors = errors
        self.starts = self.stops = 0

    def _start(self, progress):  # noqa: ANN001, ANN202
        self.starts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "started"

    def stop(self) -> None:
        self.stops += 1


def _taken() -> RuntimeError:
    return RuntimeError(f"serve exited while waiting for Ray Serve to be ready:\n[ALERT] cannot bind socket ({PORT_TAKEN})")


def test_a_port_taken_meanwhile_starts_the_stack_again(tmp_path: Path) -> None:
    stack = Flaky(tmp_path, [_taken(), _taken()])
    said: list[str] = []

    assert stack.start(said.append) == "started"

    assert (stack.starts, stack.stops) == (3, 2)
    assert said[-1].endswith(f"starting again on other ports (3/{START_ATTEMPTS})")


def test_it_gives_up_after_the_last_attempt(tmp_path: Path) -> None:
    stack = Flaky(tmp_path, [_taken() for _ in range(START_ATTEMPTS)])

    with pytest.raises(RuntimeError, match=PORT_TAKEN):
        stack.start()

    assert (stack.starts, stack.stops) == (START_ATTEMPTS, START_ATTEMPTS)


def test_any_other_failure_is_raised_at_once(tmp_path: Path) -> None:
    stack = Flaky(tmp_path, [RuntimeError("model repository lacks mobilenet_v2; run: make model")])

    with pytest.raises(RuntimeError, match="make model"):
        stack.start()

    assert (stack.starts, stack.stops) == (1, 1)
