"""Peak memory of a site's ClientApp round against the same local work in a plain process.

One site, one task (the embedded pediatric films), one local epoch of 224 px images in
batches of 2, at the largest preset (``ark_plus``, Swin-L: 197M values; ``--quick``: the tiny
Swin). Each arm runs in a fresh process, its peak RSS read from ``resource.getrusage``:

- ``clientapp``: what a ``flwr-clientapp`` process does with a ``train`` message. The master's
  message arrives as a Flower ClientApp pulls it: the deflated objects of the message (its
  records, every Array and every 5 MB chunk; made by the parent process, as the SuperNode
  holds them), inflated by Flower's ``inflate_object_from_contents``. The real ClientApp
  (:data:`client.app.app`, its audit and egress mods included) handles it, and the reply's
  objects are deflated one by one, as Flower pushes them.
- ``plain``: the same local work with ark_core alone: the student made and loaded with the
  master's values, the teacher a copy of it (round 1), and ``train_cyclic`` over the same
  films, batches, optimiser and schedule.

The arms alternate (``--reps`` each, the first arm alternating). The figure is what the
ClientApp's whole process peaks above the plain one's, in multiples of the model's float
bytes (median, min and max over the pairs). Goal: at most 1x.

Usage: ``python bench/bench_clientapp.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import yaml
from _util import MIB, ROOT, machine, peak_rss_bytes, ratio_spread_line, run_child, spread

DEMO = ROOT / "simulations" / "demo_data"


def sim_config(quick: bool, run_dir: Path) -> dict:
    task = {"name": "pediatric", "dataset": "pediatric_pneumonia", "root": "pediatric",
            "max_images": 8, "split": {"val_fraction": 0.25, "test_fraction": 0.0, "seed": 1}}
    model = ({"preset": "tiny", "img_size": 64, "work_size": 75} if quick
             else {"preset": "ark_plus", "img_size": 224, "work_size": 261})
    return {
        "model": model,
        "catalogue": [{"name": "pediatric", "labels": ["Pneumonia"], "task_type": "binary"}],
        "rounds": 1, "local_epochs": 1, "evaluate_every": 0, "run_dir": str(run_dir),
        "train": {"batch_size": 2, "lr": 1e-4, "threads": os.cpu_count() or 1, "seed": 0},
        "sites": [{"name": "site-0", "tasks": [task]}],
    }


def write_master(sim_yaml: Path, out: Path) -> None:
    """The round-1 ``train`` message as a SuperNode holds it: object id -> deflated bytes."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from ark_core.fed.aggregate import float_state
    from ark_core.fed.federation import load_simulation
    from ark_core.fed.protocol import ARRAYS, CONFIG, Instruction
    from ark_core.model.factory import create_model
    from ark_core.train.cyclic import seed_everything
    from simulations.inprocess import set_server_identity

    set_server_identity(1)
    sim, _, _ = load_simulation(sim_yaml, DEMO)
    cfg = sim.federation()
    seed_everything(cfg.train.seed)
    master = float_state(create_model(cfg.model, cfg.task_specs()))
    ins = Instruction.for_round(cfg, 1, cfg.train.lr)
    content = RecordDict({CONFIG: ConfigRecord(ins.to_config()),
                          ARRAYS: ArrayRecord({k: Array(v.numpy()) for k, v in master.items()})})
    msg = Message(content, dst_node_id=1, message_type="train", group_id="1", ttl=3600)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    with out.open("wb") as f:
        pickle.dump((msg.object_id, objects), f)
    (out.parent / "model_bytes").write_text(str(sum(4 * v.numel() for v in master.values())))


def child(arm: str, sim_yaml: Path, master_file: Path) -> dict:
    import torch

    from ark_core.fed.federation import load_simulation

    torch.set_num_threads(os.cpu_count() or 1)
    sim, base, run_dir = load_simulation(sim_yaml, DEMO)
    if arm == "clientapp":
        from flwr.app import Context, RecordDict
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        from client.app import app
        from simulations.inprocess import set_server_identity

        set_server_identity(1)
        with master_file.open("rb") as f:
            mid, contents = pickle.load(f)  # as pulled from the SuperNode
        msg = inflate_object_from_contents(mid, contents)
        msg.metadata.__dict__["_message_id"] = mid
        del contents
        rc = {"sim-config": str(sim_yaml), "data-root": str(DEMO), "run-dir": str(run_dir)}
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                            "num-partitions": 1},
                          state=RecordDict(), run_config=rc)
        reply = app(msg, context)
        del msg
        assert not reply.has_error(), reply.error
        for obj in get_all_nested_objects(reply).values():  # as Flower pushes them
            obj.deflate()
    elif arm == "plain":
        from ark_core.data.loaders import load_task_data
        from ark_core.model.factory import create_model
        from ark_core.model.network import make_teacher
        from ark_core.train.cyclic import seed_everything, train_cyclic

        cfg = sim.federation()
        seed_everything(cfg.train.seed)
        student = create_model(cfg.model, cfg.task_specs())
        seed_everything(cfg.train.seed + 1)
        tasks = load_task_data(sim.sites[0].tasks, base)
        teacher = make_teacher(student)
        train_cyclic(student, teacher, tasks, cfg.train, img_size=cfg.model.img_size,
                     work_size=cfg.model.resolved_work_size, lr=cfg.train.lr, local_epochs=1,
                     ema_step=0, ema_total_steps=len(tasks), progress=False)
    else:
        raise ValueError(arm)
    return {"arm": arm, "peak": peak_rss_bytes()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny Swin at 64 px (CI smoke run)")
    p.add_argument("--reps", type=int, help="runs of each arm (default 3; --quick: 1)")
    p.add_argument("--child", nargs=3, metavar=("ARM", "SIM", "MASTER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0
    print(f"machine: {machine()}")
    reps = args.reps or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim_yaml = tmp / "sim.yaml"
        sim_yaml.write_text(yaml.safe_dump(sim_config(args.quick, tmp / "run")))
        write_master(sim_yaml, tmp / "master.pkl")
        model = int((tmp / "model_bytes").read_text())
        rows: dict[str, list[int]] = {"clientapp": [], "plain": []}
        for rep in range(reps):
            arms = ("clientapp", "plain") if rep % 2 == 0 else ("plain", "clientapp")
            for arm in arms:
                r = run_child(Path(__file__), [arm, str(sim_yaml), str(tmp / "master.pkl")])
                rows[arm].append(r["peak"])
    preset = "tiny" if args.quick else "ark_plus"
    print(f"preset {preset} at {64 if args.quick else 224} px, batch 2: model "
          f"{model / MIB:.0f} MiB of float32 values (the largest preset; it fits: see the peaks)")
    for arm, peaks in rows.items():
        print(f"{arm:>10}: peak RSS {spread([x / MIB for x in peaks], '.0f')} MiB, "
              f"{spread([x / model for x in peaks], '.2f')} x model")
    extra = [(c - q) / model for c, q in zip(rows["clientapp"], rows["plain"], strict=True)]
    print(ratio_spread_line(f"clientapp_peak_rss_above_plain_loop_over_model[{preset}]", extra,
                            "<= 1"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
