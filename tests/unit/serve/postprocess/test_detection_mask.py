"""Probability-map postprocessing (DBNet style) and the connected-component labeling under it."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from serve.model_config import MaskPost
from serve.postprocess.base import ImageGeometry
from serve.postprocess.detection import MaskDetections, component_stats, label_components
from shared.errors import ConfigError
from tests.unit.serve.postprocess._onnx_models import mask_model, run_per_image

# A 128x256 (h x w) photo stretched to the 64x64 input: scale 0.5 rows, 0.25 columns.
STRETCH = ImageGeometry(128, 256, 64, 64, 0.5, 0.25)


def reference_labels(mask: np.ndarray) -> np.ndarray:
    """Breadth-first 8-connected labeling, numbered in raster order (what scipy does)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels


# --- labeling ----------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.4, 0.55, 0.7])
def test_labels_match_a_breadth_first_reference_on_random_masks(density: float) -> None:
    mask = np.random.default_rng(7).random((40, 50)) < density

    labels, count = label_components(mask)

    expected = reference_labels(mask)
    assert count == expected.max()
    np.testing.assert_array_equal(labels, expected)


def test_diagonal_neighbours_join_and_a_u_shape_is_one_component() -> None:
    mask = np.array(
        [
            [1, 0, 0, 1, 0, 1],
            [0, 1, 0, 1, 0, 1],
            [0, 0, 0, 1, 1, 1],
            [1, 1, 0, 0, 0, 0],
        ],
        dtype=bool,
    )

    labels, count = label_components(mask)

    assert count == 3
    assert labels[0, 0] == labels[1, 1] == 1  # diagonal pair
    assert len({labels[0, 3], labels[0, 5], labels[2, 4]}) == 1  # U: both arms meet at the bottom
    assert labels[3, 0] == labels[3, 1] == 3


def test_a_long_spiral_is_one_component() -> None:
    size = 41
    mask = np.zeros((size, size), dtype=bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:  # walls two apart, joined at the corners
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        mask[bottom, left : right + 1] = True
        mask[top + 2 : bottom + 1, left] = True
        if top + 2 <= bottom:
            mask[top + 2, left : left + 3] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2

    labels, count = label_components(mask)

    assert count == reference_labels(mask).max() == 1
    assert (labels > 0).sum() == mask.sum()


def test_empty_and_full_masks() -> None:
    assert label_components(np.zeros((5, 7), bool))[1] == 0
    labels, count = label_components(np.ones((5, 7), bool))
    assert count == 1 and (labels == 1).all()


def test_component_stats_area_box_perimeter_and_mean() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:6] = True  # 2 x 4 rectangle
    prob = np.where(mask, 0.75, 0.0).astype(np.float32)
    prob[1, 2] = 0.95

    stats = component_stats(*label_components(mask), prob)

    assert stats.area.tolist() == [8]
    assert stats.boxes.tolist() == [[1, 2, 3, 6]]
    assert stats.perimeter.tolist() == [12]
    assert stats.mean_probability[0] == pytest.approx((7 * 0.75 + 0.95) / 8)


def test_labeling_rejects_a_3d_mask() -> None:
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        label_components(np.zeros((1, 4, 4), bool))


# --- MaskDetections ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_outputs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, np.ndarray]]:
    image = np.zeros((2, 3, 64, 64), np.float32)
    image[0, :, 8:16, 4:20] = 1.0  # map rows 4..8, cols 2..10 at stride 2
    image[0, :, 40:48, 40:56] = 0.8
    image[0, :, 30:32, 30:32] = 1.0  # one map pixel: below min_area
    image[1, :, 20:28, 20:28] = 0.6  # the second image: a single square
    path = mask_model(tmp_path_factory.mktemp("mask") / "mask.onnx", (64, 64))
    return run_per_image(path, image, ())


def test_mask_regions_become_boxes_of_the_original_image(mask_outputs: list) -> None:
    spec = MaskPost(output="prob", threshold=0.5, min_area=4, label="text")

    found = MaskDetections(spec)(mask_outputs[0], STRETCH, [])

    # Input rows 8..16, cols 4..20 -> original rows 16..32 of 128, cols 16..80 of 256.
    boxes = np.array([(d.ymin, d.xmin, d.ymax, d.xmax) for d in found])
    np.testing.assert_allclose(boxes, [(0.125, 0.0625, 0.25, 0.3125), (0.625, 0.625, 0.75, 0.875)])
    assert [d.score for d in found] == pytest.approx([1.0, 0.8])
    assert {(d.class_id, d.label) for d in found} == {(0, "text")}


def test_mask_outputs_are_split_per_image(mask_outputs: list) -> None:
    spec = MaskPost(output="prob", threshold=0.5, min_area=4)

    found = MaskDetections(spec)(mask_outputs[1], STRETCH, [])

    got = np.array([(d.ymin, d.xmin, d.ymax, d.xmax, d.score) for d in found])
    np.testing.assert_allclose(got, [(0.3125, 0.3125, 0.4375, 0.4375, 0.6)], atol=1e-6)


def test_unclip_grows_boxes_by_area_times_ratio_over_perimeter(mask_outputs: list) -> None:
    spec = MaskPost(output="prob", threshold=0.5, min_area=4)

    found = MaskDetections(spec, unclip_ratio=1.5)(mask_outputs[0], STRETCH, [])

    # Map region 4 x 8: area 32, perimeter 24 -> 2 map pixels = 4 input pixels each side:
    # input rows 4..20, columns 0..24.
    assert (found[0].ymin, found[0].xmin, found[0].ymax, found[0].xmax) == pytest.approx(
        (0.0625, 0.0, 0.3125, 0.375)
    )


def test_mask_without_output_name_uses_the_only_output() -> None:
    prob = np.zeros((1, 32, 32), np.float32)
    prob[0, 4:12, 4:12] = 0.9

    found = MaskDetections(MaskPost())({"anything": prob}, STRETCH, [])

    assert len(found) == 1 and found[0].score == pytest.approx(0.9)


def test_mask_without_output_name_and_several_outputs_is_an_error() -> None:
    outputs = {"a": np.zeros((8, 8)), "b": np.zeros((8, 8))}

    with pytest.raises(ConfigError, match=r"2 outputs \['a', 'b'\]"):
        MaskDetections(MaskPost())(outputs, STRETCH, [])


def test_mask_missing_output_and_bad_shape_are_named() -> None:
    with pytest.raises(ConfigError, match=r"'prob'.*\['maps'\]"):
        MaskDetections(MaskPost(output="prob"))({"maps": np.zeros((8, 8))}, STRETCH, [])
    with pytest.raises(ConfigError, match=r"\(2, 8, 8\)"):
        MaskDetections(MaskPost(output="prob"))({"prob": np.zeros((2, 8, 8))}, STRETCH, [])


def test_an_empty_map_finds_nothing() -> None:
    assert MaskDetections(MaskPost(output="p"))({"p": np.zeros((16, 16))}, STRETCH, []) == []


def test_negative_unclip_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="-1"):
        MaskDetections(MaskPost(), unclip_ratio=-1.0)
