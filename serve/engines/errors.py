"""Which engine failures are the model's fault and which are the machine's.

A load failure is *permanent* when the same files would fail the same way on any
healthy machine (a config the backend refuses, an ONNX file the parser rejects, a
backend the image lacks): the version is refused until its files change. Everything
else (out of memory, a CUDA error, I/O) is *transient*: the load is retried later.
"""

from __future__ import annotations

import re

from serve.engines.accuracy_guard import AccuracyGuardError
from shared.errors import TransientError, TriggerfishError

# Exception classes for a model file that cannot be used: ONNX Runtime's
# (onnxruntime_pybind11_state), protobuf's DecodeError (a truncated or corrupt
# file read by ``onnx``) and the ONNX checker's ValidationError.
_MODEL_FILE_ERRORS = frozenset(
    {"InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NotImplemented", "NoModel", "DecodeError", "ValidationError"}
)
_OUT_OF_MEMORY = re.compile(
    r"out of memory|OutOfMemory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|"
    r"failed to allocate|RESOURCE_EXHAUSTED|std::bad_alloc",
    re.IGNORECASE,
)


def is_out_of_memory(err: BaseException) -> bool:
    """Host or device memory ran out: the work may succeed once memory is free again."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or bool(
        _OUT_OF_MEMORY.search(str(err))
    )


def load_error_is_permanent(err: BaseException) -> bool:
    """True when loading would fail the same way again with the same files."""
    if is_out_of_memory(err):
        return False
    if isinstance(err, TransientError):
        return False
    # Config, accuracy-guard and backend-refusal errors (TensorRT's parser, a missing plugin).
    if isinstance(err, TriggerfishError | AccuracyGuardError | ImportError):
        return True
    return type(err).__name__ in _MODEL_FILE_ERRORS
