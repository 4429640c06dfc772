"""Admission of calls to an ingress replica, by inputs and by bytes, first come first served.

A call states its cost (inputs, bytes) *before* its body is read, decompressed or
parsed: a raw image or an Open Inference Protocol body by its declared
``Content-Length`` (the route's limit when it declares none), so no large body is
held before it is admitted. A call that fits runs at once. One that does not fit
waits in line, at most ``max_wait_s`` and within its deadline, and later calls queue
behind it even when they would fit: a 100-input call is never starved by a stream of
one-input calls that each slip in below the bound (the head of the line reserves the
capacity that frees up). A call larger than the whole budget runs when nothing else
does. More than ``max_waiting`` calls in line, or a wait that runs out, is shed
(:class:`Shed`, HTTP 429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Cost:
    """What a call holds while it runs: inputs (images) and bytes (bodies, fetched images, tensors)."""

    inputs: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.inputs + other.inputs, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.inputs - other.inputs, self.bytes - other.bytes)


class Shed(Exception):
    """The call was not admitted; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Waiter:
    cost: Cost
    admitted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Ticket:
    """An admitted call's hold on the budget; :meth:`release` (or ``async with``) gives it back."""

    def __init__(self, gate: AdmissionGate, cost: Cost) -> None:
        self._gate = gate
        self.cost = cost
        self._released = False

    def adjust(self, cost: Cost) -> None:
        """Change the hold to ``cost`` once the call's real cost is known (never waits).

        Growing past the budget is allowed (the call is already running); shrinking
        lets waiting calls in.
        """
        if not self._released:
            self._gate._change(cost - self.cost)
            self.cost = cost

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._change(Cost(0, 0) - self.cost, running=-1)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionGate:
    """Inputs and bytes in flight on one ingress replica, with a first-come line for calls that wait."""

    def __init__(
        self,
        max_inputs: int,
        max_bytes: int,
        max_wait_s: float = 5.0,
        max_waiting: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inputs < 1 or max_bytes < 1 or max_wait_s < 0 or max_waiting < 0:
            raise ValueError(
                "admission bounds must be positive, got "
                f"max_inputs={max_inputs}, max_bytes={max_bytes}, max_wait_s={max_wait_s}, max_waiting={max_waiting}"
            )
        self.limit = Cost(max_inputs, max_bytes)
        self._max_wait_s = max_wait_s
        self._max_waiting = max_waiting
        self._clock = clock
        self.held = Cost(0, 0)
        # The most inputs and the most bytes held at once since the replica started.
        self.peak = Cost(0, 0)
        self._running = 0
        self._line: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def _fits(self, cost: Cost) -> bool:
        if self._running == 0:
            return True  # a call larger than the budget runs alone
        total = self.held + cost
        return total.inputs <= self.limit.inputs and total.bytes <= self.limit.bytes

    def _describe(self) -> str:
        return (
            f"{self.held.inputs} inputs and {self.held.bytes} bytes in flight, "
            f"limit {self.limit.inputs} inputs and {self.limit.bytes} bytes, {len(self._line)} calls waiting"
        )

    async def admit(self, cost: Cost, wait_s: float | None = None) -> Ticket:
        """Hold ``cost`` for a call, waiting in line up to ``min(wait_s, max_wait_s)`` seconds.

        Raises:
            Shed: the line is full or the wait ran out.
        """
        if cost.inputs < 0 or cost.bytes < 0:
            raise ValueError(f"a call's cost cannot be negative, got {cost}")
        if not self._line and self._fits(cost):
            return self._take(cost)
        wait = self._max_wait_s if wait_s is None else max(0.0, min(wait_s, self._max_wait_s))
        if len(self._line) >= self._max_waiting or wait <= 0:
            raise Shed(f"overloaded: {self._describe()}", retry_after_s=2.0)
        waiter = _Waiter(cost)
        self._line.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.admitted), wait)
        except TimeoutError:
            if waiter.admitted.done():  # admitted just as the wait ran out: keep it
                return Ticket(self, cost)
            self._line.remove(waiter)
            self._wake()  # the calls behind it may fit now
            raise Shed(f"overloaded: waited {wait:.1f} s in line; {self._describe()}", retry_after_s=2.0) from None
        except asyncio.CancelledError:
            if waiter.admitted.done():
                self._change(Cost(0, 0) - cost, running=-1)
            else:
                self._line.remove(waiter)
                self._wake()
            raise
        return Ticket(self, cost)

    def _take(self, cost: Cost) -> Ticket:
        self._change(cost, running=1)
        return Ticket(self, cost)

    def _change(self, delta: Cost, running: int = 0) -> None:
        self.held = self.held + delta
        self._running += running
        self._note_peak()
        if delta.inputs < 0 or delta.bytes < 0 or running < 0:
            self._wake()

    def _wake(self) -> None:
        """Admit waiting calls from the head of the line while they fit."""
        while self._line and self._fits(self._line[0].cost):
            waiter = self._line.popleft()
            self.held = self.held + waiter.cost
            self._running += 1
            self._note_peak()
            waiter.admitted.set_result(None)

    def _note_peak(self) -> None:
        self.peak = Cost(max(self.peak.inputs, self.held.inputs), max(self.peak.bytes, self.held.bytes))

    def snapshot(self) -> dict[str, int]:
        """Held, peak and limit (inputs and bytes) and calls waiting, for ``/v1/admission``."""
        return {
            "inputs": self.held.inputs, "bytes": self.held.bytes,
            "peak_inputs": self.peak.inputs, "peak_bytes": self.peak.bytes,
            "max_inputs": self.limit.inputs, "max_bytes": self.limit.bytes,
            "waiting": len(self._line),
        }  # fmt: skip


__all__ = ["AdmissionGate", "Cost", "Shed", "Ticket"]
