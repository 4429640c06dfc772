"""Backpressure on request bodies on Ray Serve's direct data plane.

On the direct data plane (``RAY_SERVE_THROUGHPUT_OPTIMIZED``, and HAProxy in front of
it) the ingress replica serves HTTP itself, and Ray reads each request's body into a
queue as fast as the client sends it, so that it notices a client that goes away
while the handler runs. The queue has no bound: a 100 MiB body sits in the replica
whole however slowly the handler reads it, and so does the body of a call still
waiting for admission. Four such bodies took the replica 160 MB past idle although
the handler holds a few parts of images per call.

:func:`bound_body_buffering` gives that queue a bound: once it holds
:data:`WINDOW_MESSAGES` body messages, Ray stops reading the socket until the handler
reads, and TCP slows the client down. A client that goes away is then noticed when
the handler next reads (or answers), not sooner.

The queue is Ray Serve's own (``ray.serve._private.direct_ingress_http_util``), so the
bound is set only where it is known to hold: the class and property this module
expects are there and the handler runs on the loop that fills the queue
(``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD`` off, as the direct data plane sets).
Elsewhere nothing changes and a warning says so; ``tests/unit/serve/http/test_body_window.py``
checks the installed Ray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Body messages queued per request at most; uvicorn hands the body over in pieces of
# about 64 KiB, so a request's unread body in the replica stays near 1 MiB.
WINDOW_MESSAGES = 16


def bound_body_buffering(max_messages: int = WINDOW_MESSAGES) -> bool:
    """Bound the queue Ray Serve reads request bodies into; ``True`` when it is bounded."""
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages!r}")
    try:
        from ray.serve._private import constants, direct_ingress_http_util
    except ImportError as err:
        logger.warning("request bodies stay unbounded in the replica: %s", err)
        return False
    proxy = getattr(direct_ingress_http_util, "ASGIDIReceiveProxy", None)
    if proxy is None or not isinstance(proxy.__dict__.get("queue"), property):
        logger.warning("request bodies stay unbounded in the replica: this Ray has no ASGIDIReceiveProxy.queue")
        return False
    if getattr(constants, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", True):
        # Messages then cross threads with put_nowait, which a bounded queue would refuse.
        logger.warning(
            "request bodies stay unbounded in the replica: handlers run in a separate thread "
            "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD)"
        )
        return False

    def queue(self: Any) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=max_messages)
        return self._queue

    proxy.queue = property(queue)
    return True


__all__ = ["WINDOW_MESSAGES", "bound_body_buffering"]
