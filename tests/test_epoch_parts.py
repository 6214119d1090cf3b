"""More, shorter rounds: ``local_epochs: 1/k`` trains each task on the k-th part of an epoch,
and k rounds see every training image once."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO, demo_task
from fed_helpers import write_sim
from test_client_app import _call, _message, _setup

from ark_core.config import ConfigError, TaskConfig, parse_config
from ark_core.data.loaders import load_task_data
from ark_core.fed.federation import FederationConfig, ema_position, load_simulation
from ark_core.fed.protocol import Instruction, InstructionError


def test_the_parts_of_an_epoch_are_disjoint_cover_it_and_each_epoch_has_its_own_order():
    m = load_task_data([TaskConfig.model_validate(demo_task("pediatric"))], DEMO)[0].train
    parts = [m.epoch_part(i, 4, seed=3) for i in range(8)]
    first, second = parts[:4], parts[4:]
    for epoch in (first, second):
        paths = [p for part in epoch for p in part.paths]
        assert sorted(paths) == sorted(m.paths) and len(set(paths)) == len(m.paths)
        assert max(len(p.paths) for p in epoch) - min(len(p.paths) for p in epoch) <= 1
    assert first[0].paths != second[0].paths  # a new order every epoch
    assert m.epoch_part(5, 4, seed=3).paths == parts[5].paths  # deterministic
    assert m.epoch_part(5, 4, seed=4).paths != parts[5].paths  # the run's seed changes it


@pytest.mark.parametrize("bad", [0.3, 1.5, 0.0])
def test_a_fraction_that_does_not_tile_an_epoch_is_refused(bad):
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 8}
    with pytest.raises(ConfigError, match="local_epochs"):
        parse_config({**base, "local_epochs": bad}, FederationConfig)
    assert parse_config({**base, "local_epochs": 0.25}, FederationConfig).local_epochs == 0.25
    ins = json.loads(Instruction.for_round(
        parse_config({**base, "local_epochs": 0.5}, FederationConfig), 1).to_config()["instruction"])
    ins["local_epochs"] = 0.3
    with pytest.raises(InstructionError, match="local_epochs"):
        Instruction.from_config({"instruction": json.dumps(ins)})


def test_one_ema_step_per_task_and_round_at_a_quarter_epoch():
    assert ema_position(3, 8, 0.25, 2) == (4, 16)
    assert ema_position(3, 8, 2, 2) == (8, 32)


def test_four_quarter_rounds_train_every_image_of_the_site_once(tmp_path):
    rc, fed, master, _ = _setup(tmp_path, rounds=4, local_epochs=0.25, evaluate_every=0)
    sim, base, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    n_train = len(load_task_data(sim.sites[1].tasks, base, splits=("train",))[0].train)
    seen = []
    for round_ in range(1, 5):
        m = _call(rc, _message("train", fed, round_, master, node=2), partition=1).content["metrics"]
        seen.append(int(m["num-examples.ped"]))
        assert m["ema-step"] == round_  # one task: one EMA step a round
    assert sum(seen) == n_train and max(seen) - min(seen) <= 1


def test_a_centralized_baseline_needs_a_whole_number_of_epochs(tmp_path):
    from simulations.demo import centralized_baseline

    rc = write_sim(tmp_path, rounds=3, local_epochs=0.5)
    sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    with pytest.raises(ValueError, match=r"rounds x local_epochs = 1.5: .* whole number of epochs"):
        centralized_baseline(sim, [], tmp_path / "central")
