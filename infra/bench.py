"""``triggerfish bench``: images/s through the HTTP path against the engine alone.

Measured in one run on the same machine:

* engine-only: the ONNX Runtime engine on preprocessed batches of the model's
  ``max_batch_size`` (the ceiling for the serving path),
* HTTP path: concurrent ``POST /v1/infer`` calls with ``gs://`` URIs, each one
  fetched from fake-gcs-server, decoded, preprocessed, batched and recorded,
* decoding: a full JPEG decode vs the reduced-scale (DCT) decode the ingress uses,

plus the batch sizes the model deployment actually formed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from infra._running import stack_for_command
from infra.client import StackClient
from infra.stack import DEFAULT_MODEL_REPOSITORY

SAMPLES = Path(__file__).resolve().parent / "samples"
PHOTOS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")
PHONE_SIZE = (4032, 3024)  # 12 MP, a typical phone camera frame


def bench_images(large: bool) -> dict[str, bytes]:
    """The sample photos, or 12 MP JPEG versions of them (upscaled, quality 90)."""
    images = {}
    for name in PHOTOS:
        data = (SAMPLES / name).read_bytes()
        if large:
            with Image.open(io.BytesIO(data)) as im:
                big = im.convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            big.save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
        images[name] = data
    return images


def engine_only(images: dict[str, bytes], total: int) -> dict[str, Any]:
    """Images/s of the engine alone on preprocessed, full batches."""
    from serve.engines.base import load_engine
    from serve.imaging import prepare_image, to_model_input
    from serve.loader import engine_spec
    from serve.model_config import Backend
    from serve.postprocess.factory import make_postprocessor
    from serve.repository import ModelRepository

    mv = ModelRepository(str(DEFAULT_MODEL_REPOSITORY), Path("/tmp")).resolve("mobilenet_v2")
    cfg = mv.config
    engine = load_engine(
        engine_spec(mv, make_postprocessor(cfg.postprocess).output_names), Backend.ONNXRUNTIME
    )
    pixels = [prepare_image(d, cfg.input, cfg.preprocess, 10**9).pixels for d in images.values()]
    size = cfg.batching.max_batch_size
    batch = to_model_input(
        np.stack([pixels[i % len(pixels)] for i in range(size)]), cfg.input, cfg.preprocess
    )
    engine.infer(batch)  # warm-up
    batches = max(1, total // size)
    started = time.perf_counter()
    for _ in range(batches):
        engine.infer(batch)
    elapsed = time.perf_counter() - started
    engine.close()
    return {"images": batches * size, "batch_size": size, "seconds": elapsed,
            "images_per_s": batches * size / elapsed, "backend": engine.backend_name}  # fmt: skip


def decode_cost(images: dict[str, bytes], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image: full decode + resize vs reduced-scale decode + resize."""
    from serve.imaging import decode_image

    def full(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)

    def reduced(data: bytes) -> None:
        decode_image(data, (256, 256), 10**9).resize((256, 256), Image.Resampling.BILINEAR)

    out = {}
    for label, fn in (("full_decode_ms", full), ("reduced_decode_ms", reduced)):
        started = time.perf_counter()
        for _ in range(repeats):
            for data in images.values():
                fn(data)
        out[label] = (time.perf_counter() - started) * 1000 / (repeats * len(images))
    return out


async def http_path(serve_url: str, uris: list[str], total: int, concurrency: int) -> dict[str, Any]:
    """Images/s through ``POST /v1/infer`` with ``concurrency`` requests in flight."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(uris[i % len(uris)])
    sizes: Counter[int] = Counter()
    latencies: list[float] = []
    failures = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            uri = queue.get_nowait()
            started = time.perf_counter()
            response = await http.post(f"{serve_url}/v1/infer", json={"uri": uri})
            latencies.append((time.perf_counter() - started) * 1000)
            result = response.json()["results"][0] if response.status_code == 200 else {}
            if result.get("status") != "ok":
                failures += 1
                continue
            sizes[result["timings"]["batch_size"]] += 1

    async with httpx.AsyncClient(timeout=300) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies)
    return {"images": total, "concurrency": concurrency, "seconds": elapsed,
            "images_per_s": total / elapsed, "failures": failures,
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
            "batch_size_of_each_image": {str(k): v for k, v in sorted(sizes.items())}}  # fmt: skip


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    images = bench_images(args.large)
    report: dict[str, Any] = {
        "images": "12 MP JPEGs (sample photos upscaled to 4032x3024)" if args.large else "sample photos",
        "engine_only": engine_only(images, args.images),
        "decode": decode_cost(images),
    }
    with stack_for_command(quiet=args.json) as state:
        client = StackClient(state)
        uris = []
        for name, data in images.items():
            uri, generation = client.upload(SAMPLES / name, name=f"bench/{name}", data=data)
            client.wait_result(str(uri), 120, generation=generation)  # upload path done before timing
            uris.append(str(uri))
        before = httpx.get(f"{state.serve_url}/v1/stats", timeout=30).json()["mobilenet_v2"]
        report["http"] = asyncio.run(http_path(state.serve_url, uris, args.images, args.concurrency))
        after = httpx.get(f"{state.serve_url}/v1/stats", timeout=30).json()["mobilenet_v2"]
    formed = Counter({int(k): v for k, v in after["batch_sizes"].items()})
    formed.subtract({int(k): v for k, v in before["batch_sizes"].items()})
    report["batches_formed"] = {str(k): v for k, v in sorted(formed.items()) if v > 0}
    report["http_vs_engine"] = report["http"]["images_per_s"] / report["engine_only"]["images_per_s"]
    return report


def format_report(r: dict[str, Any]) -> str:
    e, h, d = r["engine_only"], r["http"], r["decode"]
    return "\n".join([
        f"images: {r['images']}",
        f"engine only   {e['images_per_s']:8.1f} images/s  ({e['images']} images, batch {e['batch_size']}, {e['backend']})",
        f"HTTP gs://    {h['images_per_s']:8.1f} images/s  ({h['images']} requests, {h['concurrency']} in flight, "
        f"p50 {h['latency_ms_p50']:.0f} ms, p95 {h['latency_ms_p95']:.0f} ms, {h['failures']} failed)",
        f"HTTP / engine {r['http_vs_engine']:8.2f}",
        f"batches formed (size: count): {r['batches_formed']}",
        f"decode per image: full {d['full_decode_ms']:.1f} ms, reduced-scale {d['reduced_decode_ms']:.1f} ms "
        f"({d['full_decode_ms'] / d['reduced_decode_ms']:.1f}x)",
    ])  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    report = run_bench(args)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["http"]["failures"] == 0 else 1
