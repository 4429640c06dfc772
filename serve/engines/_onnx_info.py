"""What the engines need to know about an ONNX file before building from it.

* :func:`model_digest`: identifies the model *and* the external weight files it
  references (a model saved with ``save_as_external_data`` keeps its weights
  beside ``model.onnx``; hashing ``model.onnx`` alone would let new weights hit an
  old engine).
* :func:`model_precision`: ``int8`` for explicitly quantized models
  (QuantizeLinear/DequantizeLinear nodes), ``fp16`` for models whose float
  weights are half precision, else ``fp32``.

``onnx`` is used when installed (it is part of the ``gpu`` extra); without it a
byte scan of the protobuf gives the same answers for ordinary models.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_QDQ_OPS = (b"QuantizeLinear", b"DequantizeLinear")
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16
_FLOAT = 1


@dataclass(frozen=True, slots=True)
class OnnxInfo:
    """Facts about one ONNX file.

    Attributes:
        digest: SHA-256 over the model bytes and every external data file, in order.
        precision: ``int8`` (Q/DQ nodes), ``fp16`` or ``fp32``.
        external_files: External weight files, relative to the model's folder.
    """

    digest: str
    precision: str
    external_files: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


def inspect_model(path: Path) -> OnnxInfo:
    """Read ``path`` (and its external weights) once and describe it."""
    data = Path(path).read_bytes()
    try:
        import onnx
    except ImportError:
        return _inspect_bytes(Path(path), data)
    proto = onnx.load_model_from_string(data)
    from onnx import external_data_helper

    files: list[str] = []
    for tensor in proto.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in files:
                files.append(location)
    ops = {n.op_type for n in proto.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        precision = "int8"
    else:
        floats = [t.data_type for t in proto.graph.initializer if t.data_type in (_FLOAT, _FLOAT16)]
        precision = "fp16" if floats and floats.count(_FLOAT16) * 2 > len(floats) else "fp32"
    return OnnxInfo(_digest(Path(path), data, files), precision, tuple(files))


def _inspect_bytes(path: Path, data: bytes) -> OnnxInfo:
    precision = "int8" if any(op in data for op in _QDQ_OPS) else "fp32"
    # External data files are conventionally named after the model ("model.onnx.data").
    files = sorted(p.name for p in path.parent.glob(f"{path.name}*") if p.is_file() and p != path)
    return OnnxInfo(_digest(path, data, files), precision, tuple(files))


def _digest(path: Path, data: bytes, files: list[str]) -> str:
    h = hashlib.sha256(data)
    for name in files:
        h.update(b"\0" + name.encode() + b"\0")
        with (path.parent / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
