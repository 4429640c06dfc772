"""Prometheus metrics a Triton user recognises, recorded through Ray's metrics API.

Ray exports every metric of every process at the node's metrics export port,
prefixed ``ray_``; counters get the ``_total`` suffix there. The names below are
what Prometheus scrapes (``ray_triggerfish_requests_total`` ...) minus that prefix:

=========================================  =========  ==========================================
``triggerfish_requests_total``             counter    answers by model, version, entry_path and
                                                      status (``ok`` | ``error``); one per input on
                                                      ``/v1/infer`` and the event paths, one per
                                                      call on the Open Inference Protocol path
``triggerfish_request_duration_seconds``   histogram  end to end in the ingress, same labels less status
``triggerfish_errors_total``               counter    failed answers by model and reason (the error
                                                      record's reason, or ``transient`` /
                                                      ``overloaded`` / ``bad_request``)
``triggerfish_inference_count_total``      counter    images run by the engine (model, version)
``triggerfish_execution_count_total``      counter    engine executions (batches); inference count
                                                      over execution count is the average batch size
``triggerfish_batch_size``                 histogram  images per execution
``triggerfish_queue_duration_seconds``     histogram  wait in the model replica's batch queue
``triggerfish_compute_duration_seconds``   histogram  one execution: normalization and engine
``triggerfish_fetch_duration_seconds``     histogram  reading the image from Cloud Storage
``triggerfish_decode_duration_seconds``    histogram  decoding and resizing one image
``triggerfish_load_shed_total``            counter    inputs refused for overload, by model and where
                                                      (``ingress`` | ``model``)
``triggerfish_model_loaded``               gauge      1 per loaded version with the backend it runs on
``triggerfish_queue_depth``                gauge      items waiting in a model replica's batch queue
=========================================  =========  ==========================================

Ray exports a histogram's observations at the midpoints of their buckets, so the
buckets and ``_count`` are exact but ``_sum`` is an approximation; the average batch
size comes exactly from the two counters.

Ray drops a gauge series that its process has not set for a few report intervals,
so the gauges' current values are set again every :data:`GAUGE_REFRESH_S` by a
daemon thread of the process (started with the first gauge); a version that was
unloaded is set to 0 once and then left to age out.

Instruments are created on first use in each process (Serve replicas are separate
processes), never at import. Recording never raises into the serving path: a metric
that cannot be recorded is logged once and dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shared.results import InferenceResult, Status

logger = logging.getLogger(__name__)

# Seconds: from a cached 2 ms decode to a cold engine build behind a 60 s deadline.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

# Label values for answers that do not carry their own.
UNATTRIBUTED = "*"
# Shorter than the time after which Ray forgets a gauge that was not set again.
GAUGE_REFRESH_S = 5.0


class _Counter(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


class _Histogram(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class _Gauge(Protocol):
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class MetricFactory(Protocol):
    """Creates instruments; Ray's ``ray.serve.metrics`` in production, a recorder in tests."""

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> _Counter: ...

    def histogram(
        self, name: str, description: str, boundaries: Iterable[float], tag_keys: tuple[str, ...]
    ) -> _Histogram: ...

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> _Gauge: ...


class RayMetricFactory:
    """Instruments from ``ray.serve.metrics``: Serve adds deployment and replica tags."""

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> _Counter:
        from ray.serve.metrics import Counter

        return Counter(name, description=description, tag_keys=tag_keys)

    def histogram(
        self, name: str, description: str, boundaries: Iterable[float], tag_keys: tuple[str, ...]
    ) -> _Histogram:
        from ray.serve.metrics import Histogram

        return Histogram(
            name, description=description, boundaries=list(boundaries), tag_keys=tag_keys
        )

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> _Gauge:
        from ray.serve.metrics import Gauge

        return Gauge(name, description=description, tag_keys=tag_keys)


@dataclass(frozen=True, slots=True)
class _Instruments:
    requests: _Counter
    request_duration: _Histogram
    errors: _Counter
    inference_count: _Counter
    execution_count: _Counter
    batch_size: _Histogram
    queue_duration: _Histogram
    compute_duration: _Histogram
    fetch_duration: _Histogram
    decode_duration: _Histogram
    load_shed: _Counter
    model_loaded: _Gauge
    queue_depth: _Gauge

    @classmethod
    def create(cls, f: MetricFactory) -> _Instruments:
        mv = ("model", "version")
        lat = LATENCY_BUCKETS_S
        return cls(
            requests=f.counter(
                "triggerfish_requests",
                "Answers by model, version, entry path, traffic class (live|bulk) and status (ok|error).",
                (*mv, "entry_path", "priority", "status"),
            ),
            request_duration=f.histogram(
                "triggerfish_request_duration_seconds", "End-to-end time in the ingress per answer.",
                lat, (*mv, "entry_path", "priority"),
            ),
            errors=f.counter("triggerfish_errors", "Failed answers by reason.", ("model", "reason")),
            inference_count=f.counter("triggerfish_inference_count", "Images run by the engine.", mv),
            execution_count=f.counter("triggerfish_execution_count", "Engine executions (batches).", mv),
            batch_size=f.histogram("triggerfish_batch_size", "Images per engine execution.", BATCH_SIZE_BUCKETS, mv),
            queue_duration=f.histogram(
                "triggerfish_queue_duration_seconds", "Wait in the model replica's batch queue.", lat, mv
            ),
            compute_duration=f.histogram(
                "triggerfish_compute_duration_seconds", "One engine execution, input normalization included.", lat, mv
            ),
            fetch_duration=f.histogram(
                "triggerfish_fetch_duration_seconds", "Reading one image from Cloud Storage.", lat, ("model",)
            ),
            decode_duration=f.histogram(
                "triggerfish_decode_duration_seconds", "Decoding and resizing one image.", lat, ("model",)
            ),
            load_shed=f.counter(
                "triggerfish_load_shed", "Inputs refused for overload, by where and traffic class.",
                ("model", "where", "priority"),
            ),
            model_loaded=f.gauge(
                "triggerfish_model_loaded", "1 for each loaded model version, with its backend.",
                (*mv, "backend"),
            ),
            queue_depth=f.gauge("triggerfish_queue_depth", "Items waiting in the batch queue.", ("model",)),
        )  # fmt: skip


_lock = threading.Lock()
_factory: MetricFactory = RayMetricFactory()
_instruments: _Instruments | None = None
_loaded: dict[str, dict[str, str]] = {}  # model -> version -> backend reported as loaded
_gauges: dict[
    tuple[str, tuple[tuple[str, str], ...]], float
] = {}  # (gauge, labels) -> value to keep
_refresher: threading.Thread | None = None
_failed_once = False


def use_factory(factory: MetricFactory) -> None:
    """Record through ``factory`` from now on in this process (tests use a recorder)."""
    global _factory, _instruments
    with _lock:
        _factory, _instruments = factory, None
        _loaded.clear()
        _gauges.clear()


def _get() -> _Instruments:
    global _instruments
    if _instruments is None:
        with _lock:
            if _instruments is None:
                _instruments = _Instruments.create(_factory)
    return _instruments


def _safely(record) -> None:  # noqa: ANN001 - a callable taking the instruments
    """Run ``record``; metrics must never fail a request."""
    global _failed_once
    try:
        record(_get())
    except Exception:  # noqa: BLE001 - logged once, then dropped
        if not _failed_once:
            _failed_once = True
            logger.exception("recording a metric failed; later failures are not logged")


def _set_gauge(
    m: _Instruments, gauge: str, value: float, tags: dict[str, str], keep: bool = True
) -> None:
    """Set ``gauge`` now, and keep setting it (``keep``) until it is set to something else."""
    global _refresher
    getattr(m, gauge).set(value, tags)
    key = (gauge, tuple(sorted(tags.items())))
    with _lock:
        if keep:
            _gauges[key] = value
        else:
            _gauges.pop(key, None)
        if _refresher is None:
            _refresher = threading.Thread(
                target=_refresh_forever, name="metrics-gauges", daemon=True
            )
            _refresher.start()


def refresh_gauges() -> None:
    """Set every kept gauge value again (the refresher thread's work)."""
    with _lock:
        kept = list(_gauges.items())
    for (gauge, tags), value in kept:
        _safely(lambda m, g=gauge, t=tags, v=value: getattr(m, g).set(v, dict(t)))


def _refresh_forever() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        refresh_gauges()


# -- the ingress ---------------------------------------------------------------------------
def record_answer(
    model: str, version: str | None, entry_path: str, seconds: float, reason: str | None = None,
    priority: str = "live",
) -> None:  # fmt: skip
    """One answer: ``ok`` when ``reason`` is None, else ``error`` counted under ``reason``."""

    def record(m: _Instruments) -> None:
        tags = {
            "model": model or UNATTRIBUTED,
            "version": version or UNATTRIBUTED,
            "entry_path": entry_path,
            "priority": priority,
        }
        m.requests.inc(1, {**tags, "status": "ok" if reason is None else "error"})
        m.request_duration.observe(max(seconds, 0.0), tags)
        if reason is not None:
            m.errors.inc(1, {"model": tags["model"], "reason": reason})

    _safely(record)


def record_result(
    result: InferenceResult, seconds: float, model: str | None = None, priority: str = "live"
) -> None:
    """One stored result: its answer, and the fetch and decode time it reports.

    ``model`` replaces the result's model name as the label value (callers pass
    :data:`UNATTRIBUTED` for a model that is not served).
    """
    model = model or result.model.name
    reason = result.error.reason.value if result.status is Status.ERROR and result.error else None
    record_answer(model, result.model.version, result.entry_path.value, seconds, reason, priority)
    timings = result.timings

    def record(m: _Instruments) -> None:
        tags = {"model": model}
        if timings.fetch_ms is not None and timings.fetch_ms > 0:
            m.fetch_duration.observe(timings.fetch_ms / 1000, tags)
        if timings.decode_ms is not None:
            m.decode_duration.observe(timings.decode_ms / 1000, tags)

    _safely(record)


def record_decode(model: str, seconds: float) -> None:
    """Decoding of one image outside a stored result (the Open Inference Protocol path)."""
    _safely(lambda m: m.decode_duration.observe(seconds, {"model": model}))


def record_shed(model: str, where: str, count: int = 1, priority: str = "live") -> None:
    """``count`` inputs of one traffic class refused for overload ``where`` (``ingress`` or ``model``)."""
    if count > 0:
        tags = {"model": model or UNATTRIBUTED, "where": where, "priority": str(priority)}
        _safely(lambda m: m.load_shed.inc(count, tags))


# -- the model replica ---------------------------------------------------------------------
def record_batch(
    model: str,
    version: str,
    size: int,
    compute_s: float,
    queue_waits_s: Iterable[float],
    queue_depth: int,
) -> None:
    """One engine execution of ``size`` images, and the batch queue as it stands."""

    def record(m: _Instruments) -> None:
        tags = {"model": model, "version": version}
        m.execution_count.inc(1, tags)
        m.inference_count.inc(size, tags)
        m.batch_size.observe(size, tags)
        m.compute_duration.observe(max(compute_s, 0.0), tags)
        for wait in queue_waits_s:
            m.queue_duration.observe(max(wait, 0.0), tags)
        _set_gauge(m, "queue_depth", queue_depth, {"model": model})

    if size > 0:
        _safely(record)


def record_outcomes(model: str, version: str, outcomes: Iterable[Any], queue_depth: int) -> None:
    """:func:`record_batch` from the :class:`serve.model.batch.ItemOutcome` list of one execution."""
    outcomes = list(outcomes)
    compute_ms = max((o.inference_ms for o in outcomes), default=0.0)
    waits = [o.queue_wait_ms / 1000 for o in outcomes]
    record_batch(model, version, len(outcomes), compute_ms / 1000, waits, queue_depth)


def record_loaded(model: str, backends: Mapping[str, str]) -> None:
    """The versions of ``model`` loaded in this replica (version -> backend); others drop to 0."""

    def record(m: _Instruments) -> None:
        before = _loaded.get(model, {})
        for version, backend in before.items():
            if backends.get(version) != backend:
                _set_gauge(
                    m,
                    "model_loaded",
                    0,
                    {"model": model, "version": version, "backend": backend},
                    keep=False,
                )
        for version, backend in backends.items():
            _set_gauge(
                m, "model_loaded", 1, {"model": model, "version": version, "backend": backend}
            )
        _loaded[model] = dict(backends)

    _safely(record)


__all__ = [
    "BATCH_SIZE_BUCKETS",
    "UNATTRIBUTED",
    "LATENCY_BUCKETS_S",
    "MetricFactory",
    "RayMetricFactory",
    "record_answer",
    "record_batch",
    "record_decode",
    "record_loaded",
    "record_outcomes",
    "record_result",
    "record_shed",
    "refresh_gauges",
    "use_factory",
]
