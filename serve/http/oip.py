"""Open Inference Protocol (KServe v2) over HTTP: decoding requests, encoding responses.

Plain functions over bytes and NumPy arrays; :mod:`serve.http.oip_service` applies them
to the models. Supported beside the core protocol, as Triton does them:

- the *binary tensor data* extension: a request whose JSON header is followed by raw
  tensor bytes (``Inference-Header-Content-Length`` gives the header's length; an
  input with ``parameters.binary_data_size`` takes its bytes from there, in input
  order). ``BYTES`` elements are a 4-byte little-endian length and the bytes.
  Outputs asked for with ``parameters.binary_data`` (or all outputs when the request
  sets ``parameters.binary_data_output``) come back the same way.
- the *classification* extension: an output requested with
  ``parameters.classification = k`` comes back as ``BYTES`` ``"score:index:label"``,
  the ``k`` highest values of each row, highest first.

In JSON, ``BYTES`` data are strings; binary content such as an encoded image is
base64, as KServe's examples send it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import TriggerfishError
from shared.messages import parse_json_bounded

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}


class ProtocolError(TriggerfishError):
    """A call the protocol answers with ``{"error": message}`` and ``status``.

    Attributes:
        reason: Short machine-readable cause, used as the metrics' ``reason`` label.
    """

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TensorJson(_Strict):
    name: str = Field(min_length=1, max_length=256)
    shape: list[int] = Field(max_length=16)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class _OutputJson(_Strict):
    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] | None = None


class _RequestJson(_Strict):
    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[_TensorJson] = Field(min_length=1, max_length=64)
    outputs: list[_OutputJson] | None = Field(default=None, max_length=64)


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One request input; ``value`` has ``shape``, an object array of ``bytes`` for ``BYTES``.

    From :func:`parse_infer_header`, an input whose data is binary has no ``value`` yet:
    its ``binary_size`` bytes follow the header, in input order.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | None
    binary_size: int | None = None

    @property
    def count(self) -> int:
        """Its number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the caller asked for: in binary or JSON, and top-``classification`` labels if > 0."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request. ``outputs`` is ``None`` when the caller wants every output."""

    id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One response output; ``value`` is an object array of ``bytes`` for ``BYTES``."""

    name: str
    datatype: str
    value: np.ndarray


def datatype_of(dtype: np.dtype | str) -> str:
    """The protocol's datatype for a NumPy dtype (``float32`` -> ``FP32``)."""
    try:
        return _BY_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError) as err:
        raise ValueError(f"no Open Inference Protocol datatype for dtype {dtype!r}") from err


def decompress(body: bytes | bytearray, content_encoding: str | None, limit: int) -> bytes | bytearray:
    """Undo ``Content-Encoding`` (``gzip``, ``deflate``, ``identity``), refusing more than ``limit`` bytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(
            f"unsupported Content-Encoding {content_encoding!r} (gzip, deflate)", 415
        )
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ProtocolError(f"body is not valid {encoding} data: {err}") from err
    if len(out) > limit or inflater.unconsumed_tail:
        raise ProtocolError(
            f"decompressed body is over the limit of {limit} bytes", 413, "too_large"
        )
    if not inflater.eof:
        raise ProtocolError(f"body is truncated {encoding} data")
    return out


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """``BYTES`` elements in the binary layout: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> list[bytes | memoryview]:
    """Exactly ``count`` ``BYTES`` elements from ``buffer`` (the binary layout), views of it when it is a view."""
    values, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise ProtocolError(
                f"input {name!r}: binary BYTES data ends inside an element's length"
            )
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise ProtocolError(
                f"input {name!r}: binary BYTES element {len(values)} runs past the data"
            )
        # A view when ``buffer`` is one (the request body): no copy of every element up front.
        values.append(buffer[offset : offset + length])
        offset += length
    if len(values) != count:
        raise ProtocolError(
            f"input {name!r}: shape holds {count} elements, binary data has {len(values)}"
        )
    return values


def parse_infer_request(body: bytes | bytearray, header_length: str | None) -> InferRequest:
    """Decode an ``/infer`` body, with binary tensor data when ``header_length`` is given.

    Raises:
        ProtocolError: 400 naming what is wrong.
    """
    binary: bytes | memoryview = b""
    if header_length is not None:
        length = header_length_of(header_length, len(body))
        # The tensor data stays where it was read: a view, not a copy of up to 128 MiB.
        view = memoryview(body)
        body, binary = bytes(view[:length]), view[length:]
    request = parse_infer_header(body)
    offset = 0
    inputs = []
    for tensor in request.inputs:
        if tensor.binary_size is not None:
            if offset + tensor.binary_size > len(binary):
                raise ProtocolError(
                    f"input {tensor.name!r}: binary_data_size {tensor.binary_size} does not fit the binary data"
                )
            chunk = binary[offset : offset + tensor.binary_size]
            tensor = InputTensor(tensor.name, tensor.datatype, tensor.shape, _from_binary(tensor, chunk))
            offset += len(chunk)
        inputs.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(request.id, tuple(inputs), request.outputs, request.binary_output)


def header_length_of(header_length: str, body_length: int | None) -> int:
    """``Inference-Header-Content-Length`` as a number that fits the body (of unknown length: any > 0)."""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if length <= 0 or (body_length is not None and length > body_length):
        fits = "any body" if body_length is None else f"a body of {body_length} bytes"
        raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} does not fit {fits}")
    return length


def parse_infer_header(header: bytes | bytearray) -> InferRequest:
    """The request that a JSON header describes; inputs with binary data get no value yet.

    Raises:
        ProtocolError: 400 naming what is wrong.
    """
    try:
        raw = parse_json_bounded(header)
        request = _RequestJson.model_validate(raw)
    except ValueError as err:  # pydantic's ValidationError is one
        raise ProtocolError(f"not an inference request: {_first_line(err)}") from err
    inputs = tuple(_input(tensor) for tensor in request.inputs)
    binary_output = bool((request.parameters or {}).get("binary_data_output", False))
    outputs = None
    if request.outputs is not None:
        outputs = tuple(_requested(o, binary_output) for o in request.outputs)
    return InferRequest(request.id, inputs, outputs, binary_output)


def _first_line(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3])
    return str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__


def _requested(output: _OutputJson, binary_default: bool) -> RequestedOutput:
    params = output.parameters or {}
    k = params.get("classification", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ProtocolError(
            f"output {output.name!r}: classification must be a positive integer, got {k!r}"
        )
    binary = params.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise ProtocolError(
            f"output {output.name!r}: binary_data must be true or false, got {binary!r}"
        )
    return RequestedOutput(output.name, binary, k)


def _input(tensor: _TensorJson) -> InputTensor:
    name, shape = tensor.name, tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(
                f"input {name!r}: binary_data_size {size!r} does not fit the binary data"
            )
        if tensor.data is not None:
            raise ProtocolError(f"input {name!r}: give either data or binary_data_size, not both")
        needed = None if tensor.datatype == BYTES else count * _dtype(name, tensor.datatype).itemsize
        if needed is not None and size != needed:
            raise ProtocolError(
                f"input {name!r}: {tensor.datatype}{list(shape)} needs {needed} bytes, binary data has {size}"
            )
        return InputTensor(name, tensor.datatype, shape, None, size)
    if tensor.data is None:
        raise ProtocolError(f"input {name!r} has no data")
    return InputTensor(name, tensor.datatype, shape, _from_json(tensor, count))


def _from_binary(tensor: InputTensor, chunk: bytes | memoryview) -> np.ndarray:
    if tensor.datatype == BYTES:
        values = deserialize_bytes(chunk, tensor.count, tensor.name)
        return _object_array(values, tensor.shape)
    return from_little_endian(chunk, tensor.name, tensor.datatype, tensor.shape)


def from_little_endian(
    chunk: bytes | memoryview, name: str, datatype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """A numeric tensor from its binary data (sizes checked by the caller)."""
    dtype = _dtype(name, datatype)
    # No copy on a little-endian host: the array views the body's buffer.
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _from_json(tensor: _TensorJson, count: int) -> np.ndarray:
    shape = tuple(tensor.shape)
    flat = _flatten(tensor.data)
    if len(flat) != count:
        raise ProtocolError(
            f"input {tensor.name!r}: shape {list(shape)} holds {count} elements, data has {len(flat)}"
        )
    if tensor.datatype == BYTES:
        values = []
        for i, element in enumerate(flat):
            if not isinstance(element, str):
                raise ProtocolError(f"input {tensor.name!r}: BYTES element {i} is not a string")
            try:
                values.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError) as err:
                raise ProtocolError(
                    f"input {tensor.name!r}: BYTES element {i} is not base64: {err}"
                ) from err
        return _object_array(values, shape)
    dtype = _dtype(tensor.name, tensor.datatype)
    if any(isinstance(v, (str, list, dict)) or v is None for v in flat):
        raise ProtocolError(f"input {tensor.name!r}: {tensor.datatype} data must be numbers")
    try:
        return np.asarray(flat, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as err:
        raise ProtocolError(f"input {tensor.name!r}: data is not {tensor.datatype}: {err}") from err


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of ``data``, which may be flat or nested lists."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            out.append(element)
        else:
            stack.pop()
    return out


def _dtype(name: str, datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError as err:
        known = ", ".join([*DATATYPES, BYTES])
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r} ({known})") from err


def _object_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


def classify(scores: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: the ``k`` highest values of each row as
    ``b"score:index:label"`` (``score:index`` without a label), highest first.

    ``scores`` is ``[N, C]`` (or ``[C]``); the answer is ``[N, min(k, C)]`` (or ``[min(k, C)]``).
    """
    rows = scores.reshape(1, -1) if scores.ndim == 1 else scores.reshape(scores.shape[0], -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices):
            label = labels[index] if index < len(labels) else ""
            text = f"{float(rows[r, index]):f}:{int(index)}" + (f":{label}" if label else "")
            out[r, c] = text.encode()
    return out[0] if scores.ndim == 1 else out


def encode_infer_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Sequence[OutputTensor],
    binary: set[str],
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; outputs named in ``binary`` travel as binary tensor data."""
    described, chunks = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.value.shape),
        }
        if output.name in binary:
            chunk = _to_binary(output)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _to_json(output)
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _to_binary(output: OutputTensor) -> bytes:
    if output.datatype == BYTES:
        return serialize_bytes([bytes(v) for v in output.value.ravel()])
    dtype = DATATYPES[output.datatype]
    return np.ascontiguousarray(output.value, dtype=dtype.newbyteorder("<")).tobytes()


def _to_json(output: OutputTensor) -> list[Any]:
    if output.datatype == BYTES:
        return [bytes(v).decode("utf-8", errors="replace") for v in output.value.ravel()]
    return output.value.ravel().tolist()


def tensor_metadata(name: str, datatype: str, shape: Sequence[int]) -> dict[str, Any]:
    """A tensor as model metadata lists it; ``-1`` marks a dimension that varies."""
    return {"name": name, "datatype": datatype, "shape": list(shape)}


__all__ = [
    "BYTES",
    "DATATYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "InputTensor",
    "OutputTensor",
    "ProtocolError",
    "RequestedOutput",
    "classify",
    "datatype_of",
    "decompress",
    "deserialize_bytes",
    "encode_infer_response",
    "from_little_endian",
    "header_length_of",
    "parse_infer_header",
    "parse_infer_request",
    "serialize_bytes",
    "tensor_metadata",
]
