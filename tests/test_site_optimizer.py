"""A site's optimiser kept across rounds: exact save/restore, and a federation whose replayed
round restores the state saved with the teacher it starts from."""

import json

import pytest
import torch
from fed_helpers import write_sim

from ark_core.model.checkpoint import load_tensors
from ark_core.train.optim_state import load_optimizer_state, optimizer_state
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
}


def _steps(model, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_restored_optimizer_continues_bit_for_bit(name):
    torch.manual_seed(0)
    straight = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    resumed = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    resumed.load_state_dict(straight.state_dict())
    opt = OPTIMIZERS[name](straight.parameters())
    _steps(straight, opt, 3, seed=1)
    first = OPTIMIZERS[name](resumed.parameters())
    _steps(resumed, first, 3, seed=1)
    saved = optimizer_state(first, resumed)
    assert saved and all("/" in k for k in saved)
    again = OPTIMIZERS[name](resumed.parameters())  # a new object, as in the next round
    load_optimizer_state(again, resumed, saved)
    _steps(straight, opt, 3, seed=2)
    _steps(resumed, again, 3, seed=2)
    pairs = list(zip(straight.parameters(), resumed.parameters(), strict=True))
    assert all(torch.isfinite(a).all() and torch.equal(a, b) for a, b in pairs)


def test_state_of_another_shape_is_refused_by_name():
    net = torch.nn.Linear(4, 3)
    opt = OPTIMIZERS["sgd"](net.parameters())
    with pytest.raises(ValueError, match=r"weight/momentum_buffer: shape \[2, 2\], the parameter"):
        load_optimizer_state(opt, net, {"weight/momentum_buffer": torch.zeros(2, 2),
                                        "gone.weight/momentum_buffer": torch.zeros(1)})


def _train_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(x["round"], x["site"]): x for x in lines if x["kind"] == "train"}


def test_a_replayed_round_restores_the_optimizer_saved_with_its_teacher(tmp_path):
    masters = {}
    for how in ("straight", "crashed"):
        (tmp_path / how).mkdir()
        rc = write_sim(tmp_path / how, rounds=2, evaluate_every=0, keep_site_optimizer=True,
                       train={"batch_size": 4, "lr": 0.05, "threads": 1})
        cfg, run_dir = federation_from_run_config(rc)
        if how == "crashed":  # killed in round 2 after both sites trained and saved their state
            with pytest.raises(KeyboardInterrupt):
                ArkFederation(cfg, run_dir, poll_interval=0.01).start(
                    InProcessGrid(client_app, 2, rc, crash_after=6))
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
        train = _train_lines(run_dir)
        assert {k: x["optimizer-from-round"] for k, x in train.items()} == {
            (1, "hosp-a"): 0, (1, "hosp-b"): 0, (2, "hosp-a"): 1, (2, "hosp-b"): 1}
        state = sorted(p.name for p in (run_dir / "sites" / "hosp-a").rglob("optimizer_*"))
        assert state == ["optimizer_round_001.safetensors", "optimizer_round_002.safetensors"]
        masters[how] = load_tensors(run_dir / "master_student.safetensors")
    assert all(torch.equal(masters["straight"][k], masters["crashed"][k]) for k in masters["straight"])
