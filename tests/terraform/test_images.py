"""The Ray Serve GPU image agrees with the RayService and Terraform that run it."""

from __future__ import annotations

import re

import yaml

from tests.terraform._hcl import K8S_DIR, REPO_ROOT, root

DOCKERFILE = REPO_ROOT / "infra" / "docker" / "Dockerfile.gpu"


def _text():
    return DOCKERFILE.read_text()


def _arg_default(name):
    match = re.search(rf"^ARG {name}=(\S+)$", _text(), re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def test_base_image_is_nvidia_tensorrt_10():
    text = _text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\$\{TENSORRT_TAG\}$", text, re.MULTILINE)
    tag = _arg_default("TENSORRT_TAG")
    match = re.fullmatch(r"(\d{2})\.(\d{2})-py3", tag)
    assert match, tag
    # NGC 24.05 is the first TensorRT container release with TensorRT 10.
    assert (int(match.group(1)), int(match.group(2))) >= (24, 5), tag
    assert "tensorrt.__version__.startswith('10.')" in text


def test_installs_ray_serve_and_the_gpu_extra():
    text = _text()
    assert '"ray[serve]==${RAY_VERSION}"' in text
    assert '".[gpu]"' in text
    assert _arg_default("RAY_VERSION") == root().variables["ray_version"]["default"]


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


def test_build_context_filter_sits_next_to_the_dockerfile():
    ignore = (DOCKERFILE.parent / "Dockerfile.gpu.dockerignore").read_text().splitlines()
    assert "*" in ignore
    for needed in (
        "!pyproject.toml",
        "!README.md",
        "!functions/",
        "!serve/",
        "!shared/",
        "!infra/",
    ):
        assert needed in ignore, needed
    for copied in re.findall(r"^COPY (\S+) ", _text(), re.MULTILINE):
        assert f"!{copied}" in ignore or f"!{copied}/" in ignore, (
            f"COPY {copied} is filtered out of the context"
        )
