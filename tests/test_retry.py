"""SuperLink calls that fail now and then: the run goes on and ends exactly as without faults.

The real ServerApp loop and ClientApp over the in-process grid; the faults are injected
where a deployment meets them, at the Grid's calls to the SuperLink: HTTP 500 (a locked
SQLite state) and dropped connections, before the SuperLink did the work, as a failed
request leaves it.
"""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
import types

import httpx
import pytest
import torch
from fed_helpers import write_sim
from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from server.retry import RetryingGrid, shield_heartbeat, transient
from simulations.inprocess import InProcessGrid

torch.set_num_threads(1)


def _http(code: int) -> httpx.HTTPStatusError:
    req = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
    return httpx.HTTPStatusError(f"HTTP {code}", request=req, response=httpx.Response(code, request=req))


class FlakyGrid(InProcessGrid):
    """Fails a share of calls (seeded) before they reach the nodes."""

    def __init__(self, *args, fail: float, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail, self.rng, self.failed = fail, random.Random(seed), 0

    def _maybe_fail(self) -> None:
        if self.rng.random() < self.fail:
            self.failed += 1
            raise _http(500) if self.rng.random() < 0.7 else httpx.ReadError("connection reset")

    def get_node_ids(self):
        self._maybe_fail()
        return super().get_node_ids()

    def push_messages(self, messages):
        self._maybe_fail()
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        self._maybe_fail()
        return super().pull_messages(message_ids)


def _run(tmp_path, grid_cls, **kw):
    tmp_path.mkdir()
    rc = write_sim(tmp_path, rounds=2, evaluate_every=2)
    cfg, run_dir = federation_from_run_config(rc)
    grid = RetryingGrid(grid_cls(client_app, 2, rc, **kw), base_s=0.001, cap_s=0.01, seed=0)
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(grid)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, grid, lines


def test_a_run_with_failing_superlink_calls_ends_as_a_clean_one(tmp_path):
    clean_dir, _, clean_lines = _run(tmp_path / "clean", InProcessGrid)
    flaky_dir, grid, lines = _run(tmp_path / "flaky", FlakyGrid, fail=0.3, seed=3)
    assert grid.grid.failed >= 5 and grid.retries == grid.grid.failed
    state = json.loads((flaky_dir / "state.json").read_text())
    assert state["finished"] and sum(r["superlink_retries"] for r in state["rounds"].values()) > 0
    # Each site's update folded once per round, and the same master as the clean run.
    trained = sorted((m["round"], m["site"]) for m in lines if m["kind"] == "train")
    assert trained == sorted((m["round"], m["site"]) for m in clean_lines if m["kind"] == "train")
    assert len(trained) == len(set(trained)) == 4
    a = load_tensors(clean_dir / "master_student.safetensors")
    b = load_tensors(flaky_dir / "master_student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Always:
    def __init__(self, exc: Exception) -> None:
        self.exc, self.calls = exc, 0

    def get_node_ids(self):
        self.calls += 1
        raise self.exc


@pytest.mark.parametrize("code", [401, 403, 404, 412])
def test_permanent_errors_are_not_retried(code):
    inner = _Always(_http(code))
    with pytest.raises(httpx.HTTPStatusError):
        RetryingGrid(inner, base_s=0.001).get_node_ids()
    assert inner.calls == 1 and not transient(inner.exc)


def test_a_lasting_failure_gives_up_after_its_time():
    inner = _Always(_http(500))
    grid = RetryingGrid(inner, give_up_s=0.3, base_s=0.01, cap_s=0.05, seed=1)
    with pytest.raises(httpx.HTTPStatusError):
        grid.get_node_ids()
    assert inner.calls > 3 and grid.retries == inner.calls - 1


class _HeartbeatEndpoint(http.server.BaseHTTPRequestHandler):
    """The SuperLink's send-task-heartbeat: 500 for the first ``fail`` calls, then success."""

    fail = 2
    calls: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        code = 500 if len(self.calls) < self.fail else 200
        self.calls.append(code)
        body = b"database is locked" if code == 500 else (
            SendTaskHeartbeatResponse(success=True).SerializeToString())
        self.send_response(code)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("shielded", [True, False])
def test_the_serverapp_heartbeat_survives_superlink_500s(shielded):
    """Flower's own heartbeat thread and HTTP client; only the SuperLink end is a stand-in."""
    _HeartbeatEndpoint.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeartbeatEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = RuntimeHttpClient(f"http://127.0.0.1:{server.server_port}")
    grid = types.SimpleNamespace(_runtime_client=client)
    if shielded:
        assert shield_heartbeat(grid) and not shield_heartbeat(grid)  # wrapped once
    sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
    try:
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 200 not in _HeartbeatEndpoint.calls:
            if not sender._thread.is_alive():
                break
            time.sleep(0.05)
        if shielded:
            assert _HeartbeatEndpoint.calls == [500, 500, 200]
            assert sender.is_running  # the thread lives on to its next beat
        else:  # what Flower does by itself: the thread ends on the first 500
            assert _HeartbeatEndpoint.calls == [500]
            assert not sender._thread.is_alive()
    finally:
        if sender.is_running:
            sender.stop()
        server.shutdown()
        server.server_close()
        client.close()
