"""Regenerate requirements/serve-gpu.lock, the pinned dependencies of the GPU Serve image.

Run it as ``make lock`` (or ``python requirements/compile.py``) after changing
``pyproject.toml``'s dependencies or ``gpu`` extra, ``requirements/RAY_VERSION``
or ``requirements/serve-gpu.in``; it needs the Python package index.

The lock is resolved by uv for the image's interpreter and platform (CPython
3.12 on Ubuntu 24.04, x86_64) with a hash for every file, from:

- the project's dependencies and its ``gpu`` extra, except TensorRT, which the
  NVIDIA base image provides (the Dockerfile checks its version), and except
  ``onnxruntime`` when the extra brings ``onnxruntime-gpu`` (both install the
  same ``onnxruntime`` package; the GPU build also runs on the CPU);
- ``ray[serve]`` at exactly ``requirements/RAY_VERSION``;
- the project's build backend (``[build-system] requires``), so the image
  installs the project itself without fetching anything unpinned;
- the image-only requirements in ``requirements/serve-gpu.in`` (``onnx``, the
  CUDA bindings' range).

uv comes from PyPI into ``build/lock-tools`` (pinned below), so no tool needs
to be installed beforehand.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

UV_VERSION = "0.13.9"
PYTHON_VERSION = "3.12"
PLATFORM = "x86_64-manylinux_2_39"  # glibc of Ubuntu 24.04, the base image's OS

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
LOCK = REQUIREMENTS / "serve-gpu.lock"
TOOLS = ROOT / "build" / "lock-tools"

#: Provided by the base image, never resolved from the index.
FROM_BASE_IMAGE = re.compile(r"^tensorrt([-_].*)?$", re.IGNORECASE)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]


def lock_inputs(pyproject: dict, ray_version: str) -> list[str]:
    """The requirements the lock is resolved from (constraints file aside)."""
    project = pyproject["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    names = {_name(r).lower() for r in wanted}
    replaced = {"ray"} | ({"onnxruntime"} if "onnxruntime-gpu" in names else set())
    kept = [r for r in wanted if not FROM_BASE_IMAGE.match(_name(r))]
    kept = [r for r in kept if _name(r).lower() not in replaced]
    return [*kept, f"ray[serve]=={ray_version}", *pyproject["build-system"]["requires"]]


def _uv() -> Path:
    uv = TOOLS / "bin" / "uv"
    if not uv.exists():
        venv.create(TOOLS, with_pip=True)
        subprocess.run(
            [TOOLS / "bin" / "python", "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"],
            check=True,
        )
    return uv


def main() -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_version = (REQUIREMENTS / "RAY_VERSION").read_text().strip()
    subprocess.run(
        [
            _uv(),
            "pip",
            "compile",
            "--quiet",
            "--python-version",
            PYTHON_VERSION,
            "--python-platform",
            PLATFORM,
            "--generate-hashes",
            "--no-strip-extras",
            "--custom-compile-command",
            "make lock",
            "--output-file",
            LOCK,
            "-",  # the project's inputs, from stdin
            REQUIREMENTS / "serve-gpu.in",
        ],
        input="\n".join(lock_inputs(pyproject, ray_version)) + "\n",
        text=True,
        check=True,
        cwd=ROOT,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
