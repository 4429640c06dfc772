"""The Ingress replica under the bursts of the production-shape issue, with its default bounds.

1. 256 concurrent ``POST /v1/infer`` calls of 16 URIs each (4,096 inputs), each retried
   after ``Retry-After`` as a function would, while one other caller sends one-URI calls
   one after another;
2. 4 concurrent Open Inference Protocol calls of 100 MiB each (binary tensor data:
   100 sample photos each padded to 1 MiB with JPEG comment segments).

Every call is answered (no timeouts, no 5xx but a retryable 503), every input of the
URI burst ends ``ok``, and the Ingress replica's resident memory stays bounded. The
figures (resident memory before and at its peak, the other caller's p50/p95 and the parts
of its time after admission, its slowest calls, and the machine's floor for such a call,
:func:`floor_trip`) are printed (``make test-load`` runs it with ``-s``). About four minutes
on two cores, so it is marked ``load`` and left out of ``make test``.
"""

from __future__ import annotations

import json
import random
import statistics
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest

from infra.local.client import StackClient
from infra.local.stack import StackOptions, StackState
from tests.integration.conftest import SAMPLES, running_stack
from tests.integration.test_overload import ingress_pid, rss_mb

pytestmark = [pytest.mark.integration, pytest.mark.load]

MODEL = "mobilenet_v2"
BUCKET = "triggerfish-burst"
CALLS, URIS_PER_CALL = 256, 16
OIP_CALLS, OIP_BODY_BYTES, OIP_IMAGES = 4, 100 * 1024 * 1024, 100
# How long a caller keeps retrying (a function's 120 s wait plus Pub/Sub redeliveries).
PATIENCE_S = 600
# Resident growth allowed: the URI burst is held to the admission budget (192 MiB,
# estimated at 1 MiB per URI input: far more than a fetched photo and its tensor) and
# crosses to the model in calls of one batch; an OIP body with binary tensor data is run
# as it arrives, each call holding a few parts of images (serve.http.oip_stream).
MAX_URI_BURST_GROWTH_MB = 100
MAX_OIP_BURST_GROWTH_MB = 100


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    options = StackOptions(
        state_dir=tmp_path_factory.mktemp("burst-stack"),
        extra_env={
            "TRIGGERFISH_MODELS": MODEL,
            "TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{BUCKET}",
            "TRIGGERFISH_REQUEST_TIMEOUT_S": "120",
        },
    )
    with running_stack(options, [MODEL]) as state:
        yield state


@pytest.fixture(scope="module")
def uris(burst_stack: StackState) -> list[list[str]]:
    client = StackClient(burst_stack)
    client.storage.create_bucket(BUCKET)
    samples = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    bucket = client.storage.bucket(BUCKET)
    names = [f"b/{i:05d}.jpg" for i in range(CALLS * URIS_PER_CALL)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.blob(names[i]).upload_from_string(samples[i % len(samples)]), range(len(names))))
    flat = [f"gs://{BUCKET}/{n}" for n in names]
    return [flat[i : i + URIS_PER_CALL] for i in range(0, len(flat), URIS_PER_CALL)]


#: A result-sized object (a stored result is about 1.5 KB of JSON).
FLOOR_WRITE = b"{}" + b" " * 1500


def floor_trip(http: httpx.Client, state: StackState, source: str) -> dict[str, float]:
    """One trip over the legs every one-URI call crosses, with no work between them (seconds each).

    ``serve``: the data plane to an Ingress replica's event loop and back (``/v2/health/live``,
    which calls no model); ``read``: the source photo from the storage emulator; ``write``: a
    result-sized object into the results bucket (always one name, so the bucket does not grow).
    Their sum is the least a call can take on this machine at that moment, whatever the
    Ingress and the model do.
    """
    bucket, name = source.removeprefix("gs://").split("/", 1)
    legs = {}
    started = time.monotonic()
    assert http.get(f"{state.serve_url}/v2/health/live").status_code == 200
    legs["serve"] = time.monotonic() - started
    started = time.monotonic()
    read = http.get(f"{state.storage_host}/storage/v1/b/{bucket}/o/{quote(name, safe='')}", params={"alt": "media"})
    assert read.status_code == 200, read.text
    legs["read"] = time.monotonic() - started
    started = time.monotonic()
    written = http.post(
        f"{state.storage_host}/upload/storage/v1/b/{state.results_bucket}/o",
        params={"uploadType": "media", "name": "floor-probe.json"},
        content=FLOOR_WRITE, headers={"content-type": "application/json"},
    )  # fmt: skip
    assert written.status_code == 200, written.text
    legs["write"] = time.monotonic() - started
    legs["trip"] = sum(legs.values())
    return legs


class Watch:
    """Samples the Ingress's resident memory, times one other caller's one-URI calls and, beside
    them, the machine's floor for such a call (:func:`floor_trip`)."""

    def __init__(self, state: StackState, pid: int, probe_uri: str) -> None:
        self.state, self.pid, self.probe_uri = state, pid, probe_uri
        self.rss: list[float] = []
        self.latencies: list[float] = []
        self.floor: dict[str, list[float]] = {}
        # The answered calls' own timings (seconds): end to end after admission, and its parts.
        self.parts: dict[str, list[float]] = {}
        self.slowest: list[tuple[float, dict]] = []
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()

    def _memory(self) -> None:
        while not self._stop.is_set():
            self.rss.append(rss_mb(self.pid))
            self._stop.wait(0.1)

    def _other_caller(self) -> None:
        with httpx.Client(timeout=180) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                response = http.post(f"{self.state.serve_url}/v1/infer", json={"uri": self.probe_uri})
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    took = time.monotonic() - started
                    self.latencies.append(took)
                    timings = response.json()["results"][0].get("timings") or {}
                    server = server_timing(response.headers.get("server-timing", ""))
                    # Before admission: the connection, the body, the replica's event loop.
                    timings["admission_ms"] = server["admission"]
                    timings["store_ms"] = server.get("store")
                    timings["outside_ms"] = round(took * 1000 - server["admission"] - server["work"], 1)
                    self.slowest.append((took, timings))
                    for part in (
                        "outside_ms", "admission_ms", "store_ms", "end_to_end_ms", "fetch_ms", "decode_ms", "queue_wait_ms",
                        "inference_ms",
                    ):  # fmt: skip
                        self.parts.setdefault(part, []).append((timings.get(part) or 0) / 1000)
                self._stop.wait(0.2)

    def _floor(self) -> None:
        with httpx.Client(timeout=180) as http:
            while not self._stop.is_set():
                for leg, seconds in floor_trip(http, self.state, self.probe_uri).items():
                    self.floor.setdefault(leg, []).append(seconds)
                self._stop.wait(0.2)

    def __enter__(self) -> Watch:
        self._threads = [
            threading.Thread(target=t, daemon=True) for t in (self._memory, self._other_caller, self._floor)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: admission;dur=1.0, work;dur=2.0`` as milliseconds by name."""
    parts = (entry.strip().split(";dur=") for entry in header.split(",") if ";dur=" in entry)
    timings = {name: float(value) for name, value in parts}
    assert {"admission", "work"} <= set(timings), header
    return timings


def _batches(state: StackState) -> Counter[int]:
    """Batches the model replica has formed, by size."""
    stats = httpx.get(f"{state.serve_url}/v1/stats", timeout=30).json()[MODEL]
    return Counter({int(size): int(count) for size, count in stats["batch_sizes"].items()})


def _percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"{len(values)} samples"
    q = statistics.quantiles(values, n=20)
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms ({len(values)} calls)"


def idle_latency(state: StackState, uri: str) -> tuple[list[float], dict[str, list[float]]]:
    """20 one-URI calls on the idle stack, and 20 floor trips (:func:`floor_trip`) by leg."""
    times, floor = [], {}
    with httpx.Client(timeout=60) as http:
        for _ in range(20):
            started = time.monotonic()
            assert http.post(f"{state.serve_url}/v1/infer", json={"uri": uri}).status_code == 200
            times.append(time.monotonic() - started)
            for leg, seconds in floor_trip(http, state, uri).items():
                floor.setdefault(leg, []).append(seconds)
    return times, floor


def call_until_answered(http: httpx.Client, url: str, uris: list[str], give_up: float) -> list[int]:
    statuses = []
    while True:
        response = http.post(url, json={"uris": uris})
        statuses.append(response.status_code)
        if response.status_code not in (429, 503) or time.monotonic() > give_up:
            return statuses
        time.sleep(float(response.headers.get("retry-after") or 1) * random.uniform(1, 1.5))


def test_a_burst_of_256_calls_of_16_uris_is_answered_within_bounded_memory(
    burst_stack: StackState, uris: list[list[str]]
) -> None:
    url = f"{burst_stack.serve_url}/v1/infer"
    idle, idle_floor = idle_latency(burst_stack, uris[0][0])
    pid = ingress_pid(burst_stack)
    baseline = rss_mb(pid)
    gate = threading.Barrier(CALLS)
    give_up = time.monotonic() + PATIENCE_S

    def caller(batch: list[str]) -> list[int]:
        with httpx.Client(timeout=180) as http:
            gate.wait()
            return call_until_answered(http, url, batch, give_up)

    batches_before = _batches(burst_stack)
    started = time.monotonic()
    with Watch(burst_stack, pid, uris[0][0]) as watch, ThreadPoolExecutor(CALLS) as pool:
        answers = list(pool.map(caller, uris))
    elapsed = time.monotonic() - started
    batches = _batches(burst_stack) - batches_before
    statuses = Counter(s for a in answers for s in a)
    print(
        f"\nURI burst {CALLS} x {URIS_PER_CALL}: answers {dict(statuses)} in {elapsed:.0f} s; "
        f"ingress RSS {baseline:.0f} MB idle -> {max(watch.rss):.0f} MB peak "
        f"(+{max(watch.rss) - baseline:.0f} MB); other caller idle {_percentiles(idle)}, "
        f"during {_percentiles(watch.latencies)}, its statuses {dict(watch.statuses)}; "
        "its timings after admission: "
        + "; ".join(f"{part} {_percentiles(values)}" for part, values in watch.parts.items())
    )
    print(
        "  the floor (serve, read, write legs, no work): idle "
        + "; ".join(f"{leg} {_percentiles(values)}" for leg, values in idle_floor.items())
        + "; during "
        + "; ".join(f"{leg} {_percentiles(values)}" for leg, values in watch.floor.items())
    )
    formed = batches.total()
    inputs = sum(size * count for size, count in batches.items())
    print(f"  batches: {formed}, mean size {inputs / max(1, formed):.1f}; {dict(sorted(batches.items()))}")
    for latency, timings in sorted(watch.slowest, key=lambda x: -x[0])[:4]:
        print(f"  slow: {latency * 1000:.0f} ms {timings}")
    assert all(a[-1] == 200 for a in answers), Counter(a[-1] for a in answers)
    assert set(statuses) <= {200, 429, 503}, dict(statuses)
    assert max(watch.rss) - baseline < MAX_URI_BURST_GROWTH_MB, (baseline, max(watch.rss))


def padded_jpeg(data: bytes, size: int) -> bytes:
    """``data`` (a JPEG) grown to ``size`` bytes by comment segments after its start marker."""
    assert data[:2] == b"\xff\xd8" and size >= len(data) + 4
    pad, segments = size - len(data), []
    while pad:
        payload = min(65533, pad - 4)
        if 0 < pad - 4 - payload < 4:  # leave the rest room for a segment of its own
            payload -= 4
        segments.append(b"\xff\xfe" + struct.pack(">H", payload + 2) + b"\0" * payload)
        pad -= payload + 4
    return data[:2] + b"".join(segments) + data[2:]


def _oip_body() -> tuple[bytes, dict[str, str], list[str]]:
    """A 100 MiB call of 100 sample photos, each padded to 1 MiB; the photos' names in order."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    names = [photos[i % len(photos)].name for i in range(OIP_IMAGES)]
    element = OIP_BODY_BYTES // OIP_IMAGES - 4
    padded = {p.name: padded_jpeg(p.read_bytes(), element) for p in photos}
    data = b"".join(struct.pack("<I", element) + padded[name] for name in names)
    header = json.dumps(
        {"inputs": [{"name": "image", "shape": [OIP_IMAGES], "datatype": "BYTES",
                     "parameters": {"binary_data_size": len(data)}}],
         "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
    ).encode()  # fmt: skip
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    return header + data, headers, names


def test_four_concurrent_100_mib_oip_bodies_are_answered_within_bounded_memory(burst_stack: StackState) -> None:
    body, headers, names = _oip_body()
    url = f"{burst_stack.serve_url}/v2/models/{MODEL}/infer"
    # Each photo's label, from a call of the photo alone and unpadded.
    expected = {}
    with httpx.Client(timeout=60) as http:
        for photo in sorted(SAMPLES.glob("*.jpg")):
            one, one_headers, _ = _one_photo_body(photo.read_bytes())
            answer = http.post(url, content=one, headers=one_headers)
            assert answer.status_code == 200, answer.text
            expected[photo.name] = answer.json()["outputs"][0]["data"][0].split(":")[1]
    pid = ingress_pid(burst_stack)
    baseline = rss_mb(pid)
    gate = threading.Barrier(OIP_CALLS)
    give_up = time.monotonic() + PATIENCE_S

    labels: list[list[str]] = []

    def caller(_: int) -> list[int]:
        statuses = []
        with httpx.Client(timeout=180) as http:
            gate.wait()
            while True:
                response = http.post(url, content=body, headers=headers)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    labels.append([s.split(":")[1] for s in response.json()["outputs"][0]["data"]])
                if response.status_code not in (429, 503) or time.monotonic() > give_up:
                    return statuses
                time.sleep(float(response.headers.get("retry-after") or 1))

    started = time.monotonic()
    with Watch(burst_stack, pid, f"gs://{BUCKET}/b/00000.jpg") as watch, ThreadPoolExecutor(OIP_CALLS) as pool:
        answers = list(pool.map(caller, range(OIP_CALLS)))
    print(
        f"\nOIP burst {OIP_CALLS} x {OIP_BODY_BYTES >> 20} MiB: answers {answers} in "
        f"{time.monotonic() - started:.0f} s; ingress RSS {baseline:.0f} MB -> {max(watch.rss):.0f} MB peak "
        f"(+{max(watch.rss) - baseline:.0f} MB); other caller during {_percentiles(watch.latencies)}, "
        f"its statuses {dict(watch.statuses)}; the floor during it: "
        + "; ".join(f"{leg} {_percentiles(values)}" for leg, values in watch.floor.items())
    )
    assert all(a[-1] == 200 for a in answers), answers
    assert labels == [[expected[name] for name in names]] * OIP_CALLS
    assert max(watch.rss) - baseline < MAX_OIP_BURST_GROWTH_MB, (baseline, max(watch.rss))


def _one_photo_body(photo: bytes) -> tuple[bytes, dict[str, str], list[str]]:
    data = struct.pack("<I", len(photo)) + photo
    header = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}],
         "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
    ).encode()  # fmt: skip
    return header + data, {"inference-header-content-length": str(len(header))}, []
