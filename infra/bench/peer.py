"""The bench's peer: the Apache Beam RunInference pipeline (``beam_peer.py``) run and timed fairly.

The pipeline runs in ``.venv-bench`` (Beam pins libraries that clash with Ray's), over the
objects the HTTP path read, against an emptied results prefix. :func:`run_peer` times it warm
for one and for two DirectRunner workers and keeps the better; :func:`peer_row` makes the
report's row, with the peer's top-1 agreement with triggerfish on the same objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.bench.report import MODEL, PEER_FULL, PEER_REDUCED
from infra.local.stack import DEFAULT_MODEL_REPOSITORY, REPO_ROOT

if TYPE_CHECKING:
    from infra.bench.entry_paths import Bench

BEAM_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"
BEAM_SCRIPT = Path(__file__).resolve().with_name("beam_peer.py")
# The peer runs with one DirectRunner worker and with this many worker processes; the best counts.
BEAM_WORKERS = (1, 2)


def _run_once(bench: Bench, uris: list[str], reduced: bool, workers: int, prefix: str) -> dict[str, Any]:
    """One run of the peer's pipeline over ``uris``; its figures and its results' top-1."""
    model_dir = DEFAULT_MODEL_REPOSITORY / MODEL / "1"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(uris))
    argv = [str(BEAM_PYTHON), str(BEAM_SCRIPT),
            "--model", str(model_dir / "model.onnx"), "--labels", str(model_dir / "labels.txt"),
            "--uris", f.name, "--results-bucket", bench.state.results_bucket, "--prefix", prefix,
            "--batch-size", str(bench.batch_size), "--workers", str(workers)]  # fmt: skip
    if reduced:
        argv.append("--reduced")
    env = {**os.environ, **bench.state.client_env()}
    bench.meter.start()
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        os.unlink(f.name)
    emulator = bench.meter.stop().get("fake-gcs-server", 0.0)
    if out.returncode != 0:
        raise RuntimeError(f"the Beam pipeline ({prefix}) failed: {out.stderr[-2000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    top1 = bench.top1(bench.state.results_bucket, f"{prefix}/")
    bench.delete([(bench.state.results_bucket, f"{prefix}/")])
    return {**figures, "emulator_cpu_seconds": emulator, "top1": top1,
            "results": len(top1), "ok": sum(1 for c in top1.values() if c is not None)}  # fmt: skip

def run_peer(bench: Bench, uris: list[str], reduced: bool, tag: str, reference: dict[str, int | None]) -> dict[str, Any]:
    """The peer, timed warm, the best of one and of two DirectRunner workers.

    Each worker count runs the pipeline over one object and over all of them:
    ``(ok(N) - ok(1)) / (T(N) - T(1))`` leaves pipeline construction, worker start,
    model load and teardown out of the clock, as the triggerfish paths meet a warm
    stack. CPU likewise: the pipeline's processes plus the emulator, N's run minus
    1's. ``reference`` is triggerfish's top-1 on the same objects.
    """
    variant = "reduced" if reduced else "full"
    by_workers: dict[str, dict[str, Any]] = {}
    for workers in BEAM_WORKERS:
        base = f"beam-{tag}-{variant}-{workers}w"
        one = _run_once(bench, uris[:1], reduced, workers, f"{base}-one")
        full = _run_once(bench, uris, reduced, workers, f"{base}-all")
        seconds, ok = full["seconds"] - one["seconds"], full["ok"] - one["ok"]
        pipeline_cpu = full["cpu_seconds"] - one["cpu_seconds"]
        emulator_cpu = full["emulator_cpu_seconds"] - one["emulator_cpu_seconds"]
        by_workers[str(workers)] = {
            "workers": workers, "results": full["results"], "ok": full["ok"],
            "warm_seconds": seconds, "cold_seconds": full["seconds"],
            "images_per_s": ok / seconds if seconds > 0 and ok > 0 else None,
            "cold_images_per_s": full["ok"] / full["seconds"],
            "cpu_seconds": {"beam": max(0.0, pipeline_cpu), "fake-gcs-server": max(0.0, emulator_cpu)},
            "cold_cpu_seconds": {"beam": full["cpu_seconds"], "fake-gcs-server": full["emulator_cpu_seconds"]},
            "warm_ok": ok, "top1": full["top1"],
        }  # fmt: skip
    return peer_row(variant, len(uris), by_workers, reference)


def peer_row(
    variant: str, images: int, by_workers: dict[str, dict[str, Any]], reference: dict[str, int | None]
) -> dict[str, Any]:
    """The peer's row: its best worker count, timed warm when the difference is measurable."""
    warm = [r for r in by_workers.values() if r["images_per_s"] is not None]
    best = max(warm, key=lambda r: r["images_per_s"]) if warm else max(
        by_workers.values(), key=lambda r: r["cold_images_per_s"])  # fmt: skip
    timing = "warm" if warm else "cold"  # a run too short for T(N) - T(1) to be positive
    seconds = best["warm_seconds"] if warm else best["cold_seconds"]
    rate = best["images_per_s"] if warm else best["cold_images_per_s"]
    ok = best["warm_ok"] if warm else best["ok"]
    cpu = best["cpu_seconds"] if warm else best["cold_cpu_seconds"]
    shared = [name for name, c in best["top1"].items() if c is not None and reference.get(name) is not None]
    agree = sum(1 for name in shared if best["top1"][name] == reference[name])
    return {
        "path": PEER_REDUCED if variant == "reduced" else PEER_FULL,
        "images": images, "results": best["results"], "ok": best["ok"], "timing": timing,
        "workers": best["workers"], "seconds": seconds, "images_per_s": rate,
        "images_per_s_by_workers": {k: r["images_per_s"] for k, r in by_workers.items()},
        "cold_images_per_s_by_workers": {k: r["cold_images_per_s"] for k, r in by_workers.items()},
        "cpu_ms_per_image": sum(cpu.values()) * 1000 / max(1, ok),
        "cpu_ms_by_process": {k: round(v * 1000 / max(1, ok), 1) for k, v in cpu.items()},
        "cores_busy": sum(cpu.values()) / seconds if seconds > 0 else 0.0,
        "top1_agreement": agree / len(shared) if shared else None, "top1_compared": len(shared),
    }  # fmt: skip
