"""How many CPUs this process was given (for sizing thread pools), and work at a
lower priority than serving.

``os.cpu_count()`` reports the node's cores, not the replica's share: a replica
limited by its cgroup (a Kubernetes CPU limit), its CPU affinity or its Ray
resources would oversubscribe the node with that many threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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


def ray_assigned(resource: str) -> float | None:
    """How much of Ray resource ``resource`` (``CPU``, ``GPU``) this worker was given;
    None outside a Ray worker or without an assignment."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        amount = ray.get_runtime_context().get_assigned_resources().get(resource)
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no assignment
        return None
    return amount or None


def _ray_cpus() -> float | None:
    return ray_assigned("CPU")


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


#: Niceness added to threads doing background work (engine builds, bulk decodes).
BACKGROUND_NICE_STEP = 10
#: The largest niceness Linux has.
MAX_NICE = 19

T = TypeVar("T")


def lower_thread_priority(step: int = BACKGROUND_NICE_STEP) -> bool:
    """Make the calling thread ``step`` nicer than it is, at most :data:`MAX_NICE`
    (Linux: niceness is per thread, and threads it starts inherit it).

    Relative, never absolute: Ray starts its workers at niceness 15
    (``RAY_worker_niceness``), so an absolute 10 would put "background" threads
    *ahead* of the replica's serving threads wherever raising a priority is allowed.
    Usable as a thread-pool initializer.

    Returns:
        False where the platform or permissions do not allow it, or the thread is at
        :data:`MAX_NICE` already (it keeps its priority).
    """
    import threading

    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current >= MAX_NICE:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, current + step))
    except (AttributeError, OSError):
        return False
    return True


def in_background(work: Callable[[], T], step: int = BACKGROUND_NICE_STEP) -> T:
    """``work()`` on a thread of its own made ``step`` nicer (:func:`lower_thread_priority`);
    waits for it and returns its result or raises its exception.

    For CPU-heavy work that starts threads it then discards (an engine build: ONNX
    Runtime's optimizing session, TensorRT's builder): those threads inherit the lower
    priority and end with the work, while the caller, and any engine *it* opens
    afterwards, keeps the replica's priority.
    """
    import threading

    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        lower_thread_priority(step)
        try:
            outcome.append(work())
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            failure.append(err)

    thread = threading.Thread(target=run, name="background-work", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
