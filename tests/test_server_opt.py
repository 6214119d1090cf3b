"""Server optimisers: the paper's update rules, tensors without a gradient, any inner
strategy, and a checkpoint that resumes the moments exactly (unit and federated)."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim

from ark_core.config import ConfigError, parse_config
from ark_core.fed.aggregate import Aggregator, StreamingAggregator
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.privacy import DPAggregator, PrivacyConfig
from ark_core.fed.robust import AggregationConfig, make_aggregator
from ark_core.fed.server_opt import ServerOptConfig, ServerOptimizer
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

SHAPES = {"backbone.w": (4, 3), "heads.a.weight": (2, 3), "heads.b.weight": (1, 3)}


def _master(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _replies(master, round_: int) -> list[tuple[str, dict, dict]]:
    """Two sites; task b is trained in odd rounds only (its head has no gradient otherwise)."""
    g = torch.Generator().manual_seed(100 + round_)
    out = []
    for site, tasks in (("s1", ["a"]), ("s2", ["a", "b"] if round_ % 2 else ["a"])):
        upd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in master.items()
               if not k.startswith("heads.") or k.split(".")[1] in tasks}
        out.append((site, upd, dict.fromkeys(tasks, 3.0)))
    return out


def _run(opt, master, rounds: range) -> dict[str, torch.Tensor]:
    for r in rounds:
        opt.begin_round(master)
        for site, upd, tasks in _replies(master, r):
            opt.add(site, upd, 3.0, tasks)
        master = {k: v.clone() for k, v in opt.result().items()}
    return master


def _reference(name: str, cfg: ServerOptConfig, master, rounds: range):
    """The rules of Reddi et al. (2021) written out in numpy, moments from zero."""
    x = {k: v.numpy().astype(np.float64) for k, v in master.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(t) for k, t in x.items()}
    for r in rounds:
        agg = StreamingAggregator({k: torch.from_numpy(t).float() for k, t in x.items()})
        for site, upd, tasks in _replies({k: torch.from_numpy(t).float() for k, t in x.items()}, r):
            agg.add(site, upd, 3.0, tasks)
        mean, kept = agg.result(), set(agg.report.kept)
        for k in x:
            if k in kept:
                continue
            d = mean[k].double().numpy() - x[k]
            if name == "fedavgm":
                v[k] = cfg.momentum * v[k] + d
                x[k] = x[k] + cfg.lr * v[k]
                continue
            m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * d
            if name == "fedadam":
                v[k] = cfg.beta2 * v[k] + (1 - cfg.beta2) * d**2
            else:
                v[k] = v[k] - (1 - cfg.beta2) * d**2 * np.sign(v[k] - d**2)
            x[k] = x[k] + cfg.lr * m[k] / (np.sqrt(v[k]) + cfg.tau)
    return x


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_each_optimiser_follows_its_rule_and_leaves_gradientless_heads_alone(name):
    cfg = ServerOptConfig(name=name, lr=0.5 if name == "fedavgm" else 0.05)
    master = _master()
    opt = ServerOptimizer(StreamingAggregator(), cfg)
    assert isinstance(opt, Aggregator)
    out = _run(opt, master, range(1, 5))
    ref = _reference(name, cfg, master, range(1, 5))
    for k in SHAPES:
        np.testing.assert_allclose(out[k].numpy(), ref[k], rtol=1e-4, atol=1e-5)
    # Round 4 did not train task b: its head and its moments stayed where round 3 left them.
    assert torch.equal(opt.moments["v"]["heads.b.weight"], opt.state_dict()["v.heads.b.weight"])
    assert not np.allclose(out["backbone.w"].numpy(), master["backbone.w"].numpy())


def test_fedavgm_without_momentum_at_lr_1_is_the_plain_aggregate():
    master = _master()
    plain = _run(StreamingAggregator(), master, range(1, 4))
    stepped = _run(ServerOptimizer(StreamingAggregator(),
                                   ServerOptConfig(name="fedavgm", momentum=0.0)), master, range(1, 4))
    for k in SHAPES:
        torch.testing.assert_close(stepped[k], plain[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_a_resumed_optimiser_continues_bit_for_bit(name):
    cfg = ServerOptConfig(name=name, lr=0.1)
    master = _master()
    straight = _run(ServerOptimizer(StreamingAggregator(), cfg), master, range(1, 5))
    first = ServerOptimizer(StreamingAggregator(), cfg)
    mid = _run(first, master, range(1, 3))
    state = {k: t.clone() for k, t in first.state_dict().items()}
    resumed = ServerOptimizer(StreamingAggregator(), cfg)
    resumed.load_state_dict(state)
    end = _run(resumed, mid, range(3, 5))
    assert all(torch.equal(end[k], straight[k]) for k in SHAPES)
    assert resumed.nbytes() >= sum(t.numel() * 4 for t in state.values())


def test_a_state_of_another_optimiser_is_refused():
    fedavgm = ServerOptimizer(StreamingAggregator(), ServerOptConfig(name="fedavgm"))
    _run(fedavgm, _master(), range(1, 2))
    adam = ServerOptimizer(StreamingAggregator(), ServerOptConfig(name="fedadam"))
    adam.load_state_dict(fedavgm.state_dict())  # "v" alone: Adam's m restarts from zero
    with pytest.raises(ValueError, match=r"keeps moments \['v'\]; the saved state holds \['m\."):
        fedavgm.load_state_dict(adam.state_dict() | {"m.x": torch.zeros(1)})


@pytest.mark.parametrize("inner", ["median", "dp"])
def test_any_strategy_can_be_stepped(inner):
    master = _master()
    strategy = (DPAggregator(None, PrivacyConfig(clip_norm=1.0, noise_multiplier=0.1),
                             generator=torch.Generator().manual_seed(0)) if inner == "dp"
                else make_aggregator(None, AggregationConfig(method="median")))
    opt = ServerOptimizer(strategy, ServerOptConfig(name="fedadam", lr=0.01))
    out = _run(opt, master, range(1, 3))
    assert all(torch.isfinite(out[k]).all() for k in SHAPES)
    assert opt.report.sites == ["s1", "s2"]
    if inner == "dp":
        assert set(opt.report.noise_std) == {"shared", "a"}


def test_config_shorthand_fields_and_fingerprint():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    cfg = parse_config({**base, "server_optimizer": "fedyogi"}, FederationConfig)
    assert cfg.server_optimizer == ServerOptConfig(name="fedyogi")
    assert run_fingerprint(cfg) != run_fingerprint(parse_config(base, FederationConfig))
    with pytest.raises(ConfigError, match=r"server_optimizer.lr: Input should be greater than 0"):
        parse_config({**base, "server_optimizer": {"name": "fedadam", "lr": 0}}, FederationConfig)
    with pytest.raises(ConfigError, match=r"server_optimizer.name: Input should be 'fedavgm'"):
        parse_config({**base, "server_optimizer": "sgd"}, FederationConfig)


def test_an_interrupted_federation_resumes_its_server_moments(tmp_path):
    """Real ClientApp/ServerApp code: 1 round, stop, resume == 2 rounds straight."""
    masters = {}
    for how in ("straight", "resumed"):
        (tmp_path / how).mkdir()
        rc = write_sim(tmp_path / how, rounds=2, evaluate_every=0,
                       server_optimizer={"name": "fedadam", "lr": 0.01})
        cfg, run_dir = federation_from_run_config(rc)
        if how == "resumed":
            ArkFederation(cfg, run_dir, poll_interval=0.01).start(
                InProcessGrid(client_app, 2, rc), max_rounds=1)
            saved = load_tensors(run_dir / "rounds" / "server_001.safetensors")
            assert saved and all(k.split(".")[0] in ("m", "v") for k in saved)
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
        assert json.loads((run_dir / "state.json").read_text())["finished"]
        masters[how] = load_tensors(run_dir / "master_student.safetensors")
    assert all(torch.equal(masters["straight"][k], masters["resumed"][k]) for k in masters["straight"])
