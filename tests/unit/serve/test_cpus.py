"""``replica_cpus``: thread-pool size from the replica's share of the node; background work at a lower priority."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import serve.cpus as cpus
from serve.cpus import (
    BACKGROUND_NICE_STEP,
    MAX_NICE,
    THREADS_ENV,
    in_background,
    lower_thread_priority,
    replica_cpus,
)
from shared.errors import ConfigError

CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A 16-core node with no Ray assignment; fill the dict with cgroup file contents."""
    files: dict[str, str] = {}

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        try:
            return files[str(self)]
        except KeyError:
            raise FileNotFoundError(str(self)) from None

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cpus, "_ray_cpus", lambda: None)
    return files


def test_the_environment_variable_wins(node: dict[str, str]) -> None:
    node[CGROUP_V2] = "100000 100000"

    assert replica_cpus({THREADS_ENV: "6"}) == 6
    assert replica_cpus({THREADS_ENV: " 3 "}) == 3


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5", "2e3"])
def test_a_bad_environment_value_is_a_config_error_naming_it(
    node: dict[str, str], value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        replica_cpus({THREADS_ENV: value})

    assert THREADS_ENV in str(info.value) and repr(value) in str(info.value)


def test_an_empty_environment_value_means_unset(node: dict[str, str]) -> None:
    assert replica_cpus({THREADS_ENV: "  "}) == 16


def test_without_limits_the_affinity_counts(node: dict[str, str]) -> None:
    assert replica_cpus({}) == 16


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("400000 100000\n", 4), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", 16)],
    ids=["four", "fraction-rounds-up", "below-one", "unlimited"],
)
def test_a_cgroup_v2_limit_caps_the_count(
    node: dict[str, str], cpu_max: str, expected: int
) -> None:
    node[CGROUP_V2] = cpu_max

    assert replica_cpus({}) == expected


def test_a_cgroup_v1_quota_caps_the_count_when_v2_is_absent(node: dict[str, str]) -> None:
    node[V1_QUOTA], node[V1_PERIOD] = "300000\n", "100000\n"

    assert replica_cpus({}) == 3


def test_an_unlimited_cgroup_v1_quota_is_no_limit(node: dict[str, str]) -> None:
    node[V1_QUOTA], node[V1_PERIOD] = "-1", "100000"

    assert replica_cpus({}) == 16


def test_an_unreadable_cgroup_file_is_no_limit(node: dict[str, str]) -> None:
    node[CGROUP_V2] = "garbage"
    node[V1_QUOTA], node[V1_PERIOD] = "lots", "100000"

    assert replica_cpus({}) == 16


def test_the_smallest_of_affinity_cgroup_and_ray_wins(
    node: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node[CGROUP_V2] = "800000 100000"
    monkeypatch.setattr(cpus, "_ray_cpus", lambda: 2.0)

    assert replica_cpus({}) == 2

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0})
    assert replica_cpus({}) == 1


def test_outside_a_ray_worker_there_is_no_ray_assignment() -> None:
    import ray

    assert not ray.is_initialized()
    assert cpus._ray_cpus() is None


# --- background priority ------------------------------------------------------------------------


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _on_a_thread(work):  # noqa: ANN001, ANN202 - returns what work returns
    box = []
    thread = threading.Thread(target=lambda: box.append(work()))
    thread.start()
    thread.join()
    return box[0]


@pytest.mark.parametrize("start", [0, 5, 15, 12])
def test_a_background_thread_is_made_nicer_than_it_was_never_less_nice(start: int) -> None:
    """Relative to the thread's niceness: Ray starts workers at 15, where an absolute 10 is a promotion."""
    def probe() -> tuple[bool, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), start)
        return lower_thread_priority(), _niceness()

    lowered, after = _on_a_thread(probe)

    assert (lowered, after) == (True, min(MAX_NICE, start + BACKGROUND_NICE_STEP))


def test_a_thread_at_the_largest_niceness_keeps_it_and_says_so() -> None:
    def probe() -> tuple[bool, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MAX_NICE)
        return lower_thread_priority(), _niceness()

    assert _on_a_thread(probe) == (False, MAX_NICE)


def test_in_background_runs_the_work_nicer_and_leaves_the_caller_as_it_was() -> None:
    caller = _niceness()
    inner: list[int] = []

    def work() -> int:
        # A thread the work starts (an engine build's thread pool) inherits its priority.
        child = threading.Thread(target=lambda: inner.append(_niceness()))
        child.start()
        child.join()
        return _niceness()

    assert in_background(work) == min(MAX_NICE, caller + BACKGROUND_NICE_STEP)
    assert inner == [min(MAX_NICE, caller + BACKGROUND_NICE_STEP)]
    assert _niceness() == caller


def test_in_background_raises_the_works_exception() -> None:
    def work() -> None:
        raise ValueError("bad engine plan")

    with pytest.raises(ValueError, match="bad engine plan"):
        in_background(work)
