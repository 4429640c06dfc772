"""The README and docs/ as written: every shell command in them can run, and every link resolves.

Commands are the lines of ``sh`` blocks and the ``$ `` lines of transcripts. Each is checked
without side effects: ``triggerfish`` subcommands and flags against the real argument parser,
``make`` targets against the Makefile, ``python -m`` modules and the repository paths a command
names against the tree, and ``gcloud`` against the command groups tried on the emulators. The
cheap ones (``triggerfish --help``, ``triggerfish env``, ``make help``) are run for real.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.cli.main import _parser
from infra.local.stack import StackState

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# Top-level folders: a command or a code span naming a path under one of them names a file that
# must exist (``build/`` is made by make).
TREE = ("functions", "serve", "shared", "infra", "tests", "terraform", "requirements", "docs")
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-bench/bin/python"}
# Programs the docs may use, beyond triggerfish, make and the Pythons (checked more closely).
TOOLS = {"curl", "terraform", "docker", "source", "cd", "pgrep", "apt-get", "pip", "prometheus", ".venv/bin/py-spy"}
# gcloud command groups run against the emulators (tests/integration/test_gcloud.py) or needed to log in.
GCLOUD = {
    ("storage", "cp"), ("storage", "rsync"), ("storage", "cat"), ("storage", "ls"), ("storage", "objects"), ("storage", "buckets"),
    ("pubsub", "topics"), ("pubsub", "subscriptions"), ("auth", "application-default"),
}  # fmt: skip
# Commands run for real by this test; each must appear in the docs.
CHEAP = ("triggerfish --help", 'eval "$(triggerfish env)"', 'eval "$(triggerfish env --unset)"', "make help")


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.text}"


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Fenced code blocks: (language, line of the first body line, body lines)."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number + 1, []
            else:
                blocks.append((lang, start, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _closed(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def _block_commands(doc: Path, lang: str, start: int, body: list[str]) -> list[Command]:
    """The commands of one block: every line of an ``sh`` block, the ``$ `` lines of a transcript."""
    if lang not in ("sh", ""):
        return []
    found, i = [], 0
    while i < len(body):
        first, line = i, body[i]
        i += 1
        if lang == "" and not line.startswith("$ "):
            continue
        text = line.removeprefix("$ ")
        # A command goes on over a trailing backslash and inside an open quotation.
        while i < len(body) and (text.endswith("\\") or not _closed(text)):
            text, i = (text[:-1] + " " if text.endswith("\\") else text + "\n") + body[i].strip(), i + 1
        if text.strip() and not text.lstrip().startswith("#"):
            found.append(Command(doc, start + first, text.strip()))
    return found


ALL_COMMANDS = [c for doc in DOCS for block in _blocks(doc.read_text()) for c in _block_commands(doc, *block)]


def _simple_commands(text: str) -> list[list[str]]:
    """Split at ``&&``, ``||``, ``|``, ``;`` and ``&``; drop comments and redirections."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands, current, tokens = [], [], list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in {";", "&", "&&", "|", "||"}:
            commands.append(current)
            current = []
        elif token in {">", ">>", "<", "2>"}:
            i += 1  # and its target
        else:
            current.append(token)
        i += 1
    commands.append(current)
    return [c for c in commands if c]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(.*)$", text, re.M))

    def expand(value: str) -> str:
        for _ in range(5):
            value = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
        return value

    return {expand(t) for t in re.findall(r"^([^\s:#=][^:=]*):(?!=)", text, re.M)}


def _module_exists(module: str) -> bool:
    base = ROOT / module.replace(".", "/")
    if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
        return True
    return module.split(".")[0] not in TREE and importlib.util.find_spec(module) is not None


def _check_paths(tokens: list[str], cwd: Path) -> list[str]:
    """Repository paths named by a command (also as ``--flag=path`` or curl's ``@path``) must exist."""
    problems = []
    for token in tokens:
        for candidate in {token, token.split("=", 1)[-1], token.removeprefix("@")}:
            if any(ch in candidate for ch in "*<>$") or "://" in candidate:
                continue
            path = (cwd / candidate).resolve()
            try:
                relative = path.relative_to(ROOT)
            except ValueError:
                continue
            if relative.parts and relative.parts[0] in TREE and "/" in candidate and not path.exists():
                problems.append(f"{candidate} does not exist")
    return problems


def _check_triggerfish(args: list[str]) -> list[str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return [f"triggerfish {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}"]
    return []


def _check_make(args: list[str]) -> list[str]:
    targets = _make_targets()
    return [f"make {t}: no such target" for t in args if not t.startswith("-") and t not in targets]


def _check_python(args: list[str], cwd: Path) -> list[str]:
    if args[:1] == ["-m"]:
        return [] if _module_exists(args[1]) else [f"python -m {args[1]}: no such module"]
    if args and args[0] != "-c" and not (cwd / args[0]).is_file():
        return [f"python {args[0]}: no such script"]
    return []


def _check_gcloud(args: list[str]) -> list[str]:
    words = tuple(a for a in args if not a.startswith("-"))[:2]
    return [] if words in GCLOUD else [f"gcloud {' '.join(words)}: not a command group tried against the emulators"]


def _check_eval(args: list[str], cwd: Path) -> list[str]:
    inner = re.fullmatch(r"\$\((.*)\)", " ".join(args))
    if not inner:
        return [f"eval of something other than $(...): {args}"]
    return [p for simple in _simple_commands(inner.group(1)) for p in _check_simple(simple, cwd)[0]]


def _check_simple(tokens: list[str], cwd: Path) -> tuple[list[str], Path]:
    """Problems with one simple command, and the folder the next command runs in."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the program
    program, args = tokens[0], tokens[1:]
    problems = _check_paths(args, cwd)
    if program == "cd":
        target = (cwd / args[0]).resolve()
        return problems + ([] if target.is_dir() else [f"cd {args[0]}: no such folder"]), target
    checks = {
        "eval": lambda: _check_eval(args, cwd), "triggerfish": lambda: _check_triggerfish(args),
        "make": lambda: _check_make(args), "gcloud": lambda: _check_gcloud(args),
        **{python: (lambda: _check_python(args, cwd)) for python in PYTHONS},
    }  # fmt: skip
    if program in checks:
        problems += checks[program]()
    elif program not in TOOLS:
        problems.append(f"{program}: not a program the docs may use (add it to TOOLS if it should be)")
    return problems, cwd


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_names_real_subcommands_targets_modules_and_files(doc: Path) -> None:
    problems = []
    for block in _blocks(doc.read_text()):
        cwd = ROOT  # ``cd`` holds within one block
        for command in _block_commands(doc, *block):
            for simple in _simple_commands(command.text):
                found, cwd = _check_simple(simple, cwd)
                problems += [f"{command}\n    {p}" for p in found]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_wrong_flag_a_missing_target_module_and_file() -> None:
    wrong = [
        "triggerfish upload infra/samples/cat.jpg --wiat",
        "make benchmark",
        "python -m infra.bench.nothing",
        "triggerfish upload infra/samples/dog.jpg",
        "gcloud functions deploy x",
    ]
    for text in wrong:
        problems = [p for simple in _simple_commands(text) for p in _check_simple(simple, ROOT)[0]]
        assert problems, text


@pytest.fixture
def running_stack_state(tmp_path: Path) -> Path:
    """A stack state whose supervisor is this test's process, so ``triggerfish env`` reads it."""
    StackState(
        project="triggerfish-local", pubsub_host="127.0.0.1:8085", storage_host="http://127.0.0.1:4443",
        serve_url="http://127.0.0.1:8000", request_function_url="", upload_function_url="",
        images_bucket="triggerfish-images", results_bucket="triggerfish-results", models_bucket="m",
        requests_topic="triggerfish-requests", uploads_topic="u", dead_letter_topic="d",
        default_model="mobilenet_v2", supervisor_pid=os.getpid(),
    ).save(tmp_path)  # fmt: skip
    return tmp_path


@pytest.mark.parametrize("cheap", CHEAP)
def test_the_cheap_commands_run_as_written(cheap: str, running_stack_state: Path) -> None:
    assert any(cheap in c.text for c in ALL_COMMANDS), f"{cheap!r} is no longer in the docs"
    # ``triggerfish`` as this checkout's CLI, whatever the installed console script points at.
    script = f'triggerfish() {{ {shlex.quote(sys.executable)} -m infra.cli.main "$@"; }}\nset -e\n{cheap}\n'
    env = {**os.environ, "TRIGGERFISH_STATE_DIR": str(running_stack_state)}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{cheap}: {done.stderr[-2000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text, anchors, fenced = doc.read_text(), set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"#+\s+(.*)", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


def _prose(doc: Path) -> str:
    """The text outside code blocks."""
    lines, fenced = [], False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_docs_resolve(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_the_prose_names_exist(doc: Path) -> None:
    spans = re.findall(r"`([^`\s]+)`", _prose(doc))
    missing = [
        span for span in spans
        if span.split("/")[0] in TREE and "/" in span and not any(ch in span for ch in "<>*$:")
        and not (ROOT / span.rstrip("/")).exists()
    ]  # fmt: skip
    assert not missing, missing


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, the front door at most {README_MAX_LINES}"
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", "\n".join(lines)))
    assert linked == {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}, linked
