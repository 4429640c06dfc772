"""``serve.gpus``: which host GPU a process has, its memory, and the cap on ONNX Runtime's arena."""

from __future__ import annotations

import subprocess

import pytest

import serve.gpus as gpus
from serve.gpus import (
    ARENA_PART_OF_SHARE,
    GPU_MEM_LIMIT_ENV,
    gpu_memory_bytes,
    host_gpu_index,
    onnxruntime_arena_limit,
)
from shared.errors import ConfigError

GIB = 1 << 30


@pytest.fixture
def smi(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """An ``nvidia-smi`` on an 80 GiB GPU (81,920 MiB, as it prints with ``nounits``)."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="81920\n", stderr="")

    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus.subprocess, "run", run)
    return calls


def test_device_numbers_follow_cuda_visible_devices() -> None:
    assert host_gpu_index(0, {"CUDA_VISIBLE_DEVICES": "3,5"}) == "3"
    assert host_gpu_index(1, {"CUDA_VISIBLE_DEVICES": "3,5"}) == "5"
    assert host_gpu_index(1, {}) == "1"


def test_total_memory_is_read_from_nvidia_smi_in_mib(smi: list[list[str]], monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert gpu_memory_bytes(0) == 80 * GIB
    assert smi[0][1:4] == ["-i", "2", "--query-gpu=memory.total"]


def test_no_nvidia_smi_or_an_answer_it_cannot_give_is_unknown(monkeypatch) -> None:
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert gpu_memory_bytes(0) is None
    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def failing(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(6, cmd, "No devices were found")

    monkeypatch.setattr(gpus.subprocess, "run", failing)
    assert gpu_memory_bytes(0) is None
    monkeypatch.setattr(
        gpus.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(cmd, 0, "[N/A]\n", "")
    )
    assert gpu_memory_bytes(0) is None


def test_a_replica_with_half_a_gpu_caps_its_arena_below_half_the_memory(smi) -> None:
    limit = onnxruntime_arena_limit({}, share=0.5)
    assert limit == int(80 * GIB * 0.5 * ARENA_PART_OF_SHARE)
    # Two such replicas leave room on the GPU for what each allocates outside its arena.
    assert 2 * limit < 80 * GIB


def test_the_share_comes_from_rays_gpu_assignment(smi, monkeypatch) -> None:
    monkeypatch.setattr(gpus, "ray_assigned", lambda resource: {"GPU": 0.25}.get(resource))
    assert onnxruntime_arena_limit({}) == int(80 * GIB * 0.25 * ARENA_PART_OF_SHARE)


def test_a_whole_gpu_no_gpu_or_an_unknown_size_gets_no_cap(monkeypatch) -> None:
    monkeypatch.setattr(gpus, "ray_assigned", lambda resource: None)
    assert onnxruntime_arena_limit({}) is None  # a CPU replica: nvidia-smi is not even asked
    assert onnxruntime_arena_limit({}, share=1.0, total_bytes=80 * GIB) is None
    monkeypatch.setattr(gpus, "gpu_memory_bytes", lambda device=0: None)
    assert onnxruntime_arena_limit({}, share=0.5) is None


def test_the_setting_overrides_the_share() -> None:
    assert onnxruntime_arena_limit({GPU_MEM_LIMIT_ENV: "6144"}, share=0.5) == 6 * GIB


@pytest.mark.parametrize("raw", ["0", "-1", "6G", "1.5"])
def test_a_bad_setting_names_the_variable_and_the_value(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"{GPU_MEM_LIMIT_ENV}.*{raw!r}"):
        onnxruntime_arena_limit({GPU_MEM_LIMIT_ENV: raw})
