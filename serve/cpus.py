"""How many CPUs this process was given: for sizing thread pools.

``os.cpu_count()`` reports the node's cores, not the replica's share: a replica
limited by its cgroup (a Kubernetes CPU limit), its CPU affinity or its Ray
resources would oversubscribe the node with that many threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

THREADS_ENV = "TRIGGERFISH_DECODE_THREADS"


def _cgroup_limit() -> float | None:
    """The cgroup v2 (``cpu.max``) or v1 (``cfs_quota/period``) CPU limit, if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def _ray_cpus() -> float | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no assignment
        return None
    return cpus or None


def replica_cpus(env: dict[str, str] | None = None) -> int:
    """CPUs for this process: ``TRIGGERFISH_DECODE_THREADS``, else the smallest of its
    Ray CPU assignment, cgroup limit and affinity (at least 1)."""
    env = os.environ if env is None else env
    raw = env.get(THREADS_ENV, "")
    if raw.strip():
        from shared.errors import ConfigError

        if not (raw.strip().isascii() and raw.strip().isdigit()) or int(raw) < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
        return int(raw)
    limits = [float(len(os.sched_getaffinity(0)))]
    limits += [c for c in (_cgroup_limit(), _ray_cpus()) if c]
    return max(1, math.ceil(min(limits)))


#: Niceness of threads doing background work: version loads, bulk decodes.
BACKGROUND_NICE = 10


def lower_thread_priority(niceness: int = BACKGROUND_NICE) -> bool:
    """Run the calling thread at ``niceness`` (Linux: niceness is per thread).

    A thread-pool initializer: the pool's threads then yield the CPU to the
    replica's other threads (the ones serving live work) whenever both want it.

    Returns:
        False where the platform or permissions do not allow it (the thread keeps its priority).
    """
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        return False
    return True
