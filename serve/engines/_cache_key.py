"""The engine cache key: everything a serialized engine depends on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

#: Bump when the layout or the meaning of a key field changes: old entries then miss.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class EngineCacheKey:
    """Everything a built engine depends on; equal keys mean interchangeable engines.

    Attributes:
        onnx_sha256: SHA-256 of the ONNX model bytes.
        backend: ``tensorrt`` or ``onnxruntime``.
        backend_version: e.g. TensorRT ``10.3.0`` or ONNX Runtime ``1.19.2``.
        device_name: GPU name (``NVIDIA H100 80GB HBM3``) or CPU model for ONNX Runtime.
        compute_capability: ``sm_90``; empty for CPU.
        cuda_version: CUDA runtime ``major.minor`` TensorRT runs on; empty for CPU.
        precision: ``fp32`` | ``fp16`` | ``int8``.
        batch_sizes: The engine batch sizes (the optimization profile is derived from them).
        input_name: Image input tensor name.
        input_shape: Input shape without the batch dimension.
        input_dtype: Input NumPy dtype name.
        options: Other build inputs that change the result, as sorted ``(name, value)``
            pairs (e.g. ONNX Runtime providers, INT8 calibration set digest).
        format_version: :data:`CACHE_FORMAT_VERSION` at the time of writing.
    """

    onnx_sha256: str
    backend: str
    backend_version: str
    device_name: str
    compute_capability: str
    cuda_version: str
    precision: str
    batch_sizes: tuple[int, ...]
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    options: tuple[tuple[str, str], ...] = ()
    format_version: int = CACHE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.onnx_sha256) != 64:
            raise ValueError(f"onnx_sha256 must be a hex SHA-256, got {self.onnx_sha256!r}")
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)):
            raise ValueError(f"batch_sizes must be ascending and unique, got {self.batch_sizes}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (tuples become lists); stored as the entry's metadata ``key``."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> EngineCacheKey:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown or missing fields."""
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            raise ValueError(f"key fields {sorted(raw)} differ from {sorted(names)}")
        values = dict(raw)
        for name in ("batch_sizes", "input_shape"):
            values[name] = tuple(values[name])  # type: ignore[arg-type]
        values["options"] = tuple(tuple(p) for p in values["options"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]

    def digest(self) -> str:
        """Stable hex name of the entry: SHA-256 of the canonical JSON of :meth:`to_dict`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
