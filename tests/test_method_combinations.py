"""The methods added to the federation run together with what existed before them (compact
transfer, DP, robust aggregation, step normalisation, server optimisers): real ClientApp and
ServerApp code, two rounds each."""

import json

import pytest
import torch
from fed_helpers import write_sim

from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from client.state import HeadStore
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

COMBINATIONS = {
    # DP with the server's teacher (post-processing: a privatised master teacher), the heads
    # kept at the sites, and int8 differences with error feedback.
    "private": {"privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5},
                "teacher": "server", "heads": "per_site",
                "transfer": {"dtype": "int8", "delta": True, "error_feedback": True}},
    # Per-task weights through a norm bound, FedNova's normalisation and FedAdam.
    "robust": {"aggregation": {"method": "norm_bounded", "norm_bound": 5.0},
               "shared_weighting": "tasks", "step_normalisation": True,
               "server_optimizer": {"name": "fedadam", "lr": 0.01}, "teacher": "server",
               "transfer": "bf16"},
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_new_methods_compose_with_the_existing_ones(tmp_path, name):
    rc = write_sim(tmp_path, rounds=2, evaluate_every=0, **COMBINATIONS[name])
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"]
    for r in ("1", "2"):
        assert state["rounds"][r]["sites"] and not state["rounds"][r]["rejected"]
    teacher = load_tensors(run_dir / "master_teacher.safetensors")
    student = load_tensors(run_dir / "master_student.safetensors")
    assert all(torch.isfinite(v).all() for v in teacher.values() if v.is_floating_point())
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # the EMA lags
    if name == "private":
        assert (run_dir / "privacy.json").exists()
        assert HeadStore(run_dir / "sites" / "hosp-a", state["fingerprint"]).rounds() == [1, 2]
    else:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all("shared_weight" in x for x in lines if x.get("kind") == "train")
