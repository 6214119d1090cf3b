"""``ark experiment``: training methods over seeds, scored once on held-out data, with paired CIs.

An experiment YAML names a simulation (model, tasks, sites, budget), the arms to compare
(each a set of overrides of the simulation's federation settings, or the centralized
baseline of equal budget, as ``ark demo`` runs it), the seeds, and the split it scores:
``val`` while choosing methods and hyperparameters, ``test`` once the choice is made. Each
(arm, seed) runs the real ServerApp loop and ClientApp over the in-process grid
(:mod:`simulations.inprocess`). A seed sets ``train.seed`` (initialisation, data order),
never the splits, so every run is scored on the same images: the union of the sites'
split of each task, predicted once by the delivered model (the master teacher, or the
centralized teacher). A finished run keeps its predictions and is not run again.

``out_dir`` receives, per split scored, ``results-<split>.csv`` (arm, seed, task, AUC),
``summary-<split>.md`` (mean ± sd over seeds; per task, each arm's seed-averaged difference
from the reference arm with its paired patient-level bootstrap 95% CI,
:mod:`ark_core.eval.compare`) and ``summary-<split>.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from ark_core.config import Strict, load_config, load_yaml, require_unique, resolve_path
from ark_core.data.loaders import TaskData, load_task_data
from ark_core.data.manifest import Manifest
from ark_core.eval.compare import Scored, paired_difference, summary_rows, task_auc
from ark_core.eval.evaluate import predict
from ark_core.eval.plots import pyplot, save_figure
from ark_core.fed.federation import SimulationConfig, load_simulation
from ark_core.model.factory import load_model
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.demo import calibrated_copy, centralized_baseline, union_tasks
from simulations.inprocess import InProcessGrid


class Arm(Strict):
    """One method: federation overrides, or the centralized baseline."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name in tables and paths.")
    centralized: bool = Field(False, description="The centralized run of equal budget.")
    calibrate: bool = Field(
        False, description="Centralized arm: re-fit its heads on the frozen teacher's embeddings "
        "of the pooled training images (what head_calibration: final does at the sites).",
    )
    federation: dict[str, Any] = Field(
        default_factory=dict, description="Settings merged into the simulation's (e.g. "
        "head_calibration: final, server_optimizer: {name: fedadam, lr: 0.01}).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Arm:
        if self.centralized and self.federation:
            raise ValueError(f"arm {self.name!r}: a centralized arm takes no federation settings")
        if self.calibrate and not self.centralized:
            raise ValueError(f"arm {self.name!r}: calibrate is for the centralized arm; a "
                             "federated one sets federation: {head_calibration: final}")
        return self


class ExperimentConfig(Strict):
    """An experiment (``ark experiment EXP.yaml``); paths relative to the YAML's directory."""

    simulation: Path = Field(description="The simulation YAML the arms start from.")
    arms: list[Arm] = Field(min_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    evaluate_on: Literal["val", "test"] = Field("test", description="The split scored.")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="Share of each site task's patients held out as test "
        "(sets every task's split.test_fraction; the splits stay fixed across seeds).",
    )
    rounds: int | None = Field(None, gt=0, description="Override the simulation's rounds.")
    reference: str | None = Field(
        None, description="The arm differences are taken from (default: the centralized one).")
    n_boot: int = Field(1000, ge=50, description="Bootstrap replicates of the paired CIs.")
    out_dir: Path = Path("runs/experiment")

    @model_validator(mode="after")
    def _arms(self) -> ExperimentConfig:
        require_unique(self.arms, "arm")
        names = [a.name for a in self.arms]
        if self.reference is None:
            central = [a.name for a in self.arms if a.centralized]
            self.reference = central[0] if central else names[0]
        elif self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not an arm ({names})")
        return self


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def simulation_for(exp: ExperimentConfig, raw: dict, arm: Arm, seed: int) -> dict:
    """The simulation YAML content of one run: the base with the arm's and seed's settings."""
    sim = _merge(raw, arm.federation)
    sim["train"] = {**sim.get("train", {}), "seed": seed}
    if exp.rounds is not None:
        sim["rounds"] = exp.rounds
    if exp.test_fraction is not None:
        for site in sim["sites"]:
            for task in site["tasks"]:
                task["split"] = {**task.get("split", {}), "test_fraction": exp.test_fraction}
    return sim


def held_out(sim: SimulationConfig, base: Path, split: str) -> list[TaskData]:
    """Each catalogue task's images of ``split``, over all sites (``train`` holds them)."""
    parts: dict[str, list[Manifest]] = {}
    for site in sim.sites:
        root = resolve_path(site.data_root, base) if site.data_root else base
        for td in load_task_data(site.tasks, root, splits=("train", split)):
            m = td.split(split)
            if m is not None and len(m):
                parts.setdefault(td.spec.name, []).append(m)
    if not parts:
        raise ValueError(f"no site holds {split} images: set the experiment's test_fraction "
                         "(or the tasks' split.test_fraction)")
    return [TaskData(spec=s, train=Manifest.concat(parts[s.name]))
            for s in sim.task_specs() if s.name in parts]


def _train(arm: Arm, sim_path: Path, base: Path, run_dir: Path) -> Path:
    """Run one arm once (a finished run is not run again); the delivered model's file."""
    sim, _, _ = load_simulation(sim_path, str(base), str(run_dir))
    if arm.centralized:
        tasks = union_tasks(sim, base)
        teacher = run_dir / "centralized" / "teacher.safetensors"
        if not teacher.exists():  # a finished run is scored on another split without retraining
            centralized_baseline(sim, tasks, run_dir / "centralized")
        return calibrated_copy(teacher, tasks, sim.train.batch_size) if arm.calibrate else teacher
    rc = {"sim-config": str(sim_path), "data-root": str(base), "run-dir": str(run_dir / "fed"),
          "fed-config": ""}
    cfg, out = federation_from_run_config(rc)
    ArkFederation(cfg, out, poll_interval=0.0).start(InProcessGrid(client_app, len(sim.sites), rc))
    teacher = out / "master_teacher.safetensors"
    return teacher if teacher.exists() else out / "master_student.safetensors"


def _predictions(path: Path, tasks: list[TaskData], sim: SimulationConfig) -> dict[str, np.ndarray]:
    model = load_model(path)
    out = {}
    for td in tasks:
        p = predict(model, td.train, img_size=sim.model.img_size,
                    work_size=sim.model.resolved_work_size, batch_size=sim.train.batch_size,
                    tasks=[td.spec.name])
        out[f"{td.spec.name}.probs"] = p[f"probs.{td.spec.name}"]
        out[f"{td.spec.name}.index"] = p["index"]
    return out


def run_experiment(path: Path, *, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Run every (arm, seed) not run yet, then write the tables and the picture."""
    exp = load_config(path, ExperimentConfig)
    here = Path(path).resolve().parent
    sim_yaml = resolve_path(exp.simulation, here)
    raw, _ = load_yaml(sim_yaml)
    out = resolve_path(out_dir or exp.out_dir, here)
    runs = [(arm, seed) for arm in exp.arms for seed in exp.seeds]
    scored: dict[str, Scored] = {}
    for arm, seed in tqdm(runs, desc="experiment", disable=not progress, unit="run"):
        run_dir = out / arm.name / f"seed-{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        sim_path = run_dir / "simulation.yaml"
        sim_path.write_text(yaml.safe_dump(simulation_for(exp, raw, arm, seed)), encoding="utf-8")
        sim, _, _ = load_simulation(sim_path, str(sim_yaml.parent), str(run_dir))
        if sim.train.threads:
            torch.set_num_threads(sim.train.threads)
        tasks = held_out(sim, sim_yaml.parent, exp.evaluate_on)
        preds = run_dir / f"predictions-{exp.evaluate_on}.npz"
        if not preds.exists():
            np.savez(preds, **_predictions(_train(arm, sim_path, sim_yaml.parent, run_dir), tasks, sim))
        _collect(scored, np.load(preds), tasks, arm.name, seed)
    return write_summary(exp, scored, out)


def _collect(scored: dict[str, Scored], preds, tasks: list[TaskData], arm: str, seed: int) -> None:
    for td in tasks:
        name, m = td.spec.name, td.train
        index = preds[f"{name}.index"]
        s = scored.setdefault(name, Scored(td.spec, m.targets[index],
                                           [m.patient_ids[i] for i in index], {}))
        if len(index) != len(s.target):
            raise ValueError(f"{arm} seed {seed}: {len(index)} {name} images scored, other runs "
                             f"{len(s.target)}: the held-out images differ between runs")
        s.probs[arm, seed] = preds[f"{name}.probs"]


def write_summary(exp: ExperimentConfig, scored: dict[str, Scored], out: Path) -> dict:
    """results-, summary- (.md) and summary-<split>.png in ``out``; returns what they say."""
    aucs = {(arm, seed, task): float(task_auc(s.labels(), p, np.ones((1, len(s.target))))[0])
            for task, s in scored.items() for (arm, seed), p in s.probs.items()}
    split = exp.evaluate_on
    with open(out / f"results-{split}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "task", "auc", "split"])
        for (arm, seed, task), v in sorted(aucs.items()):
            w.writerow([arm, seed, task, f"{v:.6f}", exp.evaluate_on])
    table = summary_rows(aucs)
    diffs = {(arm.name, task): paired_difference(s, arm.name, exp.reference, n_boot=exp.n_boot)
             for task, s in scored.items() for arm in exp.arms if arm.name != exp.reference}
    summary = {"table": {f"{a}|{t}": v for (a, t), v in table.items()},
               "differences": {f"{a}|{t}": v for (a, t), v in diffs.items()},
               "reference": exp.reference, "split": exp.evaluate_on, "seeds": exp.seeds,
               "summary": str(out / f"summary-{split}.md")}
    (out / f"summary-{split}.md").write_text(_markdown(exp, scored, table, diffs), encoding="utf-8")
    _picture(exp, list(scored), table, out / f"summary-{split}.png")
    return summary


def _markdown(exp: ExperimentConfig, scored: dict[str, Scored], table: dict, diffs: dict) -> str:
    tasks = list(scored)
    sizes = ", ".join(f"{t}: {len(s.target)} images of {len(set(s.patients))} patients"
                      for t, s in scored.items())
    lines = [f"# Experiment: AUC on the {exp.evaluate_on} split ({sizes})", "",
             f"Mean ± sd over seeds {exp.seeds}; heads as delivered.", "",
             "| arm | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for arm in exp.arms:
        cells = [table.get((arm.name, t)) for t in tasks]
        means = [c[0] for c in cells if c]
        text = [f"{c[0]:.3f} ± {c[1]:.3f}" if c else "-" for c in cells]
        mean = f"{np.mean(means):.3f}" if means else "-"
        lines.append(f"| {arm.name} | " + " | ".join(text) + f" | {mean} |")
    lines += ["", f"Difference from `{exp.reference}` (seed-averaged AUC), paired patient-level "
              f"bootstrap 95% CI ({exp.n_boot} replicates), CI half-width:", "",
              "| arm | task | difference | 95% CI | half-width |", "|---|---|---|---|---|"]
    for (arm, task), d in diffs.items():
        ci = f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else "undefined"
        hw = f"{d['half_width']:.3f}" if d["half_width"] is not None else "-"
        lines.append(f"| {arm} | {task} | {d['difference']:+.3f} | {ci} | {hw} |")
    return "\n".join(lines) + "\n"


def _picture(exp: ExperimentConfig, tasks: list[str], table: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks), 3.6))
    width = 0.8 / len(exp.arms)
    for i, arm in enumerate(exp.arms):
        cells = [table.get((arm.name, t), (np.nan, 0.0, 0)) for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, [c[0] for c in cells], width,
               yerr=[c[1] for c in cells], capsize=3, label=arm.name)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(exp.arms) - 1) / 2, tasks)
    ax.set_ylabel(f"AUC ({exp.evaluate_on}), mean ± sd over seeds")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML")
    p.add_argument("--out-dir", type=Path, help="override out_dir")


def run(args: argparse.Namespace) -> int:
    out = run_experiment(args.config, out_dir=args.out_dir.resolve() if args.out_dir else None)
    print(Path(out["summary"]).read_text(encoding="utf-8"), end="")
    print(f"written: {out['summary']}, and the split's results .csv and summary .png beside it")
    return 0
