"""Robust aggregation, differential privacy and audit records in ark_core (no Flower)."""

import json
import math

import numpy as np
import pytest
import torch

from ark_core.config import ConfigError, parse_config
from ark_core.fed.aggregate import StreamingAggregator, UpdateRejected
from ark_core.fed.audit import append_audit, read_audit, tensors_sha256
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.privacy import DPAggregator, PrivacyConfig, epsilon_spent, privacy_report
from ark_core.fed.robust import (
    AggregationConfig,
    CoordinateAggregator,
    NormBoundedAggregator,
    make_aggregator,
    update_norm,
)

G = torch.Generator().manual_seed(0)
MASTER = {
    "backbone.w": torch.randn(40, 10, generator=G),
    "projector.b": torch.randn(16, generator=G),
    "heads.a.weight": torch.randn(3, 16, generator=G),
    "heads.b.weight": torch.randn(2, 16, generator=G),
}
TASKS = {"s1": ["a", "b"], "s2": ["a", "b"], "s3": ["a", "b"], "s4": ["a"]}


def _honest(site: str, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(sum(map(ord, site)))
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in MASTER.items()
            if not k.startswith("heads.") or k.split(".")[1] in TASKS[site]}


def _attack(update: dict, factor: float) -> dict:
    """master + factor * (update - master): x100 scaling or a sign flip."""
    return {k: MASTER[k] + factor * (v - MASTER[k]) for k, v in update.items()}


def _run(agg, updates: dict) -> dict:
    for site, u in updates.items():
        heads = sorted({k.split(".")[1] for k in u if k.startswith("heads.")})
        agg.add(site, u, 10.0, {t: 10.0 for t in heads})
    return agg.result()


def _dist(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def _clean() -> dict:
    return _run(StreamingAggregator(MASTER), {s: _honest(s) for s in ("s1", "s2", "s3")})


def test_norm_bound_neutralises_a_scaled_update():
    clean = _clean()
    honest = {s: _honest(s) for s in ("s1", "s2", "s3")}
    attacked = {**honest, "s3": _attack(honest["s3"], 100.0)}
    mean = _run(StreamingAggregator(MASTER), attacked)
    bound = max(update_norm(u, MASTER) for u in honest.values())
    agg = NormBoundedAggregator(MASTER, bound)
    bounded = _run(agg, attacked)
    step = _dist(clean, MASTER)  # how far one clean round moves the master
    assert _dist(mean, clean) > 10 * step  # the plain mean follows the attacker
    assert _dist(bounded, clean) < step  # the bound caps the attacker at an honest size
    assert agg.norms["s3"] == pytest.approx(100 * update_norm(honest["s3"], MASTER), rel=1e-4)
    # Honest updates within the bound are unchanged: same result as the plain mean.
    plain = _run(NormBoundedAggregator(MASTER, 1e9), honest)
    assert _dist(plain, clean) < 1e-5


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_neutralise_a_sign_flip(method):
    clean = _clean()
    honest = {s: _honest(s) for s in ("s1", "s2", "s3")}
    attacked = {**honest, "s4": _attack(_honest("s4"), -100.0)}  # 4 sites send head a
    mean = _run(StreamingAggregator(MASTER), attacked)
    robust = _run(CoordinateAggregator(MASTER, method), attacked)
    step = _dist(clean, MASTER)
    assert _dist(mean, clean) > 10 * step
    assert _dist(robust, clean) < step
    # Among 3 sites (head b has only s1-s3 here; s4 does not train it) it still applies.
    flipped3 = {**honest, "s3": _attack(honest["s3"], -100.0)}
    r3 = _run(CoordinateAggregator(MASTER, method), flipped3)
    assert _dist(r3, clean) < 2 * step
    assert _dist(_run(StreamingAggregator(MASTER), flipped3), clean) > 10 * step


def test_fewer_than_three_contributors_fall_back_to_norm_bound():
    honest = {s: _honest(s) for s in ("s1", "s2")}
    attacked = {**honest, "s2": _attack(honest["s2"], 100.0)}
    bound = update_norm(honest["s1"], MASTER)
    out = _run(CoordinateAggregator(MASTER, "median", norm_bound=bound), attacked)
    ref = _run(NormBoundedAggregator(MASTER, bound), attacked)
    assert _dist(out, ref) < 1e-4
    # Without a bound the (lower) median of the round's norms is used: s2 is cut to s1's size.
    auto = _run(CoordinateAggregator(MASTER, "median"), attacked)
    assert _dist(auto, ref) < 1e-4
    assert _dist(_run(StreamingAggregator(MASTER), attacked), ref) > 10 * _dist(ref, MASTER)


def test_robust_aggregators_validate_like_the_mean():
    for agg in (make_aggregator(MASTER, AggregationConfig(method="median")),
                make_aggregator(MASTER, AggregationConfig(method="norm_bounded", norm_bound=1))):
        bad = _honest("s1")
        bad["backbone.w"] = bad["backbone.w"].clone()
        bad["backbone.w"][0, 0] = float("nan")
        with pytest.raises(UpdateRejected, match="NaN"):
            agg.add("s1", bad, 10.0, {"a": 10.0, "b": 10.0})
        assert "s1" in agg.report.rejected and agg.num_accepted == 0
        with pytest.raises(UpdateRejected, match="unexpected"):
            agg.add("s2", {**_honest("s2"), "extra": torch.zeros(1)}, 10.0, {"a": 1.0, "b": 1.0})
    assert isinstance(make_aggregator(MASTER, AggregationConfig()), StreamingAggregator)


def test_dp_clips_and_noises_each_group_for_its_contributors():
    big = {"backbone.w": torch.zeros(200, 100), "heads.a.weight": torch.zeros(100, 100),
           "heads.b.weight": torch.zeros(100, 100)}
    cfg = PrivacyConfig(clip_norm=2.0, noise_multiplier=0.5)
    ups = {s: {k: torch.full_like(v, 1.0) for k, v in big.items()
               if k != "heads.b.weight" or s == "s1"} for s in ("s1", "s2", "s3", "s4")}
    agg = DPAggregator(big, cfg, generator=torch.Generator().manual_seed(1))
    out = _run(agg, ups)
    # Shared tensors: 4 contributors; head a: 4; head b: 1 (s1 only): noise C*z/k.
    assert agg.noise_std == pytest.approx({"shared": 0.25, "a": 0.25, "b": 1.0})
    # Each update (norm sqrt(40000 or 50000)) is clipped to 2 and the clipped means equal.
    n_all = math.sqrt(sum(v.numel() for v in big.values()))
    n_no_b = math.sqrt(big["backbone.w"].numel() + big["heads.a.weight"].numel())
    assert float(out["heads.b.weight"].mean()) == pytest.approx(2 / n_all, abs=0.02)
    assert float(out["backbone.w"].mean()) == pytest.approx(
        (2 / n_all + 3 * 2 / n_no_b) / 4, abs=0.005)
    assert float(out["backbone.w"].std()) == pytest.approx(0.25, rel=0.03)
    assert float(out["heads.b.weight"].std()) == pytest.approx(1.0, rel=0.03)
    # Without noise the result is the exact clipped mean.
    agg0 = DPAggregator(big, PrivacyConfig(clip_norm=2.0, noise_multiplier=0.0))
    out0 = _run(agg0, ups)
    assert float(out0["heads.a.weight"].std()) == 0.0


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    e1, e5 = epsilon_spent(1.0, 1, 1e-5), epsilon_spent(1.0, 5, 1e-5)
    assert 0 < e1 < e5
    assert epsilon_spent(2.0, 5, 1e-5) < e5
    assert epsilon_spent(0.0, 5, 1e-5) == math.inf and epsilon_spent(1.0, 0, 1e-5) == 0.0
    rep = privacy_report(PrivacyConfig(clip_norm=1, noise_multiplier=0), 3)
    assert rep["epsilon"] is None and json.dumps(rep)


def test_config_fields_and_fingerprint():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    cfg = parse_config(base, FederationConfig)
    assert cfg.aggregation.method == "mean" and cfg.privacy is None
    med = parse_config({**base, "aggregation": "median"}, FederationConfig)
    assert med.aggregation.method == "median"
    assert run_fingerprint(med) != run_fingerprint(cfg)
    dp = parse_config({**base, "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}},
                      FederationConfig)
    assert run_fingerprint(dp) != run_fingerprint(cfg)
    with pytest.raises(ConfigError, match="norm_bound"):
        parse_config({**base, "aggregation": {"method": "norm_bounded"}}, FederationConfig)
    with pytest.raises(ConfigError, match="privacy needs aggregation 'mean'"):
        parse_config({**base, "aggregation": "median",
                      "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, FederationConfig)
    with pytest.raises(ConfigError, match="aggregation"):
        parse_config({**base, "aggregation": "krum"}, FederationConfig)


def test_audit_log_round_trip_and_torn_line(tmp_path):
    from flwr.app import Array

    from ops.arrays import Tensors, raw_array

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = tensors_sha256({"w": x})
    assert h == tensors_sha256({"w": torch.from_numpy(x)}) == tensors_sha256(Tensors({"w": Array(x)}))
    assert h == tensors_sha256(Tensors({"w": raw_array(x)}))  # as a site's encoded payload
    assert h != tensors_sha256({"w": x + 1}) and h != tensors_sha256({"v": x})
    path = tmp_path / "audit.jsonl"
    append_audit(path, {"event": "a", "n": 1})
    append_audit(path, {"event": "b"})
    with open(path, "a") as f:
        f.write('{"event": "c", "cut sh')  # a crash mid-write
    recs = read_audit(path)
    assert [r["event"] for r in recs] == ["a", "b"] and all("time" in r for r in recs)
    append_audit(tmp_path / "bad.jsonl", {"event": "a"})
    with open(tmp_path / "bad.jsonl", "a") as f:
        f.write("garbage\n")
    append_audit(tmp_path / "bad.jsonl", {"event": "b"})
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_audit(tmp_path / "bad.jsonl")
    assert read_audit(tmp_path / "missing.jsonl") == []
