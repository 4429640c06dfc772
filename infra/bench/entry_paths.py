"""``triggerfish bench``: every entry path against a Beam RunInference peer, in one run.

On one local stack started for the run (emulators, Ray Serve, ONNX Runtime),
for small JPEGs (the sample photos) and for 12 MP phone-sized JPEGs, it times
from the first upload/publish/POST until the last result JSON is stored:

* upload: objects written to the images bucket (bucket notification path),
* Pub/Sub with one URI per message and with ``--per-message`` URIs per message,
* HTTP: ``--per-message`` URIs per call, ``--http-in-flight`` calls in flight,
* the peer: an Apache Beam RunInference pipeline (``infra/bench/beam_peer.py``, in
  the ``bench`` extra's environment) reading the HTTP path's objects from the same
  emulator and writing its results there, once with a full decode and once with
  reduced-scale decode, each timed warm (:mod:`infra.bench.peer`),

and reports the engine-only and decode-only ceilings, ``ok`` results per second,
CPU-ms per image summed over every process of the stack, cores busy, the batch
sizes formed, p50/p95 end to end, the peer's top-1 agreement with triggerfish on
the same objects, and one image over HTTP (raw body) next to the engine's batch-1
latency. Every path starts against emptied results and its own objects only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from infra.bench.cpu import CpuMeter
from infra.bench.peer import BEAM_PYTHON, run_peer
from infra.bench.report import MODEL, format_report, ratios
from infra.local.client import StackClient
from infra.local.stack import (
    DEFAULT_MODEL_REPOSITORY,
    LocalStack,
    StackOptions,
    StackState,
)
from shared.gcs import GcsClient
from shared.result_store import STATUS_METADATA_KEY
from shared.uris import GcsUri

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "text.jpg")
PHONE_SIZE = (4032, 3024)  # 12 MP, a typical phone camera frame
STAGING_BUCKET = "triggerfish-bench-staging"  # readable by Serve, not notified
# Uploads in flight from the benchmark's client.
UPLOAD_CONCURRENCY = 8
# How often the results bucket is listed while a path runs.
RESULT_POLL_S = 1.0
# One image at a time, this many times: the p50 of a warm series (noisy on small machines).
SINGLE_IMAGE_REPEATS = 120
# A result JSON is a few hundred bytes; anything near this is not one.
MAX_RESULT_BYTES = 1 << 20


def bench_images(large: bool) -> list[bytes]:
    """The sample photos, or 12 MP JPEG versions of them (upscaled, quality 90)."""
    images = []
    for name in PHOTOS:
        data = (SAMPLES / name).read_bytes()
        if large:
            with Image.open(io.BytesIO(data)) as im:
                big = im.convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            big.save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
        images.append(data)
    return images


def _load_engine():  # noqa: ANN202
    from serve.engines.base import load_engine
    from serve.model.loader import engine_spec
    from serve.model.repository import ModelRepository
    from serve.model_config import Backend
    from serve.postprocess.factory import make_postprocessor

    mv = ModelRepository(str(DEFAULT_MODEL_REPOSITORY), Path("/tmp")).resolve(MODEL)
    spec = engine_spec(mv, make_postprocessor(mv.config.postprocess).output_names)
    return mv.config, load_engine(spec, Backend.ONNXRUNTIME)


def ceilings(images: list[bytes], total: int) -> dict[str, Any]:
    """Engine-only images/s at the max batch size, engine batch-1 latency, decode-only images/s."""
    from serve.imaging.cpu_decode import prepare_image, to_model_input

    cfg, engine = _load_engine()
    pixels = [prepare_image(d, cfg.input, cfg.preprocess, 10**9).pixels for d in images]
    size = cfg.batching.max_batch_size
    batch = to_model_input(np.stack([pixels[i % len(pixels)] for i in range(size)]), cfg.input, cfg.preprocess)
    one = to_model_input(pixels[0][None], cfg.input, cfg.preprocess)
    engine.infer(batch)
    batches = max(1, total // size)
    started = time.perf_counter()
    for _ in range(batches):
        engine.infer(batch)
    engine_s = time.perf_counter() - started
    single = []
    for _ in range(SINGLE_IMAGE_REPEATS):
        t = time.perf_counter()
        engine.infer(one)
        single.append((time.perf_counter() - t) * 1000)
    backend = engine.backend_name
    engine.close()
    workers = os.cpu_count() or 2
    work = [images[i % len(images)] for i in range(max(len(images), total // 4))]
    with ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        list(pool.map(lambda d: prepare_image(d, cfg.input, cfg.preprocess, 10**9), work))
        decode_s = time.perf_counter() - started
    return {
        "engine_images_per_s": batches * size / engine_s, "engine_batch_size": size, "backend": backend,
        "engine_batch1_ms_p50": float(np.median(single)),
        "decode_images_per_s": len(work) / decode_s, "decode_threads": workers,
    }  # fmt: skip


class Bench:
    """Runs the entry paths against one stack and collects their figures."""

    def __init__(
        self, state: StackState, roots: dict[str, int], count: int, per_message: int, in_flight: int, batch_size: int
    ) -> None:
        self.state = state
        self.batch_size = batch_size  # the model's max batch size: the peer batches as much
        self.client = StackClient(state)
        self.meter = CpuMeter(roots)
        self.count = count
        self.per_message = per_message
        self.in_flight = in_flight

    # -- staging and waiting -------------------------------------------------------------
    def _with_gcs(self, items: list[Any], work: Callable[[GcsClient, Any], Awaitable[None]]) -> None:
        """Run ``work(gcs, item)`` for every item, ``UPLOAD_CONCURRENCY`` at a time.

        The machine that uploads is the one being measured, so the benchmark's own
        object traffic goes through the lean asyncio JSON-API client (:mod:`shared.gcs`).
        """

        async def run() -> None:
            gcs = GcsClient(self.state.storage_host)
            slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)

            async def one(item: Any) -> None:  # noqa: ANN401 - whatever ``work`` takes
                async with slots:
                    await work(gcs, item)

            try:
                await asyncio.gather(*(one(item) for item in items))
            finally:
                await gcs.close()

        asyncio.run(run())

    def upload(self, bucket: str, prefix: str, images: list[bytes], count: int | None = None) -> dict[str, float]:
        """Write ``count`` objects (default: the run's count; the images, round robin);
        returns when each upload started."""
        times: dict[str, float] = {}

        async def put(gcs: GcsClient, i: int) -> None:
            times[f"{i:05d}.jpg"] = time.time()
            await gcs.write(bucket, f"{prefix}/{i:05d}.jpg", images[i % len(images)], content_type="image/jpeg")

        self._with_gcs(list(range(self.count if count is None else count)), put)
        return times

    def stage(self, bucket: str, prefix: str, images: list[bytes], count: int | None = None) -> list[str]:
        """Write ``count`` objects (default: the run's count; the images, round robin); their URIs."""
        count = self.count if count is None else count
        self.upload(bucket, prefix, images, count)
        return [f"gs://{bucket}/{prefix}/{i:05d}.jpg" for i in range(count)]

    def wait_results(self, marker: str, expected: int, timeout: float) -> list[Any]:
        """Poll the results bucket until ``expected`` results under ``marker`` exist.

        ``marker`` is ``/<bucket>/<prefix>/``: results live at ``<model>/<bucket>/<name>.json``.
        A path's time ends at its last result's own ``updated`` time, not at the poll
        that sees it, so polls are sparse: listing costs the emulator CPU.
        """
        bucket = self.client.storage.bucket(self.state.results_bucket)
        deadline = time.monotonic() + timeout
        while True:
            found = list(self.client.storage.list_blobs(bucket, prefix=f"{MODEL}{marker}"))
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(RESULT_POLL_S)

    def clear(self, marker: str) -> None:
        """Delete one path's objects and results, so that every path meets buckets of the same size.

        fake-gcs-server lists and looks up objects in time that grows with the bucket:
        left in place, each path's objects would slow down the paths measured after it.
        """
        source_bucket, prefix = marker.strip("/").split("/", 1)
        self.delete([(self.state.results_bucket, f"{MODEL}{marker}"), (source_bucket, f"{prefix}/")])

    def delete(self, prefixes: list[tuple[str, str]]) -> None:
        """Delete every object under each (bucket, prefix)."""
        doomed = [(bucket, b.name) for bucket, prefix in prefixes
                  for b in self.client.storage.list_blobs(bucket, prefix=prefix)]  # fmt: skip

        async def delete(gcs: GcsClient, where: tuple[str, str]) -> None:
            await gcs.delete(*where)

        self._with_gcs(doomed, delete)

    def _stats(self) -> Counter[int]:
        stats = httpx.get(f"{self.state.serve_url}/v1/stats", timeout=30).json()[MODEL]
        return Counter({int(k): v for k, v in stats["batch_sizes"].items()})

    def measure(self, name: str, marker: str, submit) -> dict[str, Any]:  # noqa: ANN001
        """Run ``submit(started_at)``, wait for the results, and summarize the run."""
        sizes_before = self._stats()
        self.meter.start()
        started = time.time()
        submit_times = submit()
        found = self.wait_results(marker, self.count, timeout=60 + self.count)
        # Only ``ok`` results count: an error result is stored just as fast and proves nothing.
        ok = [b for b in found if (b.metadata or {}).get(STATUS_METADATA_KEY) == "ok"]
        stored = [b.updated.timestamp() for b in found]
        ended = max(stored) if stored else time.time()
        cpu = self.meter.stop()
        formed = self._stats()
        formed.subtract(sizes_before)
        seconds = ended - started
        latencies = [
            (b.updated.timestamp() - submit_times.get(b.name.rsplit("/", 1)[-1].removesuffix(".json"), started)) * 1000
            for b in found
        ]
        return {
            "path": name, "images": self.count, "results": len(found), "ok": len(ok), "seconds": seconds,
            "images_per_s": len(ok) / seconds if seconds > 0 else 0.0,
            "cpu_ms_per_image": sum(cpu.values()) * 1000 / max(1, len(ok)),
            "cpu_ms_by_process": {k: round(v * 1000 / max(1, len(ok)), 1) for k, v in cpu.items()},
            "cores_busy": sum(cpu.values()) / seconds if seconds > 0 else 0.0,
            "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
            "latency_ms_p95": float(np.percentile(latencies, 95)) if latencies else None,
            "batches_formed": {str(k): v for k, v in sorted(formed.items()) if v > 0},
        }  # fmt: skip

    # -- the entry paths --------------------------------------------------------------
    def upload_path(self, images: list[bytes], tag: str) -> dict[str, Any]:
        prefix = f"bench-{tag}-upload"

        def submit() -> dict[str, float]:
            return self.upload(self.state.images_bucket, prefix, images)

        return self.measure("upload", f"/{self.state.images_bucket}/{prefix}/", submit)

    def pubsub_path(self, uris: list[str], per_message: int, marker: str) -> dict[str, Any]:
        def submit() -> dict[str, float]:
            times: dict[str, float] = {}
            topic = self.client.publisher.topic_path(self.state.project, self.state.requests_topic)
            futures = []
            for i in range(0, len(uris), per_message):
                chunk = uris[i : i + per_message]
                body = {"uri": chunk[0]} if len(chunk) == 1 else {"uris": chunk}
                now = time.time()
                times.update({u.rsplit("/", 1)[-1]: now for u in chunk})
                futures.append(self.client.publisher.publish(topic, json.dumps(body).encode()))
            for f in futures:
                f.result(timeout=60)
            return times

        name = "pubsub, 1 URI/message" if per_message == 1 else f"pubsub, {per_message} URIs/message"
        return self.measure(name, marker, submit)

    def http_path(self, uris: list[str], marker: str) -> dict[str, Any]:
        chunks = [uris[i : i + self.per_message] for i in range(0, len(uris), self.per_message)]
        url = f"{self.state.serve_url}/v1/infer"

        def submit() -> dict[str, float]:
            times: dict[str, float] = {}

            async def run() -> None:
                queue = list(reversed(chunks))
                async with httpx.AsyncClient(timeout=300) as http:

                    async def worker() -> None:
                        while queue:
                            chunk = queue.pop()
                            now = time.time()
                            times.update({u.rsplit("/", 1)[-1]: now for u in chunk})
                            response = await http.post(url, json={"uris": chunk})
                            response.raise_for_status()

                    await asyncio.gather(*(worker() for _ in range(self.in_flight)))

            asyncio.run(run())
            return times

        name = f"HTTP, {self.per_message} URIs/call, {self.in_flight} in flight"
        return self.measure(name, marker, submit)

    def top1(self, bucket: str, prefix: str) -> dict[str, int | None]:
        """Top-1 class of each result under ``prefix`` by the source object's base name
        (every path's objects are ``<i>.jpg``); ``None`` for a result that is not ``ok``."""
        names = [b.name for b in self.client.storage.list_blobs(bucket, prefix=prefix)]
        found: dict[str, int | None] = {}

        async def read(gcs: GcsClient, name: str) -> None:
            body, _ = await gcs.read(GcsUri(bucket, name), None, MAX_RESULT_BYTES)
            result = json.loads(body)
            ok = result.get("status") == "ok" and result.get("labels")
            found[name.rsplit("/", 1)[-1].removesuffix(".json")] = result["labels"][0]["class_id"] if ok else None

        self._with_gcs(names, read)
        return found

    def single_image_ms(self, data: bytes, repeats: int = SINGLE_IMAGE_REPEATS, via_proxy: bool = False) -> float:
        """p50 of one raw-body image at a time; ``via_proxy``: through Serve's proxy actor."""
        base = self.state.serve_proxy_url if via_proxy else self.state.serve_url
        url = f"{base}/v1/infer"
        latencies = []
        with httpx.Client(timeout=60) as http:
            for _ in range(repeats):
                started = time.perf_counter()
                r = http.post(url, content=data, headers={"content-type": "image/jpeg"})
                r.raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
        return float(np.median(latencies[len(latencies) // 4 :]))


def run_suite(bench: Bench, images: list[bytes], tag: str, with_beam: bool) -> list[dict[str, Any]]:
    rows = [bench.upload_path(images, tag)]
    bench.clear(f"/{bench.state.images_bucket}/bench-{tag}-upload/")
    for per_message in (1, bench.per_message):
        marker = f"/{STAGING_BUCKET}/bench-{tag}-pubsub{per_message}/"
        uris = bench.stage(STAGING_BUCKET, marker.split("/")[2], images)
        rows.append(bench.pubsub_path(uris, per_message, marker))
        bench.clear(marker)
    marker = f"/{STAGING_BUCKET}/bench-{tag}-http/"
    uris = bench.stage(STAGING_BUCKET, f"bench-{tag}-http", images)
    rows.append(bench.http_path(uris, marker))
    if with_beam:
        # The peer reads the HTTP path's objects, so its top-1 is compared on the same bytes;
        # triggerfish's results go first, so the peer too meets an empty results bucket.
        reference = bench.top1(bench.state.results_bucket, f"{MODEL}{marker}")
        bench.delete([(bench.state.results_bucket, f"{MODEL}{marker}")])
        rows += [run_peer(bench, uris, reduced, tag, reference) for reduced in (False, True)]
    bench.clear(marker)
    return rows


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    small = bench_images(False)
    large = [] if args.small_only else bench_images(True)
    report: dict[str, Any] = {"started_at": datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    report["ceilings"] = {"small": ceilings(small, 256)}
    if large:
        report["ceilings"]["large"] = ceilings(large, 64)
    state_dir = Path(tempfile.mkdtemp(prefix="triggerfish-bench-"))
    stack = LocalStack(StackOptions(
        state_dir=state_dir,
        extra_env={"TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{STAGING_BUCKET}"},
    ))  # fmt: skip
    progress = (lambda m: None) if args.json else (lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    state = stack.start(progress=progress)
    try:
        StackClient(state).storage.create_bucket(STAGING_BUCKET)
        roots = {p.name: p.pid for p in stack.processes}
        batch_size = report["ceilings"]["small"]["engine_batch_size"]  # the model's max_batch_size
        bench = Bench(state, roots, args.images, args.per_message, args.http_in_flight, batch_size)
        # Warm every path once so that no figure includes a first-call cost.
        warm = bench.stage(STAGING_BUCKET, "warm", small[:1], count=1)
        bench.client.publish(warm)
        bench.single_image_ms(small[0], repeats=3)
        bench.single_image_ms(small[0], repeats=3, via_proxy=True)
        progress("small JPEGs")
        with_beam = not args.no_beam and BEAM_PYTHON.exists()
        if not args.no_beam and not with_beam:
            report["peer_skipped"] = f"{BEAM_PYTHON} is missing: make .venv-bench/.installed (or make bench)"
        report["small"] = run_suite(bench, small, "small", with_beam)
        report["ratios"] = {"small": ratios(report["small"])}
        report["single_image_http_ms_p50"] = bench.single_image_ms(small[0])
        if state.serve_proxy_url:
            report["single_image_proxy_ms_p50"] = bench.single_image_ms(small[0], via_proxy=True)
        if not args.small_only:
            progress("12 MP JPEGs")
            bench.count = args.large_images
            report["large"] = run_suite(bench, large, "large", with_beam)
            report["ratios"]["large"] = ratios(report["large"])
    finally:
        progress("stopping the local stack")
        stack.stop()
    return report


def cmd_bench(args: argparse.Namespace) -> int:
    report = run_bench(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else format_report(report))
    incomplete = [row["path"] for s in ("small", "large") for row in report.get(s, []) if row["ok"] < row["images"]]
    if incomplete:
        print(f"incomplete paths: {incomplete}", file=sys.stderr)
    return 1 if incomplete else 0
