"""Triton's own HTTP client (``tritonclient[http]``) against the local stack's Open Inference Protocol."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra.local.client import StackClient
from infra.local.stack import DEFAULT_MODEL_REPOSITORY, StackState
from serve.imaging.cpu_decode import prepare_image, to_model_input
from serve.model_config import load_model_config
from tests.integration.conftest import SAMPLES

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

EGYPTIAN_CAT, ESPRESSO = 285, 967
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def triton(stack: StackState) -> Iterator[object]:
    client = httpclient.InferenceServerClient(
        url=stack.serve_url.removeprefix("http://"), connection_timeout=60, network_timeout=120
    )
    yield client
    client.close()


def _images(*paths: Path) -> object:
    data = np.array([p.read_bytes() for p in paths], dtype=object)
    tensor = httpclient.InferInput("image", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(data)  # binary tensor data, tritonclient's default
    return tensor


def _preprocessed(path: Path) -> np.ndarray:
    """``path`` as the model's FP32 NCHW input, computed on the client side."""
    config = load_model_config(DEFAULT_MODEL_REPOSITORY / "mobilenet_v2" / "1" / "config.yaml")
    image = prepare_image(path.read_bytes(), config.input, config.preprocess, 60_000_000)
    return to_model_input(image.pixels[None], config.input, config.preprocess)


def test_health_and_server_metadata(triton: object) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("mobilenet_v2")
    assert triton.is_model_ready("mobilenet_v2", "1")
    assert not triton.is_model_ready("mobilenet_v2", "99")
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "triggerfish"
    assert {"classification", "binary_tensor_data"} <= set(metadata["extensions"])


def test_model_metadata_describes_inputs_and_outputs(triton: object) -> None:
    classifier = triton.get_model_metadata("mobilenet_v2")
    detector = triton.get_model_metadata("text_detector", "1")

    assert classifier["name"] == "mobilenet_v2" and "1" in classifier["versions"]
    assert classifier["platform"] == "onnxruntime_onnx"
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in classifier["inputs"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]} in classifier["inputs"]
    assert classifier["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert {o["name"] for o in detector["outputs"]} == {
        "detection_boxes", "detection_scores", "detection_classes", "num_detections",
    }  # fmt: skip


def test_encoded_images_with_the_classification_extension(triton: object) -> None:
    result = triton.infer(
        "mobilenet_v2",
        [_images(SAMPLES / "cat.jpg", SAMPLES / "coffee.jpg")],
        outputs=[httpclient.InferRequestedOutput("logits", class_count=3)],
    )

    top = result.as_numpy("logits")
    assert top.shape == (2, 3)
    score, index, label = top[0, 0].decode().split(":", 2)
    assert int(index) in CAT_CLASSES and label.endswith("cat") and float(score) > 0
    assert top[1, 0].decode().split(":")[1:] == [str(ESPRESSO), "espresso"]
    scores = [float(t.decode().split(":")[0]) for t in top[1]]
    assert scores == sorted(scores, reverse=True)


def test_a_preprocessed_fp32_tensor_gives_the_same_logits_as_the_encoded_image(
    triton: object,
) -> None:
    tensor = _preprocessed(SAMPLES / "cat.jpg")
    fp32 = httpclient.InferInput("input", list(tensor.shape), "FP32")
    fp32.set_data_from_numpy(tensor)

    from_tensor = triton.infer("mobilenet_v2", [fp32]).as_numpy("logits")
    from_image = triton.infer(
        "mobilenet_v2",
        [_images(SAMPLES / "cat.jpg")],
        outputs=[httpclient.InferRequestedOutput("logits")],
    ).as_numpy("logits")

    assert from_tensor.shape == (1, 1000) and from_tensor.dtype == np.float32
    assert int(from_tensor.argmax()) in CAT_CLASSES
    np.testing.assert_allclose(from_tensor, from_image, atol=1e-3)


def test_text_detector_returns_box_score_and_class_tensors(
    triton: object, client: StackClient
) -> None:
    result = triton.infer("text_detector", [_images(SAMPLES / "text.jpg")])

    count = int(result.as_numpy("num_detections")[0])
    boxes = result.as_numpy("detection_boxes")
    scores = result.as_numpy("detection_scores")
    assert count >= 1 and boxes.shape == (1, count, 4) and scores.shape == (1, count)
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    assert (result.as_numpy("detection_classes") == 0).all()
    v1 = client.infer(SAMPLES / "text.jpg", model="text_detector")["results"][0]
    assert len(v1["detections"]) == count  # the same detector behind both protocols


def test_base64_json_without_the_binary_extension(stack: StackState) -> None:
    body = {
        "id": "json-1",
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode((SAMPLES / "coffee.jpg").read_bytes()).decode()],
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
    }

    answer = httpx.post(
        f"{stack.serve_url}/v2/models/mobilenet_v2/versions/1/infer", json=body, timeout=120
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == "json-1" and answer.json()["model_version"] == "1"
    assert answer.json()["outputs"][0]["data"][0].split(":")[1:] == [str(ESPRESSO), "espresso"]


def test_an_unknown_model_is_a_404(triton: object) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("no_such_model", [_images(SAMPLES / "cat.jpg")])
    assert caught.value.status() == "404" and "unknown model" in caught.value.message()
    with pytest.raises(InferenceServerException) as metadata:
        triton.get_model_metadata("mobilenet_v2", "99")
    assert metadata.value.status() == "404"


def test_bad_inputs_are_a_400_naming_the_problem(triton: object) -> None:
    junk = httpclient.InferInput("image", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"these bytes are no image"], dtype=object))
    wrong = httpclient.InferInput("input", [1, 3, 100, 100], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 100, 100), np.float32))

    with pytest.raises(InferenceServerException) as not_an_image:
        triton.infer("mobilenet_v2", [junk])
    with pytest.raises(InferenceServerException) as bad_shape:
        triton.infer("mobilenet_v2", [wrong])

    assert not_an_image.value.status() == "400" and "cannot decode" in not_an_image.value.message()
    assert bad_shape.value.status() == "400" and "[-1, 3, 224, 224]" in bad_shape.value.message()


def test_the_protocol_path_writes_no_result(
    triton: object, client: StackClient, tmp_path: Path
) -> None:
    # A photo nobody sent before: any result stored for it would be named after its digest.
    photo = tmp_path / "cat.jpg"
    photo.write_bytes((SAMPLES / "cat.jpg").read_bytes() + uuid.uuid4().bytes)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()

    triton.infer("mobilenet_v2", [_images(photo)])

    stored = [
        b.name for b in client.storage.list_blobs(client.state.results_bucket) if digest in b.name
    ]
    assert stored == []
