"""``gs://`` URI parsing and the source-bucket allow-list."""

from __future__ import annotations

import pytest

from shared.errors import ErrorReason, PermanentError
from shared.uris import GcsUri, check_allowed, parse_gcs_uri


@pytest.mark.parametrize(
    ("uri", "bucket", "name"),
    [
        ("gs://triggerfish-images/cat.jpg", "triggerfish-images", "cat.jpg"),
        ("gs://abc/a/b/c d.jpg", "abc", "a/b/c d.jpg"),
        ("gs://my.bucket_1/x", "my.bucket_1", "x"),
        ("gs://b" + "1" * 61 + "z/o", "b" + "1" * 61 + "z", "o"),
    ],
)
def test_a_valid_uri_splits_into_bucket_and_object(uri: str, bucket: str, name: str) -> None:
    parsed = parse_gcs_uri(uri)

    assert parsed == GcsUri(bucket=bucket, name=name)
    assert str(parsed) == uri


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/cat.jpg", "https://storage.googleapis.com/b/o", "bucket/cat.jpg", "", "GS://b/o"],
)
def test_a_uri_that_is_not_gs_is_rejected_naming_it(uri: str) -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_uri(uri)

    assert info.value.reason is ErrorReason.INVALID_URI
    assert repr(uri) in info.value.message


def test_a_non_string_uri_is_rejected() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_uri(None)  # type: ignore[arg-type]

    assert info.value.reason is ErrorReason.INVALID_URI


@pytest.mark.parametrize(
    "bucket",
    [
        "ab",  # too short
        "a" * 64,  # too long
        "Upper",  # uppercase
        "-dash",  # starts with a dash
        "dash-",  # ends with a dash
        "sp ace",
        "",
        "abc\n",  # `$` alone matches before a trailing newline
    ],
)
def test_a_bad_bucket_name_is_rejected_naming_the_bucket(bucket: str) -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_uri(f"gs://{bucket}/cat.jpg")

    assert info.value.reason is ErrorReason.INVALID_URI
    assert f"invalid bucket name {bucket!r}" in info.value.message


@pytest.mark.parametrize("uri", ["gs://bucket", "gs://bucket/", "gs://bucket/folder/"])
def test_a_uri_naming_no_object_is_rejected(uri: str) -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_uri(uri)

    assert info.value.reason is ErrorReason.INVALID_URI
    assert "names no object" in info.value.message
    assert repr(uri) in info.value.message


@pytest.mark.parametrize("name", ["cat\n.jpg", "cat.jpg\r", "x" * 1025, "é" * 513, ".", "..", ".well-known/acme-challenge/t"])
def test_an_object_name_cloud_storage_refuses_is_rejected(name: str) -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_uri(f"gs://bucket/{name}")

    assert info.value.reason is ErrorReason.INVALID_URI
    assert "invalid object name" in info.value.message


def test_an_object_name_of_exactly_1024_bytes_is_accepted() -> None:
    assert parse_gcs_uri("gs://bucket/" + "x" * 1024).name == "x" * 1024


def test_an_allowed_bucket_passes() -> None:
    check_allowed(GcsUri("triggerfish-images", "cat.jpg"), frozenset({"triggerfish-images"}))


def test_a_bucket_outside_the_allow_list_is_rejected_naming_both() -> None:
    with pytest.raises(PermanentError) as info:
        check_allowed(GcsUri("elsewhere", "cat.jpg"), {"b-two", "a-one"})

    assert info.value.reason is ErrorReason.BUCKET_NOT_ALLOWED
    assert "'elsewhere'" in info.value.message
    assert "['a-one', 'b-two']" in info.value.message
