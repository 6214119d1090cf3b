"""Rotating task order and an optimiser reset between tasks: what the cyclic trainer does
with them on real films, and how they travel to the sites."""

from __future__ import annotations

import pytest
import torch
from conftest import DEMO, RECIPE, demo_task

from ark_core.config import ArkConfig, ConfigError, TrainConfig
from ark_core.data.loaders import load_task_data
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.protocol import INSTRUCTION_VERSION, Instruction
from ark_core.model.factory import create_model
from ark_core.model.network import make_teacher
from ark_core.train.cyclic import pass_order, train_cyclic

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_tasks():
    cfg = ArkConfig.model_validate({
        "model": {"preset": "tiny", "img_size": 64, "work_size": 64},
        "tasks": [demo_task("nih"), demo_task("pediatric")], "train": RECIPE})
    tasks = load_task_data(cfg.tasks, DEMO)
    for td in tasks:
        td.train = td.train.subset(range(24))  # two batches of 16 a task-epoch
    return cfg, tasks


def _train(cfg: ArkConfig, tasks, *, ema_step: int, total: int, models=None,
           **train) -> dict[str, torch.Tensor]:
    """The student after ``train_cyclic``: from a seeded initialisation (heads in name order,
    whatever the training order), or going on with ``models`` (student, teacher)."""
    if models is None:
        torch.manual_seed(0)
        student = create_model(cfg.model, sorted((td.spec for td in tasks), key=lambda t: t.name))
        models = (student, make_teacher(student))
    train_cyclic(*models, tasks, cfg.train.model_copy(update=train), img_size=64, work_size=64,
                 lr=0.05, local_epochs=1, ema_step=ema_step, ema_total_steps=total,
                 progress=False)
    return {k: v.clone() for k, v in models[0].state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_pass_starts_one_task_later():
    tasks = ["a", "b", "c"]
    starts = [pass_order(tasks, step, "rotating")[0] for step in (0, 3, 6, 9)]
    assert starts == ["a", "b", "c", "a"]
    assert pass_order(tasks, 4, "rotating") == ["b", "c", "a"]  # mid-pass: the pass's order
    assert pass_order(tasks, 6, "fixed") == tasks
    assert pass_order(["a"], 5, "rotating") == ["a"]


def test_a_rotating_pass_trains_as_the_reordered_tasks_would(two_tasks):
    cfg, (nih, ped) = two_tasks
    # The first pass is not rotated; the second (a site's second round) starts with pediatric,
    # exactly as a fixed order listing pediatric first would.
    assert _same(_train(cfg, [nih, ped], ema_step=0, total=4, task_order="rotating"),
                 _train(cfg, [nih, ped], ema_step=0, total=4))
    rotated = _train(cfg, [nih, ped], ema_step=2, total=4, task_order="rotating")
    assert _same(rotated, _train(cfg, [ped, nih], ema_step=2, total=4))
    assert not _same(rotated, _train(cfg, [nih, ped], ema_step=2, total=4))


def test_a_reset_between_tasks_is_a_fresh_optimiser_per_task(two_tasks):
    cfg, (nih, ped) = two_tasks
    reset = _train(cfg, [nih, ped], ema_step=0, total=2, optimizer_reset="every_task")
    torch.manual_seed(0)
    student = create_model(cfg.model, [nih.spec, ped.spec])
    models = (student, make_teacher(student))
    _train(cfg, [nih], ema_step=0, total=2, models=models)  # a fresh optimiser each call
    assert _same(reset, _train(cfg, [ped], ema_step=1, total=2, models=models))
    assert not _same(reset, _train(cfg, [nih, ped], ema_step=0, total=2))  # momentum carried


def _federation(**over) -> dict:
    return {"catalogue": [{"name": "nih", "labels": ["Pneumonia"], "task_type": "multilabel"}],
            "rounds": 2, **over}


def test_the_options_reach_the_sites_and_leave_older_fingerprints_alone():
    plain = FederationConfig.model_validate(_federation())
    explicit = FederationConfig.model_validate(
        _federation(train={"task_order": "fixed", "optimizer_reset": "never"}))
    rotating = FederationConfig.model_validate(_federation(train={"task_order": "rotating"}))
    assert run_fingerprint(plain) == run_fingerprint(explicit) != run_fingerprint(rotating)
    ins = Instruction.from_config(Instruction.for_round(rotating, 1, lr=0.1).to_config())
    assert ins.train.task_order == "rotating" and ins.version == INSTRUCTION_VERSION == 6
    assert TrainConfig().task_order == "fixed" and TrainConfig().optimizer_reset == "never"


def test_a_kept_site_optimizer_that_is_reset_every_task_is_refused(tmp_path):
    from ark_core.config import load_config

    path = tmp_path / "fed.yaml"
    path.write_text("catalogue: [{name: nih, labels: [Pneumonia], task_type: multilabel}]\n"
                    "rounds: 2\nkeep_site_optimizer: true\n"
                    "train: {optimizer_reset: every_task}\n")
    with pytest.raises(ConfigError, match="the kept state would never be used"):
        load_config(path, FederationConfig)
