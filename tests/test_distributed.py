"""Data-parallel training keeps the method: two gloo ranks train as one process does at the
same global batch (step losses, final student and teacher), on real films of the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_helpers import BATCH, MISSING, run, setup

from ark_core.data.loaders import make_loader
from ark_core.train.distributed import World
from ops.procs import child_env, free_port

HELPER = Path(__file__).with_name("ddp_helpers.py")


def _ranks(out: Path, size: int = 2) -> list[dict]:
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    WORLD_SIZE=str(size), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HELPER), str(out)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(size)]
    for r, p in enumerate(procs):
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, f"rank {r}:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(size)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_gloo_ranks_train_as_one_process(tmp_path):
    ranks = _ranks(tmp_path)
    torch.set_num_threads(1)
    one = run(None)
    # Every step, including the last ones where a rank holds one film or none.
    assert len(ranks[0]["steps"]) == len(one["steps"]) == 3 + 3
    for (loss, task, cons, n), (loss1, task1, cons1, n1) in zip(ranks[0]["steps"], one["steps"],
                                                                strict=True):
        assert n == n1
        assert loss == pytest.approx(loss1, rel=1e-4)
        assert task == pytest.approx(task1, rel=1e-4)
        assert cons == pytest.approx(cons1, rel=1e-4)
    assert ranks[1]["steps"] == ranks[0]["steps"]
    for role in ("student", "teacher"):
        assert _max_diff(ranks[0][role], one[role]) <= 1e-5, role
        assert _max_diff(ranks[1][role], ranks[0][role]) == 0.0, role  # the ranks stay in step
    # The round moved the models, so the comparison says something.
    assert _max_diff(one["student"], one["teacher"]) > 1e-3
    assert ranks[0]["metrics"].keys() == one["metrics"].keys()
    for key, value in one["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-4), key
    assert one["metrics"]["bad-files"] == 2 * len(MISSING)  # per pass
    # Every rank refuses the epoch as one process does, naming both files.
    assert one["refused"] and all(r["refused"] == one["refused"] for r in ranks)


def test_shards_of_a_step_make_up_the_batch_of_one_process():
    cfg, tasks = setup()
    manifest = tasks[0].train

    def indices(shard):
        loader = make_loader(manifest, cfg.train, img_size=64, work_size=64, training=True,
                             seed=11, shard=shard)
        return [b["index"].tolist() for b in loader]

    whole = indices(None)
    parts = [indices((r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [len(whole)] * 3
    for step, batch in enumerate(whole):
        assert sorted(sum((p[step] for p in parts), [])) == sorted(batch)
    assert len(whole[-1]) == len(manifest) % BATCH  # uneven: some ranks' last share is empty
    assert indices(None) != [sorted(b) for b in sorted(whole)]  # shuffled, not in file order


def test_world_from_launchers():
    assert World.from_env({}) is None
    assert World.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(1, 4, 1)
    assert World.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8",
                           "SLURM_LOCALID": "1"}) == World(5, 8, 1)
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE"):
        World.from_env({"RANK": "x", "WORLD_SIZE": "2"})
