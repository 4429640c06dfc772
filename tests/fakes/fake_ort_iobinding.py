"""A fake ``onnxruntime.InferenceSession`` on the CUDA execution provider, for IOBinding.

It follows ONNX Runtime's IOBinding API (``session.io_binding()``, ``bind_input(name,
device_type, device_id, element_type, shape, buffer_ptr)``, ``bind_output(name,
device_type)``, ``synchronize_inputs()``, ``run_with_iobinding(binding)``,
``copy_outputs_to_cpu()``) and reads the bound input through its pointer, as the CUDA
provider reads device memory; the fake's "device" pointers are host addresses (from
:mod:`tests.fakes.fake_cupy` arrays). The model: ``logits[n] = sum of image n``.
``fail_with`` makes the next run raise that message, as the provider does on CUDA errors.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Output:
    name: str


@dataclass
class FakeIOBinding:
    inputs: dict[str, tuple[str, int, type, list[int], int]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    synchronized: bool = False
    results: list[np.ndarray] = field(default_factory=list)

    def bind_input(
        self,
        name: str,
        device_type: str,
        device_id: int,
        element_type: type,
        shape: list[int],
        buffer_ptr: int,
    ) -> None:
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"unknown device type {device_type!r}")
        self.inputs[name] = (device_type, device_id, element_type, list(shape), buffer_ptr)

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.outputs[name] = device_type

    def synchronize_inputs(self) -> None:
        self.synchronized = True

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [r.copy() for r in self.results]


class FakeCudaSession:
    def __init__(self, input_name: str = "input", output_name: str = "logits") -> None:
        self.input_name, self.output_name = input_name, output_name
        self.bindings: list[FakeIOBinding] = []
        self.fail_with: str | None = None

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_outputs(self) -> list[_Output]:
        return [_Output(self.output_name)]

    def io_binding(self) -> FakeIOBinding:
        binding = FakeIOBinding()
        self.bindings.append(binding)
        return binding

    def run_with_iobinding(self, binding: FakeIOBinding, run_options: object = None) -> None:
        if self.fail_with:
            message, self.fail_with = self.fail_with, None
            raise RuntimeError(message)
        if not binding.synchronized:
            raise AssertionError("inputs read before synchronize_inputs()")
        _, _, element_type, shape, ptr = binding.inputs[self.input_name]
        dtype = np.dtype(element_type)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * size).from_address(ptr)
        batch = np.frombuffer(raw, dtype=dtype).reshape(shape)
        binding.results = [batch.reshape(shape[0], -1).sum(axis=1, keepdims=True)]
