"""Offline validation of infra/k8s as Terraform renders it (modules/ray-manifests, evaluated by
the real terraform binary): built-in kinds against the Kubernetes schemas shipped in
kubernetes-validate, the RayService against a schema of the fields it uses, and the Serve
config against Ray's own schema and the application the code builds."""

from __future__ import annotations

import base64
import importlib
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.footprint import load_footprint
from tests.terraform._hcl import K8S_DIR, child, placeholders, root
from tests.terraform._render import SAMPLE_VALUES, SECRET_VALUES, TerraformError, render

KUBERNETES_VERSION = "1.31"  # oldest minor on GKE's REGULAR channel that this targets

RAY_TEMPLATES = (
    "namespace.yaml",
    "serviceaccount.yaml",
    "networkpolicy.yaml",
    "poddisruptionbudget.yaml",
    "redis-ca.yaml",
    "redis-secret.yaml",
    "rayservice.yaml",
)
MONITORING_TEMPLATES = ("podmonitoring.yaml",)
BUILT_IN = ("namespace", "serviceaccount", "networkpolicy", "poddisruptionbudget", "redis-ca")

#: Exactly what the Serve application reads (shared/config.py, serve/app.py, the ingress auth).
SERVE_ENV = {
    "GOOGLE_CLOUD_PROJECT",
    "TRIGGERFISH_MODELS",
    "TRIGGERFISH_MODEL_REPOSITORY",
    "TRIGGERFISH_ENGINE_CACHE",
    "TRIGGERFISH_ENGINE_CACHE_DIR",
    "TRIGGERFISH_RESULTS_BUCKET",
    "TRIGGERFISH_ALLOWED_BUCKETS",
    "TRIGGERFISH_DEFAULT_MODEL",
    "TRIGGERFISH_SERVE_AUDIENCE",
    "TRIGGERFISH_ALLOWED_INVOKERS",
    "TRIGGERFISH_REQUEST_TIMEOUT_S",
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
_SECRET_REF = {
    "type": "object",
    "required": ["valueFrom"],
    "properties": {
        "valueFrom": {
            "type": "object",
            "required": ["secretKeyRef"],
            "properties": {
                "secretKeyRef": {
                    "type": "object",
                    "required": ["name", "key"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                }
            },
        }
    },
}

#: The RayService fields this project relies on (KubeRay 1.5 ray.io/v1).
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
                        "gcsFaultToleranceOptions": {
                            "type": "object",
                            "required": ["redisAddress"],
                            "additionalProperties": False,
                            "properties": {
                                "redisAddress": {"type": "string", "pattern": r"^rediss?://"},
                                "redisPassword": _SECRET_REF,
                                "redisUsername": _SECRET_REF,
                                "externalStorageNamespace": {"type": "string"},
                            },
                        },
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


@pytest.fixture(scope="module")
def outputs():
    return render()


def _document(outputs, name):
    if name in outputs["secret_documents"]:
        return yaml.safe_load(outputs["secret_documents"][name])
    return yaml.safe_load(outputs["documents"][name])


@pytest.fixture(scope="module")
def rayservice(outputs):
    return yaml.safe_load(outputs["rayservice"])


@pytest.fixture(scope="module")
def serve_config(rayservice):
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def app(serve_config):
    (application,) = serve_config["applications"]
    return application


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


def _templates(cluster):
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def test_placeholders_are_exactly_the_values_terraform_passes():
    ray = child("ray")
    passed = set(ray.locals["template_vars"]) | set(SECRET_VALUES) | {"models"}
    used = set().union(*(placeholders(_raw(name)) for name in RAY_TEMPLATES))
    assert used == passed == set(SAMPLE_VALUES) | set(SECRET_VALUES) | {"models"}
    monitoring = child("monitoring").resource("kubectl_manifest", "pod_monitoring")["yaml_body"]
    for name in MONITORING_TEMPLATES:
        for placeholder in placeholders(_raw(name)):
            assert f"{placeholder}=" in re.sub(r"\s+", "", monitoring), placeholder
    for name in (*RAY_TEMPLATES, *MONITORING_TEMPLATES):
        text = _raw(name)
        assert "%{" not in text, f"{name}: template directives would break offline validation"
        # templatefile evaluates every ${ (comments included); only plain names are allowed.
        simple = sum(len(re.findall(rf"\$\{{{p}\}}", text)) for p in placeholders(text))
        assert text.count("${") == simple, f"{name}: a ${{...}} that is not a plain placeholder"


def test_every_template_in_the_folder_is_applied_by_a_module():
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")}
    assert on_disk == set(RAY_TEMPLATES) | set(MONITORING_TEMPLATES)
    manifests = child("ray-manifests").variables
    assert {f"{n}.yaml" for n in manifests["plain_templates"]["default"]} | {
        f"{n}.yaml" for n in manifests["secret_templates"]["default"]
    } | {"rayservice.yaml"} == set(RAY_TEMPLATES)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_kinds_validate_against_the_kubernetes_schema(outputs, name):
    _validate(_document(outputs, name))


def test_the_redis_secret_is_rendered_only_as_a_sensitive_output(outputs):
    secret = _document(outputs, "redis-secret")
    _validate(secret)
    assert secret["data"]["password"] == SECRET_VALUES["redis_auth_base64"]
    assert "redis-secret" not in outputs["documents"]
    assert SECRET_VALUES["redis_auth_base64"] not in outputs["rayservice"]


def test_validation_is_real_and_offline(outputs):
    bad = _document(outputs, "networkpolicy")
    bad["spec"]["policyTypes"] = "Ingress"  # must be a list
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)


def test_rayservice_fields_match_the_schema(rayservice):
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA)


def test_pod_templates_validate_as_kubernetes_pod_templates(cluster):
    templates = _templates(cluster)
    assert set(templates) == {"head", "cpu", "gpu"}
    for group, template in templates.items():
        resource = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"ray-{group}", "namespace": "triggerfish"},
            "template": template,
        }
        _validate(resource)


def test_every_ray_container_runs_the_image_by_digest(cluster):
    for group, template in _templates(cluster).items():
        (container,) = template["spec"]["containers"]
        assert re.search(r"@sha256:[0-9a-f]{64}$", container["image"]), group
        assert container["imagePullPolicy"] in {"IfNotPresent", "Always"}, group
    precondition = child("ray").resource("kubectl_manifest", "rayservice")["lifecycle"][0][
        "precondition"
    ][0]
    assert "@sha256:[0-9a-f]{64}$" in precondition["condition"]


def test_serve_service_is_an_internal_load_balancer_for_the_connector_only(rayservice):
    serve_service = rayservice["spec"]["serveService"]
    service = {"apiVersion": "v1", "kind": "Service", **serve_service}
    service["metadata"] = {**serve_service["metadata"], "namespace": "triggerfish"}
    _validate(service)
    annotations = serve_service["metadata"]["annotations"]
    assert annotations["networking.gke.io/load-balancer-type"] == "Internal"
    # The reserved address by name; the deprecated spec.loadBalancerIP is not used.
    assert (
        annotations["networking.gke.io/load-balancer-ip-addresses"]
        == SAMPLE_VALUES["serve_address_name"]
    )
    spec = serve_service["spec"]
    assert "loadBalancerIP" not in spec
    assert spec["type"] == "LoadBalancer"
    assert spec["loadBalancerSourceRanges"] == [SAMPLE_VALUES["connector_cidr"]]
    # Keeps the client address, so the NetworkPolicy can admit the connector range only.
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True


def test_serve_config_is_valid_for_ray_serve(serve_config):
    """Ray's own schema for `serve deploy` configs, the one KubeRay's config goes through."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert serve_config["proxy_location"] == "EveryNode"


def test_serve_config_deploys_the_ingress_and_one_deployment_per_model(app):
    assert app["import_path"] == "serve.app:build_app"
    assert app["route_prefix"] == "/"
    assert "models" not in app.get("args", {}), "the model list comes from TRIGGERFISH_MODELS"
    models = app["runtime_env"]["env_vars"]["TRIGGERFISH_MODELS"].split(",")
    assert models == list(root().variables["models"]["default"])
    assert root().variables["default_model"]["default"] in models
    assert [d["name"] for d in app["deployments"]] == ["Ingress"] + [f"Model_{m}" for m in models]
    for deployment in app["deployments"]:
        # Sizing comes from the config: replica counts from autoscaling, never fixed in both places.
        assert deployment["num_replicas"] == "auto"
    (ingress,) = [d for d in app["deployments"] if d["name"] == "Ingress"]
    assert ingress["autoscaling_config"]["min_replicas"] >= 1, "the Ingress answers at zero"


def test_models_scale_to_zero_after_an_idle_delay(app, gpu_group):
    """Every model deployment may go to zero replicas after its idle delay; the GPU worker group
    and (tests/terraform/test_gke.py) the GPU node pool follow it to zero."""
    models = [d for d in app["deployments"] if d["name"].startswith("Model_")]
    assert models
    for deployment in models:
        scaling = deployment["autoscaling_config"]
        assert scaling["min_replicas"] == 0, deployment["name"]
        assert scaling["downscale_to_zero_delay_s"] > 0, deployment["name"]
    assert gpu_group["minReplicas"] == 0
    assert gpu_group["replicas"] == 0


def test_terraform_overrides_scale_to_zero_per_model():
    outputs = render(
        autoscaling='{"text_detector": {"min_replicas": 1}, '
        '"mobilenet_v2": {"downscale_to_zero_delay_s": 120}}'
    )
    config = yaml.safe_load(yaml.safe_load(outputs["rayservice"])["spec"]["serveConfigV2"])
    scaling = {d["name"]: d["autoscaling_config"] for d in config["applications"][0]["deployments"]}
    assert scaling["Model_text_detector"]["min_replicas"] == 1
    assert scaling["Model_mobilenet_v2"]["min_replicas"] == 0
    assert scaling["Model_mobilenet_v2"]["downscale_to_zero_delay_s"] == 120
    # A field left out keeps the manifest's value.
    default = render()
    default_config = yaml.safe_load(yaml.safe_load(default["rayservice"])["spec"]["serveConfigV2"])
    (detector,) = [
        d for d in default_config["applications"][0]["deployments"]
        if d["name"] == "Model_text_detector"
    ]  # fmt: skip
    assert (
        scaling["Model_text_detector"]["downscale_to_zero_delay_s"]
        == detector["autoscaling_config"]["downscale_to_zero_delay_s"]
    )


def test_terraform_refuses_a_floor_above_the_ceiling():
    ceiling = int(SAMPLE_VALUES["model_max_replicas"])
    with pytest.raises(TerraformError, match=r"min_replicas above the deployment's max_replicas"):
        render(autoscaling=f'{{"mobilenet_v2": {{"min_replicas": {ceiling + 1}}}}}')


def test_terraform_refuses_autoscaling_for_a_model_it_does_not_deploy():
    with pytest.raises(TerraformError, match=r"model_autoscaling names resnet50"):
        render(autoscaling='{"resnet50": {"min_replicas": 0}}')


def test_terraform_keeps_only_the_deployments_of_the_chosen_models():
    outputs = render(("text_detector",), default_model="text_detector")
    config = yaml.safe_load(yaml.safe_load(outputs["rayservice"])["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "Model_text_detector"]
    assert app["runtime_env"]["env_vars"]["TRIGGERFISH_MODELS"] == "text_detector"
    assert app["runtime_env"]["env_vars"]["TRIGGERFISH_DEFAULT_MODEL"] == "text_detector"


def test_terraform_refuses_a_model_without_sizing_in_the_manifest():
    with pytest.raises(TerraformError, match=r"no deployments entry for Model_resnet50"):
        render(("mobilenet_v2", "resnet50"))


def test_terraform_refuses_a_default_model_that_is_not_deployed():
    with pytest.raises(TerraformError, match=r"default_model \(mobilenet_v2\) must be one of"):
        render(("text_detector",))


def _build(app, tmp_path, monkeypatch, with_models):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    repo = tmp_path / "repo"
    repo.mkdir()
    if with_models:
        for model in app["runtime_env"]["env_vars"]["TRIGGERFISH_MODELS"].split(","):
            (repo / model / "1").mkdir(parents=True)
            (repo / model / "1" / "config.yaml").write_text("")
    for name, value in app["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(repo))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE", "")
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    module_name, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    application = call_user_app_builder_with_args_if_necessary(builder, app.get("args", {}))
    return build_app(application, name=app["name"])


def test_the_code_builds_exactly_the_configured_deployments(app, tmp_path, monkeypatch):
    """Serve refuses a config naming a deployment the application does not have, and gives a
    deployment the config does not name the code's single-machine sizing (no GPU): build the
    application from serve/app.py with the environment the RayService sets, without a Ray
    cluster, and compare."""
    built = _build(app, tmp_path, monkeypatch, with_models=True)
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}
    assert built.ingress_deployment_name == "Ingress"


def test_the_application_builds_before_any_model_is_uploaded(app, tmp_path, monkeypatch):
    """The first `terraform apply` deploys the RayService whether or not the models bucket has
    been filled yet: the application must build from an empty repository."""
    built = _build(app, tmp_path, monkeypatch, with_models=False)
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}


def test_model_deployments_fit_on_the_gpu_workers(app, gpu_group):
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


def test_serve_replicas_get_the_settings_they_read(app, gpu_group):
    env = app["runtime_env"]["env_vars"]
    assert set(env) == SERVE_ENV
    assert env["TRIGGERFISH_MODELS"] == "mobilenet_v2,text_detector"
    assert env["TRIGGERFISH_MODEL_REPOSITORY"] == "gs://my-project-triggerfish-models"
    assert env["TRIGGERFISH_ENGINE_CACHE"] == "gs://my-project-triggerfish-engine-cache/engines"
    assert env["TRIGGERFISH_RESULTS_BUCKET"] == "my-project-triggerfish-results"
    assert env["TRIGGERFISH_ALLOWED_BUCKETS"] == "my-project-triggerfish-images"
    assert env["TRIGGERFISH_DEFAULT_MODEL"] == "mobilenet_v2"
    assert env["TRIGGERFISH_SERVE_AUDIENCE"] == SAMPLE_VALUES["serve_audience"]
    assert env["TRIGGERFISH_ALLOWED_INVOKERS"] == SAMPLE_VALUES["allowed_invokers"]
    assert env["TRIGGERFISH_REQUEST_TIMEOUT_S"] == SAMPLE_VALUES["request_timeout_s"]
    # The sample is the footprint's value, which the root module passes (test_footprint.py).
    assert {"TRIGGERFISH_REQUEST_TIMEOUT_S": env["TRIGGERFISH_REQUEST_TIMEOUT_S"]} == (
        load_footprint().serve_environment()
    )
    mounts = gpu_group["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(env["TRIGGERFISH_ENGINE_CACHE_DIR"].startswith(m["mountPath"] + "/") for m in mounts)


def test_ray_head_state_survives_in_memorystore_over_tls(outputs, cluster):
    options = cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "rediss://10.30.0.4:6378"
    secret = _document(outputs, "redis-secret")
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "password"}
    head = cluster["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    ca = _document(outputs, "redis-ca")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "redis-ca"]
    assert env["RAY_REDIS_CA_CERT"] == f"{mount['mountPath']}/ca.pem"
    (volume,) = [v for v in head["volumes"] if v["name"] == "redis-ca"]
    assert volume["configMap"]["name"] == ca["metadata"]["name"]
    assert base64.b64decode(ca["binaryData"]["ca.pem"]).startswith(b"-----BEGIN CERTIFICATE")
    # Every CA Memorystore lists is trusted (a rotation adds one before the old one goes).
    ca_expression = re.sub(r"\s+", "", child("ray").locals["template_vars"]["redis_ca_base64"])
    assert "forcaingoogle_redis_instance.gcs.server_ca_certs" in ca_expression
    assert "server_ca_certs[0]" not in ca_expression
    redis = child("ray").resource("google_redis_instance", "gcs")
    assert redis["auth_enabled"] is True
    assert redis["transit_encryption_mode"] == "SERVER_AUTHENTICATION"


def test_a_disruption_budget_limits_voluntary_evictions_of_ray_pods(outputs):
    budget = _document(outputs, "poddisruptionbudget")
    assert budget["spec"]["maxUnavailable"] == 1
    (expression,) = budget["spec"]["selector"]["matchExpressions"]
    assert expression == {"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}


def test_gpu_workers_request_gpus_and_tolerate_the_gpu_taint(gpu_group):
    spec = gpu_group["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == SAMPLE_VALUES["gpus_per_worker"]
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


def test_head_runs_no_replicas_and_every_pod_exposes_serve_and_metrics(cluster):
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group, template in _templates(cluster).items():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8000, group
        assert ports["metrics"] == 8080, group


def test_pods_use_the_workload_identity_service_account(outputs, cluster):
    sa = _document(outputs, "serviceaccount")
    assert (
        sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == SAMPLE_VALUES["serve_gsa_email"]
    )
    for group, template in _templates(cluster).items():
        assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"], group


def test_network_policy_admits_only_the_functions_on_the_serve_port(outputs):
    policy = _document(outputs, "networkpolicy")
    (from_vpc,) = [
        rule for rule in policy["spec"]["ingress"] if any("ipBlock" in p for p in rule["from"])
    ]
    assert [p["ipBlock"]["cidr"] for p in from_vpc["from"]] == [SAMPLE_VALUES["connector_cidr"]]
    assert from_vpc["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_network_policy_lets_managed_prometheus_scrape_the_metrics_port(outputs):
    policy = _document(outputs, "networkpolicy")
    (scrape,) = [
        rule
        for rule in policy["spec"]["ingress"]
        if any(
            p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            == "gmp-system"
            for p in rule["from"]
        )
    ]
    assert scrape["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_pod_monitoring_scrapes_the_ray_metrics_port():
    text = _raw("podmonitoring.yaml")
    monitoring = yaml.safe_load(
        text.replace("${namespace}", "triggerfish").replace("${scrape_interval}", "30s")
    )
    assert monitoring["apiVersion"] == "monitoring.googleapis.com/v1"
    assert monitoring["kind"] == "PodMonitoring"
    assert monitoring["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
    (expression,) = monitoring["spec"]["selector"]["matchExpressions"]
    assert expression["key"] == "ray.io/node-type"
    assert set(expression["values"]) == {"head", "worker"}
