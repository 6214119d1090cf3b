"""FedNova-style step normalisation: the paper's rule per tensor group, plain FedAvg when the
steps are equal, refusals, composition, and a real federation whose sites report their steps."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim

from ark_core.config import ConfigError, parse_config
from ark_core.fed.aggregate import StreamingAggregator, UpdateRejected
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.robust import AggregationConfig, make_aggregator
from ark_core.fed.server_opt import ServerOptConfig, ServerOptimizer
from ark_core.fed.step_norm import StepNormalised, steps_of
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

SHAPES = {"backbone.w": (4, 3), "heads.a.weight": (2, 3), "heads.b.weight": (1, 3)}
# site -> (examples, steps, {task: (examples, steps)})
SITES = {"s1": (40.0, 4.0, {"a": (40.0, 4.0)}),
         "s2": (90.0, 12.0, {"a": (30.0, 3.0), "b": (60.0, 9.0)}),
         "s3": (20.0, 2.0, {"b": (20.0, 2.0)})}


def _master() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _updates(master) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {site: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in master.items()
                   if not k.startswith("heads.") or k.split(".")[1] in tasks}
            for site, (_, _, tasks) in SITES.items()}


def _fold(agg, master, updates, sites=SITES):
    agg.begin_round(master)
    for site, (n, steps, tasks) in sites.items():
        if isinstance(agg, StepNormalised):
            agg.expect(site, {"shared": steps, **{t: s for t, (_, s) in tasks.items()}})
        agg.add(site, updates[site], n, {t: m for t, (m, _) in tasks.items()})
    return agg.result()


def test_each_group_follows_fednova():
    master, updates = _master(), _updates(_master())
    got = _fold(StepNormalised(StreamingAggregator()), master, updates)
    # Wang et al. (2020), vanilla SGD: x + tau_eff * sum_i p_i (x_i - x) / tau_i, written out
    # per group in float64 (the backbone over all sites, a head over its task's sites).
    for name, x in master.items():
        group = name.split(".")[1] if name.startswith("heads.") else None
        rows = [(n, s, updates[site][name]) if group is None else (*tasks[group], updates[site][name])
                for site, (n, s, tasks) in SITES.items() if group is None or group in tasks]
        x64 = x.double().numpy()
        total = sum(n for n, _, _ in rows)
        tau_eff = sum(n / total * s for n, s, _ in rows)
        d = sum(n / total * (u.double().numpy() - x64) / s for n, s, u in rows)
        np.testing.assert_allclose(got[name].numpy(), x64 + tau_eff * d, rtol=1e-5, atol=1e-6)


def test_equal_steps_are_plain_fedavg():
    master, updates = _master(), _updates(_master())
    same = {site: (n, 5.0, {t: (m, 5.0) for t, (m, _) in tasks.items()})
            for site, (n, _, tasks) in SITES.items()}
    plain = _fold(StreamingAggregator(), master, updates, same)
    normalised = _fold(StepNormalised(StreamingAggregator()), master, updates, same)
    for k in master:
        torch.testing.assert_close(normalised[k], plain[k], rtol=1e-6, atol=1e-6)
    # Unequal steps change the result: the test above is not vacuous.
    skewed = _fold(StepNormalised(StreamingAggregator()), master, updates)
    assert not torch.allclose(skewed["backbone.w"], plain["backbone.w"])


def test_updates_without_steps_are_rejected_and_leave_the_round_untouched():
    master, updates = _master(), _updates(_master())
    agg = StepNormalised(StreamingAggregator())
    agg.begin_round(master)
    with pytest.raises(UpdateRejected, match="no local step counts"):
        agg.add("s1", updates["s1"], 40.0, {"a": 40.0})
    agg.expect("s1", {"shared": 4.0, "a": 0.0})
    with pytest.raises(UpdateRejected, match=r"claims examples but no local steps for \['a'\]"):
        agg.add("s1", updates["s1"], 40.0, {"a": 40.0})
    assert agg.report.accepted == [] and agg.result()["backbone.w"].equal(master["backbone.w"])
    with pytest.raises(UpdateRejected, match=r"no local step counts \['steps.b'\]"):
        steps_of({"steps": 3.0, "steps.a": 1.0}, ["a", "b"])


@pytest.mark.parametrize("inner", ["median", "server-optimiser"])
def test_it_composes_with_robust_rules_and_server_optimisers(inner):
    master, updates = _master(), _updates(_master())
    if inner == "median":
        agg = StepNormalised(make_aggregator(None, AggregationConfig(method="median")))
        out = _fold(agg, master, updates)
    else:
        norm = StepNormalised(StreamingAggregator())
        opt = ServerOptimizer(norm, ServerOptConfig(name="fedavgm", momentum=0.0, lr=1.0))
        opt.begin_round(master)
        for site, (n, steps, tasks) in SITES.items():
            norm.expect(site, {"shared": steps, **{t: s for t, (_, s) in tasks.items()}})
            opt.add(site, updates[site], n, {t: m for t, (m, _) in tasks.items()})
        out = opt.result()  # fedavgm at lr 1 without momentum is the plain aggregate
        want = _fold(StepNormalised(StreamingAggregator()), master, updates)
        for k in master:
            torch.testing.assert_close(out[k], want[k], rtol=1e-6, atol=1e-6)
    assert all(torch.isfinite(out[k]).all() for k in SHAPES)


def test_config_refuses_it_with_privacy_and_keeps_old_fingerprints():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    on = parse_config({**base, "step_normalisation": True}, FederationConfig)
    assert run_fingerprint(on) != run_fingerprint(parse_config(base, FederationConfig))
    assert run_fingerprint(parse_config({**base, "step_normalisation": False}, FederationConfig)) \
        == run_fingerprint(parse_config(base, FederationConfig))
    with pytest.raises(ConfigError, match="step_normalisation reweighs .* privacy accountant"):
        parse_config({**base, "step_normalisation": True,
                      "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, FederationConfig)


def test_a_federation_normalises_by_the_steps_its_sites_report(tmp_path):
    """Real ClientApp/ServerApp code: the sites send their steps through the egress guard."""
    masters = {}
    for on in (False, True):
        (tmp_path / str(on)).mkdir()
        rc = write_sim(tmp_path / str(on), rounds=1, evaluate_every=0, step_normalisation=on)
        cfg, run_dir = federation_from_run_config(rc)
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in lines if x.get("kind") == "train"]
        assert len(train) == 2 and all(x["accepted"] for x in train)
        for x in train:  # the steps add up over the site's tasks
            per_task = [v for k, v in x.items() if k.startswith("steps.")]
            assert per_task and x["steps"] == sum(per_task) > 0
        masters[on] = load_tensors(run_dir / "master_student.safetensors")
    # The two sites take different numbers of steps, so normalising changes the shared parts.
    shared = [k for k in masters[True] if not k.startswith("heads.")]
    assert any(not torch.equal(masters[True][k], masters[False][k]) for k in shared)
