"""The ingress's model client: cached look-ups shared by callers, waiting for a model that starts
from zero only within each caller's budget, and model calls split by bytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from serve.http.model_client import (
    DEFAULT_VERSION_TTL_S,
    MAX_CALL_BYTES,
    HandleModelClient,
    ModelStarting,
    waiting_for_model,
)
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import BatchItem
from serve.model.coalescer import CallerDeadlinePassed
from serve.model_config import InputSpec, PreprocessSpec
from serve.postprocess.base import ImageGeometry
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.messages import Priority

LIVE, BULK = Priority.LIVE, Priority.BULK


class _Method:
    def __init__(self, answer: Callable[..., Awaitable[Any]]) -> None:
        self.answer = answer
        self.calls: list[tuple] = []

    def remote(self, *args: Any) -> Awaitable[Any]:
        self.calls.append(args)
        return self.answer(*args)


class _Handle:
    """A deployment handle whose ``describe``/``infer_many`` answer as told, after ``ready`` is set."""

    def __init__(self, describe: Any = None, delay_s: float = 0.0, fail_if: Callable[[list], bool] | None = None) -> None:
        self.ready = asyncio.Event() if describe == "cold" else None

        async def describe_answer(version: str | None) -> Any:
            if self.ready is not None:
                await self.ready.wait()
                return INFO
            return describe

        async def infer_answer(items: list, deadline: float | None, express: bool = False) -> list:
            await asyncio.sleep(delay_s)
            if fail_if is not None and fail_if(items):
                raise ConnectionError("message larger than max")
            return ["done"] * len(items)

        self.describe = _Method(describe_answer)
        self.infer_many = _Method(infer_answer)


class _Held(_Handle):
    """A handle whose ``infer_many`` calls that ``held(items, express)`` picks wait for ``gate``."""

    def __init__(self, gate: asyncio.Event, held: Callable[[list, bool], bool], describe: Any = None) -> None:
        super().__init__(describe=describe)

        async def infer_answer(items: list, deadline: float | None, express: bool = False) -> list:
            if held(items, express):
                await gate.wait()
            return ["done"] * len(items)

        self.infer_many = _Method(infer_answer)


INFO = VersionInfo("mobilenet_v2", "3", InputSpec(height=32, width=32), PreprocessSpec())


def test_describe_keeps_explicit_versions_and_asks_again_for_the_default_after_the_ttl() -> None:
    handle = _Handle(describe=INFO)
    now = [100.0]
    client = HandleModelClient({"mobilenet_v2": handle}, clock=lambda: now[0])  # type: ignore[dict-item]

    async def run() -> None:
        assert await client.describe("mobilenet_v2", None) == INFO
        assert await client.describe("mobilenet_v2", None) == INFO  # within the TTL
        assert await client.describe("mobilenet_v2", "3") == INFO  # learnt from the default
        now[0] += DEFAULT_VERSION_TTL_S + 0.1
        assert await client.describe("mobilenet_v2", None) == INFO

    asyncio.run(run())

    assert handle.describe.calls == [(None,), (None,)]
    assert client.models() == ["mobilenet_v2"]


def test_describe_turns_rejections_and_retries_into_errors() -> None:
    rejected = HandleModelClient({"m": _Handle(describe=Rejection(ErrorReason.UNKNOWN_VERSION, "no 9"))})  # type: ignore[dict-item]
    retried = HandleModelClient({"m": _Handle(describe=Retry("not loaded yet"))})  # type: ignore[dict-item]

    with pytest.raises(PermanentError) as info:
        asyncio.run(rejected.describe("m", "9"))
    with pytest.raises(TransientError, match="not loaded yet"):
        asyncio.run(retried.describe("m", None))

    assert (info.value.reason, info.value.message) == (ErrorReason.UNKNOWN_VERSION, "no 9")


def test_a_model_with_no_replica_is_waited_for_within_the_budget_then_model_starting() -> None:
    async def run() -> None:
        handle = _Handle(describe="cold")
        client = HandleModelClient({"m": handle})  # type: ignore[dict-item]
        with waiting_for_model(time.time() + 0.05), pytest.raises(ModelStarting, match="no replica ready yet") as info:
            await client.describe("m", None)
        assert info.value.retry_after_s >= 1
        # Concurrent callers share one look-up, which keeps going after they give up ...
        with waiting_for_model(time.time() + 0.05), pytest.raises(ModelStarting):
            await asyncio.gather(client.describe("m", None), client.describe("m", None))
        assert handle.describe.calls == [(None,)]
        # ... so the model is asked for a replica until one answers; then everyone is served.
        handle.ready.set()
        with waiting_for_model(time.time() + 5):
            assert await client.describe("m", None) == INFO
        assert handle.describe.calls == [(None,)]

    asyncio.run(run())


def test_a_caller_that_may_wait_gets_the_answer_once_the_replica_starts() -> None:
    async def run() -> None:
        handle = _Handle(describe="cold")
        client = HandleModelClient({"m": handle})  # type: ignore[dict-item]
        with waiting_for_model(time.time() + 5):
            waiting = asyncio.ensure_future(client.describe("m", None))
        await asyncio.sleep(0.05)
        handle.ready.set()
        assert await waiting == INFO

    asyncio.run(run())


def test_infer_many_passes_the_deadline_and_stops_waiting_when_it_passes() -> None:
    fast = _Handle()
    slow = _Handle(delay_s=5.0)
    deadline = time.time() + 30
    items = _items(2, 8)

    answers = asyncio.run(HandleModelClient({"m": fast}).infer_many("m", items, deadline))  # type: ignore[dict-item]

    assert answers == ["done", "done"]
    [(sent, sent_deadline, express)] = fast.infer_many.calls
    assert not express  # a lone call takes a call slot
    assert sent_deadline == deadline
    # Each item carries its caller's deadline, so a merged call drops expired items one by one.
    assert [item.deadline for item in sent] == [deadline, deadline]
    assert [item.pixels is original.pixels for item, original in zip(sent, items, strict=True)] == [True, True]
    with pytest.raises(CallerDeadlinePassed):  # the caller's deadline, not the model's 5 s
        asyncio.run(HandleModelClient({"m": slow}).infer_many("m", _items(1, 8), time.time() + 0.05))  # type: ignore[dict-item]


def _items(count: int, side: int, priority: Priority = Priority.LIVE) -> list[BatchItem]:
    pixels = np.zeros((side, side, 3), np.uint8)
    geometry = ImageGeometry(side, side, side, side, 1.0, 1.0)
    return [BatchItem(pixels, geometry, "1", priority=priority) for _ in range(count)]


def test_text_detector_inputs_go_to_the_model_in_calls_below_the_byte_cap() -> None:
    """100 inputs of 960x960x3 (276 MB) would overflow gRPC's 256 MiB in one call."""
    too_large = lambda items: sum(i.pixels.nbytes for i in items) > MAX_CALL_BYTES  # noqa: E731
    handle = _Handle(fail_if=too_large)

    answers = asyncio.run(HandleModelClient({"m": handle}).infer_many("m", _items(100, 960), time.time() + 30))  # type: ignore[dict-item]

    assert answers == ["done"] * 100
    sizes = [len(call[0]) for call in handle.infer_many.calls]
    assert sum(sizes) == 100 and len(sizes) >= 5


def test_a_failed_part_answers_retry_for_its_items_only() -> None:
    handle = _Handle(fail_if=lambda items: items[0].version == "bad")
    client = HandleModelClient({"m": handle})  # type: ignore[dict-item]
    good, bad = _items(1, 8), [BatchItem(np.zeros((8, 8, 3), np.uint8), ImageGeometry(8, 8, 8, 8, 1, 1), "bad")]

    async def run() -> tuple[list, list]:
        deadline = time.time() + 30
        return tuple(await asyncio.gather(client.infer_many("m", bad, deadline), client.infer_many("m", good, deadline)))  # type: ignore[return-value]

    failed, served = asyncio.run(run())

    assert served == ["done"]
    assert isinstance(failed[0], Retry) and "message larger than max" in failed[0].message


def test_live_and_bulk_items_travel_in_calls_of_their_own_class() -> None:
    handle = _Handle(delay_s=0.01)
    client = HandleModelClient({"m": handle})  # type: ignore[dict-item]
    pixels = np.zeros((8, 8, 3), np.uint8)
    geometry = ImageGeometry(8, 8, 8, 8, 1, 1)
    mixed = [BatchItem(pixels, geometry, str(i), priority=p) for i, p in enumerate([BULK, LIVE, BULK, LIVE])]

    answers = asyncio.run(client.infer_many("m", mixed, time.time() + 30))

    assert answers == ["done"] * 4
    sent = sorted([(item.priority.value, item.version) for item in call[0]] for call in handle.infer_many.calls)
    assert sent == [[("bulk", "0"), ("bulk", "2")], [("live", "1"), ("live", "3")]]


def test_a_live_call_does_not_wait_for_bulk_calls_holding_every_slot() -> None:
    gate = asyncio.Event()

    # Bulk calls stay in flight.
    client = HandleModelClient({"m": _Held(gate, lambda items, express: items[0].priority is BULK)})  # type: ignore[dict-item]

    async def run() -> list:
        bulk = [
            asyncio.ensure_future(client.infer_many("m", _items(1, 8, BULK), time.time() + 30)) for _ in range(4)
        ]
        await asyncio.sleep(0.01)
        live = await asyncio.wait_for(client.infer_many("m", _items(1, 8), time.time() + 30), 1.0)
        gate.set()
        await asyncio.gather(*bulk)
        return live

    assert asyncio.run(run()) == ["done"]


@pytest.mark.parametrize(("priority", "most"), [(LIVE, 4), (BULK, 9)], ids=["live", "bulk"])
def test_merged_live_calls_carry_at_most_one_batch_of_the_default_version(priority: Priority, most: int) -> None:
    """A merged call is answered when its last item is: one batch keeps live answers prompt;
    bulk calls stay large (fewer calls)."""
    handle = _Handle(describe=VersionInfo("mobilenet_v2", "3", InputSpec(height=32, width=32), PreprocessSpec(),
                                          max_batch_size=4), delay_s=0.01)  # fmt: skip
    client = HandleModelClient({"mobilenet_v2": handle})  # type: ignore[dict-item]

    async def run() -> list[int]:
        await client.describe("mobilenet_v2", None)
        calls = (client.infer_many("mobilenet_v2", _items(3, 8, priority), None) for _ in range(5))
        answers = await asyncio.gather(*calls)
        assert all(a == ["done"] * 3 for a in answers)
        return [len(call[0]) for call in handle.infer_many.calls]

    # Two callers go out alone at once; the other three wait for a call slot and are merged.
    sizes = asyncio.run(run())
    assert sum(sizes) == 15 and max(sizes) == most, sizes


def test_a_one_image_live_caller_goes_express_while_a_batch_is_in_flight() -> None:
    """A one-image caller behind two callers of many items is sent at once, marked for a batch of its own."""
    gate = asyncio.Event()

    info = VersionInfo("m", "3", InputSpec(height=32, width=32), PreprocessSpec(), max_batch_size=16)
    handle = _Held(gate, lambda items, express: not express, describe=info)  # the merged calls stay in flight
    client = HandleModelClient({"m": handle})  # type: ignore[dict-item]

    async def run() -> list:
        await client.describe("m", None)  # a live part is one batch of 16: the busy callers fill one each
        busy = [asyncio.ensure_future(client.infer_many("m", _items(16, 8), time.time() + 30)) for _ in range(3)]
        await asyncio.sleep(0.01)
        lone = await asyncio.wait_for(client.infer_many("m", _items(1, 8), time.time() + 30), 1.0)
        gate.set()
        await asyncio.gather(*busy)
        return lone

    assert asyncio.run(run()) == ["done"]
    express = [call for call in handle.infer_many.calls if call[2]]
    # The first busy call went whole (nothing was in flight); the other two busy callers
    # wait for call slots (they wait for their last item anyway); the lone item went express.
    assert [len(call[0]) for call in express] == [1]
    assert len(handle.infer_many.calls[0][0]) == 16 and not handle.infer_many.calls[0][2]
    bulk_handle = _Handle(delay_s=0.01)
    bulk_client = HandleModelClient({"m": bulk_handle})  # type: ignore[dict-item]

    async def bulk_run() -> None:
        await asyncio.gather(*(bulk_client.infer_many("m", _items(2, 8, BULK), None) for _ in range(6)))

    asyncio.run(bulk_run())
    assert not [call for call in bulk_handle.infer_many.calls if call[2]]  # a backfill's calls never go express
