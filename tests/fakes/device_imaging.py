"""Install the fake nvImageCodec and CuPy under the names production code imports."""

from __future__ import annotations

import sys
import types

import pytest

from tests.fakes import fake_cupy, fake_nvimgcodec


def install_fake_device_imaging(monkeypatch: pytest.MonkeyPatch, *, device_count: int = 1) -> None:
    """``import cupy`` and ``from nvidia import nvimgcodec`` give the fakes, with fresh state."""
    fake_cupy.reset(device_count)
    fake_nvimgcodec.reset()
    nvidia = types.ModuleType("nvidia")
    nvidia.__path__ = []  # a namespace package, as the nvidia-* wheels install it
    nvidia.nvimgcodec = fake_nvimgcodec  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", fake_nvimgcodec)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)


def hide_device_imaging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import cupy`` and ``from nvidia import nvimgcodec`` fail."""
    for name in ("cupy", "nvidia", "nvidia.nvimgcodec"):
        monkeypatch.setitem(sys.modules, name, None)
