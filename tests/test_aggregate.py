"""Task-aware streaming aggregation and update validation (no Flower, no data)."""

import math

import numpy as np
import pytest
import torch

from ark_core.fed.aggregate import (
    Aggregator,
    StreamingAggregator,
    UpdateRejected,
    UpdateValidator,
    float_state,
    head_task,
)
from ark_core.fed.privacy import DPAggregator, PrivacyConfig
from ark_core.fed.robust import AggregationConfig, make_aggregator
from ark_core.model.network import ArkModel
from ark_core.tasks import TaskSpec, TaskType

TASKS = [
    TaskSpec("nih", ("Pneumonia", "Effusion", "Mass"), TaskType.MULTILABEL),
    TaskSpec("ped", ("Pneumonia",), TaskType.BINARY),
    TaskSpec("rsna", ("Normal", "Other", "Opacity"), TaskType.MULTICLASS),
]


def _master() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 3)
    st = {"backbone.w": shared.weight.detach().clone(), "projector.bias": shared.bias.detach().clone()}
    for t in TASKS:
        st[f"heads.{t.name}.weight"] = torch.randn(t.num_outputs, 3)
        st[f"heads.{t.name}.bias"] = torch.randn(t.num_outputs)
    return st


def _update(master, tasks, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g)
        for k, v in master.items()
        if head_task(k) is None or head_task(k) in tasks
    }


def test_head_task_names():
    assert head_task("heads.chestxray14.weight") == "chestxray14"
    assert head_task("heads.a_b.bias") == "a_b"
    assert head_task("projector.weight") is None
    assert head_task("backbone.heads.x") is None


def test_heterogeneous_heads_weighted_by_task_examples():
    master = _master()
    a = _update(master, ["nih", "ped"], 1)
    b = _update(master, ["nih"], 2)
    agg = StreamingAggregator(master)
    agg.add("a", a, num_examples=30, task_examples={"nih": 10, "ped": 20})
    agg.add("b", b, num_examples=50, task_examples={"nih": 50})
    out = agg.result()
    # shared: weighted by the sites' total examples
    for k in ("backbone.w", "projector.bias"):
        torch.testing.assert_close(out[k], (30 * a[k] + 50 * b[k]) / 80)
    # a head seen by two sites: weighted by each site's examples of that task
    for k in ("heads.nih.weight", "heads.nih.bias"):
        torch.testing.assert_close(out[k], (10 * a[k] + 50 * b[k]) / 60)
    # a head seen by one site: that site's values
    for k in ("heads.ped.weight", "heads.ped.bias"):
        torch.testing.assert_close(out[k], a[k])
    # a head nobody trained keeps the master's values
    for k in ("heads.rsna.weight", "heads.rsna.bias"):
        assert torch.equal(out[k], master[k])
    rep = agg.report
    assert rep.contributors == {"shared": ["a", "b"], "nih": ["a", "b"], "ped": ["a"]}
    assert rep.weights["nih"] == 60 and rep.weights["shared"] == 80
    assert sorted(rep.kept) == ["heads.rsna.bias", "heads.rsna.weight"]


def test_numpy_updates_and_dtype_kept():
    master = _master()
    u = {k: v.numpy() * 2 for k, v in _update(master, ["rsna"], 3).items()}
    agg = StreamingAggregator(master)
    agg.add("s", u, 5, {"rsna": 5})
    out = agg.result()
    assert out["backbone.w"].dtype == torch.float32
    np.testing.assert_allclose(out["heads.rsna.bias"].numpy(), u["heads.rsna.bias"], rtol=1e-6)


def _bad(kind, master):
    u = _update(master, ["nih"], 7)
    if kind == "nan":
        u["backbone.w"][0, 0] = math.nan
    elif kind == "inf":
        u["heads.nih.bias"][1] = math.inf
    elif kind == "shape":
        u["projector.bias"] = torch.zeros(4)
    elif kind == "dtype":
        u["backbone.w"] = u["backbone.w"].double()
    elif kind == "extra":
        u["heads.ped.weight"] = torch.zeros(1, 3)  # a head of a task the site did not declare
    elif kind == "extra_name":
        u["backbone.unknown"] = torch.zeros(1)
    elif kind == "missing":
        del u["heads.nih.weight"]
    return u


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "dtype", "extra", "extra_name", "missing"])
def test_rejected_update_leaves_result_unchanged(kind):
    master = _master()
    good = _update(master, ["nih"], 1)
    ref = StreamingAggregator(master)
    ref.add("good", good, 10, {"nih": 10})
    agg = StreamingAggregator(master)
    agg.add("good", good, 10, {"nih": 10})
    with pytest.raises(UpdateRejected) as e:
        agg.add("evil", _bad(kind, master), 1000, {"nih": 1000})
    assert "evil" in agg.report.rejected and agg.report.rejected["evil"] == str(e.value)
    assert agg.report.sites == ["good"]
    out, expect = agg.result(), ref.result()
    for k in master:
        assert torch.equal(out[k], expect[k]), k


def test_rejection_alone_keeps_master():
    master = _master()
    agg = StreamingAggregator(master)
    with pytest.raises(UpdateRejected, match="NaN"):
        agg.add("x", _bad("nan", master), 5, {"nih": 5})
    assert agg.num_accepted == 0
    out = agg.result()
    assert all(torch.equal(out[k], master[k]) for k in master)


def test_validator_reasons():
    master = _master()
    v = UpdateValidator(master)
    with pytest.raises(UpdateRejected, match="not in the catalogue"):
        v.check(_update(master, ["nih"], 1), ["nih", "covid"])
    with pytest.raises(UpdateRejected, match="shape"):
        v.check(_bad("shape", master), ["nih"])
    with pytest.raises(UpdateRejected, match="unexpected"):
        v.check(_bad("extra", master), ["nih"])
    with pytest.raises(UpdateRejected, match="missing"):
        v.check(_bad("missing", master), ["nih"])
    v.check(_update(master, ["nih"], 1), ["nih"])


def test_bad_weights_and_duplicate_site_rejected():
    master = _master()
    agg = StreamingAggregator(master)
    with pytest.raises(UpdateRejected, match="num-examples"):
        agg.add("a", _update(master, ["nih"], 1), 0, {"nih": 0})
    agg.add("a", _update(master, ["nih"], 1), 3, {"nih": 3})
    with pytest.raises(UpdateRejected, match="second update"):
        agg.add("a", _update(master, ["nih"], 2), 3, {"nih": 3})


def test_float_state_of_a_real_model():
    model = ArkModel(
        "swin_tiny_patch4_window7_224", TASKS[:1], img_size=64, projector_dim=16,
        backbone_kwargs={"window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
                         "num_heads": [1, 1, 1, 1]},
    )
    st = float_state(model)
    assert all(v.is_floating_point() for v in st.values())
    assert "heads.nih.weight" in st and any(k.startswith("backbone.") for k in st)
    agg = StreamingAggregator(st)
    agg.add("s", {k: v.clone() for k, v in st.items()}, 1, {"nih": 1})
    out = agg.result()
    assert all(torch.equal(out[k], st[k]) for k in st)


STRATEGIES = {
    "mean": lambda m: make_aggregator(m, None),
    "norm_bounded": lambda m: make_aggregator(m, AggregationConfig(method="norm_bounded",
                                                                   norm_bound=1.0)),
    "median": lambda m: make_aggregator(m, AggregationConfig(method="median")),
    "trimmed_mean": lambda m: make_aggregator(m, AggregationConfig(method="trimmed_mean")),
    "dp": lambda m: DPAggregator(m, PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5),
                                 generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_one_aggregator(name):
    """The round loop asks nothing of a strategy beyond the Aggregator protocol."""
    master = _master()
    agg = STRATEGIES[name](master)
    assert isinstance(agg, Aggregator)
    assert agg.nbytes() == 0 and agg.num_accepted == 0
    sites = {"a": ["nih", "ped"], "b": ["nih"], "c": ["nih", "rsna"]}
    for i, (site, tasks) in enumerate(sites.items()):
        agg.add(site, _update(master, tasks, i), 10.0 + i, dict.fromkeys(tasks, 5.0))
    with pytest.raises(UpdateRejected):  # the protocol's validation, whatever the strategy
        agg.add("d", {"backbone.w": torch.zeros(1)}, 1.0, {})
    assert agg.num_accepted == 3 and "d" in agg.report.rejected
    assert agg.nbytes() >= sum(v.numel() * 4 for k, v in master.items() if head_task(k) != "ped")
    assert set(agg.norms) <= set(sites)
    result = agg.result()
    assert result.keys() == master.keys()
    assert all(r.dtype == master[k].dtype and r.shape == master[k].shape for k, r in result.items())
    net = ArkModel("swin_tiny_patch4_window7_224", TASKS, img_size=64, projector_dim=3,
                   backbone_kwargs={"window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
                                    "num_heads": [1, 1, 1, 1]})
    heads = {k: v for k, v in result.items() if k.startswith("heads.")}
    agg.result = lambda: heads  # apply loads what result gives, by name, leaving the rest
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("heads.")}
    agg.apply(net)
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in heads.items())
    assert all(torch.equal(got[k], v) for k, v in before.items())


def _round(agg, master, seed: int) -> dict[str, torch.Tensor]:
    sites = {"a": ["nih", "ped"], "b": ["nih"], "c": ["nih", "rsna"]}
    for i, (site, tasks) in enumerate(sites.items()):
        agg.add(site, _update(master, tasks, seed + i), 10.0 + i, dict.fromkeys(tasks, 5.0))
    return agg.result()


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"dp"}))
def test_one_aggregator_serves_every_round_as_a_fresh_one_would(name):
    """begin_round forgets the last round: round 2 of a reused aggregator equals a new one's."""
    master = _master()
    agg = STRATEGIES[name](master)
    first = _round(agg, master, seed=0)
    second_master = {k: v.clone() for k, v in first.items()}
    agg.begin_round(second_master)
    assert agg.num_accepted == 0 and agg.report.rejected == {} and agg.nbytes() == 0
    reused = _round(agg, second_master, seed=10)
    fresh = _round(STRATEGIES[name](second_master), second_master, seed=10)
    assert all(torch.equal(reused[k], fresh[k]) for k in master)
    assert agg.report.sites == ["a", "b", "c"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_head_only_round_averages_heads_and_keeps_the_shared_parts(name):
    master = _master()
    agg = STRATEGIES[name](None)
    agg.begin_round(master, heads_only=True)
    with pytest.raises(UpdateRejected, match="unexpected tensors"):  # shared parts not wanted
        agg.add("a", _update(master, ["nih"], 0), 10.0, {"nih": 5.0})
    heads = {"a": ["nih", "ped"], "b": ["nih"], "c": ["nih", "rsna"]}
    for i, (site, tasks) in enumerate(heads.items()):
        upd = {k: v for k, v in _update(master, tasks, i).items() if head_task(k) is not None}
        agg.add(site, upd, 10.0, dict.fromkeys(tasks, 5.0))
    out = agg.result()
    for k in ("backbone.w", "projector.bias"):
        assert torch.equal(out[k], master[k])
    assert not torch.equal(out["heads.nih.weight"], master["heads.nih.weight"])
    assert "shared" not in agg.report.contributors
    assert agg.report.contributors["nih"] == ["a", "b", "c"] and agg.report.sites == ["a", "b", "c"]


def test_a_head_only_mean_is_the_mean_of_the_heads():
    master = _master()
    agg = StreamingAggregator(master, heads_only=True)
    ups = [{k: v for k, v in _update(master, ["ped"], s).items() if head_task(k)} for s in (1, 2)]
    agg.add("a", ups[0], 1.0, {"ped": 1.0})
    agg.add("b", ups[1], 1.0, {"ped": 3.0})
    out = agg.result()
    for k in ups[0]:
        torch.testing.assert_close(out[k], (ups[0][k] + 3 * ups[1][k]) / 4)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_stateless_strategies_checkpoint_nothing_and_refuse_a_foreign_state(name):
    agg = STRATEGIES[name](_master())
    assert agg.state_dict() == {}
    agg.load_state_dict({})
    with pytest.raises(ValueError, match=r"keeps no state across rounds, got \['momentum.w'\]"):
        agg.load_state_dict({"momentum.w": torch.zeros(2)})
