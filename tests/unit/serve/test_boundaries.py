"""The ingress side takes the model replicas' answers from ``serve.model.answers`` only:
the model deployment's module (its loaders, repository and version watcher) stays out of it."""

from __future__ import annotations

import ast
from pathlib import Path

import serve

HTTP = Path(serve.__file__).parent / "http"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_ingress_modules_do_not_import_the_model_deployment() -> None:
    modules = sorted(HTTP.glob("*.py"))
    assert len(modules) > 10, modules  # the ingress's modules were found
    crossing = {p.name: sorted(m for m in _imports(p) if m.startswith("serve.model.model_server")) for p in modules}
    assert {name: found for name, found in crossing.items() if found} == {}
    assert any("serve.model.answers" in _imports(p) for p in modules)
