"""Which load failures refuse a version for good, and which are retried."""

from __future__ import annotations

import pytest

from serve.engines.accuracy_guard import AccuracyGuardError
from serve.engines.errors import is_out_of_memory, load_error_is_permanent
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError


def _named(name: str) -> type[Exception]:
    """An exception class named like one of ONNX Runtime's or protobuf's."""
    return type(name, (Exception,), {})


@pytest.mark.parametrize(
    "err",
    [
        ConfigError("input 'x' missing"),
        PermanentError(ErrorReason.UNKNOWN_VERSION, "gone"),
        AccuracyGuardError("top-1 agreement 0.80 < 0.98"),
        ImportError("No module named 'tensorrt'"),
        _named("InvalidProtobuf")("Protobuf parsing failed"),
        _named("DecodeError")("Error parsing message"),
        _named("InvalidGraph")("bad node"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_refusal_of_the_files_is_permanent(err: Exception) -> None:
    assert load_error_is_permanent(err)


@pytest.mark.parametrize(
    "err",
    [
        MemoryError(),
        _named("OutOfMemoryError")("CUDA out of memory"),
        RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"),
        ConfigError("builder ran out of memory"),  # memory beats the type it was raised as
        TransientError("Cloud Storage unreachable"),
        OSError(5, "Input/output error"),
        FileNotFoundError("model.onnx renamed away by another replica"),
        RuntimeError("CUDA error: unspecified launch failure"),
        _named("Fail")("something went wrong"),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:20]}",
)
def test_anything_else_is_transient(err: Exception) -> None:
    assert not load_error_is_permanent(err)


def test_out_of_memory_is_recognised_by_type_or_message() -> None:
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("std::bad_alloc"))
    # ONNX Runtime's CUDA arena at its gpu_mem_limit (serve/gpus.py).
    assert is_out_of_memory(
        RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            "running Conv node. Name:'conv1' Status Message: /onnxruntime_src/onnxruntime/core/"
            "framework/bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, "
            "bool, onnxruntime::Stream*, bool, onnxruntime::WaitNotificationFn) Failed to "
            "allocate memory for requested buffer of size 102760448"
        )
    )
    assert not is_out_of_memory(RuntimeError("illegal memory access"))
