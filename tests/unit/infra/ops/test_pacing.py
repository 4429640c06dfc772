"""A backfill's window: halved on Serve's bulk sheds, grown by what lands, read from /v1/admission."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra.ops.pacing import ClassCounts, ServePressure, Window


def _counts(live: int = 0, bulk: int = 0, bulk_shed: int = 0) -> ClassCounts:
    return ClassCounts({"live": live, "bulk": bulk}, {"live": 0, "bulk": bulk_shed})


def test_a_bulk_shed_halves_the_window_down_to_one_message() -> None:
    window = Window(step=16, maximum=1000, start=256)
    window.observe(_counts(bulk_shed=5), landed=100, full=True)
    assert window.size == 128 and window.shed_seen == 5
    for _ in range(10):
        window.observe(_counts(bulk_shed=1), landed=0, full=True)
    assert window.size == 16


def test_landing_results_grow_a_full_window_up_to_the_maximum() -> None:
    window = Window(step=16, maximum=200)
    assert window.size == 64
    window.observe(_counts(), landed=5, full=True)
    assert window.size == 80  # at least one message more
    window.observe(_counts(), landed=100, full=True)
    assert window.size == 180
    window.observe(_counts(), landed=100, full=True)
    assert window.size == 200


def test_a_window_that_was_not_the_limit_does_not_grow() -> None:
    window = Window(step=16, maximum=1000)
    window.observe(_counts(), landed=50, full=False)
    window.observe(None, landed=0, full=True)  # Serve unreadable, nothing landed
    assert window.size == 64


def test_a_window_needs_a_step_below_its_maximum() -> None:
    with pytest.raises(ValueError, match="step=32, maximum=16"):
        Window(step=32, maximum=16)


def test_counts_since_an_earlier_look_and_after_a_replica_restart() -> None:
    earlier = _counts(live=10, bulk=100, bulk_shed=4)
    assert _counts(live=12, bulk=150, bulk_shed=9).since(earlier) == _counts(live=2, bulk=50, bulk_shed=5)
    assert _counts(live=3, bulk=7).since(earlier) == _counts(live=3, bulk=7)  # counting from zero again


class _Admission(BaseHTTPRequestHandler):
    snapshots: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps(self.snapshots.pop(0)).encode()
        self.send_response(200 if self.path == "/v1/admission" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_serve_pressure_reads_the_ingress_counts_by_class() -> None:
    def snapshot(bulk_admitted: int, bulk_shed: int) -> dict:
        return {"classes": {
            "live": {"admitted_inputs": 3, "shed_inputs": 0},
            "bulk": {"admitted_inputs": bulk_admitted, "shed_inputs": bulk_shed},
        }}  # fmt: skip

    _Admission.snapshots = [snapshot(40, 1), snapshot(90, 6)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admission)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pressure = ServePressure(f"http://127.0.0.1:{server.server_port}")
    try:
        assert pressure.look() == ClassCounts({"live": 0, "bulk": 0}, {"live": 0, "bulk": 0})
        assert pressure.look() == ClassCounts({"live": 0, "bulk": 50}, {"live": 0, "bulk": 5})
    finally:
        pressure.close()
        server.shutdown()


def test_serve_pressure_is_none_when_serve_cannot_be_reached() -> None:
    pressure = ServePressure("http://127.0.0.1:9", timeout_s=0.5)
    assert pressure.look() is None
    pressure.close()
