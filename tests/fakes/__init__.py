"""Fakes of GPU libraries that cannot be installed here (TensorRT, cuda-python).

:func:`install_fake_gpu` puts them into ``sys.modules`` under the names the
production code imports, with fresh state; use it through a pytest fixture
(it needs ``monkeypatch`` so that everything is undone after the test).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Literal

import pytest

from tests.fakes import fake_cudart, fake_tensorrt

CudaLayout = Literal["bindings", "legacy", "both"]


@dataclass
class FakeGpuHandle:
    """What a test gets: the fake modules and the simulated GPU it can change."""

    trt: types.ModuleType
    cudart: types.ModuleType

    @property
    def gpu(self) -> fake_cudart.FakeGpu:
        """Device 0."""
        return fake_cudart.STATE.gpus[0]

    @property
    def gpus(self) -> list[fake_cudart.FakeGpu]:
        return fake_cudart.STATE.gpus

    def set_trt_version(self, version: str) -> None:
        """Become another TensorRT release of the same major (builds are kept)."""
        if version.split(".")[0] != fake_tensorrt.__version__.split(".")[0]:
            raise ValueError("switching the major changes the API: install_fake_gpu(trt_version=)")
        fake_tensorrt.__version__ = version

    def inject_fault(self) -> None:
        """The next kernel faults with cudaErrorIllegalAddress (sticky, as on a GPU)."""
        fake_cudart.inject_fault()

    def live_device_allocations(self) -> int:
        return len(fake_cudart.STATE.allocations)

    def live_streams(self) -> int:
        return len(fake_cudart.STATE.streams)


def install_fake_gpu(
    monkeypatch: pytest.MonkeyPatch,
    *,
    gpu: fake_cudart.FakeGpu | None = None,
    gpus: list[fake_cudart.FakeGpu] | None = None,
    trt_version: str = "10.3.0.26",
    cuda_layout: CudaLayout = "both",
) -> FakeGpuHandle:
    """Install fake ``tensorrt`` and ``cuda`` packages with fresh state.

    ``trt_version`` picks the API as well: ``11.x`` has no FP16/INT8 builder flags or
    calibrators. ``gpus`` simulates several devices (``gpu`` one).

    ``cuda_layout`` picks which cuda-python layout exists: ``bindings``
    (``cuda.bindings.runtime``, cuda-python >= 12.6), ``legacy`` (``cuda.cudart``)
    or ``both``.
    """
    fake_cudart.reset(gpu, gpus)
    fake_tensorrt.reset(trt_version)
    monkeypatch.setattr(fake_tensorrt, "__version__", trt_version)
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []  # a package, so submodule imports resolve through sys.modules
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    if cuda_layout in ("legacy", "both"):
        cuda_pkg.cudart = fake_cudart  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cuda.cudart", fake_cudart)
    else:
        monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    if cuda_layout in ("bindings", "both"):
        bindings = types.ModuleType("cuda.bindings")
        bindings.__path__ = []
        bindings.runtime = fake_cudart  # type: ignore[attr-defined]
        cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart)
    else:
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    return FakeGpuHandle(trt=fake_tensorrt, cudart=fake_cudart)


def hide_gpu_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorrt`` and ``import cuda`` fail, as on a machine without them."""
    for name in ("tensorrt", "cuda", "cuda.cudart", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)
