"""The result record, its JSON and where it is written."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.errors import ErrorReason
from shared.messages import EntryPath, InferenceRequest
from shared.results import (
    HASHED_NAME_SEGMENT,
    MAX_OBJECT_NAME_BYTES,
    Detection,
    ErrorInfo,
    InferenceResult,
    Label,
    ModelRef,
    SourceRef,
    Status,
    Timings,
    invalid_source_object_name,
    result_object_name,
    superseded_error_object_name,
    version_sort_key,
)
from shared.uris import GcsUri

REQUEST = InferenceRequest(
    uri="gs://triggerfish-images/cat.jpg",
    generation="17",
    model="mobilenet_v2",
    request_id="m-1",
    entry_path=EntryPath.PUBSUB,
)


def _ok(**extra: object) -> InferenceResult:
    return InferenceResult(
        source=SourceRef(uri=REQUEST.uri, generation="17"),
        model=ModelRef(name="mobilenet_v2", version="1"),
        status=Status.OK,
        request_id="m-1",
        entry_path=EntryPath.PUBSUB,
        **extra,
    )


def test_an_error_result_requires_error_info() -> None:
    with pytest.raises(ValidationError, match="an error result needs 'error'"):
        InferenceResult(
            source=SourceRef(uri="gs://b-1/o"),
            model=ModelRef(name="m"),
            status=Status.ERROR,
            request_id="r",
            entry_path=EntryPath.HTTP,
        )


def test_an_ok_result_must_not_carry_error_info() -> None:
    with pytest.raises(ValidationError, match="an ok result must not have it"):
        _ok(error=ErrorInfo(reason=ErrorReason.NOT_AN_IMAGE, message="x"))


def test_failure_builds_an_error_result_for_the_request() -> None:
    result = InferenceResult.failure(
        REQUEST, ErrorReason.OBJECT_MISSING, "gone", model="mobilenet_v2", version="3"
    )

    assert result.status is Status.ERROR
    assert result.error == ErrorInfo(reason=ErrorReason.OBJECT_MISSING, message="gone")
    assert result.source == SourceRef(uri=REQUEST.uri, generation="17")
    assert result.model == ModelRef(name="mobilenet_v2", version="3")
    assert (result.request_id, result.entry_path) == ("m-1", EntryPath.PUBSUB)
    assert result.labels is None and result.detections is None


def test_to_json_uses_the_class_alias_and_drops_none() -> None:
    detection = Detection(
        ymin=0.1, xmin=0.2, ymax=0.3, xmax=0.4, score=0.9, class_id=17, label="cat"
    )
    result = _ok(
        backend="onnxruntime:CPUExecutionProvider",
        detections=[detection],
        timings=Timings(inference_ms=1.5, batch_size=4),
    )

    body = json.loads(result.to_json())

    assert body["detections"] == [
        {
            "ymin": 0.1,
            "xmin": 0.2,
            "ymax": 0.3,
            "xmax": 0.4,
            "score": 0.9,
            "class": 17,
            "label": "cat",
        }
    ]
    assert "labels" not in body and "error" not in body
    assert body["timings"] == {"inference_ms": 1.5, "batch_size": 4}
    assert body["source"] == {"uri": REQUEST.uri, "generation": "17"}
    assert body["status"] == "ok"
    assert body["entry_path"] == "pubsub"
    assert "created_at" in body


def test_a_detection_can_be_built_from_its_wire_form() -> None:
    wire = {"ymin": 0, "xmin": 0, "ymax": 1, "xmax": 1, "score": 0.5, "class": 3, "label": "x"}

    assert Detection.model_validate(wire).class_id == 3


def test_labels_serialize_with_class_id() -> None:
    body = json.loads(_ok(labels=[Label(class_id=281, label="tabby", score=0.8)]).to_json())

    assert body["labels"] == [{"class_id": 281, "label": "tabby", "score": 0.8}]


def test_an_error_result_round_trips_through_json() -> None:
    result = InferenceResult.failure(REQUEST, ErrorReason.NOT_AN_IMAGE, "bad", model="m")

    again = InferenceResult.model_validate_json(result.to_json())

    assert again == result
    assert json.loads(result.to_json())["error"] == {"reason": "not_an_image", "message": "bad"}


def test_result_object_name_layout() -> None:
    source = GcsUri("triggerfish-images", "a/b/cat.jpg")

    assert (
        result_object_name("mobilenet_v2", source)
        == "mobilenet_v2/triggerfish-images/a/b/cat.jpg.json"
    )


def test_result_object_name_is_deterministic_and_distinct_per_input() -> None:
    cat, dog = GcsUri("b-1", "cat.jpg"), GcsUri("b-1", "dog.jpg")

    assert result_object_name("m", cat) == result_object_name("m", GcsUri("b-1", "cat.jpg"))
    names = {
        result_object_name("m", cat),
        result_object_name("m", dog),
        result_object_name("other", cat),
        result_object_name("m", GcsUri("b-2", "cat.jpg")),
    }
    assert len(names) == 4


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd"),
        ("a/./b", "a/%2E/b"),
        ("a//b", "a/%00/b"),
        ("dir/", "dir/%00"),
        ("/lead", "%00/lead"),
        ("..", "%2E%2E"),
        ("50%.jpg", "50%25.jpg"),
        ("...", "..."),
        ("a..b/.hidden", "a..b/.hidden"),
    ],
)
def test_path_segments_a_filesystem_would_interpret_are_escaped(name: str, expected: str) -> None:
    assert result_object_name("m", GcsUri("b-1", name)) == f"m/b-1/{expected}.json"


def test_no_result_name_escapes_its_model_and_bucket_folder() -> None:
    for name in ("..", "../x", "a/../../..", "./..", "x/../../../y"):
        result = result_object_name("m", GcsUri("b-1", name))
        segments = result.removesuffix(".json").split("/")

        assert segments[:2] == ["m", "b-1"]
        assert not {".", "..", ""} & set(segments), result


def test_escaping_keeps_distinct_sources_apart() -> None:
    # Each pair would collide if only one of '.', '..', '' or '%' were escaped.
    names = [
        "..", "%2E%2E", "%252E%252E",
        ".", "%2E",
        "a//b", "a/%00/b", "a/%2500/b",
        "dir/", "dir/%00",
        "50%.jpg", "50%25.jpg",
        "x/../y", "x/%2E%2E/y",
    ]  # fmt: skip

    results = [result_object_name("m", GcsUri("b-1", n)) for n in names]

    assert len(set(results)) == len(names)


def test_version_sort_key_orders_numbers_numerically_after_names() -> None:
    versions = ["10", "beta", "2", "alpha", "1", "9"]

    assert sorted(versions, key=version_sort_key) == ["alpha", "beta", "1", "2", "9", "10"]
    assert version_sort_key("2") < version_sort_key("10")
    assert version_sort_key("zzz") < version_sort_key("0")
    assert version_sort_key("007") == version_sort_key("7")


def test_invalid_source_name_is_deterministic_and_distinct_per_uri_and_request() -> None:
    name = invalid_source_object_name("m-1", "http://nope")

    assert name == invalid_source_object_name("m-1", "http://nope")
    assert name.startswith("_invalid/") and name.endswith(".json")
    assert "nope" not in name  # hashed: safe whatever the input holds
    assert invalid_source_object_name("m-1", "http://other") != name
    assert invalid_source_object_name("m-2", "http://nope") != name
    assert len({name.split("/")[1], name.split("/")[2]}) == 2


# --- names over Cloud Storage's limit ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a" * 1000, "dir/" * 250 + "x.jpg", "%" * 400, "é" * 500],
    ids=["1000-bytes", "many-segments", "percent-escapes", "multi-byte-utf8"],
)
def test_a_result_name_over_the_limit_falls_back_to_a_hashed_name(name: str) -> None:
    source = GcsUri("bucket", name)

    result_name = result_object_name("mobilenet_v2", source)

    assert len(result_name.encode()) <= MAX_OBJECT_NAME_BYTES
    assert result_name.startswith(f"mobilenet_v2/bucket/{HASHED_NAME_SEGMENT}/")
    assert result_name == result_object_name("mobilenet_v2", GcsUri("bucket", name))  # deterministic
    assert result_name != result_object_name("mobilenet_v2", GcsUri("bucket", name + "b"))


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    # 510 characters, 1020 bytes of UTF-8: within the limit only when counted as characters.
    two_byte = "é" * 510
    name = result_object_name("m", GcsUri("b", two_byte))

    assert len(f"m/b/{two_byte}.json") < MAX_OBJECT_NAME_BYTES < len(f"m/b/{two_byte}.json".encode())
    assert HASHED_NAME_SEGMENT in name


def test_a_name_exactly_at_the_limit_is_kept_readable() -> None:
    prefix = "m/b/"
    name = "x" * (MAX_OBJECT_NAME_BYTES - len(prefix) - len(".json"))

    assert result_object_name("m", GcsUri("b", name)) == f"{prefix}{name}.json"
    assert HASHED_NAME_SEGMENT in result_object_name("m", GcsUri("b", name + "x"))


def test_no_escaped_source_name_can_collide_with_the_hashed_folder() -> None:
    # A source literally named like the hashed folder is escaped ('%' -> '%25').
    digest = "0" * 64
    source = GcsUri("b", f"{HASHED_NAME_SEGMENT}/{digest}")

    assert result_object_name("m", source) == f"m/b/%25sha256/{digest}.json"


def test_superseded_error_name_is_keyed_by_request_id_then_uri() -> None:
    a = superseded_error_object_name("req-1", "gs://b/x.jpg")

    assert a.startswith("_superseded/") and a.endswith(".json")
    assert a == superseded_error_object_name("req-1", "gs://b/x.jpg")
    assert a.split("/")[1] == superseded_error_object_name("req-1", "gs://b/y.jpg").split("/")[1]
    assert a.split("/")[1] != superseded_error_object_name("req-2", "gs://b/x.jpg").split("/")[1]
