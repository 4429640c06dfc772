"""CPU seconds per process tree from ``/proc``, for the benchmark's cost figures.

Every part of the local stack runs in its own process group and spawns helpers
(gcloud's Java emulator, Ray's raylet and workers); the benchmark sums user and
system time over the whole tree of each part, before and after a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one process, or ``None`` when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after it are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def _all() -> dict[int, tuple[int, float]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            out[int(entry)] = s
    return out


def tree_cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named root process plus all of its live descendants."""
    procs = _all()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    totals = {}
    for name, root in roots.items():
        seen, stack, total = set(), [root], 0.0
        while stack:
            pid = stack.pop()
            if pid in seen or pid not in procs:
                continue
            seen.add(pid)
            total += procs[pid][1]
            stack.extend(children.get(pid, ()))
        totals[name] = total
    return totals


class CpuMeter:
    """CPU seconds spent by the stack's process trees between ``start`` and ``stop``."""

    def __init__(self, roots: dict[str, int]) -> None:
        self._roots = roots
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = tree_cpu_seconds(self._roots)

    def stop(self, extra: Iterable[tuple[str, float]] = ()) -> dict[str, float]:
        after = tree_cpu_seconds(self._roots)
        spent = {name: max(0.0, after[name] - self._before.get(name, 0.0)) for name in after}
        for name, seconds in extra:
            spent[name] = spent.get(name, 0.0) + seconds
        return spent
