"""``make gpu-check`` on a machine without a GPU: it says what it cannot run and runs the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.bench import gpu_check
from tests.fakes.device_imaging import hide_device_imaging, install_fake_device_imaging

SHORT = [
    "--budget-s",
    "30",
    "--batch-sizes",
    "1,2",
    "--max-images",
    "6",
    "--no-large",
    "--seconds",
    "0.05",
]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: None)


def test_without_gpu_or_device_libraries_it_lists_what_it_cannot_run_and_measures_the_cpu(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    hide_device_imaging(monkeypatch)
    out = tmp_path / "gpu.json"
    assert gpu_check.main([*SHORT, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NOT RUN: every GPU column: no NVIDIA GPU visible" in text
    assert "NOT RUN: service GPU and decode agreement: device image pipeline needs CuPy" in text
    summary = json.loads(out.read_text())
    assert summary["gpu"] is None and not summary["cuda_engine"]
    assert len(summary["not_run"]) == 2
    (model,) = summary["models"]
    assert model["model"] == "mobilenet_v2:1" and "agreement" not in model
    rows = model["small"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["engine_cpu"] > 0 and row["service_cpu"] > 0 and row["service_cpu_cpu_ms"] > 0
        assert "engine_gpu" not in row and "service_gpu" not in row


def test_the_service_path_and_the_agreement_run_through_the_device_pipeline_code(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    # The fakes stand in for nvImageCodec and CuPy: the GPU replica's code runs on NumPy,
    # graded by the CPU engine, and the figures say which engine ran.
    install_fake_device_imaging(monkeypatch)
    out = tmp_path / "gpu.json"
    assert gpu_check.main([*SHORT, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPU decode vs CPU decode, both graded by the CPU engine" in text
    (model,) = json.loads(out.read_text())["models"]
    assert model["decode"] == "nvimgcodec:cuda:0"
    assert model["agreement"]["images"] == 5 + 6
    assert model["agreement"]["top1_agreement"] >= 0.99
    for row in model["small"]:
        assert row["service_gpu"] > 0 and row["service_gpu_cpu_ms"] > 0
        assert row["service_gpu_engine"] == "onnxruntime:CPUExecutionProvider"


def test_low_agreement_fails_the_check(monkeypatch, capsys) -> None:
    install_fake_device_imaging(monkeypatch)
    real = gpu_check.agreement
    monkeypatch.setattr(
        gpu_check, "agreement", lambda check: {**real(check), "top1_agreement": 0.9}
    )
    assert gpu_check.main(SHORT) == 1
    assert "LOW AGREEMENT (below 0.99): ['mobilenet_v2:1']" in capsys.readouterr().out


def test_without_a_model_repository_it_says_how_to_make_one(capsys, tmp_path: Path) -> None:
    assert gpu_check.main(["--repository", str(tmp_path)]) == 2
    assert "run `make model` first" in capsys.readouterr().out


def test_without_nvidia_smi_there_is_no_gpu(monkeypatch) -> None:
    monkeypatch.undo()  # the real detect_gpu
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.detect_gpu() is None
