"""One local stack (real Pub/Sub emulator, fake-gcs-server, Ray Serve, ONNX Runtime)
shared by the integration tests of a session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from infra.local.client import StackClient
from infra.local.processes import pid_alive
from infra.local.stack import LocalStack, StackOptions, StackState

SAMPLES = Path(__file__).resolve().parents[2] / "infra" / "samples"
# Small enough that a test can exceed it quickly, large enough for every sample photo.
MAX_IMAGE_BYTES = 2_000_000
# A source bucket Serve reads from but whose uploads the stack does not notify (outside the
# uploads subscription's filter): a test that delivers an object's notification itself
# then has no second delivery of it racing its own.
QUIET_BUCKET = "triggerfish-quiet"


@contextlib.contextmanager
def running_stack(options: StackOptions, models: Sequence[str] = ("mobilenet_v2",)) -> Iterator[StackState]:
    """A local stack started with ``options``, stopped after, and checked to leave no process
    behind; a missing exported model fails the test with how to make it."""
    missing = [m for m in models if not (options.model_repository / m).is_dir()]
    if missing:
        pytest.fail(f"{options.model_repository} lacks {missing}: run `make model` first")
    local = LocalStack(options)
    state = local.start()
    try:
        yield state
    finally:
        groups = dict(state.process_groups)
        local.stop()
    left = [name for name, pgid in groups.items() if pid_alive(pgid)]
    assert not left, f"processes still running after stop: {left}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    options = StackOptions(
        state_dir=tmp_path_factory.mktemp("stack"),
        extra_env={
            "TRIGGERFISH_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{QUIET_BUCKET}",
            "TRIGGERFISH_REPOSITORY_POLL_S": "2",
        },
    )
    with running_stack(options) as state:
        yield state


@pytest.fixture(scope="session")
def client(stack: StackState) -> StackClient:
    return StackClient(stack)
