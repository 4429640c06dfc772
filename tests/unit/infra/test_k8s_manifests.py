"""Offline validation of infra/k8s: built-in kinds against the Kubernetes schemas shipped in
kubernetes-validate, the RayService against a schema of the fields it uses."""

from __future__ import annotations

import importlib
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.terraform._hcl import K8S_DIR, child, placeholders, render, root

KUBERNETES_VERSION = "1.31"  # oldest minor on GKE's REGULAR channel that this targets

#: Values as Terraform passes them (modules/ray local.template_vars), with sample inputs.
SAMPLE_VALUES = {
    "namespace": "triggerfish",
    "service_account_name": "ray-serve",
    "serve_gsa_email": "triggerfish-serve@my-project.iam.gserviceaccount.com",
    "kuberay_namespace": "kuberay-system",
    "image": "us-central1-docker.pkg.dev/my-project/triggerfish-serve/serve-gpu:0.1.0",
    "ray_version": "2.60.0",
    "project_id": "my-project",
    "cpu_node_pool": "cpu",
    "gpu_node_pool": "gpu",
    "gpus_per_worker": 1,
    "gpu_worker_max_replicas": 2,
    "model_max_replicas": 2,
    "serve_ip": "10.10.0.50",
    "connector_cidr": "10.8.0.0/28",
    "nodes_cidr": "10.10.0.0/20",
    "models_bucket": "my-project-triggerfish-models",
    "engine_cache_bucket": "my-project-triggerfish-engine-cache",
    "results_bucket": "my-project-triggerfish-results",
    "allowed_buckets": "my-project-triggerfish-images",
    "default_model": "mobilenet_v2",
}

BUILT_IN = ("namespace.yaml", "serviceaccount.yaml", "networkpolicy.yaml")
TEMPLATES = (*BUILT_IN, "rayservice.yaml")

SERVE_ENV = {
    "GOOGLE_CLOUD_PROJECT",
    "TRIGGERFISH_MODEL_REPOSITORY",
    "TRIGGERFISH_ENGINE_CACHE",
    "TRIGGERFISH_ENGINE_CACHE_DIR",
    "TRIGGERFISH_RESULTS_BUCKET",
    "TRIGGERFISH_ALLOWED_BUCKETS",
    "TRIGGERFISH_DEFAULT_MODEL",
}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1}},
        }
    },
}

#: The RayService fields this project relies on (KubeRay ray.io/v1).
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
            },
        },
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serveService": {"type": "object", "required": ["metadata", "spec"]},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "upscalingMode": {
                                    "enum": ["Default", "Aggressive", "Conservative"]
                                },
                                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            },
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _STRING_MAP,
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": [
                                    "groupName",
                                    "minReplicas",
                                    "maxReplicas",
                                    "rayStartParams",
                                    "template",
                                ],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 1},
                                    "rayStartParams": _STRING_MAP,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _raw(name):
    return (K8S_DIR / name).read_text()


def _rendered(name):
    return yaml.safe_load(render(_raw(name), SAMPLE_VALUES))


@pytest.fixture(scope="module")
def rayservice():
    return _rendered("rayservice.yaml")


@pytest.fixture(scope="module")
def serve_config(rayservice):
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def cluster(rayservice):
    return rayservice["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def gpu_group(cluster):
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def _gpu_taint():
    pool = child("gke").resource("google_container_node_pool", "gpu")
    (taint,) = pool["node_config"][0]["taint"]
    assert taint["effect"] == "NO_SCHEDULE"
    return taint


def _validate(resource):
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_placeholders_are_exactly_the_values_terraform_passes():
    ray = child("ray")
    passed = set(ray.locals["template_vars"])
    used = set().union(*(placeholders(_raw(name)) for name in TEMPLATES))
    assert used == passed == set(SAMPLE_VALUES)
    for name in TEMPLATES:
        text = _raw(name)
        assert "%{" not in text, f"{name}: template directives would break offline validation"
        # templatefile evaluates every ${ (comments included); only plain names are allowed.
        simple = sum(len(re.findall(rf"\$\{{{p}\}}", text)) for p in placeholders(text))
        assert text.count("${") == simple, f"{name}: a ${{...}} that is not a plain placeholder"


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_parses_before_and_after_rendering(name):
    assert isinstance(yaml.safe_load(_raw(name)), dict)
    assert isinstance(_rendered(name), dict)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_kinds_validate_against_the_kubernetes_schema(name):
    _validate(_rendered(name))


def test_validation_is_real_and_offline():
    bad = _rendered("networkpolicy.yaml")
    bad["spec"]["policyTypes"] = "Ingress"  # must be a list
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)


def test_rayservice_fields_match_the_schema(rayservice):
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA)


def test_pod_templates_validate_as_kubernetes_pod_templates(cluster):
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    assert set(templates) == {"head", "cpu", "gpu"}
    for group, template in templates.items():
        resource = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"ray-{group}", "namespace": "triggerfish"},
            "template": template,
        }
        _validate(resource)


def test_serve_service_is_an_internal_load_balancer_on_port_8000(rayservice):
    serve_service = rayservice["spec"]["serveService"]
    service = {"apiVersion": "v1", "kind": "Service", **serve_service}
    service["metadata"] = {**serve_service["metadata"], "namespace": "triggerfish"}
    _validate(service)
    assert (
        serve_service["metadata"]["annotations"]["networking.gke.io/load-balancer-type"]
        == "Internal"
    )
    spec = serve_service["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["loadBalancerIP"] == SAMPLE_VALUES["serve_ip"]
    assert spec["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True


def test_serve_config_is_valid_for_ray_serve(serve_config):
    """Ray's own schema for `serve deploy` configs, the one KubeRay's config goes through."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert serve_config["proxy_location"] == "EveryNode"


def test_serve_config_builds_serve_app_with_ingress_and_one_deployment_per_model(serve_config):
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    assert app["route_prefix"] == "/"
    models = app["args"]["models"]
    assert root().variables["default_model"]["default"] in models, (
        "the default model must be deployed"
    )
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Ingress"} | {f"Model_{m}" for m in models}
    for deployment in app["deployments"]:
        # Sizing comes from the config: replica counts from autoscaling, never fixed in both places.
        assert deployment["num_replicas"] == "auto"
        assert deployment["autoscaling_config"]["min_replicas"] >= 1


def test_the_code_builds_exactly_the_configured_deployments(serve_config, tmp_path, monkeypatch):
    """Serve refuses a config naming a deployment the application does not have, and gives a
    deployment the config does not name the code's single-machine sizing (no GPU): build the
    application from serve/app.py, without a Ray cluster, and compare."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    (app,) = serve_config["applications"]
    for model in app["args"]["models"]:
        (tmp_path / "repo" / model / "1").mkdir(parents=True)
        (tmp_path / "repo" / model / "1" / "config.yaml").write_text("")
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    module_name, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    built = build_app(application, name=app["name"])
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}
    assert built.ingress_deployment_name == "Ingress"


def test_model_deployments_fit_on_the_gpu_workers(serve_config, gpu_group):
    (app,) = serve_config["applications"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    cpus = int(limits["cpu"])
    floor = 0.0
    for deployment in app["deployments"]:
        options = deployment["ray_actor_options"]
        if deployment["name"] == "Ingress":
            assert options.get("num_gpus", 0) == 0
            assert options["num_cpus"] >= 1, "Ingress must not land on the CPU-less head"
            continue
        assert 0 < options["num_gpus"] <= gpus, deployment["name"]
        assert options["num_cpus"] <= cpus, deployment["name"]
        floor += options["num_gpus"] * deployment["autoscaling_config"]["min_replicas"]
    # The replicas that always run fit on one GPU node.
    assert floor <= gpus


def test_serve_replicas_get_the_settings_they_read(serve_config, gpu_group):
    (app,) = serve_config["applications"]
    env = app["runtime_env"]["env_vars"]
    assert set(env) == SERVE_ENV
    assert env["TRIGGERFISH_MODEL_REPOSITORY"] == "gs://my-project-triggerfish-models"
    assert env["TRIGGERFISH_ENGINE_CACHE"] == "gs://my-project-triggerfish-engine-cache/engines"
    assert env["TRIGGERFISH_RESULTS_BUCKET"] == "my-project-triggerfish-results"
    assert env["TRIGGERFISH_ALLOWED_BUCKETS"] == "my-project-triggerfish-images"
    assert env["TRIGGERFISH_DEFAULT_MODEL"] == "mobilenet_v2"
    mounts = gpu_group["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(env["TRIGGERFISH_ENGINE_CACHE_DIR"].startswith(m["mountPath"] + "/") for m in mounts)


def test_gpu_workers_request_gpus_and_tolerate_the_gpu_taint(gpu_group):
    spec = gpu_group["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == str(SAMPLE_VALUES["gpus_per_worker"])
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    taint = _gpu_taint()
    assert {
        "key": taint["key"],
        "operator": "Equal",
        "value": taint["value"],
        "effect": "NoSchedule",
    } in spec["tolerations"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-nodepool": "gpu"}
    assert gpu_group["minReplicas"] == 0


def test_only_the_gpu_group_tolerates_the_gpu_taint(cluster):
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        tolerates = "tolerations" in group["template"]["spec"]
        assert tolerates == (group.get("groupName") == "gpu")
        if group.get("groupName") != "gpu":
            assert group["template"]["spec"]["nodeSelector"] == {
                "cloud.google.com/gke-nodepool": "cpu"
            }


def test_head_runs_no_replicas_and_exposes_the_serve_port(cluster):
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["serve"] == 8000


def test_pods_use_the_workload_identity_service_account(cluster):
    sa = _rendered("serviceaccount.yaml")
    assert (
        sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == SAMPLE_VALUES["serve_gsa_email"]
    )
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_network_policy_admits_the_functions_on_the_serve_port_only():
    policy = _rendered("networkpolicy.yaml")
    (from_vpc,) = [
        rule for rule in policy["spec"]["ingress"] if any("ipBlock" in p for p in rule["from"])
    ]
    assert {p["ipBlock"]["cidr"] for p in from_vpc["from"]} == {"10.8.0.0/28", "10.10.0.0/20"}
    assert from_vpc["ports"] == [{"protocol": "TCP", "port": 8000}]
