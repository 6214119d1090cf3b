"""A deployment trusts node ids, not what a site says: intruders, impersonators, inflated counts.

The real ClientApp and ServerApp code over the in-process grid, with a ``deployment:``
section and the enrolment file ark-server writes (``site_keys.json``). The attacks sit
outside the egress guard, as a hostile site's own code would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fed_helpers import hostile_app, write_sim
from flwr.app import ArrayRecord, MetricRecord
from flwr.clientapp import ClientApp

from ark_core.fed.aggregate import StreamingAggregator
from ark_core.fed.audit import read_audit
from ark_core.fed.deployment import ServerDeployment, SiteKey
from ark_core.model.checkpoint import load_tensors
from server.app import federation_from_run_config
from server.enrolment import write_registry
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

torch.set_num_threads(1)
SITES = ["hosp-a", "hosp-b", "hosp-c"]
PED = {"name": "ped", "dataset": "pediatric_pneumonia", "root": "pediatric", "max_images": 24,
       "split": {"val_fraction": 0.4, "test_fraction": 0.0, "seed": 0}}


def _app(attack) -> ClientApp:
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if not reply.has_error():
            attack(msg, reply, context.node_id)
        return reply

    return hostile_app(mod)


class RecordingGrid(InProcessGrid):
    """Remembers the destination of every message pushed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.destinations: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.destinations += [m.metadata.dst_node_id for m in messages]
        return super().push_messages(messages)


def _federation(tmp_path: Path, rounds: int, caps: dict[str, int | None]):
    sites = [{"name": n, "tasks": [{**PED, "partition": {"method": "iid", "num_sites": 3,
                                                         "site": i, "seed": 0}}]}
             for i, n in enumerate(SITES)]
    rc = write_sim(tmp_path, sites=sites, rounds=rounds, min_sites=2, evaluate_every=0,
                   catalogue=[{"name": "ped", "labels": ["Pneumonia"], "task_type": "binary"}],
                   train={"batch_size": 8, "lr": 1e-3, "threads": 1, "seed": 0})
    cfg, run_dir = federation_from_run_config(rc)
    dep = ServerDeployment(site_wait_s=0, sites=[
        SiteKey(name=n, public_key=Path(f"{n}.pub"), max_examples=caps.get(n)) for n in SITES])
    cfg = cfg.model_copy(update={"deployment": dep})
    run_dir.mkdir(parents=True)
    # Nodes 1-3 are the enrolled sites; any other node id is a stranger.
    write_registry(run_dir, {n: {"node_id": i + 1, "fingerprint": "-"} for i, n in enumerate(SITES)})
    return cfg, run_dir, rc


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def test_strangers_get_no_work_and_impersonators_are_rejected(tmp_path):
    def impersonate(msg, reply, node):  # hosp-b (node 2) says it is hosp-c when it trains
        if node == 2 and msg.metadata.message_type == "train":
            reply.content["site"]["name"] = "hosp-c"

    cfg, run_dir, rc = _federation(tmp_path, rounds=1, caps={})
    grid = RecordingGrid(_app(impersonate), 4, rc)  # node 4: connected, never enrolled
    ArkFederation(cfg, run_dir, poll_interval=0.0, node_wait_s=0.0).start(grid)

    assert 4 not in grid.destinations and {1, 2, 3} <= set(grid.destinations)
    rec = _state(run_dir)["rounds"]["1"]
    # The real hosp-c is folded in; the impersonator is rejected under its own name.
    assert sorted(rec["sites"]) == ["hosp-a", "hosp-c"]
    audit = read_audit(run_dir / "audit.jsonl")
    assert [a["node_id"] for a in audit if a["event"] == "stranger"] == [4]
    [fake] = [a for a in audit if a["event"] == "update" and a["kind"] == "train" and a["node_id"] == 2]
    assert fake["site"] == "hosp-b" and not fake["accepted"]
    assert "impersonation" in fake["reason"] and "hosp-c" in fake["reason"]
    [real] = [a for a in audit if a["event"] == "update" and a["kind"] == "train" and a["node_id"] == 3]
    assert real["site"] == "hosp-c" and real["accepted"]
    # Metrics of hosp-c come from node 3 alone.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["node_id"] for m in lines if m.get("site") == "hosp-c" and m["kind"] == "train"] == [3]


def test_inflated_example_counts_are_capped(tmp_path):
    """hosp-c claims 1e9 examples with its weights x -20 (cap 10, configured); hosp-b is
    honest in round 1 and claims 1e9 in round 2 (no cap configured: its round-1 counts)."""
    replies: dict[tuple[int, int], tuple[dict, dict]] = {}

    def inflate(msg, reply, node):
        if msg.metadata.message_type != "train":
            return
        round_ = int(msg.metadata.group_id)
        m = dict(reply.content["metrics"])
        if node == 3 or (node == 2 and round_ == 2):
            m = {k: (1e9 if k.startswith("num-examples") else v) for k, v in m.items()}
            reply.content["metrics"] = MetricRecord(m)
        if node == 3:
            w = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: -20.0 * v for k, v in w.items()})
        replies[(round_, node)] = (reply.content["arrays"].to_torch_state_dict(), m)

    cfg, run_dir, rc = _federation(tmp_path, rounds=2, caps={"hosp-a": 1000, "hosp-c": 10})
    ArkFederation(cfg, run_dir, poll_interval=0.0, node_wait_s=0.0).start(
        InProcessGrid(_app(inflate), 3, rc))

    state = _state(run_dir)
    honest_b = replies[(1, 2)][1]["num-examples"]
    assert 0 < honest_b < 1000
    assert state["rounds"]["1"]["clipped"] == {"hosp-c": {"total": [1e9, 10.0],
                                                          "ped": [1e9, 10.0]}}
    assert state["rounds"]["2"]["clipped"]["hosp-b"]["total"] == [1e9, honest_b]
    assert state["example_caps"]["hosp-b"]["total"] == honest_b
    audit = [a for a in read_audit(run_dir / "audit.jsonl")
             if a["event"] == "update" and a["kind"] == "train" and a["site"] == "hosp-c"]
    assert all(a["accepted"] and a["clipped"]["total"] == [1e9, 10.0] for a in audit)

    # Round 1's master is exactly the mean with the capped weight: the attacker moves it by
    # its capped share, not by 1e9 / (1e9 + honest examples).
    master0 = load_tensors(run_dir / "rounds" / "round_000.safetensors")
    agg = StreamingAggregator(master0)
    for node, site in enumerate(SITES, start=1):
        arrays, m = replies[(1, node)]
        n = min(m["num-examples"], 10.0) if site == "hosp-c" else m["num-examples"]
        agg.add(site, arrays, n, {"ped": n})
    expected = agg.result()
    got = load_tensors(run_dir / "rounds" / "round_001.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    honest = replies[(1, 1)][1]["num-examples"] + honest_b
    assert state["rounds"]["1"]["weights"]["shared"] == 10.0 + honest  # unbounded: 1e9 + ...
