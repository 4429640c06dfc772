"""The local stack runs the functions with the footprint's settings, as Terraform does."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.footprint import load_footprint
from infra.local import emulators, stack
from infra.local.processes import ManagedProcess


def test_function_env_adds_the_footprint_settings_to_the_stack_env():
    fp = load_footprint()
    env = emulators.function_env({"PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "THREADS": "4"}, fp)
    assert env["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:1"
    for name, value in fp.functions.environment().items():
        assert env[name] == value
    assert env["THREADS"] == str(fp.functions.request_concurrency)


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Run LocalStack.start with every process and emulator call recorded, none started."""
    spawned: dict[str, dict[str, str]] = {}

    def start_process(name, argv, log_dir, env, cwd=None):  # noqa: ANN001, ANN202
        spawned[name] = dict(env)
        return ManagedProcess(name=name, pid=2**22 + len(spawned), log_path=Path(log_dir))

    monkeypatch.setattr(stack, "start_process", start_process)
    monkeypatch.setattr(stack, "wait_until", lambda *args, **kwargs: None)
    monkeypatch.setattr(stack, "stop_group", lambda *args, **kwargs: None)
    for name in ("create_topics", "create_buckets", "create_push_subscriptions"):
        monkeypatch.setattr(emulators, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(emulators, "upload_tree", lambda *args, **kwargs: 0)
    (tmp_path / "models" / "mobilenet_v2").mkdir(parents=True)
    options = stack.StackOptions(state_dir=tmp_path / "state", model_repository=tmp_path / "models")
    local = stack.LocalStack(options)
    local.start()
    return spawned


def test_every_function_process_gets_the_footprint_settings(started):
    expected = load_footprint().functions.environment()
    functions = {name: env for name, env in started.items() if name.startswith("fn-")}
    assert set(functions) == {"fn-on-request", "fn-on-upload", "fn-on-bulk"}
    for name, env in functions.items():
        assert {k: env.get(k) for k in expected} == expected, name
