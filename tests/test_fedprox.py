"""FedProx: the proximal gradient, its effect on real local training, and the instruction
that carries mu to the sites (version 2, still reading version 1)."""

import json
from pathlib import Path

import pytest
import torch
from fed_helpers import write_sim
from test_training import ROOT, pediatric_config

from ark_core.data.loaders import load_task_data
from ark_core.fed.protocol import INSTRUCTION_VERSION, Instruction, InstructionError
from ark_core.model.factory import create_model
from ark_core.model.network import make_teacher
from ark_core.train.cyclic import Proximal, train_cyclic
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

torch.set_num_threads(1)


def test_the_proximal_gradient_is_mu_times_the_distance_on_trained_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    prox = Proximal(net, mu=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[0].weight.grad = torch.full_like(net[0].weight, 2.0)
    prox.add_gradient()
    assert torch.equal(net[0].weight.grad, torch.full_like(net[0].weight, 2.0 + 0.5 * 1.0))
    assert net[1].weight.grad is None  # not trained by this step: left alone


def _distance_after_training(mu: float) -> float:
    cfg = pediatric_config(Path("unused"), epochs=1)
    td = load_task_data(cfg.tasks, ROOT)[0]
    td.train = td.train.subset(range(32))
    torch.manual_seed(0)
    student = create_model(cfg.model, [td.spec])
    start = {k: v.clone() for k, v in student.state_dict().items()}
    train_cyclic(student, make_teacher(student), [td], cfg.train, img_size=96, work_size=96,
                 lr=0.05, local_epochs=2, ema_step=0, ema_total_steps=2, progress=False,
                 prox_mu=mu)
    return sum(float((v.float() - start[k].float()).norm() ** 2)
               for k, v in student.state_dict().items() if v.is_floating_point()) ** 0.5


def test_a_proximal_term_keeps_local_training_closer_to_the_master():
    plain, near = _distance_after_training(0.0), _distance_after_training(5.0)
    assert 0 < near < 0.9 * plain, (near, plain)


def test_the_instruction_carries_mu_and_still_reads_version_1():
    ins = Instruction(round=1, num_rounds=2, lr=0.1, local_epochs=1, fingerprint="f",
                      model={"preset": "tiny"}, train={}, catalogue=[], prox_mu=0.01)
    back = Instruction.from_config(ins.to_config())
    assert back.prox_mu == 0.01 and back.version == INSTRUCTION_VERSION
    old = json.loads(ins.to_config()["instruction"])
    old.pop("prox_mu")
    old["version"] = 1  # what a server of the previous release sends
    assert Instruction.from_config({"instruction": json.dumps(old)}).prox_mu == 0.0
    bad = {**old, "version": 2, "prox_mu": -1}
    with pytest.raises(InstructionError, match="prox_mu: Input should be greater than or equal to 0"):
        Instruction.from_config({"instruction": json.dumps(bad)})


def test_mu_reaches_the_sites_of_a_federation(tmp_path):
    """Real ClientApp/ServerApp: the same round with mu moves the sites' students less."""
    norms = {}
    for mu in (0.0, 5.0):
        (tmp_path / str(mu)).mkdir()
        rc = write_sim(tmp_path / str(mu), rounds=1, evaluate_every=0, prox_mu=mu,
                       train={"batch_size": 4, "lr": 0.05, "threads": 1})  # >= 2 steps a site
        cfg, run_dir = federation_from_run_config(rc)
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        norms[mu] = {x["site"]: x["update_norm"] for x in lines if x["kind"] == "train"}
    assert all(norms[5.0][s] < 0.9 * norms[0.0][s] for s in norms[0.0]), norms
