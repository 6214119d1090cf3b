"""``ark experiment``: training methods over seeds, scored once on held-out data, with paired CIs.

An experiment YAML names a simulation (model, tasks, sites, budget), the arms to compare
(each a set of overrides of the simulation's federation settings, or the centralized
baseline of equal budget, as ``ark demo`` runs it), the seeds, and the split it scores:
``val`` while choosing methods and hyperparameters, ``test`` once the choice is made. Each
(arm, seed) runs the real ServerApp loop and ClientApp over the in-process grid
(:mod:`simulations.inprocess`). A seed sets ``train.seed`` (initialisation, data order),
never the splits, so every run is scored on the same images: the union of the sites'
split of each task, predicted once by the delivered model (the master teacher, or the
centralized teacher; an arm whose sites keep their heads, ``heads: per_site``, is scored
site by site with their own heads, :mod:`simulations.site_heads`). A finished run keeps
its predictions and is not run again.

The grid is site split x arm x seed: ``site_splits`` deal the same tasks to the same sites
in other ways (the simulation's own, IID, Dirichlet label skew); the train/val/test split
comes first, so every site split is scored on the same images. Runs live in
``out_dir/<site split>/<arm>/seed-<n>``; centralized trainings, shared by the site splits
(their pooled data are the same), in ``out_dir/centralized-runs``.

``out_dir`` receives, per split scored, ``results-<split>.csv`` (site split, arm, seed,
task, AUC), ``summary-<split>.md`` (per site split: mean ± sd over seeds; each arm's ratio of
mean AUC to the reference arm's, and per task its seed-averaged difference, with paired
patient-level bootstrap 95% CIs, :mod:`ark_core.eval.compare`) and ``summary-<split>.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from ark_core.config import Strict, TaskConfig, load_config, load_yaml, require_unique, resolve_path
from ark_core.data.loaders import TaskData, load_task_data
from ark_core.data.manifest import Manifest
from ark_core.eval.compare import Scored, paired_difference, paired_ratio, summary_rows, task_auc
from ark_core.eval.evaluate import predict
from ark_core.eval.plots import pyplot, save_figure
from ark_core.fed.federation import SimulationConfig, load_simulation
from ark_core.model.checkpoint import read_metadata
from ark_core.model.factory import load_model
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation, FederationStopped
from simulations.demo import calibrated_copy, centralized_baseline, union_tasks
from simulations.inprocess import InProcessGrid
from simulations.site_heads import site_head_predictions


class Arm(Strict):
    """One method: federation overrides, or the centralized baseline.

    Either kind may change the training settings (a tuning grid's client learning rates).
    """

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
    train: dict[str, Any] = Field(
        default_factory=dict, description="Settings merged into the simulation's train settings "
        "(e.g. lr: 0.1); centralized arms too.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Arm:
        if self.centralized and self.federation:
            raise ValueError(f"arm {self.name!r}: a centralized arm takes no federation settings")
        if self.calibrate and not self.centralized:
            raise ValueError(f"arm {self.name!r}: calibrate is for the centralized arm; a "
                             "federated one sets federation: {head_calibration: final}")
        return self


class SiteSplit(Strict):
    """How the tasks' patients are dealt to the simulation's sites."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name in tables and paths.")
    method: Literal["natural", "iid", "dirichlet"] = Field(
        "natural", description="natural: the sites as the simulation defines them; iid and "
        "dirichlet: every site holds a share of every task, dealt at random or with label skew.",
    )
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration (small: strong skew).")
    seed: int = Field(0, description="Seed of the dealing (fixed across training seeds).")


class ExperimentConfig(Strict):
    """An experiment (``ark experiment EXP.yaml``); paths relative to the YAML's directory."""

    simulation: Path = Field(description="The simulation YAML the arms start from.")
    arms: list[Arm] = Field(min_length=2)
    site_splits: list[SiteSplit] = Field(
        default_factory=lambda: [SiteSplit(name="natural")], min_length=1,
        description="The grid's site splits (default: the simulation's own).",
    )
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
        require_unique(self.site_splits, "site split")
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


def simulation_for(exp: ExperimentConfig, raw: dict, split: SiteSplit, arm: Arm,
                   seed: int, base: Path) -> dict:
    """The simulation YAML content of one run (the base, then split, arm and seed)."""
    sim = _merge(raw, arm.federation)
    sim["train"] = {**sim.get("train", {}), **arm.train, "seed": seed}
    if exp.rounds is not None:
        sim["rounds"] = exp.rounds
    if exp.test_fraction is not None:
        for site in sim["sites"]:
            for task in site["tasks"]:
                task["split"] = {**task.get("split", {}), "test_fraction": exp.test_fraction}
    if split.method != "natural":
        sim["sites"] = holding(dealt_sites(sim["sites"], split), base)
    return sim


def holding(sites: list[dict], base: Path) -> list[dict]:
    """The sites with only the tasks they hold training images of.

    Strong label skew can deal a site none of a task; a site left with no task is left out.
    """
    out = []
    for site in sites:
        root = resolve_path(site["data_root"], base) if site.get("data_root") else base
        tasks = [t for t in site["tasks"] if len(load_task_data(
            [TaskConfig.model_validate(t)], root, splits=("train",))[0].train)]
        if tasks:
            out.append({**site, "tasks": tasks})
    return out


def dealt_sites(sites: list[dict], split: SiteSplit) -> list[dict]:
    """The same sites, each holding a share of every task (a task as its first site reads it).

    The splits into train, validation and test come first and do not change, so every site
    split is scored on the same held-out images.
    """
    tasks: dict[str, dict] = {}
    for site in sites:
        for task in site["tasks"]:
            tasks.setdefault(task["name"], task)
    part = {"method": split.method, "num_sites": len(sites), "seed": split.seed}
    if split.method == "dirichlet":
        part["alpha"] = split.alpha
    return [{**site, "tasks": [{**t, "partition": {**part, "site": i}} for t in tasks.values()]}
            for i, site in enumerate(sites)]


def held_out(sim: SimulationConfig, base: Path, split: str) -> list[TaskData]:
    """Each catalogue task's images of ``split``, whole (``train`` holds them).

    A task's sites hold shares (partitions) of the same data: the held-out images are its
    split before any dealing, so every site split is scored on the same images, also where
    a site holds no training images of a task and leaves it out.
    """
    parts: dict[str, list[Manifest]] = {}
    seen: set[tuple[Path, str]] = set()
    for site in sim.sites:
        root = resolve_path(site.data_root, base) if site.data_root else base
        for task in site.tasks:
            whole = task.model_copy(update={"partition": None})
            key = (root, whole.model_dump_json())
            if key in seen:  # another share of data already read whole
                continue
            seen.add(key)
            m = load_task_data([whole], root, splits=("train", split))[0].split(split)
            if m is not None and len(m):
                parts.setdefault(task.name, []).append(m)
    if not parts:
        raise ValueError(f"no site holds {split} images: set the experiment's test_fraction "
                         "(or the tasks' split.test_fraction)")
    return [TaskData(spec=s, train=Manifest.concat(parts[s.name]))
            for s in sim.task_specs() if s.name in parts]


def centralized_dir(run_dir: Path, sim_path: Path, tasks: list[TaskData]) -> Path:
    """Where a centralized run trains: one training per pooled data, settings and seed.

    The pooled training data do not depend on how the sites are dealt, so every site split
    shares one training per seed, and arms that differ only in what they do with the trained
    model (``calibrate``) share it too. The key is the simulation without its sites, and the
    pooled training images of each task (validation images are only logged: a dealing can
    leave out the validation share of a site that holds no training image of a task).
    """
    sim = yaml.safe_load(sim_path.read_text(encoding="utf-8"))
    settings = {k: v for k, v in sim.items() if k not in ("sites", "run_dir")}
    pooled = {td.spec.name: sorted(str(td.train.root / p) for p in td.train.paths) for td in tasks}
    key = hashlib.sha256(json.dumps([settings, pooled], sort_keys=True, default=str).encode())
    return run_dir.parents[2] / "centralized-runs" / f"{run_dir.name}-{key.hexdigest()[:12]}"


def _train(arm: Arm, sim_path: Path, base: Path, run_dir: Path) -> Path:
    """Run one arm once (a finished run is not run again); the delivered model's file."""
    sim, _, _ = load_simulation(sim_path, str(base), str(run_dir))
    if arm.centralized:
        tasks = union_tasks(sim, base)
        trained = centralized_dir(run_dir, sim_path, tasks)
        teacher = trained / "teacher.safetensors"
        # Trained for another arm or site split: scored, not retrained. A training that was
        # stopped has a teacher too, of fewer epochs: it resumes.
        epochs = round(sim.rounds * sim.local_epochs)
        done = teacher.with_name("teacher_calibrated.safetensors")
        if not teacher.exists() or read_metadata(teacher)["provenance"].get("epochs") != epochs:
            done.unlink(missing_ok=True)  # fitted to a teacher that is now trained further
            centralized_baseline(sim, tasks, trained)
        if not arm.calibrate:
            return teacher
        return done if done.exists() else calibrated_copy(teacher, tasks, sim.train.batch_size)
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
        out[f"{td.spec.name}.paths"] = np.asarray([td.train.paths[i] for i in p["index"]])
    return out


def select_arms(exp: ExperimentConfig, names: list[str], path: Path) -> ExperimentConfig:
    """``exp`` with only the arms ``names`` and its reference, in the YAML's order.

    Raises:
        ValueError: A name that is not an arm of ``path``, or nothing but the reference.
    """
    arms = [a.name for a in exp.arms]
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise ValueError(f"{path}: no arm(s) {unknown}; its arms are {arms}")
    kept = [a for a in exp.arms if a.name in names or a.name == exp.reference]
    if len(kept) < 2:
        raise ValueError(f"{path}: --arms {names} leaves only the reference {exp.reference!r}: "
                         "name an arm to compare with it")
    return exp.model_copy(update={"arms": kept})


def select_splits(exp: ExperimentConfig, names: list[str], path: Path) -> ExperimentConfig:
    """``exp`` with only the site splits ``names``, in the YAML's order.

    Raises:
        ValueError: A name that is not a site split of ``path``.
    """
    splits = [s.name for s in exp.site_splits]
    unknown = [n for n in names if n not in splits]
    if unknown:
        raise ValueError(f"{path}: no site split(s) {unknown}; its site splits are {splits}")
    return exp.model_copy(update={"site_splits": [s for s in exp.site_splits if s.name in names]})


def run_experiment(path: Path, *, out_dir: Path | None = None, progress: bool = True,
                   jobs: int = 1, arms: list[str] | None = None,
                   splits: list[str] | None = None) -> dict:
    """Run every (site split, arm, seed) not run yet, then write the tables and the picture.

    ``jobs`` runs train side by side in that many processes (each with the simulation's
    ``train.threads``); centralized runs that reuse a training (a calibrating arm, another
    site split) go last, after the run that trains it.
    """
    exp = load_config(path, ExperimentConfig)
    if arms:
        exp = select_arms(exp, arms, path)
    if splits:
        exp = select_splits(exp, splits, path)
    here = Path(path).resolve().parent
    sim_yaml = resolve_path(exp.simulation, here)
    raw, _ = load_yaml(sim_yaml)
    out = resolve_path(out_dir or exp.out_dir, here)
    runs = [(split, arm, seed, out / split.name / arm.name / f"seed-{seed}")
            for split in exp.site_splits for arm in exp.arms for seed in exp.seeds]
    for split, arm, seed, run_dir in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "simulation.yaml").write_text(
            yaml.safe_dump(simulation_for(exp, raw, split, arm, seed, sim_yaml.parent)),
            encoding="utf-8")
    todo = [(arm, run_dir) for _, arm, _, run_dir in runs
            if not (run_dir / f"predictions-{exp.evaluate_on}.npz").exists()
            and not _failure(run_dir, exp.evaluate_on)]
    reusing = _reusing(todo, sim_yaml.parent)
    with tqdm(total=len(todo), desc="experiment", disable=not progress, unit="run") as bar:
        for second in (False, True):
            phase = [(arm, run_dir, sim_yaml.parent, exp.evaluate_on)
                     for arm, run_dir in todo if (run_dir in reusing) == second]
            if jobs == 1 or len(phase) < 2:
                for job in phase:
                    run_one(*job)
                    bar.update()
                continue
            with ProcessPoolExecutor(min(jobs, len(phase)), mp_context=get_context("spawn")) as pool:
                for done in as_completed([pool.submit(run_one, *job) for job in phase]):
                    done.result()
                    bar.update()
    scored: dict[str, dict[str, Scored]] = {split.name: {} for split in exp.site_splits}
    failed: dict[tuple[str, str], dict[int, str]] = {}  # (split, arm) -> seed -> reason
    for split, arm, seed, run_dir in runs:
        if (reason := _failure(run_dir, exp.evaluate_on)) is not None:
            failed.setdefault((split.name, arm.name), {})[seed] = reason
            continue
        sim, _, _ = load_simulation(run_dir / "simulation.yaml", str(sim_yaml.parent), str(run_dir))
        _collect(scored[split.name], run_dir / f"predictions-{exp.evaluate_on}.npz",
                 held_out(sim, sim_yaml.parent, exp.evaluate_on), arm.name, seed)
    return write_summary(exp, scored, out, failed)


def _failure(run_dir: Path, split: str) -> str | None:
    """Why the run failed to train (a diverged run, recorded once), or None."""
    file = run_dir / f"failed-{split}.json"
    return json.loads(file.read_text(encoding="utf-8"))["reason"] if file.exists() else None


def _reusing(todo: list[tuple[Arm, Path]], base: Path) -> set[Path]:
    """The centralized runs that reuse another run's training.

    They go second, never side by side with the run that trains it.
    """
    seen, out = set(), set()
    for arm, run_dir in sorted(todo, key=lambda job: job[0].calibrate):
        if arm.centralized:
            sim_path = run_dir / "simulation.yaml"
            sim, _, _ = load_simulation(sim_path, str(base), str(run_dir))
            key = centralized_dir(run_dir, sim_path, union_tasks(sim, base))
            if key in seen:
                out.add(run_dir)
            seen.add(key)
    return out


def run_one(arm: Arm, run_dir: Path, base: Path, evaluate_on: str) -> None:
    """Train one run (unless trained) and save its predictions of the held-out images."""
    sim_path = run_dir / "simulation.yaml"
    sim, _, _ = load_simulation(sim_path, str(base), str(run_dir))
    if sim.train.threads:
        torch.set_num_threads(sim.train.threads)
    tasks = held_out(sim, base, evaluate_on)
    try:
        model = _train(arm, sim_path, base, run_dir)
    except (FederationStopped, FloatingPointError) as e:
        # A diverged arm is a result, not a crash: recorded, reported, and not run again
        # (delete the file to retry); the other runs go on.
        failure = {"error": type(e).__name__, "reason": str(e).splitlines()[0][:500]}
        partial = run_dir / f"failed-{evaluate_on}.partial.json"
        partial.write_text(json.dumps(failure), encoding="utf-8")
        partial.replace(run_dir / f"failed-{evaluate_on}.json")
        return
    if not arm.centralized and sim.heads == "per_site":  # each site scores with its own heads
        preds = site_head_predictions(model, run_dir / "fed", tasks, sim, base, evaluate_on)
    else:
        preds = _predictions(model, tasks, sim)
    partial = run_dir / f"predictions-{evaluate_on}.partial.npz"
    np.savez(partial, **preds)
    partial.replace(run_dir / f"predictions-{evaluate_on}.npz")  # whole, or not there at all


def _collect(scored: dict[str, Scored], file: Path, tasks: list[TaskData], arm: str,
             seed: int) -> None:
    preds = np.load(file)
    for td in tasks:
        name, m = td.spec.name, td.train
        index = preds[f"{name}.index"]
        paths = preds[f"{name}.paths"].tolist() if f"{name}.paths" in preds.files else None
        if paths != [m.paths[i] for i in index]:
            raise ValueError(f"{file}: its {name} predictions are of other images than the "
                             "held-out split now holds (another version's order, or changed "
                             "data): delete the file to score the run again")
        s = scored.setdefault(name, Scored(td.spec, m.targets[index],
                                           [m.patient_ids[i] for i in index], {}))
        if len(index) != len(s.target):
            raise ValueError(f"{arm} seed {seed}: {len(index)} {name} images scored, other runs "
                             f"{len(s.target)}: the held-out images differ between runs")
        s.probs[arm, seed] = preds[f"{name}.probs"]


def write_summary(exp: ExperimentConfig, scored: dict[str, dict[str, Scored]], out: Path,
                  failed: dict[tuple[str, str], dict[int, str]] | None = None) -> dict:
    """results-, summary- (.md) and summary-<split>.png in ``out``; returns what they say.

    ``scored``: site split -> task -> the held-out images with every run's probabilities.
    ``failed``: (site split, arm) -> seed -> why that run did not train to the end. An arm
    that failed in any seed is compared with nothing (its seeds are no longer paired); its
    other seeds' AUCs stay in the table.
    """
    failed = failed or {}
    split = exp.evaluate_on
    aucs = {(ss, arm, seed, task): float(task_auc(s.labels(), p, np.ones((1, len(s.target))))[0])
            for ss, by_task in scored.items() for task, s in by_task.items()
            for (arm, seed), p in s.probs.items()}
    with open(out / f"results-{split}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["site_split", "arm", "seed", "task", "auc", "split"])
        for (ss, arm, seed, task), v in sorted(aucs.items()):
            w.writerow([ss, arm, seed, task, f"{v:.6f}", split])
    summary: dict[str, Any] = {"reference": exp.reference, "split": split, "seeds": exp.seeds,
                               "summary": str(out / f"summary-{split}.md"), "site_splits": {}}
    for ss, by_task in scored.items():
        if (ss, exp.reference) in failed:
            raise ValueError(f"site split {ss}: the reference arm {exp.reference!r} failed "
                             f"(seeds {sorted(failed[ss, exp.reference])}: "
                             f"{next(iter(failed[ss, exp.reference].values()))}): nothing can "
                             "be compared with it")
        others = [a.name for a in exp.arms if a.name != exp.reference and (ss, a.name) not in failed]
        table = summary_rows({(a, s, t): v for (x, a, s, t), v in aucs.items() if x == ss})
        diffs = {(arm, task): paired_difference(s, arm, exp.reference, n_boot=exp.n_boot)
                 for task, s in by_task.items() for arm in others}
        ratios = {arm: paired_ratio(by_task, arm, exp.reference, n_boot=exp.n_boot)
                  for arm in others}
        summary["site_splits"][ss] = {
            "table": {f"{a}|{t}": v for (a, t), v in table.items()},
            "differences": {f"{a}|{t}": v for (a, t), v in diffs.items()}, "ratios": ratios,
            "failed": {a: {str(k): v for k, v in seeds.items()}
                       for (x, a), seeds in failed.items() if x == ss}}
    (out / f"summary-{split}.md").write_text(_markdown(exp, scored, summary), encoding="utf-8")
    _picture(exp, scored, summary, out / f"summary-{split}.png")
    return summary


def _markdown(exp: ExperimentConfig, scored: dict[str, dict[str, Scored]], summary: dict) -> str:
    by_task = next(iter(scored.values()))
    sizes = ", ".join(f"{t}: {len(s.target)} images of {len(set(s.patients))} patients"
                      for t, s in by_task.items())
    lines = [f"# Experiment: AUC on the {exp.evaluate_on} split ({sizes})", "",
             f"Mean ± sd over seeds {exp.seeds}; heads as delivered. Differences and ratios are "
             f"taken from `{exp.reference}` on seed-averaged AUC, with paired patient-level "
             f"bootstrap 95% CIs ({exp.n_boot} replicates).", ""]
    for ss, res in summary["site_splits"].items():
        tasks = list(scored[ss])
        lines += [f"## Site split: {ss}", "",
                  "| arm | " + " | ".join(tasks) + " | mean | ratio [95% CI] |",
                  "|---" * (len(tasks) + 3) + "|"]
        for arm in exp.arms:
            cells = [res["table"].get(f"{arm.name}|{t}") for t in tasks]
            means = [c[0] for c in cells if c]
            text = [f"{c[0]:.3f} ± {c[1]:.3f}" if c else "-" for c in cells]
            mean = f"{np.mean(means):.3f}" if means else "-"
            r = res["ratios"].get(arm.name)
            if arm.name in res["failed"]:
                ratio = f"failed in seed(s) {', '.join(res['failed'][arm.name])}"
            elif r is None:
                ratio = "reference"
            else:
                ratio = f"{r['ratio']:.3f} " + (
                    f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else "[undefined]")
            lines.append(f"| {arm.name} | " + " | ".join(text) + f" | {mean} | {ratio} |")
        lines += ["", "| arm | task | difference | 95% CI | half-width |", "|---|---|---|---|---|"]
        for key, d in res["differences"].items():
            arm, task = key.split("|")
            ci = f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else "undefined"
            hw = f"{d['half_width']:.3f}" if d["half_width"] is not None else "-"
            lines.append(f"| {arm} | {task} | {d['difference']:+.3f} | {ci} | {hw} |")
        if res["failed"]:
            lines += ["", "Runs that did not train to the end (compared with nothing):", ""]
            lines += [f"- {arm} seed {seed}: {reason}" for arm, seeds in res["failed"].items()
                      for seed, reason in seeds.items()]
        lines.append("")
    return "\n".join(lines)


def _picture(exp: ExperimentConfig, scored: dict[str, dict[str, Scored]], summary: dict,
             path: Path) -> Path:
    plt = pyplot()
    splits = list(scored)
    n_tasks = max(len(t) for t in scored.values())
    # The legend sits right of the bars, which it would hide with many arms; tab10 repeats
    # its colours after ten arms, so larger grids take tab20.
    fig, axes = plt.subplots(1, len(splits),
                             figsize=((2 + 1.6 * n_tasks) * len(splits) + 2.2, 3.6),
                             squeeze=False, sharey=True)
    width = 0.8 / len(exp.arms)
    colours = plt.get_cmap("tab10" if len(exp.arms) <= 10 else "tab20")
    for ax, ss in zip(axes[0], splits, strict=True):
        tasks, table = list(scored[ss]), summary["site_splits"][ss]["table"]
        for i, arm in enumerate(exp.arms):
            cells = [table.get(f"{arm.name}|{t}", (np.nan, 0.0, 0)) for t in tasks]
            ax.bar(np.arange(len(tasks)) + i * width, [c[0] for c in cells], width,
                   yerr=[c[1] for c in cells], capsize=3, label=arm.name, color=colours(i))
        ax.set_xticks(np.arange(len(tasks)) + width * (len(exp.arms) - 1) / 2, tasks)
        ax.set_title(f"site split: {ss}", fontsize=9)
        ax.set_ylim(0.4, 1.0)
    axes[0][0].set_ylabel(f"AUC ({exp.evaluate_on}), mean ± sd over seeds")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML")
    p.add_argument("--out-dir", type=Path, help="override out_dir")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, one process each (at most one per core)")
    p.add_argument("--arms", nargs="+", metavar="NAME",
                   help="only these arms and the reference: run what they lack, then "
                        "summarise them (runs already made are read, never trained again)")
    p.add_argument("--splits", nargs="+", metavar="NAME",
                   help="only these site splits (combines with --arms)")


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    out = run_experiment(args.config, out_dir=args.out_dir.resolve() if args.out_dir else None,
                         jobs=args.jobs, arms=args.arms, splits=args.splits)
    print(Path(out["summary"]).read_text(encoding="utf-8"), end="")
    print(f"written: {out['summary']}, and the split's results .csv and summary .png beside it")
    return 0
