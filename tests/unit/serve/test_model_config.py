"""Per-version model configs: the shipped ones validate, bad ones fail naming file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serve.model_config import (
    Backend,
    ClassificationPost,
    MaskPost,
    ModelConfig,
    Precision,
    Task,
    load_model_config,
    parse_model_config,
)
from shared.errors import ConfigError

MODELS = Path(__file__).resolve().parents[3] / "infra" / "models"
SHIPPED = sorted(MODELS.glob("*/1/config.yaml"))

MINIMAL = {
    "task": "classification",
    "input": {"height": 8, "width": 8},
    "postprocess": {"kind": "classification"},
}


def _error(raw: object, source: str = "repo/m/1/config.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_model_config(raw, source=source)
    message = str(info.value)
    assert source in message
    return message


def _with(path: str, value: object) -> dict:
    raw = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


def test_the_shipped_configs_are_found() -> None:
    assert {p.parts[-3] for p in SHIPPED} >= {"mobilenet_v2", "text_detector"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parts[-3])
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_model_config(path)

    assert config.input.height > 0 and config.input.width > 0
    assert config.batching.engine_batch_sizes[-1] >= config.batching.max_batch_size


def test_the_mobilenet_config_says_what_the_model_needs() -> None:
    config = load_model_config(MODELS / "mobilenet_v2" / "1" / "config.yaml")

    assert config.task is Task.CLASSIFICATION
    assert (config.input.layout, config.input.height, config.input.width) == ("NCHW", 224, 224)
    assert config.preprocess.mean == (0.485, 0.456, 0.406)
    assert config.postprocess == ClassificationPost(output="logits", top_k=5)
    assert config.batching.engine_batch_sizes == (1, 4, 8, 16)
    assert config.backends == (Backend.TENSORRT, Backend.ONNXRUNTIME)
    assert config.precision is Precision.FP32
    assert config.labels == "labels.txt"


def test_the_text_detector_config_says_what_the_model_needs() -> None:
    config = load_model_config(MODELS / "text_detector" / "1" / "config.yaml")

    assert config.task is Task.DETECTION
    assert isinstance(config.postprocess, MaskPost)
    assert config.preprocess.resize == "stretch"
    assert config.preprocess.channel_order == "BGR"
    assert config.labels is None


def test_defaults_fill_a_minimal_config() -> None:
    config = parse_model_config(MINIMAL, source="mem")

    assert isinstance(config, ModelConfig)
    assert config.preprocess.resize == "center_crop"
    assert config.batching.max_batch_size == 8
    assert config.labels == "labels.txt"


def test_a_bad_field_is_named_by_its_path(tmp_path: Path) -> None:
    raw = _with("input.height", 0)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(ConfigError) as info:
        load_model_config(path)

    assert str(path) in str(info.value)
    assert "input.height:" in str(info.value)


def test_a_missing_required_field_is_named() -> None:
    raw = copy.deepcopy(MINIMAL)
    del raw["input"]["width"]

    assert "input.width: Field required" in _error(raw)


def test_task_and_postprocess_must_agree() -> None:
    message = _error({**MINIMAL, "task": "detection"})

    assert "task 'detection' does not fit postprocess kind 'classification'" in message


def test_a_detection_task_with_classification_outputs_is_refused_the_other_way_too() -> None:
    raw = {**MINIMAL, "postprocess": {"kind": "mask"}}

    assert "task 'classification' does not fit postprocess kind 'mask'" in _error(raw)


@pytest.mark.parametrize("sizes", [[8, 4, 16], [1, 1, 8], [0, 8], []])
def test_engine_batch_sizes_must_be_ascending_unique_and_positive(sizes: list[int]) -> None:
    message = _error(_with("batching.engine_batch_sizes", sizes))

    assert "batching" in message
    assert "engine_batch_sizes must be ascending" in message


def test_engine_batch_sizes_must_cover_max_batch_size() -> None:
    raw = _with("batching.engine_batch_sizes", [1, 4])
    raw["batching"]["max_batch_size"] = 8

    assert "largest engine batch size 4 is below max_batch_size 8" in _error(raw)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("input.colour", "rgb", "input.colour"),
        ("postprocess.topk", 3, "postprocess.classification.topk"),
        ("shape", [1, 2], "shape"),
    ],
)
def test_an_unknown_field_is_rejected_by_name(path: str, value: object, field: str) -> None:
    message = _error(_with(path, value))

    assert f"{field}: Extra inputs are not permitted" in message


def test_a_non_positive_std_is_rejected() -> None:
    message = _error(_with("preprocess.std", [0.2, -0.1, 0.3]))

    assert "preprocess" in message
    assert "std must be positive" in message


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("input.layout", "CHW", "input.layout"),
        ("input.channels", 4, "input.channels"),
        ("preprocess.resize", "crop", "preprocess.resize"),
        ("precision", "fp8", "precision"),
        ("postprocess.kind", "segmentation", "postprocess"),
    ],
)
def test_an_out_of_range_value_is_named(path: str, value: object, field: str) -> None:
    assert f"{field}" in _error(_with(path, value))


def test_an_empty_backend_list_is_rejected() -> None:
    assert "backends must name at least one backend" in _error({**MINIMAL, "backends": []})


@pytest.mark.parametrize(("raw", "kind"), [(["task"], "list"), (None, "NoneType"), ("x", "str")])
def test_a_config_that_is_not_a_mapping_is_rejected(raw: object, kind: str) -> None:
    assert f"must be a mapping, got {kind}" in _error(raw)


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")

    for path in (missing, broken):
        with pytest.raises(ConfigError, match="cannot read model config") as info:
            load_model_config(path)
        assert str(path) in str(info.value)
