"""What this process may use of its GPU: which host GPU its device 0 is, how much memory
that GPU has, and how much of it ONNX Runtime's CUDA arena may take.

Read from ``nvidia-smi`` (and the driver's /proc files), never through CUDA bindings:
only the TensorRT backend imports those, and a CPU replica must not need them.

Two model replicas share one GPU in the cloud (``num_gpus: 0.5`` each in
``infra/k8s/rayservice.yaml``). ONNX Runtime's CUDA arena grows to what its largest
batches ever asked for and keeps it, so without a cap one model's arena grows until the
other model's next allocation fails with out-of-memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from serve.cpus import ray_assigned
from shared.errors import ConfigError

GPU_MEM_LIMIT_ENV = "TRIGGERFISH_GPU_MEM_LIMIT_MB"
#: The part of a replica's share of GPU memory its ONNX Runtime arena may take; the rest is
#: for what is allocated outside the arena (the CUDA context, cuDNN and cuBLAS workspaces
#: and handles, the device decoder's buffers).
ARENA_PART_OF_SHARE = 0.8
_MIB = 1 << 20


def host_gpu_index(device: int = 0, env: Mapping[str, str] | None = None) -> str:
    """The host's index of this process's CUDA device ``device`` (``CUDA_VISIBLE_DEVICES``
    renumbers devices from 0; ``nvidia-smi`` names them by the host's numbers)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if device < len(visible) and visible[device].strip().isdigit():
        return visible[device].strip()
    return str(device)


def query_gpu(device: int, fields: str) -> list[str] | None:
    """``nvidia-smi --query-gpu=fields`` for CUDA device ``device``: one string per field,
    or None where there is no ``nvidia-smi`` or it cannot answer."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "-i", host_gpu_index(device), f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.splitlines()
    if not lines:
        return None
    parts = [part.strip() for part in lines[0].split(",")]
    return parts if len(parts) == len(fields.split(",")) else None


def gpu_name_from_proc(device: int = 0) -> str | None:
    """The GPU's model name from the driver's /proc files (no ``nvidia-smi`` needed)."""
    index = int(host_gpu_index(device))
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))[index:][:1]:
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
    return None


def gpu_memory_bytes(device: int = 0) -> int | None:
    """Total memory of CUDA device ``device``, or None where it cannot be read."""
    answer = query_gpu(device, "memory.total")
    if answer is None or not answer[0].isdigit():
        return None
    return int(answer[0]) * _MIB


def onnxruntime_arena_limit(
    env: Mapping[str, str] | None = None,
    share: float | None = None,
    total_bytes: int | None = None,
) -> int | None:
    """The cap, in bytes, on ONNX Runtime's CUDA arena in this replica, or None for none.

    ``TRIGGERFISH_GPU_MEM_LIMIT_MB`` when set; else, for a replica given a fraction of a GPU
    (Ray's ``num_gpus`` below 1, or ``share``), :data:`ARENA_PART_OF_SHARE` of that
    fraction of the GPU's memory (``total_bytes``, else read from ``nvidia-smi``). A
    replica with a whole GPU, or none, gets no cap.

    Raises:
        ConfigError: ``TRIGGERFISH_GPU_MEM_LIMIT_MB`` is not a positive integer.
    """
    env = os.environ if env is None else env
    raw = env.get(GPU_MEM_LIMIT_ENV, "").strip()
    if raw:
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise ConfigError(f"{GPU_MEM_LIMIT_ENV} must be a positive number of MiB, got {raw!r}")
        return int(raw) * _MIB
    share = ray_assigned("GPU") if share is None else share
    if not share or share >= 1:
        return None
    total = gpu_memory_bytes() if total_bytes is None else total_bytes
    if total is None:
        return None
    return int(total * share * ARENA_PART_OF_SHARE)
