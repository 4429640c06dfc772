"""Mixed traffic against the local stack, so that every dashboard panel has something to show.

Every entry path (raw-body and ``gs://`` HTTP, Pub/Sub, the Open Inference
Protocol, both models) in phases of rising and falling concurrency, with a few
inputs that fail on purpose (not an image, a missing object). Run the stack with
a low ``TRIGGERFISH_MAX_INFLIGHT`` to see load shedding in the burst phase::

    python -m infra.grafana.traffic --minutes 5
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

from infra.local.client import StackClient
from infra.local.stack import DEFAULT_STATE_DIR, StackState

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")
# (share of the run, concurrent callers)
PHASES = ((0.2, 2), (0.25, 6), (0.15, 16), (0.25, 4), (0.15, 1))


class Traffic:
    def __init__(self, client: StackClient) -> None:
        self.client = client
        self.url = client.state.serve_url
        self.photos = {name: (SAMPLES / name).read_bytes() for name in PHOTOS}
        self.uris = [
            str(client.upload(SAMPLES / name, name=f"traffic/{name}")[0]) for name in PHOTOS
        ]
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def one(self, http: httpx.Client, rng: random.Random) -> str:
        pick = rng.random()
        if pick < 0.35:
            name = rng.choice(PHOTOS)
            r = http.post(
                f"{self.url}/v1/infer",
                content=self.photos[name],
                headers={"content-type": "image/jpeg"},
            )
        elif pick < 0.6:
            images = [self.photos[rng.choice(PHOTOS)] for _ in range(rng.randint(1, 4))]
            model = "text_detector" if rng.random() < 0.1 else "mobilenet_v2"
            r = http.post(
                f"{self.url}/v2/models/{model}/infer",
                json=_oip_body(images[:1] if model == "text_detector" else images),
            )
        elif pick < 0.75:
            r = http.post(
                f"{self.url}/v1/infer", json={"uris": rng.sample(self.uris, rng.randint(1, 3))}
            )
        elif pick < 0.9:
            self.client.publish([rng.choice(self.uris)])
            return "pubsub"
        elif pick < 0.95:
            r = http.post(
                f"{self.url}/v1/infer",
                content=b"not an image",
                headers={"content-type": "image/jpeg"},
            )
        else:
            missing = (
                f"gs://{self.client.state.images_bucket}/traffic/missing-{uuid.uuid4().hex[:6]}.jpg"
            )
            r = http.post(f"{self.url}/v1/infer", json={"uri": missing})
        return str(r.status_code)

    def worker(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < until:
                try:
                    outcome = self.one(http, rng)
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                with self._lock:
                    self.outcomes[outcome] += 1

    def run(self, seconds: float) -> None:
        for share, callers in PHASES:
            until = time.monotonic() + share * seconds
            threads = [
                threading.Thread(target=self.worker, args=(until, i)) for i in range(callers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sys.stdout.write(
                f"{callers:3} callers for {share * seconds:5.0f}s: {dict(self.outcomes)}\n"
            )


def _oip_body(images: list[bytes]) -> dict:
    data = [base64.b64encode(i).decode() for i in images]
    return {
        "inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    Traffic(StackClient(StackState.load(args.state_dir))).run(args.minutes * 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
