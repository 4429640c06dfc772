"""infra/packaging/package_functions.py: a reproducible, deployable Cloud Functions source zip."""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from infra.packaging import package_functions
from infra.packaging.package_functions import (
    RUNTIME_REQUIREMENTS,
    build_archive,
    main,
    requirements_txt,
)

REPO_ROOT = Path(__file__).resolve().parents[4]

PYPROJECT = """\
[project]
name = "demo"
dependencies = [
  "pydantic>=2.7",
  "httpx>=0.27",
  "aiohttp>=3.9",
  "numpy>=1.26",
  "functions-framework>=3.5",
  "google-cloud-storage>=2.16",
  "Cloudevents>=1.10",
  "ray[serve]>=2.30",
]
"""


@pytest.fixture
def fake_repo(tmp_path):
    """A minimal repository with compiled leftovers the archive must not carry."""
    repo = tmp_path / "repo"
    (repo / "functions" / "__pycache__").mkdir(parents=True)
    (repo / "shared" / "sub").mkdir(parents=True)
    (repo / "functions" / "__init__.py").write_text("")
    (repo / "functions" / "main.py").write_text(
        "__all__ = ['on_request']\n\ndef on_request(event):\n    return None\n"
    )
    (repo / "functions" / "_helpers.py").write_text("X = 1\n")
    (repo / "functions" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\x00compiled")
    (repo / "functions" / "stale.pyc").write_bytes(b"\x00compiled")
    (repo / "shared" / "__init__.py").write_text("")
    (repo / "shared" / "config.py").write_text("Y = 2\n")
    (repo / "shared" / "sub" / "__init__.py").write_text("")
    (repo / "pyproject.toml").write_text(PYPROJECT)
    return repo


def _names(path):
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_archive_has_main_at_the_root_and_both_packages(fake_repo, tmp_path):
    archive = build_archive(tmp_path / "out" / "functions-source.zip", fake_repo)
    assert _names(archive.path) == [
        "functions/__init__.py",
        "functions/_helpers.py",
        "functions/main.py",
        "main.py",
        "requirements.txt",
        "shared/__init__.py",
        "shared/config.py",
        "shared/sub/__init__.py",
    ]


def test_root_main_re_exports_the_functions_handlers(fake_repo, tmp_path):
    archive = build_archive(tmp_path / "fs.zip", fake_repo)
    with zipfile.ZipFile(archive.path) as zf:
        source = zf.read("main.py").decode()
        assert zf.read("functions/main.py") == (fake_repo / "functions" / "main.py").read_bytes()
    tree = ast.parse(source)
    (star,) = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert star.module == "functions.main"
    assert [alias.name for alias in star.names] == ["*"]


def test_same_tree_gives_the_same_bytes(fake_repo, tmp_path):
    first = build_archive(tmp_path / "a.zip", fake_repo)
    # Modification times must not matter.
    os.utime(fake_repo / "shared" / "config.py", (1_900_000_000, 1_900_000_000))
    second = build_archive(tmp_path / "b.zip", fake_repo)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()


def test_a_code_change_changes_the_hash(fake_repo, tmp_path):
    before = build_archive(tmp_path / "a.zip", fake_repo)
    (fake_repo / "shared" / "config.py").write_text("Y = 3\n")
    after = build_archive(tmp_path / "b.zip", fake_repo)
    assert before.sha256 != after.sha256


def test_entries_have_fixed_timestamps_and_modes(fake_repo, tmp_path):
    archive = build_archive(tmp_path / "fs.zip", fake_repo)
    with zipfile.ZipFile(archive.path) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_requirements_carry_the_pyproject_ranges(fake_repo):
    lines = requirements_txt(fake_repo / "pyproject.toml").splitlines()
    assert lines == [
        "Cloudevents>=1.10",
        "aiohttp>=3.9",
        "functions-framework>=3.5",
        "google-cloud-storage>=2.16",
        "httpx>=0.27",
        "pydantic>=2.7",
    ]


def test_requirements_fall_back_to_bare_names(tmp_path):
    assert requirements_txt(tmp_path / "missing.toml").splitlines() == sorted(RUNTIME_REQUIREMENTS)


def test_missing_entry_module_is_an_error(fake_repo, tmp_path, capsys):
    (fake_repo / "functions" / "main.py").unlink()
    assert main(["--out", str(tmp_path / "fs.zip"), "--repo-root", str(fake_repo)]) == 1
    assert "functions/main.py does not exist" in capsys.readouterr().err
    assert not (tmp_path / "fs.zip").exists()


def test_cli_prints_the_path_and_sha256(fake_repo, tmp_path, capsys):
    out = tmp_path / "build" / "functions-source.zip"
    assert main(["--out", str(out), "--repo-root", str(fake_repo)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(out), f"sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}"]


def test_module_runs_as_a_script(tmp_path):
    out = tmp_path / "functions-source.zip"
    result = subprocess.run(
        [sys.executable, "-m", "infra.packaging.package_functions", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == f"sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}"


# --- the real functions/ and shared/ -------------------------------------------


@pytest.fixture(scope="module")
def real_archive(tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("pkg") / "functions-source.zip")


def _distribution_closure(requirements):
    """Distributions installed by ``requirements``, with their dependencies."""
    seen: set[str] = set()
    todo = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo.extend(
            re.split(r"[<>=!~\[; (]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r
        )
    return seen


def _provided_modules(dists):
    """Dotted names of the modules and regular packages the installed ``dists`` ship.

    Only names backed by a file (``x.py``, ``x/__init__.py``, an extension module):
    a namespace package such as ``google`` or ``google.cloud`` provides nothing itself.
    """
    modules: set[str] = set()
    for dist in dists:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.suffix not in (".py", ".pyi", ".so", ".pyd") or ".." in file.parts:
                continue
            parts = [*file.parts[:-1], file.name.split(".", 1)[0]]
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                modules.add(".".join(parts))
    return modules


def _uncovered_imports(sources, requirements):
    """Imports in ``sources`` (file name -> Python source) that ``requirements`` do not install."""
    provided = _distribution_closure(requirements)
    packages_of = importlib.metadata.packages_distributions()
    provided_modules = _provided_modules(provided)
    local = {name.split("/")[0].removesuffix(".py") for name in sources}
    missing: dict[str, list[str]] = {}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imports = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imports = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, imported in imports:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                if top == "google":
                    # A namespace shared by many distributions: what must be provided is the
                    # module itself (``from google.cloud import storage`` needs google.cloud.storage).
                    wanted = [f"{module}.{imported}", module] if imported else [module]
                    covered = any(w in provided_modules for w in wanted)
                else:
                    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in packages_of.get(top, [])}
                    covered = bool(dists & provided)
                if not covered:
                    missing.setdefault(f"{module}.{imported}" if imported else module, []).append(name)
    return missing


def test_every_import_in_the_archive_is_provided(real_archive):
    """A module imported by functions/ or shared/ but missing from requirements.txt would
    only fail after deployment; catch it here."""
    with zipfile.ZipFile(real_archive.path) as zf:
        requirements = zf.read("requirements.txt").decode().split()
        sources = {n: zf.read(n).decode() for n in zf.namelist() if n.endswith(".py")}
    missing = _uncovered_imports(sources, requirements)
    assert not missing, f"imports not covered by requirements.txt: {missing}"


@pytest.mark.parametrize(
    "source",
    [
        "from google.cloud import pubsub_v1",  # installed here, but not a function requirement
        "import google.cloud.pubsub_v1",
        "from google.cloud.pubsub_v1 import PublisherClient",
        "from google.cloud import bigquery",  # not installed at all
        "import google.protobuf_nonexistent",
    ],
)
def test_the_import_check_flags_a_google_module_the_requirements_do_not_provide(source):
    requirements = [f"{name}>=0" for name in RUNTIME_REQUIREMENTS]

    missing = _uncovered_imports({"shared/x.py": source}, requirements)

    assert list(missing.values()) == [["shared/x.py"]], missing


@pytest.mark.parametrize(
    "source",
    [
        "from google.cloud import storage",
        "import google.auth",
        "from google.auth.transport import requests",
        "from google.cloud.storage import Blob",
        "from google.api_core import exceptions",
    ],
)
def test_the_import_check_accepts_google_modules_the_requirements_provide(source):
    requirements = [f"{name}>=0" for name in RUNTIME_REQUIREMENTS]
    assert _uncovered_imports({"shared/x.py": source}, requirements) == {}


_SERVE_PUSH = textwrap.dedent(
    """
    import json, sys
    from functions_framework import create_app

    target, body = sys.argv[1], json.loads(sys.argv[2])
    app = create_app(target=target, source="main.py")
    response = app.test_client().post(
        "/projects/demo/topics/demo-topic", json=body, headers={"Content-Type": "application/json"}
    )
    print(response.status_code)
    """
)


def _push(extracted: Path, target: str, data: bytes, attributes: dict[str, str]) -> tuple[int, str]:
    """Deliver a raw Pub/Sub push body to ``target`` loaded from the extracted archive."""
    body = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": "1234",
            "publishTime": "2024-01-01T00:00:00Z",
        },
        "subscription": "projects/demo/subscriptions/demo-push",
    }
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIGGERFISH_", "PYTHON", "STORAGE_EMULATOR"))
    }
    env.update(
        {
            "TRIGGERFISH_SERVE_URL": "http://127.0.0.1:9",  # nothing listens: Serve is "down"
            "TRIGGERFISH_ALLOWED_BUCKETS": "demo-images",
            "TRIGGERFISH_RESULTS_BUCKET": "demo-results",
            "TRIGGERFISH_REQUEST_TIMEOUT_S": "2",
            "GOOGLE_CLOUD_PROJECT": "demo",
        }
    )
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_PUSH, target, json.dumps(body)],
        cwd=extracted,  # sys.path[0] is the archive's root, as on Cloud Functions
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def extracted(real_archive, tmp_path_factory):
    root = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(real_archive.path) as zf:
        zf.extractall(root)
    return root


def test_push_delivery_of_a_non_finalize_notification_is_acknowledged(extracted):
    """Raw push body -> functions-framework CloudEvent -> on_upload -> 2xx (ack)."""
    status, _ = _push(
        extracted, "on_upload", b"{}", {"eventType": "OBJECT_DELETE", "bucketId": "demo-images"}
    )
    assert status == 200


def test_push_delivery_fails_while_serve_is_down_so_pubsub_retries(extracted):
    """Transient failure -> the function raises -> 500 -> redelivery with backoff, then dead letter."""
    data = json.dumps({"uri": "gs://demo-images/cat.jpg"}).encode()
    status, log = _push(extracted, "on_request", data, {})
    assert status == 500
    assert "TransientError" in log


def test_packaging_module_exports_its_surface():
    assert set(package_functions.__all__) == {
        "RUNTIME_REQUIREMENTS",
        "Archive",
        "build_archive",
        "collect_sources",
        "main",
        "requirements_txt",
    }
