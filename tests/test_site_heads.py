"""heads: per_site (FedArk's heads): each site trains its own heads from round to round and
sends only the shared parts; the server averages those alone."""

import json

import pytest
import torch
from fed_helpers import write_sim

from ark_core.config import ConfigError, parse_config
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.protocol import Instruction
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from client.site import Site
from client.state import HeadStore
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

BASE = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}


def test_the_config_turns_calibration_off_and_keeps_old_fingerprints():
    on = parse_config({**BASE, "heads": "per_site"}, FederationConfig)
    assert on.head_calibration == "off"  # the default calibration averages heads
    plain = parse_config(BASE, FederationConfig)
    assert run_fingerprint(on) != run_fingerprint(plain)
    assert run_fingerprint(parse_config({**BASE, "heads": "averaged"}, FederationConfig)) \
        == run_fingerprint(plain)
    assert Instruction.from_config(Instruction.for_round(on, 1).to_config()).heads == "per_site"
    with pytest.raises(ConfigError, match="with heads: per_site every site keeps its own"):
        parse_config({**BASE, "heads": "per_site", "head_calibration": "final"}, FederationConfig)


def test_a_federation_keeps_each_sites_heads_at_the_site(tmp_path):
    """Real ClientApp/ServerApp code through the egress guard: 2 rounds, sites hosp-a (nih,
    ped) and hosp-b (ped)."""
    rc = write_sim(tmp_path, rounds=2, evaluate_every=2, heads="per_site",
                   shared_weighting="sites")
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"]
    for r in ("1", "2"):  # only the shared parts were averaged, each site weighing 1
        assert state["rounds"][r]["contributors"] == {"shared": ["hosp-a", "hosp-b"]}
        assert state["rounds"][r]["weights"] == {"shared": 2.0}
    initial = load_tensors(run_dir / "rounds" / "round_000.safetensors")
    for name in ("master_student", "master_teacher"):
        final = load_tensors(run_dir / f"{name}.safetensors")
        heads = [k for k in final if k.startswith("heads.")]
        assert heads and all(torch.equal(final[k], initial[k]) for k in heads)
        assert any(not torch.equal(final[k], initial[k]) for k in final
                   if not k.startswith("heads.") and torch.is_floating_point(final[k]))
    # Each site's own heads of its own tasks, after each round, trained apart.
    own = {}
    for site, tasks in (("hosp-a", {"nih", "ped"}), ("hosp-b", {"ped"})):
        store = HeadStore(run_dir / "sites" / site, state["fingerprint"])
        assert store.rounds() == [1, 2]
        own[site] = store.load(2)
        assert {k.split(".")[1] for k in own[site]} == tasks
        assert all(k.startswith("heads.") for k in own[site])
        r1 = store.load(1)
        assert any(not torch.equal(r1[k], own[site][k]) for k in r1)  # round 2 trained them on
    assert not torch.equal(own["hosp-a"]["heads.ped.weight"], own["hosp-b"]["heads.ped.weight"])
    # The sites scored the master with their own heads: hosp-b's reported AUC is that, and
    # not the AUC of the master's untrained heads.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = {x["site"]: x for x in lines if x.get("kind") == "evaluate"}["hosp-a"]
    site = Site.from_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"], 0)
    master = load_tensors(run_dir / "master_student.safetensors")
    ins = Instruction.for_round(cfg, 2)
    own = {k: v for k, v in site.evaluate(ins, master).items() if k.startswith("student.")}
    untrained = site.evaluate(ins.model_copy(update={"heads": "averaged"}), master)
    assert own and all(reported[k] == pytest.approx(v) for k, v in own.items())
    assert any(untrained[k] != pytest.approx(v) for k, v in own.items())
