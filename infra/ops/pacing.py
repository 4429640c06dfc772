"""How fast a backfill publishes: a window of images in flight that follows Serve's load shedding.

A backfill publishes to Pub/Sub, so it never sees Serve's 429s itself: its bulk
requests are shed inside Serve and redelivered later. :class:`ServePressure` reads
what the ingress counts per traffic class (``GET /v1/admission``: inputs admitted and
shed, live and bulk) and :class:`Window` turns it into the number of images the run
keeps in flight: halved when bulk inputs were shed since the last look
(multiplicative decrease), grown by what landed when results land without shedding
and the window was the limit (at least one message more), never below one message
or above ``--max-in-flight``.

Each look reaches one ingress replica (the one the load balancer picks): with
several, the window follows a sample of them, which is enough to back off while any
of them sheds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClassCounts:
    """Inputs admitted and shed per traffic class, cumulative since the replica started."""

    admitted: dict[str, int]
    shed: dict[str, int]

    @classmethod
    def from_snapshot(cls, snapshot: dict) -> ClassCounts:
        classes = snapshot.get("classes") or {}
        return cls(
            admitted={name: int(c.get("admitted_inputs", 0)) for name, c in classes.items()},
            shed={name: int(c.get("shed_inputs", 0)) for name, c in classes.items()},
        )

    def since(self, earlier: ClassCounts | None) -> ClassCounts:
        """The counts added since ``earlier`` (a restarted replica counts from zero again)."""
        if earlier is None:
            return ClassCounts({k: 0 for k in self.admitted}, {k: 0 for k in self.shed})

        def delta(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
            return {k: v - then.get(k, 0) if v >= then.get(k, 0) else v for k, v in now.items()}

        return ClassCounts(delta(self.admitted, earlier.admitted), delta(self.shed, earlier.shed))


class ServePressure:
    """Reads the ingress's per-class counts; ``None`` from :meth:`look` when it cannot be reached."""

    def __init__(self, serve_url: str, timeout_s: float = 2.0) -> None:
        self._url = serve_url.rstrip("/") + "/v1/admission"
        self._client = httpx.Client(timeout=timeout_s)
        self._last: ClassCounts | None = None
        self._warned = False

    def look(self) -> ClassCounts | None:
        """What changed since the previous look (zeros the first time)."""
        try:
            response = self._client.get(self._url)
            response.raise_for_status()
            counts = ClassCounts.from_snapshot(response.json())
        except (httpx.HTTPError, ValueError) as err:
            if not self._warned:
                logger.warning("cannot read %s (%s): the window follows results only", self._url, err)
                self._warned = True
            return None
        change = counts.since(self._last)
        self._last = counts
        return change

    def close(self) -> None:
        self._client.close()


class Window:
    """Images a backfill keeps in flight (published, no result yet): AIMD on bulk sheds."""

    def __init__(self, step: int, maximum: int, start: int | None = None) -> None:
        if step < 1 or maximum < step:
            raise ValueError(f"a window needs 1 <= step <= maximum, got step={step}, maximum={maximum}")
        self.step = step
        self.maximum = maximum
        self.size = min(maximum, start if start is not None else 4 * step)
        self.shed_seen = 0

    def observe(self, change: ClassCounts | None, landed: int, full: bool) -> None:
        """Adjust after one look: ``landed`` results since the last, ``full`` when the window was the limit."""
        shed = (change.shed.get("bulk", 0) if change is not None else 0)
        if shed > 0:
            self.shed_seen += shed
            self.size = max(self.step, self.size // 2)
        elif landed and full:
            self.size = min(self.maximum, self.size + max(self.step, landed))
