"""A small two-task round for the data-parallel tests: the same code as one process or as a
rank of a gloo world (run as a script: ``python tests/ddp_helpers.py OUT``, with torchrun's
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from conftest import DEMO, RECIPE, demo_task  # noqa: E402

from ark_core.config import ArkConfig  # noqa: E402
from ark_core.data.dataset import BadFileCounter, TooManyBadFiles  # noqa: E402
from ark_core.data.loaders import load_task_data, make_loader  # noqa: E402
from ark_core.model.factory import create_model  # noqa: E402
from ark_core.model.network import make_teacher  # noqa: E402
from ark_core.train import distributed  # noqa: E402
from ark_core.train.cyclic import build_optimizer, train_cyclic, train_task_epoch  # noqa: E402

BATCH = 4  # the global batch; 9 and 10 films leave a last batch of 1 and of 2
SIZES = {"nih": 9, "pediatric": 10}
MISSING = (2, 7)  # pediatric films that are not there: 2 of 10 unreadable


def setup():
    """Config and the two tasks (ChestX-ray14's 14 labels and pediatric pneumonia) of the demo."""
    cfg = ArkConfig.model_validate({
        "model": {"preset": "tiny", "img_size": 64, "work_size": 64,
                  "backbone_kwargs": {"drop_path_rate": 0.0}},
        "tasks": [{**demo_task("nih"), "labels": None}, demo_task("pediatric")],
        "train": {**RECIPE, "batch_size": BATCH, "grad_clip": 1.0, "threads": 1,
                  "bad_file_fraction": 0.25}})
    tasks = load_task_data(cfg.tasks, DEMO)
    for td in tasks:
        td.train = td.train.subset(range(SIZES[td.spec.name]))
    for i in MISSING:
        tasks[1].train.paths[i] = f"missing/{i}.jpeg"
    return cfg, tasks


def models(cfg: ArkConfig, tasks, seed: int):
    torch.manual_seed(seed)
    student = create_model(cfg.model, [td.spec for td in tasks])
    torch.manual_seed(seed + 1)  # a teacher unlike the student, so consistency has a value
    return student, make_teacher(create_model(cfg.model, [td.spec for td in tasks]))


def run(world: distributed.World | None) -> dict:
    """Per-step losses of each task's epoch; a whole round (2 passes, EMA, consistency);
    whether a task-epoch with too many unreadable files is refused."""
    cfg, tasks = setup()
    device = torch.device("cpu")
    # 1. Step by step: each step's loss over the whole batch.
    student, teacher = models(cfg, tasks, seed=1)
    ddp = distributed.wrap(student, device) if world else None
    opt = build_optimizer(student, cfg.train, cfg.train.lr)
    losses = []
    for td in tasks:
        loader = make_loader(td.train, cfg.train, img_size=64, work_size=64, training=True,
                             seed=7, shard=(world.rank, world.size) if world else None)
        for batch in loader:
            stats = train_task_epoch(student, teacher, [batch], td.spec, opt, cfg.train,
                                     lam=0.5, device=device, bad_files=BadFileCounter(),
                                     progress=False, ddp=ddp)
            losses.append((stats["loss"], stats["task-loss"], stats["consistency"],
                           stats["num-examples"]))
    # 2. A round: two passes over both tasks, the teacher following by EMA.
    student, teacher = models(cfg, tasks, seed=3)
    result = train_cyclic(student, teacher, tasks, cfg.train, img_size=64, work_size=64,
                          lr=cfg.train.lr, local_epochs=2, ema_step=0, ema_total_steps=4,
                          progress=False, world=world)
    out = {"steps": losses, "metrics": result.metrics,
           "student": {k: v.clone() for k, v in student.state_dict().items()},
           "teacher": {k: v.clone() for k, v in teacher.state_dict().items()}}
    # 3. 2 unreadable films of 10 are too many at 15%, though neither rank holds both.
    strict = cfg.train.model_copy(update={"bad_file_fraction": 0.15})
    try:
        train_cyclic(student, teacher, tasks[1:], strict, img_size=64, work_size=64, lr=0.0,
                     local_epochs=1, ema_step=0, ema_total_steps=1, progress=False, world=world)
        refused = None
    except TooManyBadFiles as e:
        refused = str(e)
    return out | {"refused": refused}


if __name__ == "__main__":
    torch.set_num_threads(1)
    world = distributed.World.from_env()
    distributed.start(world, "cpu", timeout_s=60)
    torch.save(run(world), Path(sys.argv[1]) / f"rank{world.rank}.pt")
    distributed.stop()
