"""Attacks on a real loopback deployment (ark-server, ark-client, TLS and site keys on).

- an outsider tries the Control API through the sites' port with dot segments: 404;
- an intruder whose key was registered on the SuperLink by hand (not enrolled in the
  federation YAML) connects: it gets no work, and the coordinator logs it;
- an enrolled site says it is another site: its reply is rejected as impersonation;
- a second ark-client of the same site stops at once with its own exit code;
- the coordinator starts over with a new run directory: the sites rejoin, not exit;
- ``flwr stop`` ends that run as stopped: ark-server exits 0, and started again it does not
  resume it (a restart policy would otherwise undo the stop).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    BIN,
    PED,
    copy_keys,
    processes,
    wait_for,
    write_federation,
    write_site,
)
from test_deploy_run import _json, _jsonl, _post, _registered_nodes

from ark_core.fed.pki import make_site_key
from client.cli import EXIT_DUPLICATE
from ops.procs import free_port

pytestmark = pytest.mark.slow


def _rename(site_yaml: Path, name: str) -> None:
    cfg = yaml.safe_load(site_yaml.read_text())
    cfg["name"] = name
    site_yaml.write_text(yaml.safe_dump(cfg))


def _register_by_hand(run: Path, pub: Path, env: dict) -> int:
    """What an operator (or an earlier bypass of the gate) did on the SuperLink directly."""
    res = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "ark",
                          "--format", "json"], env={**env, "FLWR_HOME": str(run / "flwr")},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return int(json.loads(res.stdout[res.stdout.find("{"):])["node-id"])


def test_outsider_intruder_impersonator_and_duplicate(tmp_path, keys):
    keys = copy_keys(keys, tmp_path / "keys")
    make_site_key(keys, "intruder")
    port = free_port()
    fed = write_federation(tmp_path, keys, port, ["site-a", "site-b"], rounds=1,
                           evaluate_every=0, min_sites=1)
    run = tmp_path / "run"
    with processes(tmp_path) as procs:
        server = procs.start("server", "ark-server", str(fed))
        wait_for(lambda: "sites connect to" in procs.log(server) or server.poll() is not None,
                 180, "the sites' port")
        assert server.poll() is None, procs.log(server)

        # The outsider: the Control API through the sites' port, however it is spelled.
        ca = keys / "ca.crt"
        for path in ("/v1/control/list-runs", "/v1/fleet/../control/list-runs",
                     "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/..%2fcontrol/register-node"):
            assert _post(port, path, ca) == 404, path

        # The intruder connects first, so it is there when the first round is sent.
        intruder_node = _register_by_hand(run, keys / "sites" / "intruder.pub", procs.env)
        intruder = procs.start("intruder", "ark-client", str(write_site(
            tmp_path, "intruder", keys, port, tasks=[PED])))
        site_a = write_site(tmp_path, "site-a", keys, port, tasks=[PED], startup_retries=60)
        site_b = write_site(tmp_path, "site-b", keys, port, tasks=[PED], startup_retries=60)
        _rename(site_b, "site-a")  # site-b's key, but it says it is site-a
        a = procs.start("site-a", "ark-client", str(site_a))
        procs.start("site-b", "ark-client", str(site_b))

        # A second ark-client of site-a, started once the first holds the site's lock (it
        # takes it before it joins), stops at once, naming the first.
        wait_for(lambda: "joining" in procs.log(a) or a.poll() is not None, 120, "site-a to join")
        second = procs.start("site-a-again", "ark-client", str(site_a))
        assert second.wait(timeout=120) == EXIT_DUPLICATE, procs.log(second)
        assert "another ark-client of site site-a is running" in procs.log(second)

        assert server.wait(timeout=900) == 0, procs.log(server)
        out = procs.log(server)
        assert f"node {intruder_node} is connected but not enrolled" in out
        assert intruder.poll() is None, "the intruder is not refused by Flower: it is ignored"

        state = _json(run / "state.json")
        assert state["finished"]
        assert state["rounds"]["1"]["sites"] == ["site-a"]
        audit = _jsonl(run / "audit.jsonl")
        assert intruder_node in {x["node_id"] for x in audit if x["event"] == "stranger"}
        # site-b says it is site-a when asked its tasks: rejected under its enrolled name,
        # so it never gets the master.
        fakes = [x for x in audit if x["event"] == "update" and x["site"] == "site-b"
                 and "impersonation" in x["reason"]]
        assert fakes and not any(x["event"] == "master" and "site-b" in x["sites"] for x in audit)
        assert not any(x.get("site") == "intruder" for x in audit)
        assert not any(x.get("node_id") == intruder_node for x in audit if x["event"] != "stranger")

        # The coordinator starts over on a new run directory (a new registry, new node ids):
        # site-a's ark-client rejoins instead of exiting.
        cfg = yaml.safe_load(fed.read_text())
        cfg["run_dir"] = str(tmp_path / "run2")
        fed.write_text(yaml.safe_dump(cfg))
        again = procs.start("server-new-run", "ark-server", str(fed))
        wait_for(lambda: (tmp_path / "run2" / "site_keys.json").exists()
                 or again.poll() is not None, 180, "the new registry")
        node_a = _json(tmp_path / "run2" / "site_keys.json")["site-a"]["node_id"]
        wait_for(lambda: _registered_nodes(tmp_path / "run2", procs.env).get(node_a) == "online"
                 or a.poll() is not None, 300, "site-a to rejoin the new run")
        assert a.poll() is None, procs.log(a)
        assert "starting a new one" in procs.log(a)

        # flwr stop, on the coordinator: recorded as stopped, not resumed by a restart.
        wait_for(lambda: re.search(r"started run (\d+)", procs.log(again)) or again.poll()
                 is not None, 180, "the new run")
        run_id = re.search(r"started run (\d+)", procs.log(again)).group(1)
        res = subprocess.run([str(BIN / "flwr"), "stop", run_id, "ark"], capture_output=True,
                             text=True, timeout=120,
                             env={**procs.env, "FLWR_HOME": str(tmp_path / "run2" / "flwr")})
        assert res.returncode == 0, res.stdout + res.stderr
        assert again.wait(timeout=300) == 0, procs.log(again)
        assert "was stopped (flwr stop)" in procs.log(again)
        assert (tmp_path / "run2" / "stopped.json").exists()
        after = procs.start("server-after-stop", "ark-server", str(fed))
        assert after.wait(timeout=120) == 0 and "pass --resume" in procs.log(after)
