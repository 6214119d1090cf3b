"""The sites' port: no request target reaches anything but an allowed Fleet route.

A real gate (uvicorn, the same code ``ark-server`` runs) in front of a stand-in upstream that
records every request it receives. Known bypass forms go over raw sockets, so that bytes
no HTTP client library would send (absolute-form targets, overlong UTF-8) reach the gate as
an attacker would send them; then hypothesis sends at least 10,000 generated targets.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.procs import free_port
from server.gate import FLEET_ROUTES, HEALTH, create_app

CONTROL = "/v1/control/list-runs"


class Recorder:
    """The stand-in SuperLink: answers 200 and records (method, raw path, query)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, bytes]] = []
        self.status = 200

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        self.seen.append((scope["method"], scope["raw_path"], scope["query_string"]))
        while (await receive()).get("more_body"):
            pass
        status = self.status
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"ok\n" if status == 200 else b"no\n"})


def _serve(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def gate() -> Iterator[tuple[int, Recorder]]:
    recorder, up_port, gate_port = Recorder(), free_port(), free_port()
    servers = [_serve(recorder, up_port),
               _serve(create_app(f"http://127.0.0.1:{up_port}", False), gate_port)]
    yield gate_port, recorder
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _raw(port: int, method: str, target: bytes) -> int:
    """Send one request with ``target`` as its bytes; the status (0: connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def _allowed(method: str, target: str) -> bool:
    """The rule, stated from the Fleet API's list: exact route, right method, nothing else.

    An absolute-form target (RFC 9112 3.2.2) names the route after its scheme and authority.
    """
    for scheme in ("http://", "https://"):
        if target.startswith(scheme):
            target = "/" + target[len(scheme):].partition("/")[2]
    return (method == "POST" and target in FLEET_ROUTES) or (
        method in ("GET", "HEAD") and target == HEALTH)


BYPASSES = [
    CONTROL,
    "/v1/control/register-node",
    "/v1/control/start-run",
    "/v1/fleet/register-node",  # self-registration: not a route an authenticated node uses
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E/control/list-runs",
    "/v1/fleet/%2e%2E/control/list-runs",
    "/v1/fleet/.%2e/control/list-runs",
    "/v1/fleet/%252e%252e/control/list-runs",  # double encoding
    "/v1/fleet/..%2fcontrol%2flist-runs",
    "/v1/fleet/..%2Fcontrol/list-runs",
    "/v1/fleet%2f..%2fcontrol/list-runs",
    "/v1/fleet/..\\control\\list-runs",
    "/v1/fleet/..%5ccontrol/list-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/;/../control/list-runs",
    "/v1/fleet/..;/control/list-runs",
    "/v1/fleet/pull-messages;x=1",
    "/v1/fleet/%c0%ae%c0%ae/control/list-runs",  # overlong UTF-8 dots, escaped
    "/v1/fleet/%e0%80%ae%e0%80%ae/control/list-runs",
    "//v1/fleet/pull-messages",
    "/v1//fleet/pull-messages",
    "/v1/fleet//pull-messages",
    "/v1/fleet/./pull-messages",
    "/./v1/fleet/pull-messages",
    "/v1/fleet/pull-messages/",
    "/v1/fleet/pull-messages/.",
    "/v1/fleet/pull-%6dessages",  # an escaped letter: the same route once decoded
    "/V1/FLEET/pull-messages",
    "/v1/fleet/pull-messages?x=1",
    "/v1/fleet/pull-messages%3fx=1",
    "/v1/fleet/pull-messages%00",
    "/health/../v1/control/list-runs",
    "/v1/serverappio/pull-messages",
    "http://127.0.0.1/v1/control/list-runs",  # absolute-form targets
    "http://127.0.0.1/v1/fleet/../control/list-runs",
    "*",
]
RAW_BYPASSES = [
    b"/v1/fleet/\xc0\xae\xc0\xae/control/list-runs",  # overlong UTF-8 dots, raw
    b"/v1/fleet/\xe2\x80\xa4\xe2\x80\xa4/control/list-runs",  # one-dot leaders
    b"/v1/fleet/pull-messages\xc0\xaf",
]


@pytest.mark.parametrize("target", BYPASSES)
def test_known_bypass_forms_are_refused(gate, target):
    port, recorder = gate
    before = len(recorder.seen)
    for method in ("POST", "GET"):
        status = _raw(port, method, target.encode())
        assert status in (0, 400, 404), (method, target, status)
    assert recorder.seen[before:] == [], f"{target} reached the upstream"


@pytest.mark.parametrize("target", RAW_BYPASSES)
def test_raw_non_ascii_targets_are_refused(gate, target):
    port, recorder = gate
    before = len(recorder.seen)
    assert _raw(port, "POST", target) in (0, 400, 404)
    assert recorder.seen[before:] == []


def test_allowed_routes_pass_exactly_as_checked(gate):
    port, recorder = gate
    for route in sorted(FLEET_ROUTES):
        before = len(recorder.seen)
        assert _raw(port, "POST", route.encode()) == 200
        assert recorder.seen[before:] == [("POST", route.encode(), b"")]
        assert _raw(port, "GET", route.encode()) == 404  # the right route, the wrong method
        assert len(recorder.seen) == before + 1
        # Absolute form: the server takes the path part, which is then checked as any other.
        before = len(recorder.seen)
        assert _raw(port, "POST", f"https://localhost:9092{route}".encode()) == 200
        assert recorder.seen[before:] == [("POST", route.encode(), b"")]
    before = len(recorder.seen)
    assert _raw(port, "GET", HEALTH.encode()) == 200
    assert recorder.seen[before:] == [("GET", HEALTH.encode(), b"")]


# Pieces an attacker combines: real route names, dot segments in every spelling, separators.
PIECES = st.sampled_from([
    "v1", "V1", "fleet", "Fleet", "control", "serverappio", "list-runs", "start-run",
    "register-node", "pull-messages", "push-messages", "get-run", "health", "..", ".", "",
    "%2e", "%2E", "%2e%2e", ".%2e", "%252e", "%2f", "%2F", "%5c", "%5C", "\\", ";", ";x=1",
    "%3b", "%c0%ae", "%c0%af", "%00", "%20", "?", "?a=b", "#", "%23", "~", "%7e", "..;",
    "http:", "https:", "127.0.0.1:9092", "localhost",
])
ASCII = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=6)


@st.composite
def targets(draw) -> str:
    # One target in eight is a real route, so every run exercises the allowed side as well
    # (left to chance, a run could draw none and prove nothing about it).
    if draw(st.integers(0, 7)) == 0:
        route = draw(st.sampled_from(sorted(FLEET_ROUTES) + [HEALTH]))
        return draw(st.sampled_from(["", "http://127.0.0.1", "https://localhost:9092"])) + route
    segments = draw(st.lists(st.one_of(PIECES, ASCII), min_size=1, max_size=7))
    sep = draw(st.sampled_from(["/", "/", "/", "//", "\\", "%2f"]))
    path = sep.join(segments)
    prefix = draw(st.sampled_from(["/", "/", "/v1/fleet/", "/v1/fleet/", "", "//",
                                   "http://127.0.0.1/", "/v1/fleet/pull-messages/"]))
    return prefix + path


class _Client:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port, self.conn = port, None

    def send(self, method: str, target: str) -> int:
        for _ in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                self.conn.putheader("Host", "localhost")
                self.conn.putheader("Content-Length", "0")
                self.conn.endheaders()
                resp = self.conn.getresponse()
                resp.read()
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return resp.status
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
        return 0


def test_fuzzed_targets_reach_only_allowed_routes(gate):
    port, recorder = gate
    client = _Client(port)
    counts = {"sent": 0, "allowed": 0}

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["POST", "POST", "GET", "HEAD", "PUT"]), target=targets())
    def check(method: str, target: str) -> None:
        before = len(recorder.seen)
        status = client.send(method, target)
        counts["sent"] += 1
        if _allowed(method, target):
            counts["allowed"] += 1
            assert status == 200
            assert [(m, p.decode()) for m, p, _ in recorder.seen[before:]] == [
                (method, target if target.startswith("/") else "/" + target.split("/", 3)[3])]
        else:
            assert status in (0, 400, 404), (method, target, status)
            assert recorder.seen[before:] == [], f"{method} {target} reached the upstream"

    check()
    assert counts["sent"] >= 10_000 and counts["allowed"] > 0
    # Whatever was sent, the upstream saw allowed routes only.
    assert all(_allowed(m, p.decode()) and not q for m, p, q in recorder.seen)


def test_a_superlink_500_reaches_the_site_as_503(gate):
    """Flower's SuperNode retries 503 and gives up on 500 (then hangs): the gate translates."""
    port, recorder = gate
    recorder.status = 500
    try:
        assert _raw(port, "POST", b"/v1/fleet/pull-messages") == 503
        assert _raw(port, "GET", b"/health") == 500  # not a Fleet route: passed as it is
    finally:
        recorder.status = 200
