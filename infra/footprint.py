"""The names, delivery settings and function settings in ``infra/footprint.json``.

Terraform reads the same file (``jsondecode(file(...))`` in ``terraform/main.tf``), so
the local stack runs the functions exactly as the cloud does: the environment of
:meth:`FunctionSettings.environment` is what both set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FOOTPRINT_FILE = Path(__file__).with_name("footprint.json")


class FootprintError(ValueError):
    """``footprint.json`` holds a value the system cannot run with; the message names it."""


def _positive_int(section: dict, key: str, where: str) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FootprintError(f"{where}.{key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class PushSubscription:
    name: str
    topic: str
    entry_point: str
    ack_deadline_seconds: int
    min_backoff_seconds: int
    max_backoff_seconds: int
    max_delivery_attempts: int


@dataclass(frozen=True, slots=True)
class FunctionSettings:
    """How the functions run (the footprint's ``"functions"`` object).

    Attributes:
        request_concurrency: Events one instance handles at once: Cloud Run's
            ``max_instance_request_concurrency`` and gunicorn's ``THREADS``.
        workers: gunicorn worker processes per instance (1: concurrent events share
            merged calls to Serve).
        max_instances: Instance ceiling per function in the cloud.
        timeout_margin_seconds: A function's timeout is its subscription's ack deadline
            minus this.
        serve_wait_seconds: How long a function waits for Serve
            (``TRIGGERFISH_REQUEST_TIMEOUT_S`` of the functions).
        available_cpu: vCPUs of one instance.
        available_memory: Memory of one instance (Cloud Run quantity, e.g. ``512Mi``).
    """

    request_concurrency: int
    workers: int
    max_instances: int
    timeout_margin_seconds: int
    serve_wait_seconds: int
    available_cpu: str
    available_memory: str

    def environment(self) -> dict[str, str]:
        """The variables Terraform and the local stack both set on every function."""
        return {
            "THREADS": str(self.request_concurrency),
            "WORKERS": str(self.workers),
            "TRIGGERFISH_REQUEST_TIMEOUT_S": str(self.serve_wait_seconds),
        }

    def timeout_seconds(self, subscription: PushSubscription) -> int:
        """The timeout of the function that ``subscription`` pushes to."""
        return subscription.ack_deadline_seconds - self.timeout_margin_seconds


@dataclass(frozen=True, slots=True)
class ColdStart:
    """A model replica's start from zero GPU nodes (the footprint's ``"cold_start"``).

    Attributes:
        terms: Seconds per step, in order: ``node_provision_seconds`` (the cluster
            autoscaler creates a GPU node, GKE installs the driver),
            ``image_pull_seconds`` (the Serve image, streamed), and
            ``engine_from_cache_seconds`` (the engine downloaded from the GCS cache,
            loaded and warmed up; never a TensorRT build).
        measured: False while the terms are estimates still to be confirmed.
    """

    terms: dict[str, int]
    measured: bool

    @property
    def total_seconds(self) -> int:
        return sum(self.terms.values())


COLD_START_TERMS = ("node_provision_seconds", "image_pull_seconds", "engine_from_cache_seconds")


def _cold_start(raw: dict) -> ColdStart:
    status = raw["status"]
    if status not in ("estimate", "measured"):
        raise FootprintError(f"cold_start.status must be 'estimate' or 'measured', got {status!r}")
    terms = raw["terms"]
    if tuple(terms) != COLD_START_TERMS:
        raise FootprintError(f"cold_start.terms must be {COLD_START_TERMS}, got {tuple(terms)}")
    return ColdStart(
        terms={key: _positive_int(terms, key, "cold_start.terms") for key in COLD_START_TERMS},
        measured=status == "measured",
    )


@dataclass(frozen=True, slots=True)
class Footprint:
    requests_topic: str
    uploads_topic: str
    bulk_topic: str
    results_topic: str
    dead_letter_topic: str
    requests_subscription: PushSubscription
    uploads_subscription: PushSubscription
    bulk_subscription: PushSubscription
    results_subscription: str
    dead_letter_subscription: str
    images_bucket: str
    results_bucket: str
    models_bucket: str
    engine_cache_bucket: str
    functions: FunctionSettings
    serve_request_timeout_s: int
    cold_start: ColdStart

    @property
    def push_subscriptions(self) -> tuple[PushSubscription, ...]:
        """Every subscription that pushes to a function: live requests, uploads, bulk."""
        return (self.requests_subscription, self.uploads_subscription, self.bulk_subscription)

    def serve_environment(self) -> dict[str, str]:
        """What the RayService sets on Serve from the footprint (its request deadline)."""
        return {"TRIGGERFISH_REQUEST_TIMEOUT_S": str(self.serve_request_timeout_s)}


def _functions(raw: dict) -> FunctionSettings:
    ints = {
        key: _positive_int(raw, key, "functions")
        for key in (
            "request_concurrency",
            "workers",
            "max_instances",
            "timeout_margin_seconds",
            "serve_wait_seconds",
        )
    }
    return FunctionSettings(
        **ints, available_cpu=str(raw["available_cpu"]), available_memory=raw["available_memory"]
    )


def _check_timeouts_nest(fp: Footprint) -> None:
    """ack deadline > function timeout > the function's wait on Serve > Serve's own timeout."""
    for sub in fp.push_subscriptions:
        chain = [
            ("the ack deadline of " + sub.name, sub.ack_deadline_seconds),
            ("the function timeout", fp.functions.timeout_seconds(sub)),
            ("functions.serve_wait_seconds", fp.functions.serve_wait_seconds),
            ("serve.request_timeout_seconds", fp.serve_request_timeout_s),
        ]
        for (outer, outer_s), (inner, inner_s) in zip(chain, chain[1:], strict=False):
            if not outer_s > inner_s:
                raise FootprintError(
                    f"timeouts must nest: {inner} ({inner_s} s) must be below {outer} ({outer_s} s)"
                )


def load_footprint(path: Path = FOOTPRINT_FILE) -> Footprint:
    raw = json.loads(path.read_text())
    topics, subs, buckets = raw["topics"], raw["subscriptions"], raw["buckets"]

    def push(key: str) -> PushSubscription:
        s = subs[key]
        return PushSubscription(
            name=s["name"],
            topic=topics[s["topic"]],
            entry_point=s["entry_point"],
            ack_deadline_seconds=int(s["ack_deadline_seconds"]),
            min_backoff_seconds=int(s["min_backoff_seconds"]),
            max_backoff_seconds=int(s["max_backoff_seconds"]),
            max_delivery_attempts=int(s["max_delivery_attempts"]),
        )

    fp = Footprint(
        requests_topic=topics["requests"],
        uploads_topic=topics["uploads"],
        bulk_topic=topics["bulk"],
        results_topic=topics["results"],
        dead_letter_topic=topics["dead_letter"],
        requests_subscription=push("requests"),
        uploads_subscription=push("uploads"),
        bulk_subscription=push("bulk"),
        results_subscription=subs["results"]["name"],
        dead_letter_subscription=subs["dead_letter"]["name"],
        images_bucket=buckets["images"],
        results_bucket=buckets["results"],
        models_bucket=buckets["models"],
        engine_cache_bucket=buckets["engine_cache"],
        functions=_functions(raw["functions"]),
        serve_request_timeout_s=_positive_int(raw["serve"], "request_timeout_seconds", "serve"),
        cold_start=_cold_start(raw["cold_start"]),
    )
    _check_timeouts_nest(fp)
    return fp
