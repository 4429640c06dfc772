"""Model versions are uploaded with ``config.yaml`` last, so none is listed half-uploaded."""

from __future__ import annotations

from pathlib import Path

from infra.local.emulators import publish_order


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


def test_every_config_comes_after_every_other_file(tmp_path: Path) -> None:
    _tree(tmp_path, [
        "mobilenet_v2/1/config.yaml", "mobilenet_v2/1/model.onnx", "mobilenet_v2/1/labels.txt",
        "mobilenet_v2/1/validation/a.jpg", "mobilenet_v2/1/validation/z.jpg",
        "mobilenet_v2/2/calibration/c.jpg", "mobilenet_v2/2/config.yaml", "mobilenet_v2/2/model.onnx",
    ])  # fmt: skip

    order = [p.relative_to(tmp_path).as_posix() for p in publish_order(tmp_path)]

    assert sorted(order) == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    configs = [i for i, name in enumerate(order) if name.endswith("/config.yaml")]
    others = [i for i, name in enumerate(order) if not name.endswith("/config.yaml")]
    assert configs == [6, 7], order
    assert max(others) < min(configs)
    # Alphabetical order alone would upload 1/config.yaml before 1/labels.txt and 1/validation/.
    assert order.index("mobilenet_v2/1/config.yaml") > order.index("mobilenet_v2/1/validation/z.jpg")


def test_a_file_merely_ending_in_the_config_name_is_not_held_back(tmp_path: Path) -> None:
    _tree(tmp_path, ["m/1/old-config.yaml", "m/1/config.yaml", "m/1/model.onnx"])

    order = [p.relative_to(tmp_path).as_posix() for p in publish_order(tmp_path)]

    assert order == ["m/1/model.onnx", "m/1/old-config.yaml", "m/1/config.yaml"]
