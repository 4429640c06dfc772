"""Settings from an explicit environment mapping."""

from __future__ import annotations

import pytest

from shared.config import Settings, load_settings
from shared.errors import ConfigError


def test_an_empty_environment_gives_the_defaults() -> None:
    assert load_settings({}) == Settings()
    assert Settings().allowed_buckets == frozenset({"triggerfish-images"})


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "GOOGLE_CLOUD_PROJECT": "proj",
            "TRIGGERFISH_SERVE_URL": "https://serve.example:8000/",
            "TRIGGERFISH_RESULTS_BUCKET": "res",
            "TRIGGERFISH_ALLOWED_BUCKETS": " a-1 , b-2,,",
            "TRIGGERFISH_DEFAULT_MODEL": "resnet",
            "TRIGGERFISH_MODEL_REPOSITORY": "gs://models/prefix/",
            "TRIGGERFISH_ENGINE_CACHE": "gs://cache",
            "TRIGGERFISH_ENGINE_CACHE_DIR": "/var/cache/tf",
            "TRIGGERFISH_MAX_IMAGE_BYTES": "1000",
            "TRIGGERFISH_MAX_IMAGE_PIXELS": "2000",
            "TRIGGERFISH_REQUEST_TIMEOUT_S": "2.5",
            "TRIGGERFISH_MAX_INFLIGHT": "64",
            "TRIGGERFISH_MAX_INFLIGHT_BYTES": "1048576",
            "TRIGGERFISH_ADMISSION_WAIT_S": "0",
        }
    )

    assert settings == Settings(
        project="proj",
        serve_url="https://serve.example:8000",
        results_bucket="res",
        allowed_buckets=frozenset({"a-1", "b-2"}),
        default_model="resnet",
        model_repository="gs://models/prefix",
        engine_cache_uri="gs://cache",
        engine_cache_dir="/var/cache/tf",
        max_image_bytes=1000,
        max_image_pixels=2000,
        request_timeout_s=2.5,
        max_inflight_inputs=64,
        max_inflight_bytes=1048576,
        admission_wait_s=0.0,
    )


def test_empty_values_mean_the_default() -> None:
    env = {
        "TRIGGERFISH_MAX_IMAGE_BYTES": "",
        "TRIGGERFISH_REQUEST_TIMEOUT_S": "",
        "TRIGGERFISH_SERVE_URL": "",
        "TRIGGERFISH_ALLOWED_BUCKETS": "",
    }

    assert load_settings(env) == Settings()


@pytest.mark.parametrize("path", ["/srv/models", "./models", "../models"])
def test_a_local_model_repository_is_accepted(path: str) -> None:
    assert load_settings({"TRIGGERFISH_MODEL_REPOSITORY": path}).model_repository == path


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("TRIGGERFISH_MAX_IMAGE_BYTES", "25MB", "must be an integer"),
        ("TRIGGERFISH_MAX_IMAGE_BYTES", "1.5", "must be an integer"),
        ("TRIGGERFISH_MAX_IMAGE_BYTES", "0", "must be >= 1"),
        ("TRIGGERFISH_MAX_IMAGE_PIXELS", "-3", "must be >= 1"),
        ("TRIGGERFISH_REQUEST_TIMEOUT_S", "-1", "must be positive"),
        ("TRIGGERFISH_REQUEST_TIMEOUT_S", "0", "must be positive"),
        ("TRIGGERFISH_REQUEST_TIMEOUT_S", "nan", "must be positive"),
        ("TRIGGERFISH_REQUEST_TIMEOUT_S", "soon", "must be a number"),
        ("TRIGGERFISH_SERVE_URL", "127.0.0.1:8000", "must be an http(s) URL"),
        ("TRIGGERFISH_SERVE_URL", "ftp://serve", "must be an http(s) URL"),
        ("TRIGGERFISH_ALLOWED_BUCKETS", ",", "must list at least one bucket"),
        ("TRIGGERFISH_ALLOWED_BUCKETS", " , ", "must list at least one bucket"),
        ("TRIGGERFISH_MODEL_REPOSITORY", "models", "gs:// prefix or a filesystem path"),
        ("TRIGGERFISH_MODEL_REPOSITORY", "s3://models", "gs:// prefix or a filesystem path"),
        ("TRIGGERFISH_MODEL_REPOSITORY", "gs://", "gs:// prefix or a filesystem path"),
        ("TRIGGERFISH_MODEL_REPOSITORY", "gs:///", "gs:// prefix or a filesystem path"),
        ("TRIGGERFISH_ENGINE_CACHE", "cache", "gs:// prefix or a filesystem path"),
        ("TRIGGERFISH_REQUEST_TIMEOUT_S", "inf", "must be positive and finite"),
        ("TRIGGERFISH_MAX_INFLIGHT", "0", "must be >= 1"),
        ("TRIGGERFISH_MAX_INFLIGHT_BYTES", "lots", "must be an integer"),
        ("TRIGGERFISH_ADMISSION_WAIT_S", "-1", "must be non-negative and finite"),
        ("TRIGGERFISH_ADMISSION_WAIT_S", "nan", "must be non-negative and finite"),
    ],
)
def test_a_bad_value_raises_naming_the_variable_and_the_value(
    name: str, value: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})

    message = str(info.value)
    assert name in message
    assert repr(value) in message
    assert words in message


def test_the_engine_cache_may_be_empty() -> None:
    assert load_settings({"TRIGGERFISH_ENGINE_CACHE": ""}).engine_cache_uri == ""


def test_the_decode_setting_is_checked_once_with_the_others() -> None:
    assert load_settings({}).decode == "auto"
    assert load_settings({"TRIGGERFISH_DECODE": " Device "}).decode == "device"
    with pytest.raises(ConfigError, match=r"TRIGGERFISH_DECODE must be one of auto\|device\|cpu"):
        load_settings({"TRIGGERFISH_DECODE": "gpu"})


def test_the_traffic_class_shares_are_read_and_checked_as_fractions() -> None:
    settings = load_settings(
        {"TRIGGERFISH_BULK_MIN_SHARE": "0.2", "TRIGGERFISH_LIVE_HEADROOM": "0", "TRIGGERFISH_BULK_BATCH_WHILE_LIVE": "1"}
    )
    assert (settings.bulk_min_share, settings.live_headroom, settings.bulk_batch_while_live) == (0.2, 0.0, 1.0)
    assert load_settings({}).bulk_batch_while_live == 0.125
    with pytest.raises(ConfigError, match=r"TRIGGERFISH_LIVE_HEADROOM must be a fraction between 0 and 1, got '1.5'"):
        load_settings({"TRIGGERFISH_LIVE_HEADROOM": "1.5"})
    with pytest.raises(ConfigError, match="TRIGGERFISH_BULK_MIN_SHARE"):
        load_settings({"TRIGGERFISH_BULK_MIN_SHARE": "-0.1"})
