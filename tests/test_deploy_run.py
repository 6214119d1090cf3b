"""One federated run over loopback with real processes: ark-server and three ark-client sites
with TLS and site authentication, through everything a deployment meets in its life.

One run (3 rounds of the tiny model, min_sites 2) serves every check, to fit the CI budget:

- the sites' port passes the Fleet API only; a site whose key was never registered is refused;
- round 2: site-c is killed while it trains and restarted at once; the round completes with
  the two others as soon as the SuperLink gives the dead session up (missed heartbeats), and
  site-c trains round 3 from its own teacher of round 1, untouched on disk;
- after round 2, on the running server (``ark-server --sync-keys``): site-a's key is rotated
  and site-b removed; both old keys' SuperNodes are refused, site-a rejoins with its new key
  and its teacher;
- Ctrl-C stops the server; started again on the same run directory it resumes at round 3.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    BIN,
    PED,
    copy_keys,
    own_processes,
    processes,
    wait_for,
    write_federation,
    write_site,
)

from ark_core.fed.pki import make_site_key, retire_site_key
from client.cli import EXIT_REFUSED
from ops.procs import free_port

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b", "site-c"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _post(port: int, path: str, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://localhost:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _sync_keys(fed: Path, env: dict) -> str:
    res = subprocess.run([str(BIN / "ark-server"), str(fed), "--sync-keys"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _registered_nodes(run: Path, env: dict) -> dict[int, str]:
    """Node id -> status, as the SuperLink itself reports them (coordinator's Flower CLI)."""
    res = subprocess.run([str(BIN / "flwr"), "supernode", "list", "ark", "--format", "json"],
                         env={**env, "FLWR_HOME": str(run / "flwr")}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout[res.stdout.find("{"):])
    return {int(n["node-id"]): str(n["status"]) for n in out["nodes"]}


def test_federation_lifecycle_over_tls(tmp_path, keys):
    keys = copy_keys(keys, tmp_path / "keys")  # this test rotates a key
    port = free_port()
    fed = write_federation(tmp_path, keys, port, SITES, rounds=3, evaluate_every=3)
    run = tmp_path / "run"
    teachers = tmp_path / "sites" / "site-c"
    with processes(tmp_path) as procs:
        server = procs.start("server", "ark-server", str(fed))
        # Started with the server: they retry until its port opens.
        site = {s: procs.start(s, "ark-client", str(write_site(
            tmp_path, s, keys, port, startup_retries=120, retry_wait_s=1))) for s in SITES}
        wait_for(lambda: "sites connect to" in procs.log(server) or server.poll() is not None,
                 180, "the SuperLink, key registration and the sites' port")
        assert server.poll() is None, procs.log(server)
        nodes = {k: v["node_id"] for k, v in _json(run / "site_keys.json").items()}
        assert set(nodes) == set(SITES)

        # The sites' port passes the Fleet API only: no run control, no key registration.
        wait_for(lambda: _post(port, "/health", keys / "ca.crt") != 503, 60, "the gate")
        assert _post(port, "/v1/control/list-runs", keys / "ca.crt") == 404
        assert _post(port, "/v1/control/register-node", keys / "ca.crt") == 404

        # A site whose key was never registered is refused and exits with a clear message.
        stranger = procs.start("stranger", "ark-client",
                               str(write_site(tmp_path, "stranger", keys, port, tasks=[PED])))

        # Round 2: site-c is killed while it trains (its SuperNode has taken the message)
        # and restarted at once, as a container's restart policy would.
        # Killed as soon as its own log says it took the message: a ClientApp process may be
        # slow to appear on a busy machine, or already gone, but the reply cannot be out
        # before the ClientApp has started and trained.
        wait_for(lambda: procs.log(site["site-c"]).count("Receiving: train message") >= 2
                 or server.poll() is not None, 600, "round 2 at site-c")
        procs.kill(site["site-c"])
        wait_for(lambda: not own_processes(str(tmp_path / "site-c.yaml")), 10, "site-c's end")
        [fp_dir] = [d for d in teachers.iterdir() if d.is_dir() and d.name != "flwr"]  # app home
        teacher_1 = fp_dir / "teacher_round_001.safetensors"
        sha_before = hashlib.sha256(teacher_1.read_bytes()).hexdigest()
        assert not (fp_dir / "teacher_round_002.safetensors").exists(), "killed too late"
        site["site-c"] = procs.start("site-c-restarted", "ark-client", str(tmp_path / "site-c.yaml"))

        # Round 2 completes with the two others once the SuperLink gives the dead session up;
        # the restarted site-c waits for that before it joins, so its lost message is not
        # awaited until the round's timeout.
        wait_for(lambda: _json(run / "state.json").get("last_round", 0) >= 2
                 or server.poll() is not None, 600, "round 2")
        assert server.poll() is None, procs.log(server)
        assert sorted(_json(run / "state.json")["rounds"]["2"]["sites"]) == ["site-a", "site-b"]
        assert "last session of this site was killed" in procs.log(site["site-c"])

        # On the running server: site-a's key rotated, site-b removed, in one --sync-keys.
        retire_site_key(keys, "site-a")
        make_site_key(keys, "site-a")
        cfg = yaml.safe_load(fed.read_text())
        cfg["deployment"]["sites"] = [s for s in cfg["deployment"]["sites"] if s["name"] != "site-b"]
        fed.write_text(yaml.safe_dump(cfg))
        out = _sync_keys(fed, procs.env)
        for line in ("site site-a: key unregistered", "site site-a: key registered",
                     "site site-b: key unregistered"):
            assert line in out, out
        now_keys = _json(run / "site_keys.json")
        assert set(now_keys) == {"site-a", "site-c"} and now_keys["site-a"]["node_id"] != nodes["site-a"]
        registered = _registered_nodes(run, procs.env)
        assert registered.get(nodes["site-a"], "unregistered") == "unregistered"
        assert registered.get(nodes["site-b"], "unregistered") == "unregistered"
        assert registered[now_keys["site-a"]["node_id"]] != "unregistered"
        # The old keys' SuperNodes are refused from now on. site-b's ark-client stops;
        # site-a's new key replaced the old file, so its ark-client rejoins with it.
        assert site["site-b"].wait(timeout=120) == EXIT_REFUSED, procs.log(site["site-b"])
        assert "refused this site's key" in procs.log(site["site-b"])
        wait_for(lambda: "starting a new one" in procs.log(site["site-a"])
                 or site["site-a"].poll() is not None, 120, "site-a's new SuperNode")
        assert site["site-a"].poll() is None, procs.log(site["site-a"])

        # Ctrl-C: ark-server stops the SuperLink, the gate and the ServerApp.
        assert procs.interrupt(server, timeout=60) == 130
        wait_for(lambda: not [c for c in own_processes(str(run))
                              if "flower-superlink" in c or "server.gate" in c], 30,
                 "the server's processes to end")
        # The server, started again on the same run directory, resumes after round 2.
        server = procs.start("server-restarted", "ark-server", str(fed))
        assert server.wait(timeout=900) == 0, procs.log(server)
        log = procs.log(server)
        assert "resuming" in log and "after round 2" in log and "last AUC" in log

        assert stranger.wait(timeout=120) == EXIT_REFUSED
        assert "refused this site's key" in procs.log(stranger)
        assert site["site-a"].poll() is None and site["site-c"].poll() is None, \
            "sites outlive a server restart"

    state = _json(run / "state.json")
    assert state["finished"] and state["last_round"] == 3
    assert sorted(state["rounds"]["1"]["sites"]) == SITES
    assert sorted(state["rounds"]["3"]["sites"]) == ["site-a", "site-c"]
    assert (run / "master_student.safetensors").stat().st_size > 0
    assert (run / "master_teacher.safetensors").stat().st_size > 0

    # The server logged site-c's unanswered round-2 message: its old node is gone.
    rejected = [a for a in _jsonl(run / "audit.jsonl")
                if a["event"] == "update" and a["round"] == 2 and not a["accepted"]]
    assert len(rejected) == 1 and "unavailable" in rejected[0]["reason"].lower()

    # site-c trained round 3 from its teacher of round 1, which the kill left intact;
    # site-a from its teacher of round 2, kept across its key rotation.
    trained = {(m["round"], m["site"]): m for m in _jsonl(run / "metrics.jsonl")
               if m.get("kind") == "train"}
    assert ("site-c", 2) not in {(s, r) for r, s in trained}
    assert trained[(3, "site-c")]["teacher-from-round"] == 1
    assert trained[(3, "site-a")]["teacher-from-round"] == 2
    assert hashlib.sha256(teacher_1.read_bytes()).hexdigest() == sha_before
    replies = {a["round"] for a in _jsonl(teachers / "audit.jsonl")
               if a.get("event") == "reply" and a.get("kind") == "train"}
    assert replies == {1, 3}
    wait_for(lambda: not own_processes(str(tmp_path)), 30, "every process to end")
