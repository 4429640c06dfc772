"""The names and delivery settings in ``infra/footprint.json``, shared with Terraform."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FOOTPRINT_FILE = Path(__file__).with_name("footprint.json")


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
class Footprint:
    requests_topic: str
    uploads_topic: str
    dead_letter_topic: str
    requests_subscription: PushSubscription
    uploads_subscription: PushSubscription
    dead_letter_subscription: str
    images_bucket: str
    results_bucket: str
    models_bucket: str
    engine_cache_bucket: str


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

    return Footprint(
        requests_topic=topics["requests"],
        uploads_topic=topics["uploads"],
        dead_letter_topic=topics["dead_letter"],
        requests_subscription=push("requests"),
        uploads_subscription=push("uploads"),
        dead_letter_subscription=subs["dead_letter"]["name"],
        images_bucket=buckets["images"],
        results_bucket=buckets["results"],
        models_bucket=buckets["models"],
        engine_cache_bucket=buckets["engine_cache"],
    )
