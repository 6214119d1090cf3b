"""A federated run over loopback with real processes: ark-server, three ark-client sites, TLS,
site authentication, a stranger refused, Ctrl-C and a restart that resumes the run."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest
from deploy_helpers import PED, make_keys, processes, wait_for, write_federation, write_site

from server.procs import free_port

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b", "site-c"]


def _state(run):
    path = run / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _post(port: int, path: str, ca) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://localhost:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _own_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a tmp path of this test)."""
    from pathlib import Path

    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            out.append(text)
    return out


def test_tls_authenticated_run_with_restart(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, [*SITES, "stranger"])
    port = free_port()
    fed = write_federation(tmp_path, keys, port, SITES)
    run = tmp_path / "run"
    with processes(tmp_path) as procs:
        server = procs.start("server", "ark-server", str(fed))
        # Started with the server: they retry until its port opens.
        sites = [procs.start(s, "ark-client", str(write_site(
            tmp_path, s, keys, port, startup_retries=120, retry_wait_s=1))) for s in SITES]
        wait_for(lambda: "sites connect to" in procs.log(server) or server.poll() is not None,
                 180, "the SuperLink, key registration and the sites' port")
        assert server.poll() is None, procs.log(server)
        assert set(json.loads((run / "site_keys.json").read_text())) == set(SITES)

        # The sites' port passes the Fleet API only: no run control, no key registration.
        wait_for(lambda: _post(port, "/health", keys / "ca.crt") != 503, 60, "the gate")
        assert _post(port, "/v1/control/list-runs", keys / "ca.crt") == 404
        assert _post(port, "/v1/control/register-node", keys / "ca.crt") == 404

        # A site whose key was never registered is refused and exits with a clear message.
        stranger = procs.start("stranger", "ark-client",
                               str(write_site(tmp_path, "stranger", keys, port, tasks=[PED])))
        wait_for(lambda: _state(run).get("last_round", -1) >= 1 or server.poll() is not None,
                 600, "round 1")
        assert server.poll() is None, procs.log(server)

        # Ctrl-C: ark-server stops the SuperLink, the gate and the ServerApp.
        assert procs.interrupt(server, timeout=60) == 130
        wait_for(lambda: not [c for c in _own_processes(str(run))
                              if "flower-superlink" in c or "server.gate" in c], 30,
                 "the server's processes to end")
        # Started again on the same run directory, it resumes after round 1.
        server = procs.start("server2", "ark-server", str(fed))
        assert server.wait(timeout=900) == 0, procs.log(server)
        assert "resuming" in procs.log(server) and "after round 1" in procs.log(server)

        assert stranger.wait(timeout=120) != 0
        assert "refused this site's key" in procs.log(stranger)
        assert all(s.poll() is None for s in sites), "sites must outlive a server restart"

    state = _state(run)
    assert state["finished"] and state["last_round"] == 2
    for r in ("1", "2"):
        assert len(state["rounds"][r]["sites"]) >= 2
        assert "stranger" not in state["rounds"][r]["sites"]
    assert (run / "master_student.safetensors").stat().st_size > 0
    assert (run / "master_teacher.safetensors").stat().st_size > 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {ln["round"] for ln in lines} >= {1, 2}
    assert {ln["site"] for ln in lines} <= set(SITES)
    wait_for(lambda: not _own_processes(str(tmp_path)), 30, "every process to end")
