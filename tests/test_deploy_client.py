"""ark-client's checks before it joins: each bad input ends with a clear message and exit code."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from deploy_helpers import NIH, make_keys, write_site

from ark_core.config import load_config
from ark_core.fed.federation import SiteConfig
from client import cli
from ops.procs import free_port


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([*args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_good_site_prints_its_data_report(tmp_path, keys, capsys):
    site = write_site(tmp_path, "site-a", keys, free_port(), tasks=[NIH])
    code, out = _run(capsys, str(site), "--check-only")
    assert code == 0, out
    assert "task nih (multilabel): " in out and "Pneumonia" in out and " pos " in out


def test_missing_private_key(tmp_path, keys, capsys):
    site = write_site(tmp_path, "site-a", keys, free_port(), key_name="nobody", tasks=[NIH])
    code, out = _run(capsys, str(site), "--check-only")
    assert code == cli.EXIT_CONFIG
    assert "private key" in out and "nobody.key not found" in out


def test_unreadable_ca(tmp_path, keys, capsys):
    bad_ca = tmp_path / "ca.crt"
    bad_ca.write_text("not a certificate\n")
    site = write_site(tmp_path, "site-a", keys, free_port(), tasks=[NIH], ca_cert=str(bad_ca))
    code, out = _run(capsys, str(site), "--check-only")
    assert code == cli.EXIT_CONFIG and "CA certificate" in out and "not a PEM certificate" in out


def test_bad_data_and_unreadable_files(tmp_path, keys, capsys):
    site = write_site(tmp_path, "site-a", keys, free_port(),
                      tasks=[{**NIH, "root": str(tmp_path / "missing")}])
    code, out = _run(capsys, str(site), "--check-only")
    assert code == cli.EXIT_DATA and "task data" in out

    # A copy of the data where every image is damaged: the check lists them and refuses.
    import shutil

    root = tmp_path / "nih"
    shutil.copytree(NIH["root"], root)
    for png in (root / "images").glob("*.png"):
        png.write_bytes(png.read_bytes()[:40])
    site = write_site(tmp_path, "site-a", keys, free_port(), tasks=[{**NIH, "root": str(root)}])
    code, out = _run(capsys, str(site), "--check-only")
    assert code == cli.EXIT_DATA
    assert "files unreadable" in out and ".png" in out


def test_unknown_key_in_yaml_names_the_line(tmp_path, keys, capsys):
    site = write_site(tmp_path, "site-a", keys, free_port(), tasks=[NIH], colour="blue")
    code, out = _run(capsys, str(site), "--check-only")
    assert code == cli.EXIT_CONFIG and "deployment.colour: unknown key" in out


def test_unreachable_server_gives_up_after_bounded_tries(tmp_path, keys, capsys):
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        site = write_site(tmp_path, "site-a", keys, port, tasks=[NIH], startup_retries=2,
                          retry_wait_s=0.1)
        code, out = _run(capsys, str(site))
    assert code == cli.EXIT_UNREACHABLE
    assert "unreachable after 2 tries" in out and "(try 2/2)" in out


def test_server_with_a_certificate_from_another_ca_is_refused(tmp_path, keys, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    make_keys(other, [])
    import ssl
    import threading

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(other / "server.crt", other / "server.key")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(cli.SiteError, match="does not verify with the CA") as e:
            cli.wait_for_server(f"localhost:{port}", keys / "ca.crt", tries=1, wait_s=0.1)
        assert e.value.code == cli.EXIT_MISMATCH
    finally:
        srv.close()
        t.join(timeout=5)


def test_each_site_installs_the_app_in_its_own_state_dir(tmp_path, keys, monkeypatch):
    # An exported FLWR_HOME shared by two sites on one host would let one SuperNode load the
    # app bundle the other is still copying (Flower installs without a lock).
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "shared_home"))
    homes = set()
    for name in ("site-a", "site-b"):
        cfg = load_config(write_site(tmp_path, name, keys, free_port()), SiteConfig)
        env = cli.supernode_env(Path(cfg.state_dir), cfg.deployment)
        assert Path(env["FLWR_HOME"]) == Path(cfg.state_dir) / "flwr"
        homes.add(env["FLWR_HOME"])
    assert len(homes) == 2


def test_a_killed_session_delays_the_next_one_until_the_server_gave_it_up(tmp_path):
    assert cli.session_wait_s(tmp_path) == 0  # no session file: the last exit was clean
    marker = tmp_path / cli.SESSION_FILE
    marker.touch()
    last = marker.stat().st_mtime
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    offline = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL  # when the SuperLink gives up
    assert offline + cli.TOUCH_S < cli.session_wait_s(tmp_path, now=last) < offline + 30
    assert cli.session_wait_s(tmp_path, now=last + 200) == 0


def _run_against_standin(tmp_path, keys, capsys, answer) -> tuple[int, str]:
    """Run ark-client against a stand-in SuperLink over TLS; ``answer(route)`` gives each
    POST's (status, content type, body)."""
    import http.server
    import ssl
    import threading

    class StandIn(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            code, kind, body = answer(self.path.rsplit("/", 1)[1])
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(keys / "server.crt", keys / "server.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        site = write_site(tmp_path, "site-a", keys, srv.server_address[1], tasks=[NIH])
        return _run(capsys, str(site))
    finally:
        srv.shutdown()


def test_a_server_of_an_incompatible_flower_version_ends_with_its_own_code(tmp_path, keys, capsys):
    """A real flower-supernode against a stand-in SuperLink that answers as a SuperLink of
    an incompatible Flower version does (its version check's error payload)."""
    import json

    from flwr.supercore.error import ApiErrorCode, FlowerError

    body = json.dumps(FlowerError(
        ApiErrorCode.RUNTIME_VERSION_INCOMPATIBLE, "",
        public_details="SuperLink 9.0.0 does not accept SuperNode 1.42.0.",
    ).to_json("Runtime version compatibility check failed.")).encode()

    code, out = _run_against_standin(tmp_path, keys, capsys,
                                     lambda route: (412, "application/json", body))
    assert code == cli.EXIT_MISMATCH, out
    assert "Flower version does not work with this site's" in out and "9.0.0" in out


def test_a_second_instance_of_a_site_stops_at_once(tmp_path, keys):
    from client.supernode import SiteLock

    with SiteLock(tmp_path, "site-a"):
        with pytest.raises(cli.SiteError, match="another ark-client of site site-a") as e:
            SiteLock(tmp_path, "site-a").__enter__()
        assert e.value.code == cli.EXIT_DUPLICATE
    with SiteLock(tmp_path, "site-a"):  # released on exit: the next one runs
        pass


def _stand_in(tmp_path, script: str) -> list[str]:
    """A process in the SuperNode's place that prints what a SuperNode prints, then exits."""
    path = tmp_path / "supernode.py"
    path.write_text(script)
    import sys

    return [sys.executable, str(path)]


def test_a_supernode_that_ends_after_joining_is_replaced_until_the_give_up_time(tmp_path, capsys):
    runs = tmp_path / "runs"
    cmd = _stand_in(tmp_path, f"open({str(runs)!r}, 'a').write('x')\nprint('SuperNode ID: 7')\n")
    code = cli.run_supernode(cmd, {}, tmp_path / "session", give_up_s=2.5)
    out = capsys.readouterr()
    assert code == cli.EXIT_UNREACHABLE
    assert len(runs.read_text()) >= 2, "it was started again"
    assert "starting a new one" in out.err and "no SuperNode stayed joined" in out.err
    assert "SuperNode ID: 7" in out.out  # its output reaches ark-client's


def test_a_refused_key_ends_the_site_at_once(tmp_path, capsys):
    cmd = _stand_in(tmp_path, "print('ERROR :     Exit Code: 305')\n"
                    "print('Failed to initialize the connection to the SuperLink.')\n"
                    "print('[code: 2004] Failed to activate SuperNode.')\nraise SystemExit(49)\n")
    assert cli.run_supernode(cmd, {}, tmp_path / "session") == cli.EXIT_REFUSED
    assert "the server refused this site's key" in capsys.readouterr().err


def test_a_supernode_that_stops_working_on_a_server_error_is_replaced(tmp_path, keys, capsys):
    """A real flower-supernode against a stand-in SuperLink that answers one pull with 500:
    Flower's SuperNode then stops working without exiting. ark-client replaces it; the
    stand-in refuses the second activation as a SuperLink refuses an unknown key."""
    import json

    from flwr.proto.fleet_pb2 import ActivateNodeResponse, PullMessagesResponse
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatResponse
    from flwr.supercore.error import ApiErrorCode, FlowerError

    seen: list[str] = []
    refused = json.dumps(FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "").to_json(
        "Failed to activate SuperNode.")).encode()

    def answer(route: str) -> tuple[int, str, bytes]:
        seen.append(route)
        pb = "application/protobuf"
        if route == "activate-node" and seen.count(route) == 1:
            return 200, pb, ActivateNodeResponse(node_id=5).SerializeToString()
        if route == "activate-node":
            return 412, "application/json", refused
        if route == "send-node-heartbeat":
            return 200, pb, SendNodeHeartbeatResponse(success=True).SerializeToString()
        if route == "pull-messages" and seen.count(route) < 2:
            return 200, pb, PullMessagesResponse().SerializeToString()
        return 500, "application/json", b'{"detail": "database is locked"}'

    code, out = _run_against_standin(tmp_path, keys, capsys, answer)
    assert "stopped working after a server error" in out
    assert seen.count("activate-node") == 2, seen
    assert code == cli.EXIT_REFUSED, out
