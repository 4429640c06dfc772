"""Open Inference Protocol encoding: JSON and binary tensor data, BYTES, classification, errors.

Bodies are built and answers read with tritonclient's own (public) helpers, so the
wire format is checked against the client people use, not against our reading of it.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from serve.http import oip

httpclient = pytest.importorskip("tritonclient.http")


def _triton_body(inputs, outputs=None, **kwargs) -> tuple[bytes, str | None]:  # noqa: ANN001
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, **kwargs
    )
    return body, None if header_length is None else str(header_length)


def test_tritonclient_binary_bytes_images_are_decoded_element_by_element() -> None:
    images = np.array([b"\xff\xd8jpeg-one", b"\x89PNG-two\x00\x00"], dtype=object)
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(images)  # binary_data=True: tritonclient's default
    body, header_length = _triton_body(
        [image], [httpclient.InferRequestedOutput("logits", class_count=3)]
    )

    request = oip.parse_infer_request(body, header_length)

    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", "BYTES", (2,))
    assert list(tensor.value) == [b"\xff\xd8jpeg-one", b"\x89PNG-two\x00\x00"]
    assert request.outputs == (oip.RequestedOutput("logits", binary=True, classification=3),)


def test_tritonclient_binary_fp32_tensor_keeps_shape_and_values() -> None:
    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4) / 7
    tensor = httpclient.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    body, header_length = _triton_body([tensor], request_id="r-1")

    request = oip.parse_infer_request(body, header_length)

    assert request.id == "r-1"
    assert request.outputs is None and request.binary_output  # no outputs named: all, binary
    np.testing.assert_array_equal(request.inputs[0].value, pixels)
    assert request.inputs[0].value.dtype == np.float32


def test_json_data_may_be_nested_or_flat_and_bytes_are_base64() -> None:
    body = {
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]},
            {"name": "y", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]},
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(b"\x00\xffjpeg").decode()],
            },
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    }

    request = oip.parse_infer_request(json.dumps(body).encode(), None)

    x, y, image = request.inputs
    np.testing.assert_array_equal(x.value, [[1, 2], [3, 4]])
    assert x.value.dtype == np.int32
    np.testing.assert_array_equal(y.value, [[1, 2], [3, 4.5]])
    assert list(image.value) == [b"\x00\xffjpeg"]
    assert request.outputs == (oip.RequestedOutput("logits", binary=False, classification=2),)


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{not json", None, "not an inference request"),
        (b'{"inputs": []}', None, "not an inference request"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}', None, "holds 2 elements"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None, "must be numbers"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "has no data"),
        (b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}', None, "not base64"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "extra": 1}', None, "not an inference request"),
        (b'{"inputs": []}', "999", "does not fit a body"),
    ],
    ids=["not-json", "no-inputs", "count", "datatype", "strings", "no-data", "base64", "unknown-field", "header-length"],
)  # fmt: skip
def test_a_malformed_request_is_a_400_that_says_what_is_wrong(
    body: bytes, header_length: str | None, message: str
) -> None:
    with pytest.raises(oip.ProtocolError, match=message) as caught:
        oip.parse_infer_request(body, header_length)
    assert caught.value.status == 400


def test_binary_data_must_match_the_declared_sizes() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()

    with pytest.raises(oip.ProtocolError, match="does not fit the binary data"):
        oip.parse_infer_request(header + b"\x00" * 4, str(len(header)))
    with pytest.raises(oip.ProtocolError, match="belong to no input"):
        oip.parse_infer_request(header + b"\x00" * 12, str(len(header)))
    request = oip.parse_infer_request(header + struct.pack("<2f", 1.5, -2.0), str(len(header)))
    np.testing.assert_array_equal(request.inputs[0].value, [1.5, -2.0])


def test_binary_bytes_elements_must_fill_the_shape() -> None:
    with pytest.raises(oip.ProtocolError, match="shape holds 2 elements, binary data has 1"):
        oip.deserialize_bytes(oip.serialize_bytes([b"abc"]), 2, "image")
    with pytest.raises(oip.ProtocolError, match="runs past the data"):
        oip.deserialize_bytes(struct.pack("<I", 10) + b"abc", 1, "image")
    assert oip.deserialize_bytes(oip.serialize_bytes([b"", b"xy"]), 2, "image") == [b"", b"xy"]


def test_classification_is_tritons_score_index_label_highest_first() -> None:
    scores = np.array([[0.1, 3.5, -1.0, 2.25], [9.0, 0.0, 0.5, 0.25]], np.float32)

    top = oip.classify(scores, 2, ["cat", "dog", "fish"])

    assert top.shape == (2, 2)
    assert list(top[0]) == [b"3.500000:1:dog", b"2.250000:3"]  # index 3 has no label
    assert list(top[1]) == [b"9.000000:0:cat", b"0.500000:2:fish"]
    assert oip.classify(scores, 10, []).shape == (2, 4)  # k is capped at the classes


def test_responses_decode_with_tritonclient_in_binary_and_json() -> None:
    logits = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    labels = oip.classify(logits, 1, ["a", "b"])
    outputs = [
        oip.OutputTensor("logits", "FP32", logits),
        oip.OutputTensor("top", "BYTES", labels),
        oip.OutputTensor("count", "INT32", np.array([0, 7], np.int32)),
    ]

    body, headers = oip.encode_infer_response("m", "1", "req-9", outputs, binary={"logits", "top"})

    assert headers["content-type"] == "application/octet-stream"
    result = httpclient.InferenceServerClient.parse_response_body(
        body, header_length=int(headers[oip.HEADER_LENGTH])
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert list(result.as_numpy("top").ravel()) == [b"2.000000:1:b", b"4.000000:1:b"]
    np.testing.assert_array_equal(result.as_numpy("count"), [0, 7])
    assert result.get_response()["id"] == "req-9"
    assert result.get_response()["model_version"] == "1"

    plain, plain_headers = oip.encode_infer_response("m", "1", None, outputs, binary=set())
    assert plain_headers == {"content-type": "application/json"}
    decoded = json.loads(plain)
    assert decoded["outputs"][1]["data"] == ["2.000000:1:b", "4.000000:1:b"]
    assert "id" not in decoded


def test_compressed_bodies_are_inflated_within_the_limit() -> None:
    raw = b'{"inputs": []}' * 10
    assert oip.decompress(gzip.compress(raw), "gzip", 1000) == raw
    assert oip.decompress(zlib.compress(raw), "deflate", 1000) == raw
    assert oip.decompress(raw, None, 1000) == raw
    with pytest.raises(oip.ProtocolError, match="over the limit") as caught:
        oip.decompress(gzip.compress(b"0" * 5000), "gzip", 1000)
    assert caught.value.status == 413
    with pytest.raises(oip.ProtocolError, match="truncated"):
        oip.decompress(gzip.compress(raw)[:-8], "gzip", 1000)
    with pytest.raises(oip.ProtocolError) as unsupported:
        oip.decompress(raw, "br", 1000)
    assert unsupported.value.status == 415


def test_datatypes_follow_numpy_dtypes() -> None:
    assert oip.datatype_of("float32") == "FP32"
    assert oip.datatype_of(np.dtype(np.int64)) == "INT64"
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        oip.datatype_of("complex64")
