"""Open Inference Protocol calls of many images, one after another, on a local stack.

Each call carries ``--images`` sample photos as binary tensor data (the form
``tritonclient`` sends) and asks for the top label of each. The first ``--warm-up``
calls are left out of the figures: the median and spread of a call's time and the
images per second that gives.

    python -m infra.bench.oip_calls --images 100 --calls 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from infra.local.stack import LocalStack, StackOptions, StackState

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MODEL = "mobilenet_v2"


def binary_call(photos: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """An inference call of ``photos`` (BYTES, binary tensor data) asking for each top label."""
    data = b"".join(struct.pack("<I", len(p)) + p for p in photos)
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [len(photos)], "datatype": "BYTES",
                 "parameters": {"binary_data_size": len(data)}},
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
        }
    ).encode()  # fmt: skip
    return header + data, {"inference-header-content-length": str(len(header))}


def summary(seconds: list[float], images: int, warm_up: int) -> dict[str, Any]:
    """Figures over the calls after ``warm_up``."""
    timed = seconds[warm_up:]
    if not timed:
        raise ValueError(f"no calls left after {warm_up} warm-up calls (of {len(seconds)})")
    median = statistics.median(timed)
    return {
        "calls": len(timed),
        "images_per_call": images,
        "call_s_median": round(median, 3),
        "call_s_min": round(min(timed), 3),
        "call_s_max": round(max(timed), 3),
        "images_per_s": round(images / median, 1),
    }


def run(state: StackState, images: int, calls: int) -> list[float]:
    """Each call's seconds; every call must answer 200 with one label per image."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    body, headers = binary_call([photos[i % len(photos)].read_bytes() for i in range(images)])
    url = f"{state.serve_url}/v2/models/{MODEL}/infer"
    seconds = []
    with httpx.Client(timeout=300) as http:
        for _ in range(calls):
            started = time.monotonic()
            response = http.post(url, content=body, headers=headers)
            seconds.append(time.monotonic() - started)
            if response.status_code != 200:
                raise RuntimeError(f"call answered {response.status_code}: {response.text[:500]}")
            shape = response.json()["outputs"][0]["shape"]
            if shape != [images, 1]:
                raise RuntimeError(f"expected {images} labels, got an output of shape {shape}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images per call (1..100)")
    parser.add_argument("--calls", type=int, default=12, help="calls, one after another")
    parser.add_argument("--warm-up", type=int, default=2, help="first calls left out of the figures")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 100:
        parser.error(f"--images must be 1..100, got {args.images}")
    if args.calls <= args.warm_up:
        parser.error(f"--calls ({args.calls}) must be more than --warm-up ({args.warm_up})")
    progress = lambda m: print(f"... {m}", file=sys.stderr, flush=True)  # noqa: E731
    stack = LocalStack(StackOptions(
        state_dir=Path(tempfile.mkdtemp(prefix="triggerfish-oip-calls-")),
        extra_env={"TRIGGERFISH_MODELS": MODEL},
    ))  # fmt: skip
    state = stack.start(progress=progress)
    try:
        progress(f"{args.calls} calls of {args.images} images")
        seconds = run(state, args.images, args.calls)
    finally:
        progress("stopping the local stack")
        stack.stop()
    print(json.dumps({**summary(seconds, args.images, args.warm_up), "seconds": [round(s, 3) for s in seconds]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
