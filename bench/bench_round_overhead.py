"""Federated round wall time in simulation against the same local work done by ark_core alone.

Two simulated sites, each holding half of the embedded pediatric set, train one after the
other (each site reserves every CPU core, so Ray runs one at a time). The federated side is
a real `flwr run .` (``simulations.simulate.run_simulation``: SuperLink, Ray, message
serialisation, the site's teacher store, validation and streaming aggregation at the server);
its round times come from the run's metrics.jsonl. The local side calls
``ark_core.train.cyclic.train_cyclic`` for the same sites, tasks, schedule and settings in this
process. The federated arm does everything the local arm does and more, so a ratio below 1
can only be noise: the two arms alternate (``--reps`` repetitions, each arm a fresh run of
all rounds, the arm that goes first alternating), each steady round (round 2 on) of one arm
pairs with the same round of the other, and the figure is the median of those ratios with
min and max. Goal <= 1.15 when local training takes >= 60 s. Round 1 (cold start: Ray
workers, imports) is printed separately.

Usage: ``python bench/bench_round_overhead.py [--quick] [--local-epochs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _util import ROOT, machine, ratio_spread_line, spread

from ark_core.data.loaders import load_task_data
from ark_core.fed.federation import load_simulation
from ark_core.model.factory import create_model
from ark_core.model.network import make_teacher
from ark_core.train.cyclic import train_cyclic


def sim_config(local_epochs: int, rounds: int, max_images: int | None) -> dict:
    task = {"name": "pediatric", "dataset": "pediatric_pneumonia",
            "root": str(ROOT / "simulations" / "demo_data" / "pediatric"),
            "split": {"val_fraction": 0.1, "test_fraction": 0.0}}
    if max_images:
        task["max_images"] = max_images
    return {
        "model": {"preset": "tiny", "img_size": 96, "work_size": 96},
        "catalogue": [{"name": "pediatric", "labels": ["Pneumonia"], "task_type": "binary"}],
        "rounds": rounds, "local_epochs": local_epochs, "min_sites": 2, "evaluate_every": 0,
        "round_timeout_s": 3600,
        "train": {"optimizer": "sgd", "lr": 0.03, "batch_size": 16, "ema_m0": 0.5,
                  "threads": os.cpu_count() or 1, "seed": 0},
        "sites": [
            {"name": f"site-{k}", "tasks": [{**task, "partition": {"num_sites": 2, "site": k}}]}
            for k in range(2)
        ],
    }


def local_round_seconds(sim_yaml: Path, rounds: int) -> list[float]:
    """Per round: the sites' local work, one after the other, with ark_core alone."""
    sim, base, _ = load_simulation(sim_yaml)
    torch.set_num_threads(sim.train.threads or 1)
    specs = sim.task_specs()
    master = create_model(sim.model, specs)
    out = []
    for r in range(1, rounds + 1):
        total = 0.0
        for site in sim.sites:
            t0 = time.perf_counter()
            tasks = load_task_data(site.tasks, base)
            student = create_model(sim.model, specs)
            student.load_state_dict(master.state_dict())
            teacher = make_teacher(student)
            steps = sim.local_epochs * len(tasks)
            train_cyclic(
                student, teacher, tasks, sim.train, img_size=sim.model.img_size,
                work_size=sim.model.resolved_work_size, lr=sim.train.lr,
                local_epochs=sim.local_epochs, ema_step=(r - 1) * steps,
                ema_total_steps=rounds * steps, progress=False,
            )
            total += time.perf_counter() - t0
        out.append(total)
    return out


def federated_round_seconds(sim_yaml: Path, run_dir: Path) -> list[float]:
    from simulations.simulate import run_simulation

    out = run_simulation(sim_yaml, run_dir=run_dir, cpus_per_site=os.cpu_count() or 1)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["seconds"] for x in lines if x.get("kind") == "round"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data, 2 short rounds, 2 repetitions")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="repetitions of both arms (default 5)")
    args = p.parse_args()
    rounds = 2 if args.quick else 3
    reps = args.reps or (2 if args.quick else 5)
    local_epochs = args.local_epochs or (1 if args.quick else 16)
    print(f"machine: {machine()}", flush=True)
    ratios, fixed, cold, steady_local = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        sim_yaml = Path(tmp) / "sim.yaml"
        sim_yaml.write_text(yaml.safe_dump(sim_config(local_epochs, rounds, 48 if args.quick else None)))
        for i in range(reps):
            arms = {"local": lambda: local_round_seconds(sim_yaml, rounds),
                    "federated": lambda i=i: federated_round_seconds(sim_yaml, Path(tmp) / f"run{i}")}
            order = list(arms) if i % 2 == 0 else list(arms)[::-1]  # alternate who goes first
            got = {name: arms[name]() for name in order}
            local, fed = got["local"], got["federated"]
            print(f"repetition {i + 1} ({' then '.join(order)}): local work per round (s) "
                  f"{', '.join(f'{x:.1f}' for x in local)}; federated round (s) "
                  f"{', '.join(f'{x:.1f}' for x in fed)}", flush=True)
            cold.append(fed[0] / local[0])  # round 1: Ray workers, imports
            for f, lo in zip(fed[1:], local[1:], strict=True):
                ratios.append(f / lo)
                fixed.append(f - lo)
                steady_local.append(lo)
    print(f"round 1 (cold start), federated / local: {spread(cold, '.2f')}")
    print(f"steady rounds: local work {spread(steady_local, '.1f')} s; federated minus local "
          f"{spread(fixed, '.1f')} s (median [min, max] of {len(fixed)} round pairs)")
    if statistics.median(steady_local) < 60:
        print(f"note: local training took {statistics.median(steady_local):.0f} s < 60 s per "
              "round; the goal applies from 60 s (use --local-epochs to lengthen it)")
    print(ratio_spread_line("federated_round_over_local_work[steady]", ratios, "<= 1.15"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
