"""Build the Cloud Functions source archive, byte-for-byte reproducibly.

    python -m infra.packaging.package_functions --out build/functions-source.zip

Layout of the archive (what Cloud Functions' Python buildpack expects):

- ``main.py`` at the root: a two-line module that re-exports the handlers of
  ``functions/main.py`` (Cloud Functions loads ``main.py`` from the root and
  looks the entry point up by name);
- ``functions/`` and ``shared/``: the packages, whole (``__pycache__`` and
  compiled files left out), so ``from functions._forward import ...`` and
  ``from shared... import ...`` resolve as they do locally;
- ``requirements.txt``: the runtime dependencies of the functions, with the
  version ranges declared in ``pyproject.toml``.

Every entry has a fixed timestamp and fixed permissions and entries are
sorted, so the same tree always gives the same bytes and the same sha256.
Terraform names the uploaded object after that hash: a change redeploys, no
change does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RUNTIME_REQUIREMENTS",
    "Archive",
    "build_archive",
    "collect_sources",
    "main",
    "requirements_txt",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Packages zipped whole next to ``main.py``.
PACKAGES = ("functions", "shared")

#: What the functions import at runtime (distribution names, as in pyproject).
RUNTIME_REQUIREMENTS = (
    "functions-framework",
    "aiohttp",
    "google-cloud-storage",
    "pydantic",
    "httpx",
    "cloudevents",
)

#: Root ``main.py``: Cloud Functions requires it; the code stays in ``functions/``.
ENTRY_MODULE = (
    '"""Cloud Functions entry module: the handlers live in functions/main.py."""\n'
    "\n"
    "from functions.main import *  # noqa: F403\n"
)

_FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest timestamp a zip can hold
_FILE_MODE = 0o100644  # regular file, rw-r--r--
_EXCLUDED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"})
_EXCLUDED_SUFFIXES = frozenset({".pyc", ".pyo"})
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True, slots=True)
class Archive:
    """A built archive: where it is and the sha256 of its bytes."""

    path: Path
    sha256: str


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_txt(pyproject: Path) -> str:
    """The functions' ``requirements.txt``: each runtime package with its pyproject range.

    A package that ``[project].dependencies`` does not mention is listed without a range.
    """
    declared: dict[str, str] = {}
    if pyproject.is_file():
        with pyproject.open("rb") as fh:
            dependencies = tomllib.load(fh).get("project", {}).get("dependencies", [])
        for spec in dependencies:
            match = _NAME_RE.match(spec)
            if match:
                # Extras are for the full install; the functions need the base package.
                declared[_canonical(match.group(1))] = re.sub(r"\[[^\]]*\]", "", spec).strip()
    lines = sorted(declared.get(_canonical(name), name) for name in RUNTIME_REQUIREMENTS)
    return "".join(f"{line}\n" for line in lines)


def _package_files(package_dir: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for filename in filenames:
            path = Path(dirpath, filename)
            if path.suffix not in _EXCLUDED_SUFFIXES and path.is_file():
                yield path


def collect_sources(repo_root: Path) -> dict[str, bytes]:
    """Archive entries (name -> bytes) for the functions found under ``repo_root``.

    Raises:
        FileNotFoundError: a package directory or ``functions/main.py`` is missing.
    """
    entries: dict[str, bytes] = {}
    for package in PACKAGES:
        package_dir = repo_root / package
        if not package_dir.is_dir():
            raise FileNotFoundError(f"package directory {package_dir} does not exist")
        for path in _package_files(package_dir):
            entries[path.relative_to(repo_root).as_posix()] = path.read_bytes()
    if "functions/main.py" not in entries:
        raise FileNotFoundError(f"{repo_root / 'functions' / 'main.py'} does not exist")
    entries["main.py"] = ENTRY_MODULE.encode()
    entries["requirements.txt"] = requirements_txt(repo_root / "pyproject.toml").encode()
    return entries


def _write_zip(out: Path, entries: dict[str, bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so that external_attr holds the mode
            info.external_attr = _FILE_MODE << 16
            archive.writestr(info, entries[name], compresslevel=9)
    tmp.replace(out)


def build_archive(out: Path, repo_root: Path = REPO_ROOT) -> Archive:
    """Write the functions' source zip to ``out`` and return its path and sha256."""
    _write_zip(out, collect_sources(repo_root))
    return Archive(path=out, sha256=hashlib.sha256(out.read_bytes()).hexdigest())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the archive, print its path and sha256."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.packaging.package_functions",
        description="Build the Cloud Functions source zip (functions/ + shared/ + requirements.txt).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/functions-source.zip"),
        help="where to write the zip (default: build/functions-source.zip)",
    )
    parser.add_argument(
        "--repo-root",
        type=Path,
        default=REPO_ROOT,
        help="repository holding functions/, shared/ and pyproject.toml (default: this checkout)",
    )
    args = parser.parse_args(argv)
    try:
        archive = build_archive(args.out, args.repo_root)
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"{archive.path}\nsha256:{archive.sha256}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
