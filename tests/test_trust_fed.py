"""Egress guard, audit logs and differential privacy over real Flower Messages."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from ark_core.fed.aggregate import float_state, head_task
from ark_core.fed.audit import read_audit, tensors_sha256
from ark_core.fed.federation import load_simulation
from ark_core.fed.protocol import Instruction
from ark_core.model.checkpoint import read_metadata
from ark_core.model.factory import create_model
from client.app import app as client_app
from client.audit import audit_mod
from client.egress import EGRESS_BLOCKED, egress_guard
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid, set_server_identity

torch.set_num_threads(1)


@pytest.fixture
def setup(tmp_path):
    # hosp-b trains only 'ped': the 'nih' head is not its to send.
    rc = write_sim(tmp_path)
    sim, _, run_dir = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed = sim.federation()
    torch.manual_seed(0)
    master = float_state(create_model(fed.model, fed.task_specs()))
    set_server_identity()
    content = RecordDict({"config": ConfigRecord(Instruction.for_round(fed, 1, 1e-3).to_config()),
                          "arrays": ArrayRecord(dict(master))})
    msg = Message(content, dst_node_id=2, message_type="train", group_id="1")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config=dict(rc))
    return rc, run_dir, master, msg, ctx


def _reply(msg, master, *, arrays=None, metrics=None, site=None):
    own = {k: v.numpy() for k, v in master.items() if head_task(k) in (None, "ped")}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in (arrays or own).items()}),
        "metrics": MetricRecord(metrics or {"num-examples": 8.0, "num-examples.ped": 8.0,
                                            "loss.ped": 0.7, "lr": 1e-3}),
        "site": ConfigRecord(site or {"name": "hosp-b", "tasks": ["ped"]}),
    })
    return Message(content, reply_to=msg)


def _guard(msg, ctx, reply):
    return egress_guard(msg, ctx, lambda m, c: reply)


def test_egress_guard_passes_a_proper_reply(setup):
    _, _, master, msg, ctx = setup
    reply = _reply(msg, master)
    assert _guard(msg, ctx, reply) is reply


def _own(master):
    return {k: v.numpy() for k, v in master.items() if head_task(k) in (None, "ped")}


@pytest.mark.parametrize("case", [
    "string", "bytes", "int-array", "per-image-metric", "unknown-metric", "unknown-tensor",
    "other-head", "wrong-shape", "extra-record", "site-name",
])
def test_egress_guard_blocks(setup, case, caplog):
    _, _, master, msg, ctx = setup
    own = _own(master)
    key = next(k for k in own if head_task(k) is None)
    kw = {}
    if case == "string":
        kw["site"] = {"name": "hosp-b", "tasks": ["ped"], "note": "patient 0042, J. Doe"}
    elif case == "bytes":
        kw["site"] = {"name": "hosp-b", "tasks": ["ped"], "blob": b"\x89PNG..."}
    elif case == "int-array":
        kw["arrays"] = {**own, key: own[key].astype(np.int64)}
    elif case == "per-image-metric":
        kw["metrics"] = {"num-examples": 8.0, "loss.ped": [0.1, 0.9, 0.3]}
    elif case == "unknown-metric":
        kw["metrics"] = {"num-examples": 8.0, "patient-age.ped": 71.0}
    elif case == "unknown-tensor":
        kw["arrays"] = {**own, "embeddings.val": np.zeros((8, 64), np.float32)}
    elif case == "other-head":  # the nih head: not this site's task
        kw["arrays"] = {k: v.numpy() for k, v in master.items()}
    elif case == "wrong-shape":
        kw["arrays"] = {**own, key: np.zeros((7, 3), np.float32)}
    elif case == "site-name":
        kw["site"] = {"name": "hosp-a", "tasks": ["ped"]}
    reply = _reply(msg, master, **kw)
    if case == "extra-record":
        reply.content["labels"] = ConfigRecord({"ids": "img_001.png,img_002.png"})
    with caplog.at_level("ERROR", logger="flwr.ark.client.egress"):
        out = _guard(msg, ctx, reply)
    assert out.has_error() and out.error.code == EGRESS_BLOCKED
    assert "egress guard blocked" in out.error.reason
    assert out.metadata.reply_to_message_id == msg.metadata.message_id
    assert any("BLOCKED" in r.getMessage() for r in caplog.records)


def test_site_audit_records_what_left_and_what_was_blocked(setup):
    rc, run_dir, master, msg, ctx = setup
    good = _reply(msg, master)
    audit_mod(msg, ctx, lambda m, c: egress_guard(m, c, lambda m2, c2: good))
    bad = _reply(msg, master, metrics={"num-examples": 8.0, "loss.ped": [0.1, 0.9]})
    out = audit_mod(msg, ctx, lambda m, c: egress_guard(m, c, lambda m2, c2: bad))
    assert out.has_error()
    recs = read_audit(run_dir / "sites" / "hosp-b" / "audit.jsonl")
    assert len(recs) == 2
    sent, blocked = recs
    assert sent["kind"] == "train" and sent["round"] == 1 and "error" not in sent
    assert sent["master_sha256"] == tensors_sha256(master)
    assert sent["payload_sha256"] == tensors_sha256(_own(master))
    assert set(sent["sent"]) == set(_own(master)) and sent["bytes"] == sum(sent["sent"].values())
    assert sent["metrics"]["loss.ped"] == 0.7
    assert len(sent["bundle"]["code_sha256"]) == 64
    assert "egress guard blocked" in blocked["error"] and blocked["sent"] == {}


def test_dp_run_audit_logs_and_privacy_report(tmp_path):
    # Two rounds with DP on; the sites' and the server's audit logs agree on the masters.
    rc = write_sim(tmp_path, rounds=2, evaluate_every=0,
                   privacy={"clip_norm": 0.5, "noise_multiplier": 1.1, "delta": 1e-5})
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(InProcessGrid(client_app, 2, rc))
    state = json.loads((run_dir / "state.json").read_text())
    eps = [state["rounds"][r]["privacy"]["epsilon"] for r in ("1", "2")]
    assert 0 < eps[0] < eps[1]
    assert state["rounds"]["1"]["privacy"]["noise_std"] == pytest.approx(
        {"shared": 1.1 * 0.5 / 2, "nih": 1.1 * 0.5, "ped": 1.1 * 0.5 / 2})
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert priv["epsilon"] == pytest.approx(eps[1]) and priv["teachers_collected"] is False
    assert not (run_dir / "master_teacher.safetensors").exists()
    assert read_metadata(run_dir / "master_student.safetensors")["provenance"]["teacher_sites"] == []
    server = read_audit(run_dir / "audit.jsonl")
    # One master event per round and task set: hosp-a (nih, ped) and hosp-b (ped) get
    # different parts of the master, each hashed as sent.
    masters = {(r["round"], s): r["sha256"] for r in server if r["event"] == "master"
               for s in r["sites"]}
    updates = [r for r in server if r["event"] == "update"]
    assert sorted(masters) == [(1, "hosp-a"), (1, "hosp-b"), (2, "hosp-a"), (2, "hosp-b")]
    assert masters[1, "hosp-a"] != masters[1, "hosp-b"] and len(updates) == 4
    assert all(r["accepted"] and r["bytes"] > 0 and r["norm"] > 0 for r in updates)
    assert all(r["master_sha256"] == masters[r["round"], r["site"]] for r in updates)
    for site in ("hosp-a", "hosp-b"):
        recs = [r for r in read_audit(run_dir / "sites" / site / "audit.jsonl")
                if r["kind"] == "train"]
        assert [r["round"] for r in recs] == [1, 2]
        assert all(r["master_sha256"] == masters[r["round"], site] for r in recs)
        sizes = {r["site"]: r["bytes"] for r in updates if r["round"] == 1}
        assert recs[0]["bytes"] == sizes[site]
    # A restart appends: the log survives and grows, nothing is rewritten.
    before = (run_dir / "audit.jsonl").read_text()
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(InProcessGrid(client_app, 2, rc))
    assert (run_dir / "audit.jsonl").read_text().startswith(before)
