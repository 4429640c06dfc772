"""``make gpu-check`` without a GPU: a clear skip, exit status 0."""

from __future__ import annotations

from infra.bench import gpu_check


def test_it_skips_cleanly_without_a_gpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: None)
    assert gpu_check.main([]) == 0
    assert "SKIPPED - no NVIDIA GPU visible" in capsys.readouterr().out


def test_without_nvidia_smi_or_torch_there_is_no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert gpu_check.detect_gpu() is None
