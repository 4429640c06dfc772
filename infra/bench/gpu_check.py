"""``make gpu-check``: the GPU path against the CPU path, on a machine with an NVIDIA GPU.

For every bundled model (``build/model-repository``) it loads the engine the
backend preference picks on this machine (TensorRT when installed, else ONNX
Runtime with the CUDA execution provider) and the FP32 CPU engine, then:

* agreement: top-1 (classifiers) or box matches (detectors, same class, IoU >= 0.5)
  of the GPU engine against the CPU engine on the same inputs, and of GPU decoding
  plus the GPU engine against CPU decoding plus the CPU engine, on the sample
  photos and the version's validation images;
* throughput in images/s, engine-only and decode-plus-engine, at batch sizes 1 to 64,
  GPU and CPU in the same run (decode-plus-engine also on 12 MP phone-sized JPEGs).

Without a GPU it prints why it skips and exits 0; ``--out`` writes the figures as JSON.
It keeps to a time budget (``--budget-s``, default 270 s) by shortening measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
IOU_MATCH = 0.5


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def detect_gpu() -> str | None:
    """The first NVIDIA GPU's name, or None when there is none (or no driver)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            lines = done.stdout.strip().splitlines()
            if lines:
                return lines[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN into the process before ONNX Runtime looks for them: PyTorch's
    import does, and ``onnxruntime.preload_dlls`` finds the nvidia-* wheels otherwise."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as err:  # noqa: BLE001 - best effort; the provider check follows
            _out(f"note: onnxruntime.preload_dlls: {err}")


class Budget:
    """Measurement time left; each timing loop gets a share of it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def share(self, wanted: float) -> float:
        left = self.deadline - time.monotonic()
        return max(0.05, min(wanted, left / 20))


def images_per_s(run: Callable[[], int], seconds: float, warmup: int = 2) -> float:
    """Images per second of ``run`` (which returns the images it handled)."""
    for _ in range(warmup):
        run()
    done, iterations, start = 0, 0, time.perf_counter()
    while iterations < 3 or time.perf_counter() - start < seconds:
        done += run()
        iterations += 1
    return done / (time.perf_counter() - start)


def _cycle(items: Sequence, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def _large_jpegs(photos: Sequence[bytes], count: int = 4) -> list[bytes]:
    """12 MP (4032x3024) JPEGs made from the sample photos, as phones produce them."""
    from PIL import Image

    out = []
    for data in photos[:count]:
        with Image.open(io.BytesIO(data)) as image:
            big = image.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _per_image(outputs: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in outputs.items()} for i in range(n)]


def _agreement(refs: list, cands: list) -> tuple[float, str]:
    from serve.engines.accuracy_guard import box_agreement, top1_agrees
    from shared.results import Detection

    detection = any(r and isinstance(r[0], Detection) for r in refs + cands)
    if detection:
        scores = [box_agreement(r, c, IOU_MATCH) for r, c in zip(refs, cands, strict=True)]
        return float(np.mean(scores)), "box_match"
    scores = [1.0 if top1_agrees(r, c) else 0.0 for r, c in zip(refs, cands, strict=True)]
    return float(np.mean(scores)), "top1"


def check_model(name: str, repo_dir: Path, samples: list[bytes], args, budget: Budget) -> dict:  # noqa: ANN001, C901
    from serve.engines.build import load_cached_engine
    from serve.engines.cache import DiskEngineStore, EngineCache
    from serve.imaging.cpu_decode import prepare_image, to_model_input
    from serve.imaging.gpu_decode import decode_backend, prepare_batch_gpu
    from serve.model.loader import backend_preference, engine_spec, open_engine
    from serve.model.repository import ModelRepository
    from serve.model_config import Backend
    from serve.postprocess.factory import make_postprocessor

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    mv = ModelRepository(str(repo_dir), work / "repo").resolve(name)
    cfg = mv.config
    post = make_postprocessor(cfg.postprocess)
    spec = engine_spec(mv, post.output_names)
    cache = EngineCache(disk=DiskEngineStore(work / "engines"))
    started = time.monotonic()
    try:
        gpu = open_engine(mv, spec, cache, backend_preference(cfg.backends), work)
    except Exception as err:  # noqa: BLE001 - reported, then the engine is made without the cache
        from serve.engines.onnxruntime import OnnxRuntimeEngine

        _out(f"note: loading through the engine cache failed ({type(err).__name__}: {err}); "
             "loading ONNX Runtime directly")  # fmt: skip
        gpu = OnnxRuntimeEngine.load(spec)
    gpu_load_s = time.monotonic() - started
    cpu = load_cached_engine(
        spec, Backend.ONNXRUNTIME, cache, providers=["CPUExecutionProvider"]
    ).value
    report: dict = {"model": f"{mv.name}:{mv.version}", "gpu_backend": gpu.backend_name,
                    "cpu_backend": cpu.backend_name, "decode": decode_backend(),
                    "gpu_engine_load_s": round(gpu_load_s, 2)}  # fmt: skip
    _out(f"\n== {report['model']}: {gpu.backend_name} (loaded in {gpu_load_s:.1f}s) vs "
         f"{cpu.backend_name}; decode {report['decode']}")  # fmt: skip

    folder = mv.directory / cfg.accuracy_guard.validation_dir
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    photos = samples + [p.read_bytes() for p in files[: args.max_images]]
    limit = 10**9
    cpu_prep = [prepare_image(d, cfg.input, cfg.preprocess, limit) for d in photos]
    gpu_prep = prepare_batch_gpu(photos, cfg.input, cfg.preprocess, max_pixels=limit)
    bad = [str(g) for g in gpu_prep if isinstance(g, Exception)]
    if bad:
        raise RuntimeError(f"GPU decode refused inputs the CPU decodes: {bad[:3]}")

    def run_all(engine, prepared) -> list:  # noqa: ANN001
        results, step = [], cfg.batching.max_batch_size
        for i in range(0, len(prepared), step):
            chunk = prepared[i : i + step]
            batch = to_model_input(np.stack([p.pixels for p in chunk]), cfg.input, cfg.preprocess)
            outs = _per_image(dict(engine.infer(batch)), len(chunk))
            results += [post(o, p.geometry, mv.labels) for o, p in zip(outs, chunk, strict=True)]
        return results

    ref = run_all(cpu, cpu_prep)
    engine_agree, metric = _agreement(ref, run_all(gpu, cpu_prep))
    e2e_agree, _ = _agreement(ref, run_all(gpu, gpu_prep))
    report.update(metric=metric, images=len(photos), engine_agreement=engine_agree,
                  decode_and_engine_agreement=e2e_agree)  # fmt: skip
    _out(f"agreement with the CPU path ({metric}, {len(photos)} images): engine "
         f"{engine_agree:.4f}, GPU decode + engine {e2e_agree:.4f}")  # fmt: skip

    sizes = [b for b in args.batch_sizes if b <= args.max_batch.get(name, 64)]
    pixels = [p.pixels for p in cpu_prep]
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    rows = []

    def engine_only(engine, b: int) -> float:  # noqa: ANN001
        batch = to_model_input(np.stack(_cycle(pixels, b)), cfg.input, cfg.preprocess)
        return images_per_s(
            lambda: len(engine.infer(batch)[spec.output_names[0]]), budget.share(args.seconds)
        )

    def decode_engine(engine, data: list[bytes], on_gpu: bool) -> float:  # noqa: ANN001
        def run() -> int:
            if on_gpu:
                prepared = prepare_batch_gpu(data, cfg.input, cfg.preprocess, max_pixels=limit)
            else:
                prepared = list(
                    pool.map(lambda d: prepare_image(d, cfg.input, cfg.preprocess, limit), data)
                )
            batch = to_model_input(
                np.stack([p.pixels for p in prepared]), cfg.input, cfg.preprocess
            )
            return len(engine.infer(batch)[spec.output_names[0]])

        return images_per_s(run, budget.share(args.seconds), warmup=1)

    _out(f"{'batch':>5}  {'engine GPU':>11} {'engine CPU':>11}  {'decode+engine GPU':>18} "
         f"{'decode+engine CPU':>18}   images/s")  # fmt: skip
    for b in sizes:
        data = _cycle(photos, b)
        row = {"batch": b, "engine_gpu": engine_only(gpu, b), "engine_cpu": engine_only(cpu, b),
               "decode_engine_gpu": decode_engine(gpu, data, True),
               "decode_engine_cpu": decode_engine(cpu, data, False)}  # fmt: skip
        rows.append(row)
        _out(f"{b:>5}  {row['engine_gpu']:>11.1f} {row['engine_cpu']:>11.1f}  "
             f"{row['decode_engine_gpu']:>18.1f} {row['decode_engine_cpu']:>18.1f}")  # fmt: skip
    report["throughput"] = rows
    if args.large and name == args.large_model:
        large = _large_jpegs(samples)
        report["throughput_12mp"] = []
        for b in args.large_batch_sizes:
            data = _cycle(large, b)
            row = {"batch": b, "decode_engine_gpu": decode_engine(gpu, data, True),
                   "decode_engine_cpu": decode_engine(cpu, data, False)}  # fmt: skip
            report["throughput_12mp"].append(row)
            _out(f"12 MP JPEGs, batch {b}: decode+engine GPU {row['decode_engine_gpu']:.1f}, "
                 f"CPU {row['decode_engine_cpu']:.1f} images/s")  # fmt: skip
    pool.shutdown()
    gpu.close()
    cpu.close()
    shutil.rmtree(work, ignore_errors=True)
    return report


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "build" / "model-repository")
    parser.add_argument("--samples", type=Path, default=ROOT / "infra" / "samples")
    parser.add_argument("--models", default="mobilenet_v2,text_detector")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement, at most")
    parser.add_argument("--budget-s", type=float, default=270.0)
    parser.add_argument("--max-images", type=int, default=256, help="validation images used")
    parser.add_argument("--no-large", dest="large", action="store_false")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.large_batch_sizes = [16, 64]
    args.large_model = "mobilenet_v2"
    # DBNet at 960x960 on the CPU takes about a second per image: big batches would
    # spend the whole budget on the CPU column.
    args.max_batch = {"text_detector": 8}
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    gpu = detect_gpu()
    if gpu is None:
        _out("gpu-check: SKIPPED - no NVIDIA GPU visible (nvidia-smi finds none and PyTorch "
             "sees no CUDA device); run it on a GPU machine")  # fmt: skip
        return 0
    if not (args.repository / "mobilenet_v2").is_dir():
        _out(f"gpu-check: no model repository at {args.repository}; run `make model` first")
        return 2
    _preload_cuda_libraries()
    import onnxruntime as ort

    from serve.imaging.gpu_decode import decode_backend

    providers = ort.get_available_providers()
    _out(
        f"gpu-check on {gpu}: onnxruntime {ort.__version__} {providers}; decode {decode_backend()}"
    )
    if "CUDAExecutionProvider" not in providers:
        _out("note: no CUDA execution provider (install onnxruntime-gpu): the engine columns "
             "compare the CPU with itself")  # fmt: skip
    samples = [p.read_bytes() for p in sorted(args.samples.glob("*.jpg"))]
    budget = Budget(args.budget_s)
    reports = [
        check_model(m, args.repository, samples, args, budget) for m in args.models.split(",")
    ]
    summary = {"gpu": gpu, "onnxruntime": ort.__version__, "providers": providers,
               "seconds": round(time.monotonic() - started, 1), "models": reports}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    failed = [r["model"] for r in reports if r["engine_agreement"] < 0.98]
    _out(
        f"\ngpu-check done in {summary['seconds']}s"
        + (f"; LOW AGREEMENT: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
