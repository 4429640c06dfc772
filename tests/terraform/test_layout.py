"""Module layout and reference integrity: an offline stand-in for `terraform validate`."""

from __future__ import annotations

import re

import pytest

from tests.terraform._hcl import TF_ROOT, all_modules, load_module, module_dirs, root

REQUIRED_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
META_ARGUMENTS = {"source", "version", "providers", "depends_on", "count", "for_each"}
PROVIDER_OF_PREFIX = {"google": "google", "helm": "helm", "kubectl": "kubectl"}

MODULES = [TF_ROOT, *module_dirs()]
IDS = [p.name for p in MODULES]


def test_the_expected_modules_exist():
    assert {p.name for p in module_dirs()} == {
        "functions",
        "gke",
        "network",
        "pubsub",
        "ray",
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
    used = {rtype.split("_", 1)[0] for rtype, _, _ in module.iter_resources()}
    used |= {dtype.split("_", 1)[0] for dtype in module.data}
    for prefix in used:
        provider = PROVIDER_OF_PREFIX[prefix]
        assert provider in required, (
            f"{path.name} uses {prefix}_* without requiring provider {provider}"
        )
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


def test_root_module_calls_match_the_child_modules_interfaces():
    top = root()
    for call_name, call in top.module_calls.items():
        child_path = (TF_ROOT / call["source"]).resolve()
        child = load_module(child_path)
        passed = set(call) - META_ARGUMENTS
        unknown = passed - set(child.variables)
        assert not unknown, (
            f"module {call_name} gets arguments it does not declare: {sorted(unknown)}"
        )
        required = {name for name, body in child.variables.items() if "default" not in body}
        missing = required - passed
        assert not missing, f"module {call_name} is missing required arguments {sorted(missing)}"


def test_root_uses_only_outputs_the_modules_declare():
    top = root()
    sources = {
        name: (TF_ROOT / call["source"]).resolve() for name, call in top.module_calls.items()
    }
    for module_name, output in set(re.findall(r"\bmodule\.([a-z0-9_]+)\.([a-z0-9_]+)", top.text)):
        assert module_name in sources, f"module.{module_name} is not called"
        assert output in load_module(sources[module_name]).outputs, (
            f"module.{module_name}.{output} does not exist"
        )


def test_modules_use_for_each_rather_than_count():
    for module in all_modules():
        for rtype, name, body in module.iter_resources():
            assert "count" not in body, (
                f"{module.path.name}: {rtype}.{name} uses count; use for_each over objects"
            )
