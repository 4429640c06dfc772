"""How the storage emulator's requests slow down as a bucket fills.

fake-gcs-server's memory backend (the local stack's) keeps a bucket's objects in one
list and takes one server-wide lock for every write: each write and each read by name
scans the list (fsouza/fake-gcs-server#2357), so the emulator serves one request at a
time, each slower the more objects the bucket holds. Cloud Storage answers in about
constant time. A figure measured on the local stack after thousands of results (a
burst, a benchmark) carries this; this bench measures it alone, for the memory backend
and for the filesystem backend (which stores an object as a file, but refuses names with
a part over 255 bytes that Cloud Storage accepts, so the local stack does not use it).

Writes of 1.5 KB result-sized objects ``--step`` at a time, ``--concurrency`` in flight,
through the project's own client (``shared.gcs.GcsClient``), then 200 reads of objects
just written, until the bucket holds ``--objects``:

    python -m infra.bench.storage_emulator --objects 4000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.local.emulators import fake_gcs_binary
from infra.local.processes import free_port
from shared.gcs import GcsClient
from shared.uris import GcsUri

BUCKET = "emulator-bench"
PAYLOAD = b'{"labels": "' + b"x" * 1500 + b'"}'
READS_PER_STEP = 200


@dataclass(frozen=True, slots=True)
class Step:
    """Rates with ``objects`` in the bucket before the step's writes."""

    backend: str
    objects: int
    writes_per_s: float
    write_p50_ms: float
    reads_per_s: float


def _start(backend: str, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(fake_gcs_binary()), "-backend", backend, "-scheme", "http", "-host", "127.0.0.1",
        "-port", str(port), "-external-url", url, "-log-level", "error",
    ]  # fmt: skip
    if backend == "filesystem":
        argv += ["-filesystem-root", str(root)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            body = json.dumps({"name": BUCKET}).encode()
            request = urllib.request.Request(
                f"{url}/storage/v1/b", body, {"content-type": "application/json"}
            )
            urllib.request.urlopen(request, timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"fake-gcs-server ({backend}) did not start")


async def _step(url: str, start: int, count: int, concurrency: int) -> tuple[float, float, float]:
    gcs = GcsClient(url, None, timeout_s=120)
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def write(i: int) -> None:
        async with slots:
            began = time.perf_counter()
            await gcs.write(BUCKET, f"results/{i:07d}.json", PAYLOAD)
            latencies.append((time.perf_counter() - began) * 1000)

    async def read(i: int) -> None:
        async with slots:
            await gcs.read(GcsUri(BUCKET, f"results/{i:07d}.json"), None, len(PAYLOAD) + 1)

    try:
        began = time.perf_counter()
        await asyncio.gather(*(write(i) for i in range(start, start + count)))
        writes = count / (time.perf_counter() - began)
        began = time.perf_counter()
        reads = min(READS_PER_STEP, start + count)
        await asyncio.gather(*(read(i) for i in range(start + count - reads, start + count)))
        reads_per_s = reads / (time.perf_counter() - began)
    finally:
        await gcs.close()
    latencies.sort()
    return writes, latencies[len(latencies) // 2], reads_per_s


def measure(backend: str, objects: int, step: int, concurrency: int) -> list[Step]:
    """Fill a fresh bucket on a fresh emulator with ``backend``, ``step`` objects at a time."""
    with tempfile.TemporaryDirectory(prefix="fake-gcs-bench-") as root:
        process, url = _start(backend, Path(root))
        try:
            steps = []
            for start in range(0, objects, step):
                writes, p50, reads = asyncio.run(_step(url, start, step, concurrency))
                steps.append(Step(backend, start, round(writes), round(p50, 1), round(reads)))
                sys.stderr.write(
                    f"{backend:10s} {start:6d} objects: {writes:7.0f} writes/s (p50 {p50:6.1f} ms), "
                    f"{reads:6.0f} reads/s\n"
                )
            return steps
        finally:
            process.terminate()
            process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=4000, help="objects in the bucket at the end")
    parser.add_argument("--step", type=int, default=500, help="objects written per step")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--backends", default="memory,filesystem", help="comma-separated")
    parser.add_argument("--out", type=Path, help="write the steps as JSON here")
    args = parser.parse_args(argv)
    if args.objects < 1 or args.step < 1 or args.concurrency < 1:
        parser.error("--objects, --step and --concurrency must be positive")
    steps = [
        s
        for backend in args.backends.split(",")
        for s in measure(backend.strip(), args.objects, args.step, args.concurrency)
    ]
    report = json.dumps([asdict(s) for s in steps], indent=2)
    if args.out:
        args.out.write_text(report + "\n")
    sys.stdout.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
