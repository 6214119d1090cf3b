"""ark-server's watch: each way a run stops moving is told apart, and a moving run is left be.

Real processes and a real HTTP health endpoint stand in for the SuperLink's; the deployment
test (test_deploy_liveness.py) freezes a real SuperLink.
"""

from __future__ import annotations

import http.server
import os
import ssl
import subprocess
import sys
import threading
import time

import pytest

from server.liveness import Pulse, Watch


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _watch(health, pulse, sleeper, stall_s=2.0) -> Watch:
    url = f"http://127.0.0.1:{health.server_port}/health"
    return Watch(url, ssl.create_default_context(), pulse, stall_s, {"the SuperLink": sleeper})


def test_a_moving_run_is_left_alone_and_a_stale_pulse_blames_the_serverapp(
        tmp_path, health, sleeper):
    pulse = tmp_path / "serverapp.pulse"
    watch = _watch(health, pulse, sleeper)
    assert watch.check() is None  # not started yet: no pulse
    Pulse(pulse).beat()
    assert watch.check() is None
    past = time.time() - 5
    os.utime(pulse, (past, past))
    assert watch.check() is None  # beaten before this watch began: a previous run's
    watch.started = past - 1  # this run's ServerApp beat, then went quiet for 5 s > 2 s
    reason = watch.check()
    assert reason and reason.startswith("the ServerApp is running but has made no call")


def test_an_unanswering_superlink_is_named_not_the_serverapp_waiting_on_it(
        tmp_path, health, sleeper):
    pulse = tmp_path / "serverapp.pulse"
    watch = _watch(health, pulse, sleeper, stall_s=1.0)
    Pulse(pulse).beat()
    assert watch.check() is None
    health.shutdown()
    health.server_close()
    assert watch.check() is None  # within stall_s
    time.sleep(1.2)
    old = time.time() - 60
    os.utime(pulse, (old, old))
    watch.started = old - 1
    reason = watch.check()
    assert reason and reason.startswith("the SuperLink is running but has not answered")


def test_an_exited_process_is_reported_at_once(tmp_path, health, sleeper):
    watch = _watch(health, tmp_path / "serverapp.pulse", sleeper)
    sleeper.kill()
    sleeper.wait()
    assert watch.check() == f"the SuperLink exited (code {sleeper.returncode})"


def test_the_pulse_is_touched_at_most_once_per_interval(tmp_path):
    path = tmp_path / "pulse"
    pulse = Pulse(path, every_s=60)
    pulse.beat()
    first = path.stat().st_mtime_ns
    os.utime(path, ns=(first - 10**9, first - 10**9))
    pulse.beat()  # within the interval: not touched again
    assert path.stat().st_mtime_ns == first - 10**9
