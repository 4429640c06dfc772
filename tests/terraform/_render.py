"""Evaluate terraform/modules/ray-manifests with the real terraform binary, offline.

The module uses no provider, so `terraform init` needs no download: the tests
get exactly the manifests that modules/ray applies, not a re-implementation of
templatefile.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.terraform._hcl import K8S_DIR, MODULES_DIR

#: Template values as modules/ray passes them, with sample inputs.
SAMPLE_VALUES: dict[str, str] = {
    "namespace": "triggerfish",
    "service_account_name": "ray-serve",
    "serve_gsa_email": "triggerfish-serve@my-project.iam.gserviceaccount.com",
    "kuberay_namespace": "kuberay-system",
    "image": "us-central1-docker.pkg.dev/my-project/triggerfish-serve/serve-gpu@sha256:" + "0" * 64,
    "ray_version": "2.60.0",
    "project_id": "my-project",
    "cpu_node_pool": "cpu",
    "gpu_node_pool": "gpu",
    "gpus_per_worker": "1",
    "gpu_worker_max_replicas": "2",
    "model_max_replicas": "2",
    "serve_address_name": "triggerfish-serve-ilb",
    "connector_cidr": "10.8.0.0/28",
    "models_bucket": "my-project-triggerfish-models",
    "engine_cache_bucket": "my-project-triggerfish-engine-cache",
    "results_bucket": "my-project-triggerfish-results",
    "allowed_buckets": "my-project-triggerfish-images",
    "default_model": "mobilenet_v2",
    "serve_audience": "http://10.10.0.50:8000",
    "allowed_invokers": "triggerfish-functions@my-project.iam.gserviceaccount.com",
    "request_timeout_s": "110",
    "redis_host": "10.30.0.4",
    "redis_port": "6378",
    "redis_ca_base64": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
}
SECRET_VALUES = {"redis_auth_base64": "c2VjcmV0"}
SAMPLE_MODELS = ("mobilenet_v2", "text_detector")

_CONFIG = """
module "manifests" {{
  source        = "{source}"
  manifests_dir = "{manifests_dir}"
  models            = {models}
  model_autoscaling = {autoscaling}
  template_vars     = {values}
  secret_vars   = {secrets}
}}

output "rayservice" {{
  value = module.manifests.rayservice
}}

output "documents" {{
  value = module.manifests.documents
}}

output "secret_documents" {{
  value     = module.manifests.secret_documents
  sensitive = true
}}

output "names" {{
  value = [module.manifests.rayservice_name, module.manifests.serve_service_name]
}}
"""


class TerraformError(Exception):
    """terraform exited non-zero; the message is its output."""


def _terraform() -> str:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not on PATH; install Terraform >= 1.5", pytrace=False)
    return terraform


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "NO_COLOR": "1"}
    result = subprocess.run(
        [_terraform(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise TerraformError(result.stdout + result.stderr)
    return result.stdout


@functools.cache
def render(
    models: tuple[str, ...] = SAMPLE_MODELS, *, autoscaling: str = "{}", **overrides: str
) -> dict[str, Any]:
    """Apply the module with sample values; return its outputs (sensitive ones included).

    ``autoscaling`` is the module's ``model_autoscaling`` as JSON (a string, so calls cache).
    """
    values = {**SAMPLE_VALUES, **overrides}
    with tempfile.TemporaryDirectory(prefix="tf-ray-manifests-") as tmp:
        work = Path(tmp)
        (work / "main.tf").write_text(
            _CONFIG.format(
                source=os.path.relpath(MODULES_DIR / "ray-manifests", work),
                manifests_dir=K8S_DIR,
                models=json.dumps(list(models)),
                autoscaling=autoscaling,
                values=json.dumps(values),
                secrets=json.dumps(SECRET_VALUES),
            )
        )
        _run(["init", "-input=false", "-backend=false"], work)
        _run(["apply", "-input=false", "-auto-approve"], work)
        outputs = json.loads(_run(["output", "-json"], work))
    return {name: output["value"] for name, output in outputs.items()}
