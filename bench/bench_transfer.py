"""Bytes per site and round of compact transfer against fp32, on the demo, both ways.

The setting is the embedded demo's (``simulations/demo.yaml``: three sites, two tasks, the
tiny Swin at 96 px on CPU, the demo's radiographs), run in-process: the real ServerApp round
loop and the real ClientApp (egress guard and audit log included) exchange real Flower
Messages through the tests' in-process Grid, without a SuperLink. One run per option, seed
0: fp32 (the default, the baseline), then

- ``bf16``: the weights in bfloat16 up, the master in fp32 down;
- ``int8-delta+ef``: the difference from the master quantised to int8 per tensor, with
  error feedback, up; the master in fp32 down;
- ``bf16-both`` and ``int8-both``: the same up, and the master down as its bf16 or int8
  difference from the reference both sides rebuild (``transfer.downlink``).

Printed per option:

- ``bytes_per_site_round_over_fp32``: the reply's payload as the server logs it
  (``metrics.jsonl``: tensors as sent, int8 scales and the encoding manifest), the largest
  over sites and rounds;
- ``wire_bytes_uplink_over_fp32`` and ``wire_bytes_both_ways_over_fp32``: every ``train``
  Message as Flower serialises it, each distinct object of its tree (the message, its
  records, every Array and every chunk) once, as Flower pushes and pulls them, the master
  going down and the reply coming up, per site and round; the largest from round 2 on
  (round 1 sends the master in fp32 whatever the option: there is no reference yet);
- ``wire_bytes_whole_run_over_fp32``: all train messages of the run, both ways, round 1
  included.

The final AUC of each run is printed for orientation only: one seed on validation films
says nothing about quality. The quality of compact transfer is measured by the experiment
harness, paired on held-out test films over several seeds
(``simulations/experiments/transfer.yaml``).

``--quick`` (CI): two rounds, 16 images per task and site.

Usage: ``python bench/bench_transfer.py [--quick] [--rounds N] [--max-images N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _util import machine, ratio_line

from ark_core.fed.federation import load_simulation
from client.app import app as client_app
from server.loop import ArkFederation
from simulations.demo import DEMO_YAML, evaluate_file, union_tasks
from simulations.inprocess import InProcessGrid


def wire_bytes(message) -> int:
    """A Message's bytes as Flower sends them: every distinct object of its tree, serialised."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


class CountingGrid(InProcessGrid):
    """The in-process grid, counting the serialised ``train`` messages each way per node."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.down: dict[int, list[int]] = {}
        self.up: dict[int, list[int]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":  # not "train.heads" (calibration)
                self.down.setdefault(m.metadata.dst_node_id, []).append(wire_bytes(m))
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for m in replies:
            if m.metadata.message_type == "train" and m.has_content():
                self.up.setdefault(m.metadata.src_node_id, []).append(wire_bytes(m))
        return replies

OPTIONS = {
    "fp32": None,
    "bf16": {"dtype": "bf16"},
    "int8-delta+ef": {"dtype": "int8", "delta": True, "error_feedback": True},
    "bf16-both": {"dtype": "bf16", "delta": True, "downlink": "bf16"},
    "int8-both": {"dtype": "int8", "delta": True, "error_feedback": True, "downlink": "int8"},
}
GOALS = {"bf16": 0.5, "int8-delta+ef": 0.27, "bf16-both": 0.5, "int8-both": 0.27}  # uplink
BOTH_WAYS_GOALS = {"bf16": 0.75, "int8-delta+ef": 0.65, "bf16-both": 0.5, "int8-both": 0.3}


def demo_yaml(out: Path, *, seed: int, transfer: dict | None, rounds: int | None,
              max_images: int | None) -> Path:
    """The demo's simulation YAML with one seed and transfer option, written to ``out``."""
    cfg = yaml.safe_load(DEMO_YAML.read_text(encoding="utf-8"))  # merge keys resolved
    cfg["train"]["seed"] = seed
    cfg["evaluate_every"] = 0  # the final master teacher is evaluated here, once
    if rounds is not None:
        cfg["rounds"] = rounds
    if transfer is not None:
        cfg["transfer"] = transfer
    for site in cfg["sites"]:
        for task in site["tasks"]:
            task["root"] = str((DEMO_YAML.parent / task["root"]).resolve())
            if max_images is not None:
                task["max_images"] = max_images
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_one(work: Path, name: str, seed: int, transfer: dict | None, args) -> dict:
    """One federated run; returns bytes per (site, round), the final AUC and the time."""
    out = work / f"{name}-seed{seed}"
    sim_yaml = demo_yaml(out, seed=seed, transfer=transfer, rounds=args.rounds,
                         max_images=args.max_images)
    rc = {"sim-config": str(sim_yaml), "data-root": str(out), "run-dir": str(out / "run"),
          "fed-config": ""}
    sim, base, run_dir = load_simulation(sim_yaml, str(out), str(out / "run"))
    t0 = time.perf_counter()
    grid = CountingGrid(client_app, len(sim.sites), rc)
    ArkFederation(sim.federation(), run_dir, poll_interval=0.0).start(grid)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    if not all(x["accepted"] for x in train):
        raise RuntimeError(f"{name}: rejected updates: {[x.get('reason') for x in train]}")
    aucs = evaluate_file(run_dir / "master_teacher.safetensors", union_tasks(sim, base), sim)
    vals = [v for v in aucs.values() if v is not None]
    return {"bytes": {(x["site"], x["round"]): x["bytes"] for x in train},
            "encoding": sorted({x["encoding"] for x in train}),
            "auc": sum(vals) / len(vals), "auc_per_task": aucs, "seconds": seconds,
            "wire_up": grid.up, "wire_down": grid.down}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 rounds, 16 images")
    p.add_argument("--rounds", type=int, help="override the demo's rounds")
    p.add_argument("--max-images", type=int, help="images per task and site")
    p.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temp dir)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.max_images = 2, args.max_images or 16
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"machine: {machine()}")
    print(f"setting: {DEMO_YAML.name}, rounds {args.rounds or 'as in the demo'}, images per "
          f"task and site {args.max_images or 'all'}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        ref = run_one(work, "fp32", 0, None, args)
        print(f"fp32 seed 0: final AUC {ref['auc']:.4f} {_tasks(ref)}, {ref['seconds']:.0f} s",
              flush=True)
        for site in sorted({s for s, _ in ref["bytes"]}):
            n = [b for (s, _), b in ref["bytes"].items() if s == site]
            print(f"fp32 bytes per round, {site}: {n[0] / 2**20:.3f} MiB")

        for name, transfer in OPTIONS.items():
            if transfer is None:
                continue
            r = run_one(work, name, 0, transfer, args)
            ratios = [b / ref["bytes"][key] for key, b in r["bytes"].items()]
            print(f"{name} seed 0 ({', '.join(r['encoding'])}): final AUC {r['auc']:.4f} "
                  f"{_tasks(r)} (fp32 {ref['auc']:.4f}; one seed on validation films, not a "
                  f"quality result), {r['seconds']:.0f} s", flush=True)
            print(ratio_line(f"bytes_per_site_round_over_fp32[{name}]", max(ratios),
                             f"<= {GOALS[name]}"))
            wire = {way: _per_round(r[f"wire_{way}"], ref[f"wire_{way}"]) for way in ("up", "down")}
            # Round 1 sends the master in fp32 (nothing to differ from yet): steady state is
            # round 2 on, and the whole run is printed beside it.
            steady = slice(1, None) if args.rounds != 1 else slice(None)
            up = [u / fu for node in wire["up"] for u, fu in wire["up"][node][steady]]
            down = [d / fd for node in wire["down"] for d, fd in wire["down"][node][steady]]
            both = [(u + d) / (fu + fd) for node in wire["up"]
                    for (u, fu), (d, fd) in zip(wire["up"][node][steady],
                                                wire["down"][node][steady], strict=True)]
            total = sum(b for w in wire.values() for bs in w.values() for b, _ in bs)
            total_fp32 = sum(f for w in wire.values() for bs in w.values() for _, f in bs)
            print(f"{name}: serialised train messages per site and round (round 2 on), up "
                  f"{min(up):.4f}-{max(up):.4f}, down {min(down):.4f}-{max(down):.4f}, both "
                  f"ways {min(both):.4f}-{max(both):.4f} x fp32; the whole run, round 1 "
                  f"included: {total / total_fp32:.4f} x fp32 (fp32 up "
                  f"{ref['wire_up'][1][0] / 2**20:.3f} MiB, down "
                  f"{ref['wire_down'][1][0] / 2**20:.3f} MiB at node 1)")
            print(ratio_line(f"wire_bytes_uplink_over_fp32[{name}]", max(up), f"<= {GOALS[name]}"))
            print(ratio_line(f"wire_bytes_both_ways_over_fp32[{name}]", max(both),
                             f"<= {BOTH_WAYS_GOALS[name]}"))
            print(ratio_line(f"wire_bytes_whole_run_over_fp32[{name}]", total / total_fp32,
                             "none: round 1 is fp32 whatever the option"))


def _per_round(ours: dict[int, list[int]], fp32: dict[int, list[int]]) -> dict:
    """Node -> [(bytes, fp32 bytes)] round by round."""
    return {node: list(zip(bs, fp32[node], strict=True)) for node, bs in ours.items()}


def _tasks(r: dict) -> str:
    return "(" + ", ".join(f"{t} {v:.4f}" for t, v in r["auc_per_task"].items()
                           if v is not None) + ")"


if __name__ == "__main__":
    main()
