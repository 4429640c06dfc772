"""bound_body_buffering against the installed Ray Serve's direct-ingress receive queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.serve._private import constants, direct_ingress_http_util

from serve.http.body_window import bound_body_buffering

Proxy = direct_ingress_http_util.ASGIDIReceiveProxy
MESSAGES = 100


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The receive proxy's class as it was, after the test."""
    monkeypatch.setattr(Proxy, "queue", Proxy.__dict__["queue"])
    return monkeypatch


async def _pull_then_read() -> tuple[int, int, list[Any]]:
    """Messages Ray pulled from the client before the handler read any, then after it read all."""
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > MESSAGES:
            await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.request", "body": bytes([pulled % 256]) * 1000, "more_body": pulled < MESSAGES}

    proxy = Proxy({"type": "http"}, receive, asyncio.get_running_loop())
    task = proxy.fetch_until_disconnect_task()
    await asyncio.sleep(0.05)
    before = pulled
    read = []
    while not read or read[-1]["more_body"]:
        read.append(await proxy())
    task.cancel()
    return before, pulled, read


def test_the_body_queue_holds_a_window_and_every_message_still_arrives_in_order(restored: pytest.MonkeyPatch) -> None:
    restored.setattr(constants, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", False)

    assert bound_body_buffering(max_messages=8)
    before, after, read = asyncio.run(_pull_then_read())

    assert before <= 9  # eight queued, one in hand
    assert [m["body"][0] for m in read] == [i % 256 for i in range(1, MESSAGES + 1)]
    assert after == MESSAGES + 1


def test_unbounded_ray_reads_the_whole_body_before_the_handler_reads(restored: pytest.MonkeyPatch) -> None:
    before, _, read = asyncio.run(_pull_then_read())

    assert before == MESSAGES + 1 and len(read) == MESSAGES


def test_it_leaves_ray_alone_when_handlers_run_in_another_thread(restored: pytest.MonkeyPatch) -> None:
    restored.setattr(constants, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", True)
    queue = Proxy.__dict__["queue"]

    assert not bound_body_buffering()
    assert Proxy.__dict__["queue"] is queue


def test_a_window_below_one_message_is_refused() -> None:
    with pytest.raises(ValueError, match="max_messages must be >= 1, got 0"):
        bound_body_buffering(0)
