"""The Open Inference Protocol's calls over fake model deployments that run real batches.

The fake client builds each model's signature from a real :class:`LoadedVersion`
and runs items through :func:`serve.model.batch.run_batch`, so validation, preprocessed
tensors, raw outputs and detections go through the code the replicas run.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from serve.http import oip
from serve.http.admission import AdmissionGate, Cost
from serve.http.deadline import ANSWER_MARGIN_S, parse_deadline
from serve.http.model_client import ModelStarting
from serve.http.oip_checks import MAX_IMAGES_PER_CALL
from serve.http.oip_service import MAX_BODY_BYTES, InferCall, OipService
from serve.http.oip_stream import PARTS_IN_FLIGHT, streamed_hold
from serve.model.answers import Rejection, Retry
from serve.model.batch import BatchItem, ItemOutcome, LoadedVersion, run_batch, validate_item
from serve.model.signature import ModelSignature, signature_of
from serve.model_config import parse_model_config
from serve.postprocess.factory import make_postprocessor
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError

LABELS = tuple(f"class_{i}" for i in range(10))
CLASSIFIER = parse_model_config(
    {
        "task": "classification",
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "height": 8, "width": 8},
        "preprocess": {"resize": "stretch", "scale": 1 / 255},
        "postprocess": {"kind": "classification", "output": "logits", "top_k": 3},
        "batching": {"max_batch_size": 4, "engine_batch_sizes": [1, 4]},
    },
    source="test",
)
DETECTOR = parse_model_config(
    {
        "task": "detection",
        "input": {"name": "x", "layout": "NCHW", "dtype": "float32", "height": 8, "width": 8},
        "preprocess": {"resize": "stretch", "scale": 1 / 255},
        "postprocess": {"kind": "mask", "output": "prob", "threshold": 0.5, "min_area": 1},
        "batching": {"max_batch_size": 4, "engine_batch_sizes": [1, 4]},
        "labels": None,
    },
    source="test",
)


class ClassifierEngine:
    """Logits whose winner is the mean of the first channel, in tenths."""

    backend_name = "onnxruntime:CPUExecutionProvider"

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        assert batch.dtype == np.float32 and batch.shape[1:] == (3, 8, 8)
        logits = np.zeros((len(batch), 10), np.float32)
        for i, image in enumerate(batch):
            logits[i, min(9, int(image[0].mean() * 10))] = 5.0
        return {"logits": logits}

    def close(self) -> None: ...


class DetectorEngine:
    """A probability map that is 1 wherever the first channel is bright."""

    backend_name = "onnxruntime:CPUExecutionProvider"

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        return {"prob": (batch[:, :1] > 0.5).astype(np.float32)}

    def close(self) -> None: ...


def _loaded(model: str, config: Any, engine: Any, labels: tuple[str, ...]) -> LoadedVersion:
    loaded = LoadedVersion(
        model, "1", config, engine, make_postprocessor(config.postprocess), labels
    )
    loaded.output_specs = (
        {"logits": ("float32", (10,))} if model == "cls" else {"prob": ("float32", (1, 8, 8))}
    )
    return loaded


class FakeModels:
    def __init__(self) -> None:
        self.loaded = {
            "cls": _loaded("cls", CLASSIFIER, ClassifierEngine(), LABELS),
            "det": _loaded("det", DETECTOR, DetectorEngine(), ()),
        }
        self.calls: list[list[BatchItem]] = []
        self.answer: list[Any] | None = None
        self.stats_answer = {"default_version": "1", "loaded_versions": ["1"], "healthy": True}

    def models(self) -> list[str]:
        return list(self.loaded)

    async def signature(self, model: str, version: str | None) -> ModelSignature:
        if version not in (None, "1"):
            raise PermanentError(
                ErrorReason.UNKNOWN_VERSION, f"model {model!r} has no version {version!r}"
            )
        return signature_of(self.loaded[model], ["1"])

    async def stats(self, model: str) -> dict[str, Any]:
        return dict(self.stats_answer)

    async def infer_many(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        self.calls.append(items)
        if self.answer is not None:
            return self.answer
        loaded = self.loaded[model]
        for item in items:
            validate_item(item, loaded.config)
        return run_batch(loaded, items)


def _service(models: FakeModels) -> OipService:
    return OipService(Settings(max_image_bytes=100_000), models, ThreadPoolExecutor(max_workers=1))


def _http(body: bytes, headers: dict[str, str] | None = None) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "headers": raw_headers, "path": "/"}, receive)


def _infer(
    service: OipService,
    model: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def call() -> Any:
        prepared = await service.prepare(model, None, _http(raw, headers))
        if not isinstance(prepared, InferCall):
            return prepared
        return await service.run(prepared, None)

    response = asyncio.run(call())
    return response.status_code, response


def _jpeg(value: int, size: tuple[int, int] = (16, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_encoded_images_give_raw_logits_and_tritons_classification() -> None:
    models = FakeModels()
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [2],
                "datatype": "BYTES",
                "data": [_b64(_jpeg(40)), _b64(_jpeg(230))],
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    }

    status, response = _infer(_service(models), "cls", body)

    assert status == 200
    answer = json.loads(response.body)
    assert (answer["model_name"], answer["model_version"]) == ("cls", "1")
    [output] = answer["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 2])
    assert output["data"][0] == "5.000000:1:class_1"  # 40/255 -> class 1
    assert output["data"][2] == "5.000000:9:class_9"
    [items] = models.calls
    assert all(item.raw and not item.preprocessed for item in items)


def test_a_preprocessed_fp32_tensor_goes_in_as_it_is_and_logits_come_back() -> None:
    models = FakeModels()
    pixels = np.full((3, 3, 8, 8), 0.0, np.float32)
    pixels[1] += 0.55  # class 5
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [3, 3, 8, 8],
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ],
        "parameters": {"binary_data_output": True},
    }

    status, response = _infer(_service(models), "cls", body)

    assert status == 200
    result = oip_result(response)
    logits = result.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert list(logits.argmax(axis=1)) == [0, 5, 0]
    [items] = models.calls
    assert all(item.preprocessed and item.pixels.shape == (3, 8, 8) for item in items)


def oip_result(response: Any) -> Any:
    httpclient = pytest.importorskip("tritonclient.http")
    length = response.headers.get(oip.HEADER_LENGTH)
    return httpclient.InferenceServerClient.parse_response_body(
        response.body, header_length=int(length) if length else None
    )


def test_detections_come_back_as_padded_box_score_class_tensors() -> None:
    models = FakeModels()
    bright = np.zeros((3, 8, 8), np.float32)
    bright[:, 2:4, 2:6] = 1.0
    tensor = np.stack([bright, np.zeros_like(bright)])
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 3, 8, 8],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }

    status, response = _infer(_service(models), "det", body)

    assert status == 200
    outputs = {o["name"]: o for o in json.loads(response.body)["outputs"]}
    assert outputs["num_detections"]["data"] == [1, 0]
    assert outputs["detection_boxes"]["shape"] == [2, 1, 4]
    ymin, xmin, ymax, xmax = outputs["detection_boxes"]["data"][:4]
    assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
    assert outputs["detection_boxes"]["data"][4:] == [0, 0, 0, 0]  # padding for the empty image
    assert outputs["detection_classes"]["datatype"] == "INT32"
    assert not any(item.raw for item in models.calls[0])  # detectors never ship their raw maps


@pytest.mark.parametrize(
    ("model", "body", "status", "message"),
    [
        ("nope", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}, 404, "unknown model"),
        ("cls", {"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}, 400, "must be named 'image'"),
        ("cls", {"inputs": [{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}]}, 400, "does not fit the model"),
        ("cls", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(b"not an image")]}]}, 400, "element 0: cannot decode"),
        ("cls", {"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}, 400, "1..100 images"),
        ("cls", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
        ("det", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], "outputs": [{"name": "num_detections", "parameters": {"classification": 1}}]}, 400, "classification needs"),
    ],
    ids=["unknown-model", "bytes-name", "tensor-shape", "not-an-image", "no-images", "unknown-output", "classify-detector"],
)  # fmt: skip
def test_bad_calls_are_answered_with_the_protocols_error(
    model: str, body: dict[str, Any], status: int, message: str
) -> None:
    code, response = _infer(_service(FakeModels()), model, body)

    assert code == status
    assert message in json.loads(response.body)["error"]


def test_too_many_images_are_refused_before_any_work() -> None:
    models = FakeModels()
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [MAX_IMAGES_PER_CALL + 1],
                "datatype": "BYTES",
                "data": ["AA=="] * 101,
            }
        ]
    }

    status, _ = _infer(_service(models), "cls", body)

    assert status == 400 and models.calls == []


def test_an_overloaded_model_is_a_429_with_retry_after_and_a_failed_call_a_503() -> None:
    models = FakeModels()
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(_jpeg(9))]}]
    }
    models.answer = [Retry("batch queue full", overloaded=True, retry_after_s=3.2)]

    status, response = _infer(_service(models), "cls", body)
    assert status == 429 and response.headers["retry-after"] == "3"

    models.answer = [Retry("no version loaded yet")]
    status, response = _infer(_service(models), "cls", body)
    assert status == 503 and "no version loaded" in json.loads(response.body)["error"]


def test_metadata_lists_both_inputs_and_the_engine_outputs() -> None:
    service = _service(FakeModels())

    answer = json.loads(asyncio.run(service.model_metadata("cls", None)).body)

    assert answer["name"] == "cls" and answer["versions"] == ["1"]
    assert answer["platform"] == "onnxruntime_onnx"
    assert answer["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
    ]
    assert answer["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    detector = json.loads(asyncio.run(service.model_metadata("det", None)).body)
    assert [o["name"] for o in detector["outputs"]] == [
        "detection_boxes", "detection_scores", "detection_classes", "num_detections",
    ]  # fmt: skip
    missing = asyncio.run(service.model_metadata("cls", "7"))
    assert missing.status_code == 404 and "no version '7'" in json.loads(missing.body)["error"]


def test_readiness_follows_the_model_replicas() -> None:
    models = FakeModels()
    service = _service(models)

    assert asyncio.run(service.ready()).status_code == 200
    assert asyncio.run(service.model_ready("cls", "1")).status_code == 200
    assert asyncio.run(service.model_ready("cls", "2")).status_code == 400
    assert asyncio.run(service.model_ready("nope", None)).status_code == 404
    models.stats_answer["healthy"] = False
    assert json.loads(asyncio.run(service.ready()).body) == {"ready": False}
    assert service.live().status_code == 200
    assert json.loads(service.server_metadata().body)["extensions"] == [
        "classification",
        "binary_tensor_data",
    ]


def test_an_oversized_body_is_a_413() -> None:
    status, response = _infer(
        _service(FakeModels()), "cls", b"{}", {"content-length": str(1 << 30)}
    )

    assert status == 413 and "limit" in json.loads(response.body)["error"]


def test_an_unknown_model_is_a_404_whatever_the_body() -> None:
    status, response = _infer(_service(FakeModels()), "nope", b"{not even json")

    assert status == 404 and "unknown model 'nope'" in json.loads(response.body)["error"]


# --- admission, deadlines, models that start from zero ----------------------------------------


def _gated(models: FakeModels, gate: AdmissionGate) -> OipService:
    return OipService(Settings(max_image_bytes=100_000), models, ThreadPoolExecutor(max_workers=1), gate)


def _jpeg_call(count: int) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "image", "shape": [count], "datatype": "BYTES", "data": [_b64(_jpeg(9))] * count}]}
    ).encode()


def test_a_call_is_admitted_by_its_declared_body_before_a_byte_is_read() -> None:
    models = FakeModels()
    gate = AdmissionGate(max_inputs=100, max_bytes=1000, max_wait_s=0)
    read: list[bool] = []
    body = _jpeg_call(1)
    request = _http(body, {"content-length": str(len(body))})
    original = request._receive

    async def receive() -> Any:
        read.append(True)
        return await original()

    request._receive = receive

    async def run() -> Any:
        await gate.admit(Cost(1, 900))  # another call holds most of the bytes
        return await _gated(models, gate).infer("cls", None, request, parse_deadline(None, 60))

    response = asyncio.run(run())

    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert "limit 100 inputs and 1000 bytes" in json.loads(response.body)["error"]
    assert read == [] and models.calls == []


def test_an_admitted_call_holds_its_images_and_bytes_until_it_is_answered() -> None:
    models = FakeModels()
    gate = AdmissionGate(max_inputs=100, max_bytes=10**9, max_wait_s=0)
    body = _jpeg_call(3)
    held: list[Cost] = []

    async def run() -> Any:
        service = _gated(models, gate)
        call = await service.prepare("cls", None, _http(body, {"content-length": str(len(body))}), parse_deadline(None, 60))
        assert isinstance(call, InferCall)
        held.append(gate.held)
        call.ticket.release()  # type: ignore[union-attr]
        held.append(gate.held)
        return await service.infer("cls", None, _http(body), parse_deadline(None, 60))

    response = asyncio.run(run())

    assert response.status_code == 200
    # Three images, the body, and a model-size tensor each (the classifier's input).
    assert held[0].inputs == 3 and held[0].bytes > len(body)
    assert held[1] == Cost(0, 0) and gate.held == Cost(0, 0)


def test_a_body_declared_over_the_limit_is_refused_before_admission() -> None:
    gate = AdmissionGate(max_inputs=1, max_bytes=1, max_wait_s=0)
    request = _http(b"", {"content-length": str(MAX_BODY_BYTES + 1)})

    response = asyncio.run(_gated(FakeModels(), gate).infer("cls", None, request, parse_deadline(None, 60)))

    assert response.status_code == 413 and gate.held == Cost(0, 0)


def test_a_model_starting_from_zero_is_a_503_with_its_retry_after() -> None:
    class Cold(FakeModels):
        async def signature(self, model: str, version: str | None) -> ModelSignature:
            raise ModelStarting("model cls: no replica ready yet", 30)

    status, response = _infer(_service(Cold()), "cls", _jpeg_call(1))

    assert status == 503 and response.headers["retry-after"] == "30"
    assert "no replica ready yet" in json.loads(response.body)["error"]


def test_a_call_that_outlives_its_deadline_is_answered_503_and_releases_its_hold() -> None:
    class Stuck(FakeModels):
        async def infer_many(self, model: str, items: list[BatchItem], deadline: float | None) -> list[Any]:
            await asyncio.sleep(60)
            return []

    gate = AdmissionGate(max_inputs=100, max_bytes=10**9, max_wait_s=0)
    deadline = parse_deadline(f"{time.time() + ANSWER_MARGIN_S + 0.2:.3f}", 60)

    response = asyncio.run(_gated(Stuck(), gate).infer("cls", None, _http(_jpeg_call(1)), deadline))

    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert gate.held == Cost(0, 0)


# --- binary tensor data, run as it arrives ------------------------------------------------------


def _binary_call(elements: list[bytes], outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, dict[str, str]]:
    data = oip.serialize_bytes(elements)
    header: dict[str, Any] = {
        "inputs": [{"name": "image", "shape": [len(elements)], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}]
    }
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + data, {oip.HEADER_LENGTH: str(len(text)), "content-length": str(len(text) + len(data))}


def _chunked(body: bytes, headers: dict[str, str], size: int, pulled: list[int] | None = None) -> Request:
    """A request whose body arrives in chunks of ``size`` bytes; ``pulled`` counts the chunks read."""
    parts = [body[i : i + size] for i in range(0, len(body), size)]

    async def receive() -> dict[str, Any]:
        if not parts:
            return {"type": "http.disconnect"}
        if pulled is not None:
            pulled.append(1)
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "headers": raw_headers, "path": "/"}, receive)


class Counting(FakeModels):
    """Models that note how many parts of a call they hold at once."""

    def __init__(self) -> None:
        super().__init__()
        self.at_once = 0
        self.most_at_once = 0

    async def infer_many(self, model: str, items: list[BatchItem], deadline: float | None) -> list[Any]:
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await asyncio.sleep(0.01)
            return await super().infer_many(model, items, deadline)
        finally:
            self.at_once -= 1


def _run(service: OipService, request: Request, model: str = "cls") -> Any:
    async def call() -> Any:
        prepared = await service.prepare(model, None, request)
        if not isinstance(prepared, InferCall):
            return prepared
        return await service.run(prepared, None)

    return asyncio.run(call())


def test_binary_images_are_sent_to_the_model_in_parts_as_they_arrive() -> None:
    models = Counting()
    values = [10 + 20 * (i % 12) for i in range(30)]
    body, headers = _binary_call([_jpeg(v) for v in values], [{"name": "logits", "parameters": {"classification": 1}}])

    response = _run(_service(models), _chunked(body, headers, 997))

    assert response.status_code == 200
    [output] = json.loads(response.body)["outputs"]
    assert output["shape"] == [30, 1]
    assert [int(s.split(":")[1]) for s in output["data"]] == [min(9, int(v / 255 * 10)) for v in values]
    assert [len(items) for items in models.calls] == [4] * 7 + [2]  # parts of one batch of the model
    assert models.most_at_once == PARTS_IN_FLIGHT


def test_a_bad_element_answers_the_call_and_the_rest_of_the_body_is_not_read() -> None:
    models = FakeModels()
    elements = [_jpeg(9)] * 5 + [b"not an image"] + [_jpeg(9)] * 60
    body, headers = _binary_call(elements)
    pulled: list[int] = []

    response = _run(_service(models), _chunked(body, headers, 1000, pulled))

    assert response.status_code == 400
    assert "input 'image' element 5: cannot decode image" in json.loads(response.body)["error"]
    assert len(pulled) < len(body) // 1000 / 2


def test_an_element_over_the_image_limit_is_refused_before_its_bytes_are_read() -> None:
    body, headers = _binary_call([_jpeg(9), b"\xff" * 100_001])
    pulled: list[int] = []

    response = _run(_service(FakeModels()), _chunked(body, headers, 1000, pulled))

    assert response.status_code == 400
    answer = json.loads(response.body)["error"]
    assert "element 1: 100001 bytes, limit 100000" in answer
    assert len(pulled) < 5


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda body: body + b"\0", "bytes after input 'image'"),
        (lambda body: body[:-3], "body ended after"),
    ],
    ids=["trailing-bytes", "short-body"],
)
def test_binary_data_that_does_not_match_its_header_is_a_400(mangle: Any, message: str) -> None:
    body, headers = _binary_call([_jpeg(9), _jpeg(200)])
    body = mangle(body)
    headers["content-length"] = str(len(body))

    response = _run(_service(FakeModels()), _chunked(body, headers, 100))

    assert response.status_code == 400 and message in json.loads(response.body)["error"]


def test_a_binary_fp32_tensor_is_streamed_row_by_row_and_a_gzip_body_inflated() -> None:
    models = FakeModels()
    pixels = np.zeros((6, 3, 8, 8), np.float32)
    pixels[2] += 0.55
    pixels[5] += 0.95
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [6, 3, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": pixels.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = gzip.compress(header + pixels.tobytes())
    headers = {oip.HEADER_LENGTH: str(len(header)), "content-encoding": "gzip", "content-length": str(len(body))}

    response = _run(_service(models), _chunked(body, headers, 500))

    assert response.status_code == 200
    assert list(oip_result(response).as_numpy("logits").argmax(axis=1)) == [0, 0, 5, 0, 0, 9]
    assert [len(items) for items in models.calls] == [4, 2]
    assert all(item.preprocessed and item.pixels.shape == (3, 8, 8) for item in models.calls[0])


def test_a_streamed_call_is_admitted_by_what_it_holds_not_by_its_body() -> None:
    models = FakeModels()
    sig = asyncio.run(models.signature("cls", None))
    body, headers = _binary_call([_jpeg(9)] * 40)
    header = int(headers[oip.HEADER_LENGTH])
    hold = header + streamed_hold(sig, 100_000)
    gate = AdmissionGate(max_inputs=100, max_bytes=hold, max_wait_s=0)
    held: list[Cost] = []

    class Watching(FakeModels):
        async def infer_many(self, model: str, items: list[BatchItem], deadline: float | None) -> list[Any]:
            held.append(gate.held)
            return await super().infer_many(model, items, deadline)

    response = asyncio.run(_gated(Watching(), gate).infer("cls", None, _chunked(body, headers, 4096), parse_deadline(None, 60)))

    assert response.status_code == 200
    assert held and all(h == Cost(40, hold) for h in held)
    assert gate.held == Cost(0, 0)
