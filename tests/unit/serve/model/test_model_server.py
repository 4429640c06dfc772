"""The model deployment's version life cycle: promotion, quarantine, backoff, eviction, faults.

A real :class:`ModelServer` over a real local repository folder; only the engine is
a fake (``load_version`` is replaced), so each case runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import yaml

import serve.model.model_server as model_server
from serve.engines.base import EngineFault
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import BatchItem, ItemOutcome, LoadedVersion
from serve.model.chaos import CHAOS_DIR_ENV, FAIL_LOAD_ENV
from serve.model.model_server import LOAD_BACKOFF_S, RUNTIME_FAULT_LIMIT, ModelServer
from serve.model.repository import ModelVersion
from serve.model_config import preparation_key
from serve.postprocess.base import ImageGeometry
from serve.postprocess.factory import make_postprocessor
from shared.errors import ErrorReason

MODEL = "tiny"
CONFIG = {
    "task": "classification",
    "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "height": 4, "width": 4},
    "preprocess": {"scale": 1 / 255},
    "postprocess": {"kind": "classification", "output": "logits", "top_k": 3},
    "batching": {"max_batch_size": 8, "batch_wait_timeout_ms": 1, "engine_batch_sizes": [1, 8]},
    "labels": "labels.txt",
    "backends": ["onnxruntime"],
}
GEOMETRY = ImageGeometry(4, 4, 4, 4, 1.0, 1.0)


class FakeEngine:
    """Logits favouring class 1; ``failing`` makes every call fail (``sticky``: as a dead device)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.closed = False
        self.failing: Exception | None = None

    @property
    def backend_name(self) -> str:
        return "fake:cpu"

    @property
    def healthy(self) -> bool:
        return not isinstance(self.failing, EngineFault)

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        if self.failing is not None:
            raise self.failing
        logits = np.zeros((len(batch), 10), np.float32)
        logits[:, 1] = 5.0
        return {"logits": logits}

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(root))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE", "")
    monkeypatch.setenv(CHAOS_DIR_ENV, str(tmp_path / "chaos"))
    (tmp_path / "chaos").mkdir()
    monkeypatch.delenv(FAIL_LOAD_ENV, raising=False)
    return root


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every engine load, by version; the engines are :class:`FakeEngine`."""
    seen: list[str] = []

    def load_version(mv: ModelVersion, cache: object, work_dir: Path, workers: int = 1, *, warm: bool = True, **_: object):
        seen.append(mv.version)
        engine = FakeEngine(mv.version)
        return LoadedVersion(mv.name, mv.version, mv.config, engine, make_postprocessor(mv.config.postprocess), mv.labels)

    monkeypatch.setattr(model_server, "load_version", load_version)
    monkeypatch.setattr(model_server, "warm_up", lambda loaded, pause=0.0: None)
    return seen


def publish(root: Path, version: str, labels: bool = True, **batching: int) -> Path:
    directory = root / MODEL / version
    directory.mkdir(parents=True)
    config = {**CONFIG, "batching": {**CONFIG["batching"], **batching}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "model.onnx").write_bytes(b"fake onnx " + version.encode())
    if labels:
        (directory / "labels.txt").write_text("\n".join(f"label_{i}" for i in range(10)))
    return directory


def item(version: str) -> BatchItem:
    return BatchItem(np.full((4, 4, 3), 7, np.uint8), GEOMETRY, version)


def server(clock: Clock | None = None) -> ModelServer:
    return ModelServer(MODEL, poll_interval_s=3600, clock=clock or Clock())


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


async def promoted(s: ModelServer, version: str, timeout_s: float = 2.0) -> None:
    """Until the watcher, running in the background, has made ``version`` the default (or the time is up)."""
    for _ in range(int(timeout_s / 0.01)):
        if s._default == version:
            return
        await asyncio.sleep(0.01)


def engine_of(s: ModelServer, version: str) -> FakeEngine:
    return s._versions[version].engine  # type: ignore[return-value]


# --- promotion ------------------------------------------------------------------------------


def test_a_new_version_is_promoted_once_loaded(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2")

    async def scenario() -> tuple[VersionInfo | Rejection | Retry, ...]:
        before = await s.describe()
        await s.check_versions()
        return before, await s.describe()

    before, after = run(scenario())

    assert isinstance(before, VersionInfo) and before.version == "1"
    assert isinstance(after, VersionInfo) and after.version == "2"
    assert loads == ["1", "2"]


def test_the_watcher_does_not_reload_a_version_a_request_loaded(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2")

    async def scenario() -> None:
        assert isinstance(await s.describe("2"), VersionInfo)  # loaded on demand
        await s.check_versions()

    run(scenario())

    assert s._default == "2"
    assert loads == ["1", "2"]  # promoted without a second load


def test_an_evicted_version_is_closed(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    first = engine_of(s, "1")
    for version in ("2", "3"):
        publish(repo, version)

    async def scenario() -> None:
        await s.check_versions()  # promotes 3, keeps 1 loaded
        await s.describe("2")  # a third version: the oldest non-default goes
        await asyncio.sleep(0.05)  # closing runs on the default executor

    run(scenario())

    assert s._default == "3"
    assert set(s._versions) == {"2", "3"}
    assert first.closed


def test_deleting_the_default_version_does_not_wedge_the_watcher(repo: Path, loads: list[str]) -> None:
    publish(repo, "10")
    s = server()
    shutil.rmtree(repo / MODEL / "10")
    publish(repo, "11")

    run(s.check_versions())

    assert s._default == "11"


def test_the_watcher_never_steps_back_to_an_older_version(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    publish(repo, "2")
    s = server()
    shutil.rmtree(repo / MODEL / "2")

    run(s.check_versions())

    assert s._default == "2" and loads == ["2"]


# --- quarantine and backoff -------------------------------------------------------------------


def test_a_batch_size_above_the_queue_capacity_is_quarantined_and_serving_goes_on(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2", max_batch_size=1024, engine_batch_sizes=[1, 1024])  # type: ignore[arg-type]

    async def scenario() -> list[ItemOutcome | Rejection | Retry]:
        await s.check_versions()
        return await s.infer_many([item("1")])

    [outcome] = run(scenario())

    assert s._default == "1" and "2" in s._quarantined
    assert "queue capacity" in s._quarantined["2"]
    assert s._queue.max_batch_size == 8  # not half-promoted
    assert isinstance(outcome, ItemOutcome) and outcome.version == "1"
    assert loads == ["1"]  # refused before any engine was built


def test_a_replica_starts_when_the_newest_version_is_refused(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    publish(repo, "2", max_batch_size=1024, engine_batch_sizes=[1, 1024])  # type: ignore[arg-type]

    s = server()

    assert s._default == "1" and list(s._quarantined) == ["2"]


def test_a_half_uploaded_version_is_served_once_its_upload_completes(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    late = publish(repo, "2", labels=False)  # config names labels.txt, not there yet

    run(s.check_versions())
    assert s._default == "1" and "2" in s._quarantined

    (late / "labels.txt").write_text("\n".join(f"label_{i}" for i in range(10)))
    run(s.check_versions())

    assert s._default == "2" and not s._quarantined


def test_a_transient_load_failure_is_retried_with_backoff_not_quarantined(
    repo: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(repo, "1")
    clock = Clock()
    s = server(clock)
    publish(repo, "2")
    monkeypatch.setenv(FAIL_LOAD_ENV, f"{MODEL}/2")

    async def scenario() -> None:
        await s.check_versions()  # the injected failure
        assert s._default == "1" and not s._quarantined and "2" in s._backoff
        await s.check_versions()  # not due yet: no attempt
        assert loads == ["1"]
        clock.now += LOAD_BACKOFF_S[0]
        await s.check_versions()

    run(scenario())

    assert s._default == "2" and not s._backoff
    assert loads == ["1", "2"]
    assert run(s.stats())["transient_load_failures"] == {"2": 1}


def test_the_chaos_knob_fails_only_the_first_load_on_the_machine(
    repo: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(repo, "1")
    monkeypatch.setenv(FAIL_LOAD_ENV, f"{MODEL}/1, other/3")

    first, second = server(), server()  # two replicas on one machine

    assert first._default is None and "1" in first._backoff
    assert second._default == "1"


# --- what an item naming a version this replica lacks gets ------------------------------------


def test_an_item_for_a_version_newer_than_the_default_is_retried_not_rejected(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2")  # another replica already promoted it

    [outcome] = run(s.infer_many([item("2")]))

    assert isinstance(outcome, Retry) and "not loaded on this replica yet" in outcome.message
    assert loads == ["1"]  # nothing loaded on the request path


def test_an_item_for_a_quarantined_or_missing_version_is_retried(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    publish(repo, "2", labels=False)
    s = server()
    assert s._default == "1"

    outcomes = run(s.infer_many([item("2"), item("0")]))

    assert all(isinstance(o, Retry) for o in outcomes)


def test_describing_a_quarantined_version_by_name_is_a_rejection(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    publish(repo, "2", labels=False)
    s = server()

    async def scenario() -> list[VersionInfo | Rejection | Retry]:
        return [await s.describe("7"), await s.describe("2")]

    missing, quarantined = run(scenario())

    assert isinstance(missing, Rejection) and missing.reason is ErrorReason.UNKNOWN_VERSION
    assert isinstance(quarantined, Rejection) and "quarantined" in quarantined.message


# --- faults at run time -----------------------------------------------------------------------


def test_a_version_faulting_at_run_time_is_quarantined_and_the_previous_one_served(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2")

    async def scenario() -> list[ItemOutcome | Rejection | Retry]:
        await s.check_versions()
        engine_of(s, "2").failing = RuntimeError("illegal instruction in a kernel")
        answers = []
        for _ in range(RUNTIME_FAULT_LIMIT):
            answers += await s.infer_many([item("2")])
        return answers

    answers = run(scenario())

    assert all(isinstance(a, Retry) for a in answers)  # nobody's image is blamed
    assert "2" in s._quarantined and s._default == "1"
    run(s.check_health())  # a faulty version is not a faulty replica
    [after] = run(s.infer_many([item("1")]))
    assert isinstance(after, ItemOutcome) and after.version == "1"


def test_a_sticky_device_fault_makes_the_replica_unhealthy(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    engine_of(s, "1").failing = EngineFault("CUDA error: an illegal memory access")

    [outcome] = run(s.infer_many([item("1")]))

    assert isinstance(outcome, Retry)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(s.check_health())


def test_an_out_of_memory_item_is_retried_and_the_version_kept(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    engine_of(s, "1").failing = MemoryError()

    [outcome] = run(s.infer_many([item("1")]))

    assert isinstance(outcome, Retry) and "out of memory" in outcome.message
    assert not s._quarantined and s._runtime_faults["1"] == 0
    run(s.check_health())


def test_every_request_for_a_version_that_does_not_exist_is_rejected_alike(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()

    async def scenario() -> list[VersionInfo | Rejection | Retry]:
        return [await s.describe("99") for _ in range(3)]

    answers = run(scenario())

    assert all(isinstance(a, Rejection) and a.reason is ErrorReason.UNKNOWN_VERSION for a in answers), answers
    assert not s._backoff and not s._quarantined


def test_a_request_for_a_newer_version_wakes_the_watcher_without_waiting_for_the_poll(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()  # polls hourly
    publish(repo, "2")

    async def scenario() -> tuple[ItemOutcome | Rejection | Retry, ItemOutcome | Rejection | Retry]:
        [first] = await s.infer_many([item("2")])
        await promoted(s, "2")  # the watcher loads and promotes in the background
        [second] = await s.infer_many([item("2")])
        return first, second

    first, second = run(scenario())

    assert isinstance(first, Retry)
    assert isinstance(second, ItemOutcome) and second.version == "2"


def test_a_replica_no_call_reaches_still_promotes_a_new_version(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = ModelServer(MODEL, poll_interval_s=0.05, clock=Clock())
    publish(repo, "2")

    async def scenario() -> str | None:
        await s.check_health()  # Serve's periodic health check: no request ever arrives
        await promoted(s, "2")
        return s._default

    assert run(scenario()) == "2"
    assert loads == ["1", "2"]


def _asking_default(s: ModelServer, version: str, key: str | None = None) -> BatchItem:
    """An item for ``version`` whose caller asked for the default, prepared as this replica's default is."""
    current = s._versions[s._default].config  # type: ignore[index]
    return dataclasses.replace(item(version), default_prepared_as=key or preparation_key(current.input, current.preprocess))


def test_an_item_for_the_default_is_served_by_this_replicas_default_until_it_promotes_the_newer(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()  # polls hourly: the newer version is loaded only when a call wakes it
    publish(repo, "2")

    async def scenario() -> tuple[ItemOutcome | Rejection | Retry, ItemOutcome | Rejection | Retry]:
        [meanwhile] = await s.infer_many([_asking_default(s, "2")])
        await promoted(s, "2")  # the item woke the watcher
        [after] = await s.infer_many([_asking_default(s, "2")])
        return meanwhile, after

    meanwhile, after = run(scenario())

    assert isinstance(meanwhile, ItemOutcome) and meanwhile.version == "1"
    assert isinstance(after, ItemOutcome) and after.version == "2"


def test_an_item_that_named_its_version_or_was_prepared_otherwise_is_not_served_by_another(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2")

    async def scenario() -> list[ItemOutcome | Rejection | Retry]:
        return await s.infer_many([item("2"), _asking_default(s, "2", key="prepared for another input")])

    named, prepared_otherwise = run(scenario())

    assert isinstance(named, Retry) and isinstance(prepared_otherwise, Retry)


def test_callers_waiting_on_a_load_see_its_quarantine_without_loading_again(
    repo: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(repo, "1")
    s = server()
    publish(repo, "2", labels=False)
    resolved: list[str] = []
    real = s._repo.resolve

    def resolve(model: str, version: str | None = None) -> ModelVersion:
        resolved.append(version or "")
        return real(model, version)

    monkeypatch.setattr(s._repo, "resolve", resolve)

    async def scenario() -> list[VersionInfo | Rejection | Retry]:
        return list(await asyncio.gather(s.describe("2"), s.describe("2"), s.describe("2")))

    answers = run(scenario())

    assert all(isinstance(a, Rejection) and a.reason is ErrorReason.UNKNOWN_VERSION for a in answers), answers
    assert resolved == ["2"]  # one load; the others re-checked the quarantine under the lock


def test_each_item_is_dropped_at_its_own_callers_deadline_in_a_merged_call(repo: Path, loads: list[str]) -> None:
    publish(repo, "1")
    s = server()
    now = time.time()
    expired = dataclasses.replace(item("1"), deadline=now - 1)  # its caller gave up
    alive = dataclasses.replace(item("1"), deadline=now + 60)

    late, served, plain = run(s.infer_many([expired, alive, item("1")], deadline=now + 60))

    assert isinstance(late, Retry) and "deadline" in late.message
    assert isinstance(served, ItemOutcome) and isinstance(plain, ItemOutcome)
    assert served.error_reason is None and plain.error_reason is None


def test_stats_show_where_each_engine_came_from_and_why_a_backend_was_refused(
    repo: Path, loads: list[str]
) -> None:
    publish(repo, "1")
    s = server()
    s._versions["1"].engine_source = "gcs"
    s._versions["1"].fallback_reason = "tensorrt: accuracy guard: top1_confident 0.91 (below 0.99)"

    stats = run(s.stats())
    [outcome] = run(s.infer_many([item("1")]))

    assert stats["engine_sources"] == {"1": "gcs"} and stats["decode"] == {"1": "cpu"}
    assert stats["fallback_reasons"] == {"1": "tensorrt: accuracy guard: top1_confident 0.91 (below 0.99)"}
    assert isinstance(outcome, ItemOutcome) and outcome.engine_source == "gcs" and outcome.decode == "cpu"


def test_items_that_wake_the_watcher_are_coalesced_into_few_repository_checks(
    repo: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(repo, "1")
    s = server()  # polls hourly: only the items' wakes make it check
    listings: list[float] = []
    refresh = s._repo.refresh

    def counted() -> dict[str, list[str]]:
        listings.append(time.monotonic())
        return refresh()

    monkeypatch.setattr(s._repo, "refresh", counted)

    async def scenario() -> list[ItemOutcome | Rejection | Retry]:
        # Another replica serves version 2, not yet visible here; each item served on this
        # replica's default wakes the watcher.
        answers = []
        for _ in range(40):
            answers += await s.infer_many([_asking_default(s, "2")])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        return answers

    answers = run(scenario())

    assert all(isinstance(a, ItemOutcome) and a.version == "1" for a in answers)
    assert 1 <= len(listings) <= 4, listings  # 40 wakes in about half a second
    assert all(b - a >= model_server.WAKE_CHECK_GAP_S * 0.9 for a, b in itertools.pairwise(listings))


# --- GPU memory ------------------------------------------------------------------------------


def test_a_replica_with_half_a_gpu_loads_every_version_with_its_arena_capped(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serve.gpus as gpus

    monkeypatch.setattr(gpus, "ray_assigned", lambda resource: {"GPU": 0.5}.get(resource))
    monkeypatch.setattr(gpus, "gpu_memory_bytes", lambda device=0: 24 << 30)  # an L4
    caps: list[int | None] = []

    def load_version(mv: ModelVersion, *args: object, gpu_mem_limit: int | None = None, **_: object):
        caps.append(gpu_mem_limit)
        return LoadedVersion(
            mv.name, mv.version, mv.config, FakeEngine(mv.version),
            make_postprocessor(mv.config.postprocess), mv.labels,
        )  # fmt: skip

    monkeypatch.setattr(model_server, "load_version", load_version)
    monkeypatch.setattr(model_server, "warm_up", lambda loaded, pause=0.0: None)
    publish(repo, "1")
    s = server()
    publish(repo, "2")
    run(s.check_versions())

    assert caps == [int((24 << 30) * 0.5 * gpus.ARENA_PART_OF_SHARE)] * 2


def test_a_bad_gpu_memory_setting_stops_the_replica_at_start(
    repo: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.errors import ConfigError

    monkeypatch.setenv("TRIGGERFISH_GPU_MEM_LIMIT_MB", "half")
    publish(repo, "1")
    with pytest.raises(ConfigError, match="TRIGGERFISH_GPU_MEM_LIMIT_MB.*'half'"):
        server()
    assert loads == []
