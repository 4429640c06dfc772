"""``make gpu-check``: a GPU node's service path, bytes in and labels out, against the engine alone
and against the CPU path on every core of the same machine.

For each model (default: MobileNetV2 from ``build/model-repository``) it measures, at batch
sizes 1 to 64, in images/s:

* ``engine GPU``: the ONNX Runtime CUDA engine alone, on a device-resident batch (IOBinding);
* ``service GPU``: JPEG bytes to labels through the code a GPU replica runs
  (:func:`serve.imaging.device_infer.infer_prepared` after
  :class:`serve.imaging.device_batch.DeviceBatchPreparer`), decoding batch k+1 while batch k
  is inferred (:func:`serve.imaging.overlap.overlapped`), with the process's CPU-ms per image;
* ``engine CPU`` and ``service CPU``: the CPU engine, and Pillow decoding on every core plus
  the CPU engine, with its CPU-ms per image;

for the small sample/validation JPEGs and for 12 MP phone-sized JPEGs (made from the samples).
Agreement: top-1 of the *CPU* engine on GPU-decoded inputs against CPU-decoded inputs, on the
sample and validation photos (so decoder differences are not mixed with engine differences),
gated at ``--min-agreement``; the mean and largest input difference are reported too.

What cannot run here (no GPU, no CuPy, no nvImageCodec, no CUDA execution provider) is listed
under ``NOT RUN`` and the rest still runs; the exit status is 0 unless a measured agreement is
below the gate (1) or the model repository is missing (2). ``--out`` writes the figures as JSON.
The whole run keeps to ``--budget-s`` (default 270 s) by shortening measurements.

What a GPU machine needs besides the CPU image's packages and ``onnxruntime-gpu``, for CUDA 13
(driver >= 580) and the machine's Python (sizes of the 0.9.0.20 / 14.2.0 cp311 wheels):
``nvidia-nvimgcodec-cu13`` (23.9 MiB), ``nvidia-nvjpeg`` (3.7 MiB, nvImageCodec's ``nvjpeg``
extra), ``cupy-cuda13x`` (66.7 MiB), ``cuda-pathfinder`` (0.1 MiB, CuPy's library finder) and,
unless PyTorch or the CUDA toolkit already put them there, ``nvidia-cuda-nvrtc`` (55.5 MiB: CuPy
compiles its kernels with NVRTC) and ``nvidia-cuda-runtime`` (2.4 MiB). The CUDA 12 wheels are
``nvidia-nvimgcodec-cu12`` (30.6 MiB), ``nvidia-nvjpeg-cu12`` (5.1 MiB), ``cupy-cuda12x``
(130.3 MiB), ``nvidia-cuda-nvrtc-cu12`` (85.4 MiB). Where a call carries at most 64 MiB, CuPy's
wheel travels in parts (``split -b 32M``) in an ignored folder that the machine keeps between
calls, and is joined (``cat``) before ``pip install --no-deps``.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PIXEL_LIMIT = 10**9


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def detect_gpu() -> str | None:
    """The first NVIDIA GPU's name, or None when there is none (or no driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


@dataclass
class Capabilities:
    """What this machine can run, and why not where it cannot."""

    gpu: str | None
    cuda_engine: bool
    device_pipeline: str | None  # None when available, else why not
    onnxruntime: str
    not_run: list[str] = field(default_factory=list)


def probe(gpu: str | None) -> Capabilities:
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if gpu and preload is not None:
        try:  # CUDA/cuDNN from the nvidia-* wheels, before the CUDA provider looks for them
            preload()
        except Exception as err:  # noqa: BLE001 - best effort; the provider check follows
            _out(f"note: onnxruntime.preload_dlls: {err}")
    from serve.imaging.device_batch import device_decode_unavailable

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    caps = Capabilities(gpu, cuda and gpu is not None, device_decode_unavailable(), ort.__version__)
    if gpu is None:
        caps.not_run.append("every GPU column: no NVIDIA GPU visible (nvidia-smi finds none)")
    elif not cuda:
        caps.not_run.append("engine GPU: no CUDAExecutionProvider (install onnxruntime-gpu)")
    if caps.device_pipeline:
        caps.not_run.append(f"service GPU and decode agreement: {caps.device_pipeline}")
    return caps


class Budget:
    """Measurement time left; each timing loop gets a share of it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, wanted: float) -> float:
        return max(0.05, min(wanted, self.left() / 20))


def measure(run: Callable[[], int], seconds: float, warmup: int = 1) -> tuple[float, float]:
    """``(images/s, CPU-ms per image of this process)`` of ``run`` (returns images handled)."""
    for _ in range(warmup):
        run()
    done, iterations = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while iterations < 2 or time.perf_counter() - wall < seconds:
        done += run()
        iterations += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return done / wall, cpu * 1000 / done


def _cycle(items: Sequence, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def large_jpegs(photos: Sequence[bytes], count: int = 4) -> list[bytes]:
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


class ModelCheck:
    """One model version's engines, preparer and inputs for the measurements."""

    def __init__(self, name: str, args: argparse.Namespace, caps: Capabilities, work: Path) -> None:
        from serve.engines.onnxruntime import OnnxRuntimeEngine
        from serve.model.batch import LoadedVersion
        from serve.model.loader import engine_spec
        from serve.model.repository import ModelRepository
        from serve.postprocess.factory import make_postprocessor

        mv = ModelRepository(str(args.repository), work / "repo").resolve(name)
        self.cfg, self.name = mv.config, f"{mv.name}:{mv.version}"
        post = make_postprocessor(self.cfg.postprocess)
        spec = engine_spec(mv, post.output_names)
        self.output = spec.output_names[0]
        cpu = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
        self.cpu = LoadedVersion(mv.name, mv.version, self.cfg, cpu, post, mv.labels)
        self.gpu = None
        if caps.cuda_engine:
            engine = OnnxRuntimeEngine.load(
                spec, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
            self.gpu = LoadedVersion(mv.name, mv.version, self.cfg, engine, post, mv.labels)
        self.preparer = None
        self.max_batch = max(args.batch_sizes + (args.large_batch_sizes if args.large else []))
        if caps.device_pipeline is None:
            from serve.imaging.device_batch import DeviceBatchPreparer

            self.preparer = DeviceBatchPreparer(
                self.cfg.input,
                self.cfg.preprocess,
                max_batch=self.max_batch,
                max_pixels=PIXEL_LIMIT,
            )
        folder = mv.directory / self.cfg.accuracy_guard.validation_dir
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
        self.photos = args.samples_bytes + [p.read_bytes() for p in files[: args.max_images]]
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def close(self) -> None:
        self.pool.shutdown()
        for loaded in (self.cpu, self.gpu):
            if loaded is not None:
                loaded.engine.close()

    # -- the paths measured ------------------------------------------------------------
    def cpu_input(self, datas: Sequence[bytes]) -> tuple[np.ndarray, list]:
        from serve.imaging.cpu_decode import prepare_image, to_model_input

        cfg = self.cfg
        prepared = list(
            self.pool.map(lambda d: prepare_image(d, cfg.input, cfg.preprocess, PIXEL_LIMIT), datas)
        )
        batch = to_model_input(np.stack([p.pixels for p in prepared]), cfg.input, cfg.preprocess)
        return batch, [p.geometry for p in prepared]

    def service_cpu(self, datas: Sequence[bytes]) -> int:
        batch, geometries = self.cpu_input(datas)
        outputs = self.cpu.engine.infer(batch)
        for i, geometry in enumerate(geometries):
            self.cpu.postprocess({k: v[i] for k, v in outputs.items()}, geometry, self.cpu.labels)
        return len(datas)

    def service_gpu(self, batches: Sequence[Sequence[bytes]]) -> int:
        from serve.imaging.device_infer import infer_prepared
        from serve.imaging.overlap import overlapped

        loaded, preparer = self.gpu or self.cpu, self.preparer
        assert preparer is not None
        done = overlapped(
            batches, preparer.prepare, lambda b: infer_prepared(loaded, b, preparer.name)
        )
        return sum(len(results) for results in done)

    def engine_only(self, loaded: Any, batch: Any) -> Callable[[], int]:
        if hasattr(batch, "__cuda_array_interface__") or loaded is self.gpu:
            return lambda: len(loaded.engine.infer_bound(batch)[self.output])
        return lambda: len(loaded.engine.infer(batch)[self.output])


def agreement(check: ModelCheck) -> dict:
    """Top-1 of the CPU engine on GPU-decoded against CPU-decoded inputs, and input differences."""
    assert check.preparer is not None
    agree, total, diffs, largest, on_cpu = 0, 0, [], 0.0, 0
    step = min(32, check.max_batch)
    for i in range(0, len(check.photos), step):
        chunk = check.photos[i : i + step]
        cpu_batch, _ = check.cpu_input(chunk)
        with check.preparer.prepare(chunk) as batch:
            tensor = batch.tensor
            device = tensor.get() if hasattr(tensor, "get") else np.array(tensor)
            on_cpu += batch.decoded_on.count("cpu")
            if batch.errors:
                raise RuntimeError(f"GPU path refused inputs the CPU path decodes: {batch.errors}")
        ours = check.cpu.engine.infer(device)[check.output].argmax(axis=1)
        theirs = check.cpu.engine.infer(cpu_batch)[check.output].argmax(axis=1)
        agree += int((ours == theirs).sum())
        total += len(chunk)
        delta = np.abs(device.astype(np.float32) - cpu_batch.astype(np.float32))
        diffs.append(float(delta.mean()))
        largest = max(largest, float(delta.max()))
    return {"images": total, "top1_agreement": agree / total, "input_mean_abs_diff": float(np.mean(diffs)),
            "input_max_abs_diff": largest, "fell_back_to_cpu_decoder": on_cpu}  # fmt: skip


def throughput(
    check: ModelCheck, photos: Sequence[bytes], sizes: Sequence[int], args, budget: Budget
) -> list[dict]:  # noqa: ANN001, C901
    rows = []
    _out(f"{'batch':>5} {'engine GPU':>11} {'service GPU':>12} {'(CPU-ms/img)':>13} {'engine CPU':>11} "
         f"{'service CPU':>12} {'(CPU-ms/img)':>13}   images/s")  # fmt: skip
    for b in sizes:
        if budget.left() < 5:
            check_not_run = f"batch {b} and larger: over the time budget"
            _out(f"NOT RUN: {check_not_run}")
            args.not_run.append(f"{check.name} {check_not_run}")
            break
        data = _cycle(photos, b)
        row: dict[str, Any] = {"batch": b}
        if not args.large_only:
            cpu_batch, _ = check.cpu_input(data)
            row["engine_cpu"], _ = measure(
                check.engine_only(check.cpu, cpu_batch), budget.share(args.seconds)
            )
            if check.gpu is not None:
                device = _to_device(cpu_batch)
                row["engine_gpu"], _ = measure(
                    check.engine_only(check.gpu, device), budget.share(args.seconds)
                )
        if check.preparer is not None:
            batches = [data] * 4  # four batches per run, so that the overlap shows
            ips, cpu_ms = measure(
                lambda batches=batches: check.service_gpu(batches), budget.share(args.seconds)
            )
            row.update(service_gpu=ips, service_gpu_cpu_ms=cpu_ms)
            row["service_gpu_engine"] = (check.gpu or check.cpu).engine.backend_name
        ips, cpu_ms = measure(lambda data=data: check.service_cpu(data), budget.share(args.seconds))
        row.update(service_cpu=ips, service_cpu_cpu_ms=cpu_ms)
        rows.append(row)

        def cell(key: str, width: int, row: dict = row) -> str:
            return f"{row[key]:>{width}.1f}" if key in row else f"{'-':>{width}}"

        _out(f"{b:>5} {cell('engine_gpu', 11)} {cell('service_gpu', 12)} {cell('service_gpu_cpu_ms', 13)} "
             f"{cell('engine_cpu', 11)} {cell('service_cpu', 12)} {cell('service_cpu_cpu_ms', 13)}")  # fmt: skip
    return rows


def _to_device(batch: np.ndarray) -> Any:
    try:
        import cupy
    except ImportError:
        return batch
    return cupy.asarray(batch)


def check_model(name: str, args: argparse.Namespace, caps: Capabilities, budget: Budget) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    check = ModelCheck(name, args, caps, work)
    try:
        report: dict[str, Any] = {
            "model": check.name,
            "engine_gpu": check.gpu.engine.backend_name if check.gpu else None,
            "engine_cpu": check.cpu.engine.backend_name,
            "decode": check.preparer.name if check.preparer else None,
        }
        _out(f"\n== {check.name}: engines {report['engine_gpu'] or '(no GPU engine)'} and "
             f"{report['engine_cpu']}; device decode {report['decode'] or '(not available)'}")  # fmt: skip
        if check.preparer is not None:
            report["agreement"] = agreement(check)
            a = report["agreement"]
            _out(f"GPU decode vs CPU decode, both graded by the CPU engine, {a['images']} photos: top-1 "
                 f"{a['top1_agreement']:.4f}; input |diff| mean {a['input_mean_abs_diff']:.4f}, max "
                 f"{a['input_max_abs_diff']:.3f}; {a['fell_back_to_cpu_decoder']} fell back to the CPU decoder")  # fmt: skip
        _out(f"small JPEGs ({len(check.photos)} distinct photos):")
        args.large_only = False
        report["small"] = throughput(check, check.photos, args.batch_sizes, args, budget)
        if args.large:
            _out("12 MP JPEGs (4032x3024, made from the samples):")
            args.large_only = True
            large = large_jpegs(args.samples_bytes)
            report["large"] = throughput(check, large, args.large_batch_sizes, args, budget)
        return report
    finally:
        check.close()
        shutil.rmtree(work, ignore_errors=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "build" / "model-repository")
    parser.add_argument("--samples", type=Path, default=ROOT / "infra" / "samples")
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--large-batch-sizes", default="16,64")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement, at most")
    parser.add_argument("--budget-s", type=float, default=270.0)
    parser.add_argument("--max-images", type=int, default=256, help="validation photos used")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--no-large", dest="large", action="store_false")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.large_batch_sizes = [int(b) for b in args.large_batch_sizes.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    if not (args.repository / "mobilenet_v2").is_dir():
        _out(f"gpu-check: no model repository at {args.repository}; run `make model` first")
        return 2
    caps = probe(detect_gpu())
    _out(f"gpu-check on {caps.gpu or 'a machine without an NVIDIA GPU'}: onnxruntime {caps.onnxruntime}, "
         f"CUDA engine {'yes' if caps.cuda_engine else 'no'}, device decode "
         f"{'yes' if caps.device_pipeline is None else 'no'}")  # fmt: skip
    args.not_run = list(caps.not_run)
    for line in caps.not_run:
        _out(f"NOT RUN: {line}")
    args.samples_bytes = [p.read_bytes() for p in sorted(args.samples.glob("*.jpg"))]
    budget = Budget(args.budget_s)
    reports = [check_model(m, args, caps, budget) for m in args.models.split(",")]
    summary = {"gpu": caps.gpu, "onnxruntime": caps.onnxruntime, "cuda_engine": caps.cuda_engine,
               "device_pipeline": caps.device_pipeline or "available", "cpus": os.cpu_count(),
               "seconds": round(time.monotonic() - started, 1), "not_run": args.not_run,
               "models": reports}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    low = [
        r["model"]
        for r in reports
        if "agreement" in r and r["agreement"]["top1_agreement"] < args.min_agreement
    ]
    _out(f"\ngpu-check done in {summary['seconds']}s")
    for line in args.not_run:
        _out(f"NOT RUN: {line}")
    if low:
        _out(f"LOW AGREEMENT (below {args.min_agreement}): {low}")
    return 1 if low else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
