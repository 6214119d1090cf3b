"""Per-task weighting of the shared tensors: the rule, its refusals, and a real federation
whose sites state their training counts when asked their tasks."""

import json

import pytest
import torch
from fed_helpers import NIH, PED, SPLIT, write_sim

from ark_core.config import ConfigError, parse_config
from ark_core.fed.aggregate import UpdateRejected
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.protocol import INSTRUCTION_VERSION, Instruction
from ark_core.fed.task_weights import shared_weight, task_totals
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

# site -> task -> training examples: task "a" is ten times the size of task "b"
COUNTS = {"s1": {"a": 600.0}, "s2": {"a": 400.0, "b": 30.0}, "s3": {"b": 70.0}}


def test_every_task_carries_the_same_total_weight():
    totals = task_totals(COUNTS.values())
    assert totals == {"a": 1000.0, "b": 100.0}
    w = {s: shared_weight(c, totals) for s, c in COUNTS.items()}
    # Split each site's weight into its tasks' parts: each task's parts add up to N / T.
    per_task = {t: sum(n * 550.0 / totals[t] for c in COUNTS.values() for u, n in c.items()
                       if u == t) for t in totals}
    assert per_task == pytest.approx({"a": 550.0, "b": 550.0})
    assert w == pytest.approx({"s1": 330.0, "s2": 220.0 + 165.0, "s3": 385.0})
    # By examples, s3 would weigh 70 / 1100; here it weighs what its task's share gives it.
    assert w["s3"] / sum(w.values()) == pytest.approx(0.35)


def test_tasks_of_equal_size_are_weighed_by_examples():
    counts = {"s1": {"a": 50.0}, "s2": {"a": 30.0, "b": 40.0}, "s3": {"b": 40.0}}
    totals = task_totals(counts.values())
    for c in counts.values():
        assert shared_weight(c, totals) == pytest.approx(sum(c.values()))


def test_examples_of_a_task_no_site_stated_are_rejected():
    with pytest.raises(UpdateRejected, match=r"task\(s\) \['c'\] that no site stated"):
        shared_weight({"a": 10.0, "c": 5.0}, {"a": 100.0})
    assert shared_weight({"a": 10.0, "c": 0.0}, {"a": 100.0}) == pytest.approx(10.0)


def test_the_config_refuses_unweighted_combinations_and_keeps_old_fingerprints():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    on = parse_config({**base, "shared_weighting": "tasks"}, FederationConfig)
    plain = parse_config(base, FederationConfig)
    assert run_fingerprint(on) != run_fingerprint(plain)
    assert run_fingerprint(parse_config({**base, "shared_weighting": "examples"},
                                        FederationConfig)) == run_fingerprint(plain)
    ins = Instruction.from_config(Instruction.for_round(on, 1).to_config())
    assert ins.shared_weighting == "tasks" and ins.version == INSTRUCTION_VERSION == 6
    with pytest.raises(ConfigError, match="privacy averages the clipped updates with equal"):
        parse_config({**base, "shared_weighting": "tasks", "head_calibration": "off",
                      "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, FederationConfig)
    with pytest.raises(ConfigError, match="'median' is coordinate-wise and unweighted"):
        parse_config({**base, "shared_weighting": "tasks", "aggregation": "median"},
                     FederationConfig)
    parse_config({**base, "shared_weighting": "tasks",
                  "aggregation": {"method": "norm_bounded", "norm_bound": 1.0}},
                 FederationConfig)


def test_a_federation_weighs_the_shared_tensors_per_task(tmp_path):
    """Real ClientApp/ServerApp code: the counts pass the sites' egress guard with the tasks."""
    sites = [{"name": "hosp-a", "tasks": [NIH]},
             {"name": "hosp-b", "tasks": [NIH, {**PED, "max_images": 40}]},
             {"name": "hosp-c", "tasks": [{**PED, "max_images": 40, "split": {**SPLIT, "seed": 0}}]}]
    masters = {}
    for mode in ("examples", "tasks"):
        (tmp_path / mode).mkdir()
        rc = write_sim(tmp_path / mode, sites, rounds=1, evaluate_every=0,
                       head_calibration="off", shared_weighting=mode)
        cfg, run_dir = federation_from_run_config(rc)
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 3, rc))
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = {x["site"]: x for x in lines if x.get("kind") == "train"}
        assert sorted(train) == ["hosp-a", "hosp-b", "hosp-c"]
        assert all(x["accepted"] for x in train.values())
        masters[mode] = load_tensors(run_dir / "master_student.safetensors")
        if mode == "examples":
            assert not any("shared_weight" in x for x in train.values())
            continue
        # One epoch a round: the counts each site trained are the counts it stated.
        counts = {s: {t: x[f"num-examples.{t}"] for t in ("nih", "ped") if f"num-examples.{t}" in x}
                  for s, x in train.items()}
        totals = task_totals(counts.values())
        assert totals["ped"] > 2 * totals["nih"]  # unequal tasks: the weights differ from examples
        for s, x in train.items():
            assert x["shared_weight"] == pytest.approx(shared_weight(counts[s], totals))
            assert x["shared_weight"] != pytest.approx(x["num-examples"])
    shared = [k for k in masters["tasks"] if not k.startswith("heads.")]
    assert any(not torch.equal(masters["tasks"][k], masters["examples"][k]) for k in shared)


def test_equal_site_weights_ignore_the_counts(tmp_path):
    """shared_weighting: sites: every accepted site weighs 1 in the shared tensors."""
    rc = write_sim(tmp_path, rounds=1, evaluate_every=0, head_calibration="off",
                   shared_weighting="sites")
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("kind") == "train"]
    assert len(train) == 2 and {x["shared_weight"] for x in train} == {1.0}
    assert len({x["num-examples"] for x in train}) == 2  # the counts differ; the weights do not
    record = json.loads((run_dir / "state.json").read_text())["rounds"]["1"]
    assert record["weights"]["shared"] == 2.0
