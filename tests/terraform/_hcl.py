"""Read the Terraform configuration with python-hcl2, in a shape tests can assert on.

python-hcl2 keeps string literals quoted (``'"enforced"'``), block labels quoted
and marks blocks with ``__is_block__``; :func:`load_module` strips all of that so
a literal reads as ``"enforced"`` and an expression as ``"${var.x}"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2

REPO_ROOT = Path(__file__).resolve().parents[2]
TF_ROOT = REPO_ROOT / "terraform"
MODULES_DIR = TF_ROOT / "modules"
FOOTPRINT = REPO_ROOT / "infra" / "footprint.json"
K8S_DIR = REPO_ROOT / "infra" / "k8s"

_META = {"__is_block__", "__comments__", "__inline_comments__"}


def _unquote(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            return value[1:-1]
        return value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k not in _META}
    return value


@dataclass(frozen=True)
class Module:
    """One Terraform module directory, parsed."""

    path: Path
    resources: dict[str, dict[str, dict[str, Any]]]  # type -> name -> body
    data: dict[str, dict[str, dict[str, Any]]]
    variables: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    module_calls: dict[str, dict[str, Any]]
    locals: dict[str, Any]
    terraform: list[dict[str, Any]]
    text: str  # all .tf files concatenated, comments included

    def resource(self, rtype: str, name: str) -> dict[str, Any]:
        return self.resources[rtype][name]

    def iter_resources(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for rtype, by_name in self.resources.items():
            for name, body in by_name.items():
                yield rtype, name, body


@functools.cache
def load_module(path: Path) -> Module:
    """Parse every ``*.tf`` file of one module directory."""
    resources: dict[str, dict[str, dict[str, Any]]] = {}
    data: dict[str, dict[str, dict[str, Any]]] = {}
    variables: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    module_calls: dict[str, dict[str, Any]] = {}
    local_values: dict[str, Any] = {}
    terraform: list[dict[str, Any]] = []
    texts = []
    for tf in sorted(path.glob("*.tf")):
        text = tf.read_text()
        texts.append(text)
        doc = _unquote(hcl2.loads(text))
        for block in doc.get("resource", []):
            for rtype, by_name in block.items():
                resources.setdefault(rtype, {}).update(by_name)
        for block in doc.get("data", []):
            for dtype, by_name in block.items():
                data.setdefault(dtype, {}).update(by_name)
        for block in doc.get("variable", []):
            variables.update(block)
        for block in doc.get("output", []):
            outputs.update(block)
        for block in doc.get("module", []):
            module_calls.update(block)
        for block in doc.get("locals", []):
            local_values.update(block)
        terraform.extend(doc.get("terraform", []))
    return Module(
        path=path,
        resources=resources,
        data=data,
        variables=variables,
        outputs=outputs,
        module_calls=module_calls,
        locals=local_values,
        terraform=terraform,
        text="\n".join(texts),
    )


def root() -> Module:
    return load_module(TF_ROOT)


def module_dirs() -> list[Path]:
    return sorted(p for p in MODULES_DIR.iterdir() if p.is_dir())


def all_modules() -> list[Module]:
    return [root(), *(load_module(p) for p in module_dirs())]


def child(name: str) -> Module:
    return load_module(MODULES_DIR / name)


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The single nested block ``name`` of a resource body."""
    blocks = body.get(name)
    assert isinstance(blocks, list) and len(blocks) == 1, (
        f"expected one {name!r} block, got {blocks!r}"
    )
    return blocks[0]


def expr(value: Any) -> str:
    """Normalise an expression for substring assertions (whitespace removed)."""
    return re.sub(r"\s+", "", str(value))


def placeholders(text: str) -> set[str]:
    """Template placeholders (``${name}``) used in a manifest template."""
    return set(re.findall(r"\$\{([a-z_][a-z0-9_]*)\}", text))


def render(text: str, values: dict[str, Any]) -> str:
    """Render a manifest template like Terraform's templatefile does for plain ``${name}``."""
    missing = placeholders(text) - set(values)
    assert not missing, f"no value for placeholders {sorted(missing)}"
    return re.sub(r"\$\{([a-z_][a-z0-9_]*)\}", lambda m: str(values[m.group(1)]), text)


_FOOTPRINT_REF = re.compile(
    r"^\$\{(?:tostring\()?local\.(footprint|function_settings)((?:\.[a-z_]+)+)\)?\}$"
)


def footprint_value(expression: Any, footprint: dict[str, Any]) -> Any:
    """Evaluate a Terraform expression that only reads the footprint.

    ``${local.footprint.a.b}``, ``${local.function_settings.x}`` (the root module's alias of
    ``local.footprint.functions``) and either wrapped in ``tostring(...)``; a ``tostring`` gives
    a string, as Terraform does. Anything else is an assertion error naming the expression.
    """
    match = _FOOTPRINT_REF.match(str(expression))
    assert match, f"{expression!r} does not read the footprint"
    value: Any = footprint if match.group(1) == "footprint" else footprint["functions"]
    for part in match.group(2).strip(".").split("."):
        value = value[part]
    return str(value) if str(expression).startswith("${tostring(") else value
