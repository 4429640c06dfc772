"""The Open Inference Protocol's calls on triggerfish's models.

Health, server and model metadata, model readiness and inference. Plain asyncio
code over an :class:`OipModelClient`, so it runs in tests without a Ray cluster;
:class:`HandleOipClient` plugs in the Serve deployment handles.

An inference call takes either a ``BYTES`` tensor of encoded images (input
``image``, shape ``[N]`` or ``[N, 1]``), decoded and resized here exactly as on
``/v1/infer``, or a tensor already in the model's input shape and dtype (FP32
NCHW for ``mobilenet_v2``). Its images join the model replica's batch queue one
by one, so they batch with every other caller's. Classifiers answer with their
raw output tensor (top-k ``"score:index:label"`` strings on request), detectors
with ``detection_boxes`` ``[N, D, 4]`` (ymin, xmin, ymax, xmax, relative to the
image; to the input tensor for preprocessed inputs), ``detection_scores``
``[N, D]``, ``detection_classes`` ``[N, D]`` and ``num_detections`` ``[N]``,
padded with zeros to the most detections ``D`` of any image. Nothing is written to
the results bucket: the caller gets the answer and keeps it.

A call with binary tensor data is run as its body arrives
(:mod:`serve.http.oip_stream`), admitted by the window it runs in; a plain-JSON call
is read whole, admitted by its declared body.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from serve import metrics
from serve.http import oip
from serve.http.admission import AdmissionGate, Cost, Shed, Ticket
from serve.http.body_stream import BodyStream
from serve.http.call_pool import run_in_turn
from serve.http.deadline import HANDLE_GRACE_S, CallDeadline
from serve.http.model_client import ModelStarting
from serve.http.oip_checks import (
    IMAGE_INPUT,
    Unavailable,
    check_inputs,
    check_outputs,
    outputs_of,
)
from serve.http.oip_checks import outputs as output_tensors
from serve.http.oip_stream import item_bytes, run_streamed, streamed_hold
from serve.http.pipeline import unwrap
from serve.imaging.cpu_decode import prepare_image
from serve.model.answers import Rejection, Retry
from serve.model.batch import BatchItem, ItemOutcome, model_input_shape
from serve.model.signature import ModelSignature
from serve.model_config import Task
from serve.postprocess.base import ImageGeometry
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError

ENTRY_PATH = "oip"
# Bodies above this are refused with 413: 100 preprocessed 224x224 FP32 images fit
# (60 MB); larger batches of large inputs should be split by the caller.
MAX_BODY_BYTES = 128 * 1024 * 1024
SIGNATURE_TTL_S = 2.0
PARSE_THREADS = 2
EXTENSIONS = ("classification", "binary_tensor_data")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


class OipModelClient(Protocol):
    """How the protocol's calls reach the model deployments."""

    def models(self) -> list[str]: ...

    async def signature(self, model: str, version: str | None) -> ModelSignature: ...

    async def stats(self, model: str) -> dict[str, Any]: ...

    async def infer_many(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]: ...


class HandleOipClient:
    """:class:`OipModelClient` over Serve deployment handles; signatures kept for a short while.

    ``base`` is the ingress's :class:`serve.http.ingress.HandleModelClient` (for ``models``
    and ``infer_many``).
    """

    def __init__(self, handles: Mapping[str, Any], base: Any, clock=time.monotonic) -> None:  # noqa: ANN001
        self._handles = handles
        self._base = base
        self._signatures: dict[tuple[str, str | None], tuple[float, ModelSignature]] = {}
        self._clock = clock

    def models(self) -> list[str]:
        return list(self._handles)

    async def signature(self, model: str, version: str | None) -> ModelSignature:
        cached = self._signatures.get((model, version))
        if cached is not None and self._clock() - cached[0] < SIGNATURE_TTL_S:
            return cached[1]
        # One look-up for every concurrent caller; waits for a starting model within the caller's budget.
        answer: ModelSignature = await self._base.lookup("signature", model, version)
        self._signatures[(model, version)] = (self._clock(), answer)
        return answer

    async def stats(self, model: str) -> dict[str, Any]:
        return await asyncio.wait_for(self._handles[model].stats.remote(), 10)

    async def infer_many(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        return await self._base.infer_many(model, items, deadline)


@dataclass(frozen=True, slots=True)
class InferCall:
    """An inference call that was admitted, parsed and fits its model; ``ticket`` holds its admission.

    ``body`` is set when the input's binary data is still to be read from it (streamed).
    """

    signature: ModelSignature
    request: oip.InferRequest
    images: int
    started: float
    ticket: Ticket | None = None
    body: BodyStream | None = None
    call: int = 0


def error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error answer."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def declared_length(request: Request) -> int | None:
    """The body's ``Content-Length``, or ``None`` when it declares none (or nonsense)."""
    declared = request.headers.get("content-length", "").strip()
    return int(declared) if declared.isdigit() and len(declared) <= 15 else None


async def read_body(request: Request, limit: int) -> bytes | bytearray:
    """The request body, refused with 413 once it passes ``limit`` bytes.

    A declared length is read into one buffer of that size (no chunk list joined
    into a second copy).
    """
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise oip.ProtocolError(f"body is {declared} bytes, limit {limit}", 413, "too_large")
    if declared is not None:
        buffer, size = bytearray(declared), 0
        async for chunk in request.stream():
            end = size + len(chunk)
            if end > declared:
                raise oip.ProtocolError(f"body is longer than its Content-Length {declared}")
            buffer[size:end] = chunk
            size = end
        if size != declared:
            raise oip.ProtocolError(f"body ended after {size} of its {declared} declared bytes")
        return buffer
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise oip.ProtocolError(f"body is over the limit of {limit} bytes", 413, "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def admission_cost(request: Request) -> Cost:
    """What a plain-JSON inference call holds from before its body is read: the declared body,
    and when it is compressed, the most it may inflate to. (Its images are added once parsed.)"""
    declared = declared_length(request)
    body = MAX_BODY_BYTES if declared is None else min(declared, MAX_BODY_BYTES)
    encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
    return Cost(1, body + (0 if encoding in ("", "identity") else MAX_BODY_BYTES))


def _parse_call(
    sig: ModelSignature, body: bytes | bytearray, encoding: str | None
) -> tuple[oip.InferRequest, int, int]:
    """Decompress, parse and check a JSON call (CPU work, run off the event loop): request, images, payload bytes."""
    payload = oip.decompress(body, encoding, MAX_BODY_BYTES)
    request = oip.parse_infer_request(payload, None)
    images = check_inputs(sig, request)
    check_outputs(sig, request)
    return request, images, len(payload)


def _parse_header(sig: ModelSignature, header: bytes) -> tuple[oip.InferRequest, int]:
    """Parse and check a streamed call's JSON header (off the event loop): request, images."""
    request = oip.parse_infer_header(header)
    images = check_inputs(sig, request)
    check_outputs(sig, request)
    return request, images


def _error_of(err: oip.ProtocolError) -> JSONResponse:
    headers = {"Retry-After": err.retry_after} if isinstance(err, Unavailable) else None
    return error(err.message, err.status, headers)


def _streamed_header(http: Request, declared: int | None) -> int | None:
    """The JSON header's length when the call carries binary tensor data (streamed), else ``None``."""
    header_length = http.headers.get(oip.HEADER_LENGTH)
    if header_length is None:
        return None
    return oip.header_length_of(header_length, declared)


def _prepare_element(data: bytes | memoryview, *args: Any) -> Any:
    """:func:`prepare_image` on one element; a view into the body is copied here, in the
    decode thread, so only as many elements as there are decode threads exist twice."""
    return prepare_image(bytes(data), *args)


class OipService:
    """Answers the Open Inference Protocol's calls."""

    def __init__(
        self,
        settings: Settings,
        models: OipModelClient,
        decode_executor: Executor,
        gate: AdmissionGate | None = None,
    ) -> None:
        self._settings = settings
        self._models = models
        self._decode = decode_executor
        self._gate = gate
        # Decompressing and parsing large bodies is CPU work: off the event loop, two at a time.
        self._parse = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="oip-parse")

    # -- health and metadata -----------------------------------------------------------------
    def live(self) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(self) -> JSONResponse:
        """Ready when every model has a loaded default version on a healthy replica."""
        try:
            stats = await asyncio.gather(*(self._models.stats(m) for m in self._models.models()))
        except Exception:  # noqa: BLE001 - a model that does not answer is not ready
            return JSONResponse({"ready": False}, status_code=400)
        ready = all(s.get("default_version") and s.get("healthy", True) for s in stats)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    def server_metadata(self) -> JSONResponse:
        try:
            version = metadata.version("triggerfish")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return JSONResponse(
            {"name": "triggerfish", "version": version, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(self, model: str, version: str | None) -> JSONResponse:
        try:
            sig = await self._signature(model, version)
        except oip.ProtocolError as err:
            return _error_of(err)
        return JSONResponse(
            {
                "name": sig.model,
                "versions": list(sig.versions),
                "platform": PLATFORMS.get(sig.backend.split(":")[0], sig.backend),
                "inputs": [
                    oip.tensor_metadata(IMAGE_INPUT, oip.BYTES, [-1]),
                    oip.tensor_metadata(
                        sig.input.name,
                        oip.datatype_of(sig.input.dtype),
                        [-1, *model_input_shape(sig.input)],
                    ),
                ],
                "outputs": [
                    oip.tensor_metadata(t.name, oip.datatype_of(t.dtype), [-1, *t.shape])
                    for t in outputs_of(sig)
                ],
            }
        )

    async def model_ready(self, model: str, version: str | None) -> JSONResponse:
        if model not in self._models.models():
            return error(_unknown_model(model, self._models.models()), 404)
        try:
            stats = await self._models.stats(model)
        except Exception:  # noqa: BLE001 - a replica that does not answer is not ready
            stats = {}
        wanted = version or stats.get("default_version")
        ready = (
            bool(wanted)
            and wanted in stats.get("loaded_versions", [])
            and stats.get("healthy", True)
        )
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 400)

    # -- inference -----------------------------------------------------------------------------
    async def infer(
        self, model: str, version: str | None, http: Request, deadline: CallDeadline
    ) -> Response:
        """Admit, read, parse and run one inference call; answer by its deadline."""
        call = await self.prepare(model, version, http, deadline)
        if not isinstance(call, InferCall):
            return call
        try:
            return await asyncio.wait_for(
                self.run(call, deadline.work), max(0.0, deadline.remaining()) + HANDLE_GRACE_S
            )
        except TimeoutError:
            metrics.record_answer(
                call.signature.model, call.signature.version, ENTRY_PATH,
                time.monotonic() - call.started, "transient",
            )  # fmt: skip
            return error("the call did not finish before its deadline", 503, {"Retry-After": "5"})
        finally:
            if call.ticket is not None:
                call.ticket.release()

    async def prepare(
        self, model: str, version: str | None, http: Request, deadline: CallDeadline | None = None
    ) -> InferCall | JSONResponse:
        """Admit, read and parse the call and check it against the model; an error answer if it does not fit.

        The call is admitted (by its declared body) before its body is read; an
        :class:`InferCall` holds the admission until its ticket is released.
        """
        started = time.monotonic()
        sig: ModelSignature | None = None
        ticket: Ticket | None = None
        try:
            sig = await self._signature(model, version)
            declared = declared_length(http)
            if declared is not None and declared > MAX_BODY_BYTES:
                raise oip.ProtocolError(f"body is {declared} bytes, limit {MAX_BODY_BYTES}", 413, "too_large")
            header = _streamed_header(http, declared)
            if header is not None:
                # Binary tensor data is run as it arrives: the call holds its header and a
                # bounded window of its images, whatever the size of its body.
                hold = header + streamed_hold(sig, self._settings.max_image_bytes)
                ticket = await self._admit(Cost(1, hold), deadline)
                call = await self._open_stream(sig, http, declared, header, started, ticket)
                if ticket is not None:
                    ticket.adjust(Cost(call.images, hold + (0 if call.body else call.images * item_bytes(sig))))
                return call
            ticket = await self._admit(admission_cost(http), deadline)
            body = await read_body(http, MAX_BODY_BYTES)
            request, images, payload_bytes = await asyncio.get_running_loop().run_in_executor(
                self._parse, _parse_call, sig, body, http.headers.get("content-encoding")
            )
            if ticket is not None:
                # Now the real cost is known: the body, its inflated form, and a tensor per image.
                extra = payload_bytes if payload_bytes != len(body) else 0
                ticket.adjust(Cost(images, len(body) + extra + images * item_bytes(sig)))
        except oip.ProtocolError as err:
            if ticket is not None:
                ticket.release()
            # Label values come from what is served, never from what a caller typed.
            served = model if model in self._models.models() else metrics.UNATTRIBUTED
            metrics.record_answer(
                served,
                sig.version if sig else None,
                ENTRY_PATH,
                time.monotonic() - started,
                err.reason,
            )
            return _error_of(err)
        except BaseException:
            if ticket is not None:
                ticket.release()
            raise
        return InferCall(sig, request, images, started, ticket, call=random.getrandbits(62))

    async def _open_stream(
        self, sig: ModelSignature, http: Request, declared: int | None, header: int, started: float,
        ticket: Ticket | None,
    ) -> InferCall:  # fmt: skip
        """Read and check the JSON header; the input's binary data stays in the body, unread."""
        body = BodyStream(
            http.stream(), declared=declared,
            encoding=http.headers.get("content-encoding"), limit=MAX_BODY_BYTES,
        )  # fmt: skip
        text = await body.read(header)
        request, images = await asyncio.get_running_loop().run_in_executor(
            self._parse, _parse_header, sig, text
        )
        [tensor] = request.inputs
        if tensor.binary_size is None:
            await body.expect_end(f"the {header}-byte header, binary data that belongs to no input")
        return InferCall(
            sig, request, images, started, ticket,
            body=body if tensor.binary_size is not None else None, call=random.getrandbits(62),
        )  # fmt: skip

    async def _admit(self, cost: Cost, deadline: CallDeadline | None) -> Ticket | None:
        if self._gate is None:
            return None
        try:
            return await self._gate.admit(cost, None if deadline is None else deadline.remaining())
        except Shed as err:
            metrics.record_shed(metrics.UNATTRIBUTED, "ingress", cost.inputs)
            raise Unavailable(err.message, str(max(1, round(err.retry_after_s))), 429) from err

    async def run(self, call: InferCall, deadline: float | None) -> Response:
        """Run an admitted call through the model's batch queue and encode the answer."""
        sig = call.signature
        try:
            if call.body is not None:
                outcomes = await run_streamed(
                    call.body, call.request.inputs[0], sig, self._settings.max_image_bytes,
                    lambda i, data: self._item(call, i, data),
                    lambda items: self._models.infer_many(sig.model, items, deadline),
                )  # fmt: skip
            else:
                items = await self._items(call)
                outcomes = await self._models.infer_many(sig.model, items, deadline)
            outputs = output_tensors(sig, call.request, outcomes)
        except ClientDisconnect:
            raise
        except oip.ProtocolError as err:
            metrics.record_answer(
                sig.model, sig.version, ENTRY_PATH, time.monotonic() - call.started, err.reason
            )
            return _error_of(err)
        except Exception as err:  # noqa: BLE001 - the model call itself failed: retry later
            cause = unwrap(err)
            metrics.record_answer(
                sig.model, sig.version, ENTRY_PATH, time.monotonic() - call.started, "transient"
            )
            return error(
                f"model {sig.model} unavailable: {cause!r}"[:1000], 503, {"Retry-After": "5"}
            )
        requested = call.request.outputs
        binary = {o.name for o in requested if o.binary} if requested is not None else (
            {o.name for o in outputs} if call.request.binary_output else set()
        )  # fmt: skip
        body, headers = oip.encode_infer_response(
            sig.model, sig.version, call.request.id, outputs, binary
        )
        metrics.record_answer(sig.model, sig.version, ENTRY_PATH, time.monotonic() - call.started)
        return Response(body, headers=headers)

    async def _signature(self, model: str, version: str | None) -> ModelSignature:
        if model not in self._models.models():
            raise oip.ProtocolError(
                _unknown_model(model, self._models.models()), 404, ErrorReason.UNKNOWN_MODEL.value
            )
        try:
            return await self._models.signature(model, version)
        except PermanentError as err:
            status = (
                404
                if err.reason in (ErrorReason.UNKNOWN_MODEL, ErrorReason.UNKNOWN_VERSION)
                else 400
            )
            raise oip.ProtocolError(err.message, status, err.reason.value) from err
        except ModelStarting as err:
            raise Unavailable(str(err), str(round(err.retry_after_s))) from err
        except Exception as err:  # noqa: BLE001 - transient: the caller retries
            raise Unavailable(f"model {model} unavailable: {unwrap(err)}", "5") from err

    async def _items(self, call: InferCall) -> list[BatchItem]:
        """The call's images as batch items (a call read whole)."""
        [tensor] = call.request.inputs
        assert tensor.value is not None
        images = tensor.value.ravel() if tensor.datatype == oip.BYTES else tensor.value
        return list(await asyncio.gather(*(self._item(call, i, v) for i, v in enumerate(images))))

    async def _item(self, call: InferCall, i: int, data: Any) -> BatchItem:
        """Image ``i`` of the call: an encoded element decoded and resized, or a tensor row
        (an array, or its bytes from a streamed body) as it is."""
        sig, [tensor] = call.signature, call.request.inputs
        raw = sig.task is Task.CLASSIFICATION
        if tensor.datatype != oip.BYTES:
            h, w = sig.input.height, sig.input.width
            if not isinstance(data, np.ndarray):
                data = oip.from_little_endian(data, tensor.name, tensor.datatype, tensor.shape[1:])
            return BatchItem(
                np.ascontiguousarray(data), ImageGeometry(h, w, h, w, 1.0, 1.0), sig.version,
                preprocessed=True, raw=raw,
            )  # fmt: skip
        if len(data) > self._settings.max_image_bytes:
            raise oip.ProtocolError(
                f"input {IMAGE_INPUT!r} element {i}: {len(data)} bytes, limit {self._settings.max_image_bytes}",
                400, ErrorReason.IMAGE_TOO_LARGE.value,
            )  # fmt: skip
        t = time.monotonic()
        try:
            image = await run_in_turn(
                self._decode, call.call, _prepare_element, data, sig.input, sig.preprocess,
                self._settings.max_image_pixels,
            )  # fmt: skip
        except PermanentError as err:
            raise oip.ProtocolError(
                f"input {IMAGE_INPUT!r} element {i}: {err.message}", 400, err.reason.value
            ) from err
        except Exception as err:  # noqa: BLE001 - a decoder failing on these bytes condemns this input
            raise oip.ProtocolError(
                f"input {IMAGE_INPUT!r} element {i}: cannot decode image: {err!r}"[:500], 400,
                ErrorReason.NOT_AN_IMAGE.value,
            ) from err  # fmt: skip
        metrics.record_decode(sig.model, time.monotonic() - t)
        return BatchItem(image.pixels, image.geometry, sig.version, raw=raw)


def _unknown_model(model: str, known: list[str]) -> str:
    return f"unknown model {model!r} (models: {sorted(known)})"


__all__ = ["HandleOipClient", "IMAGE_INPUT", "InferCall", "OipModelClient", "OipService"]
