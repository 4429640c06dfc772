"""Module layout and reference integrity: an offline stand-in for `terraform validate`."""

from __future__ import annotations

import re

import pytest

from tests.terraform._hcl import TF_ROOT, all_modules, load_module, module_dirs

REQUIRED_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
META_ARGUMENTS = {"source", "version", "providers", "depends_on", "count", "for_each"}
PROVIDER_OF_PREFIX = {"google": "google", "helm": "helm", "kubectl": "kubectl", "time": "time"}

MODULES = [TF_ROOT, *module_dirs()]
IDS = [p.name for p in MODULES]


def test_the_expected_modules_exist():
    assert {p.name for p in module_dirs()} == {
        "functions",
        "gke",
        "monitoring",
        "network",
        "pubsub",
        "ray",
        "ray-manifests",
        "results-bigquery",
        "storage",
    }


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_module_has_the_standard_files(path):
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    assert not missing, f"{path} lacks {missing}"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_every_variable_is_typed_and_described(path):
    module = load_module(path)
    assert module.variables, f"{path} declares no variables"
    for name, body in module.variables.items():
        assert body.get("type"), f"{path.name}: variable {name} has no type"
        assert str(body.get("description", "")).strip(), (
            f"{path.name}: variable {name} has no description"
        )


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_every_output_is_described(path):
    module = load_module(path)
    assert module.outputs, f"{path} declares no outputs"
    for name, body in module.outputs.items():
        assert str(body.get("description", "")).strip(), (
            f"{path.name}: output {name} has no description"
        )


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_versions_pin_terraform_and_every_provider_used(path):
    module = load_module(path)
    (settings,) = module.terraform
    assert settings["required_version"].startswith(">="), settings
    required = settings["required_providers"][0]
    used = {
        body.get("provider") or PROVIDER_OF_PREFIX[rtype.split("_", 1)[0]]
        for rtype, _, body in module.iter_resources()
    }
    used |= {PROVIDER_OF_PREFIX[dtype.split("_", 1)[0]] for dtype in module.data}
    for provider in used:
        assert provider in required, f"{path.name} uses provider {provider} without requiring it"
        assert required[provider].get("version"), (
            f"{path.name}: provider {provider} is not version-pinned"
        )


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_references_resolve_within_the_module(path):
    module = load_module(path)
    code = re.sub(r"(?m)^\s*(#|//).*$", "", module.text)  # comments may mention anything
    for name in set(re.findall(r"\bvar\.([a-z0-9_]+)", code)):
        assert name in module.variables, f"{path.name}: var.{name} is not declared"
    for name in set(re.findall(r"\blocal\.([a-z0-9_]+)", code)):
        assert name in module.locals, f"{path.name}: local.{name} is not declared"
    for rtype, name in set(
        re.findall(r"\b(google_[a-z0-9_]+|helm_[a-z_]+|kubectl_[a-z_]+)\.([a-z0-9_]+)\b", code)
    ):
        if rtype in module.resources:
            assert name in module.resources[rtype], f"{path.name}: {rtype}.{name} is not declared"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_module_calls_match_the_called_modules_interfaces(path):
    caller = load_module(path)
    for call_name, call in caller.module_calls.items():
        called = load_module((path / call["source"]).resolve())
        passed = set(call) - META_ARGUMENTS
        unknown = passed - set(called.variables)
        assert not unknown, (
            f"{path.name}: module {call_name} gets arguments it does not declare: {sorted(unknown)}"
        )
        required = {name for name, body in called.variables.items() if "default" not in body}
        missing = required - passed
        assert not missing, (
            f"{path.name}: module {call_name} is missing required arguments {sorted(missing)}"
        )


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_modules_use_only_outputs_the_called_modules_declare(path):
    caller = load_module(path)
    sources = {
        name: (path / call["source"]).resolve() for name, call in caller.module_calls.items()
    }
    for module_name, output in set(
        re.findall(r"\bmodule\.([a-z0-9_]+)\.([a-z0-9_]+)", caller.text)
    ):
        assert module_name in sources, f"{path.name}: module.{module_name} is not called"
        assert output in load_module(sources[module_name]).outputs, (
            f"{path.name}: module.{module_name}.{output} does not exist"
        )


def test_modules_use_for_each_rather_than_count():
    for module in all_modules():
        for rtype, name, body in module.iter_resources():
            assert "count" not in body, (
                f"{module.path.name}: {rtype}.{name} uses count; use for_each over objects"
            )


def test_the_manifest_renderer_needs_no_provider():
    """modules/ray-manifests is evaluated offline by the tests; a provider would need a download."""
    module = load_module(TF_ROOT / "modules" / "ray-manifests")
    assert not module.resources and not module.data
    (settings,) = module.terraform
    assert settings["required_providers"] == [{}]
