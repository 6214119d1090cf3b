"""``ark demo``: the embedded federated Ark+ demo against a centralized run of equal budget.

1. A federated simulation (``simulations/demo.yaml``: three sites, two tasks with different
   label sets, the tiny Swin) through `flwr run .`; the server logs per round, site and task
   the validation AUC.
2. A centralized cyclic run over the union of the sites' training data with the same number
   of optimiser steps: ``rounds x local_epochs`` epochs, the same batch size, learning-rate
   schedule and EMA settings.
3. The master teacher and the centralized teacher, both evaluated on the union of the sites'
   validation splits; the federated/centralized ratio of their mean AUC, with a paired
   patient-level bootstrap 95% CI (the validation sets are small: read the CI). With
   ``head_calibration: final`` (the demo's setting) the centralized models' heads are
   re-fitted on the pooled training images the same way the sites re-fit theirs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from ark_core.config import resolve_path
from ark_core.data.loaders import TaskData, load_task_data
from ark_core.data.manifest import Manifest
from ark_core.eval.compare import Scored, paired_ratio
from ark_core.eval.evaluate import evaluate, predict
from ark_core.eval.report import write_report
from ark_core.fed.audit import read_audit
from ark_core.fed.federation import SimulationConfig, load_simulation, run_fingerprint
from ark_core.fed.privacy import PrivacyConfig
from ark_core.model.checkpoint import read_metadata, save_model
from ark_core.model.factory import load_model
from ark_core.train.calibrate import fit_heads
from ark_core.train.centralized import train_tasks
from simulations.simulate import run_simulation

DEMO_YAML = Path(__file__).resolve().parent / "demo.yaml"


def union_tasks(sim: SimulationConfig, base: Path) -> list[TaskData]:
    """Every catalogue task with the union of all sites' train and val data."""
    parts: dict[str, list[TaskData]] = defaultdict(list)
    for i, site in enumerate(sim.sites):
        root = resolve_path(site.data_root, base) if site.data_root else base
        beside = [*site.twin_tasks, *sim.tasks_beside(i, base)]
        for td in load_task_data(site.tasks, root, twin_tasks=beside):
            parts[td.spec.name].append(td)
    out = []
    for spec in sim.task_specs():
        tds = parts.get(spec.name)
        if not tds:
            continue
        out.append(
            TaskData(
                spec=spec,
                train=Manifest.concat([t.train for t in tds]),
                val=Manifest.concat([t.val for t in tds if t.val is not None]),
            )
        )
    return out


def optimiser_steps(sizes: list[int], batch_size: int) -> int:
    return sum(math.ceil(n / batch_size) for n in sizes if n)


def centralized_baseline(sim: SimulationConfig, tasks: list[TaskData], out: Path, *,
                         max_epochs: int | None = None) -> dict:
    """The centralized run with the federation's budget (see the module docstring).

    It resumes from ``out``'s checkpoint; ``max_epochs`` stops it after that many more.
    """
    epochs = sim.rounds * sim.local_epochs
    if not float(epochs).is_integer():
        raise ValueError(f"rounds x local_epochs = {epochs}: the centralized baseline of the "
                         "same budget needs a whole number of epochs")
    warmup = round(sim.train.warmup_epochs * sim.local_epochs)  # warm-up rounds -> epochs
    train = sim.train.model_copy(update={"epochs": int(epochs), "warmup_epochs": warmup})
    return train_tasks(
        tasks, sim.model, train, out, fingerprint="demo-" + run_fingerprint(sim.federation()),
        progress=False, max_epochs=max_epochs,
    )


def calibrated_copy(path: Path, tasks: list[TaskData], batch_size: int) -> Path:
    """``path``'s model with its heads re-fitted on the pooled training images, saved beside.

    What ``head_calibration: final`` does at the sites, done once on the pooled data, so a
    centralized baseline gets the same treatment as the federation it is compared with.
    """
    model = load_model(path)
    heads, _ = fit_heads(model, tasks, batch_size=batch_size)
    model.load_state_dict(heads, strict=False)
    meta = read_metadata(path)
    out = path.with_name(path.stem + "_calibrated.safetensors")
    save_model(model, out, role=meta["role"], provenance={"heads_calibrated_from": path.name})
    return out


def ratio_with_ci(numerator: Path, denominator: Path, tasks: list[TaskData], *, img_size: int,
                  work_size: int, batch_size: int, n_boot: int = 1000) -> dict:
    """Ratio of two models' mean validation AUC over tasks, with a paired bootstrap 95% CI.

    Both models are scored on the same validation images; each task's patients are resampled
    on their own, the same draw for both (:func:`ark_core.eval.compare.paired_ratio`).
    """
    scored: dict[str, Scored] = {}
    models = {"numerator": load_model(numerator), "denominator": load_model(denominator)}
    for td in tasks:
        name, m = td.spec.name, td.val
        if m is None or not len(m):
            continue
        for role, model in models.items():
            p = predict(model, m, img_size=img_size, work_size=work_size,
                        batch_size=batch_size, tasks=[name])
            idx = p["index"]
            s = scored.setdefault(name, Scored(td.spec, m.targets[idx],
                                               [m.patient_ids[i] for i in idx], {}))
            s.probs[role, 0] = p[f"probs.{name}"]
    return paired_ratio(scored, "numerator", "denominator", n_boot=n_boot)


def evaluate_file(path: Path, tasks: list[TaskData], sim: SimulationConfig) -> dict[str, float | None]:
    model = load_model(path)
    res = evaluate(
        model, tasks, img_size=sim.model.img_size, work_size=sim.model.resolved_work_size,
        batch_size=sim.train.batch_size,
    )
    return {task: r["auc_mean"] for task, r in res.items()}


def _mean(d: dict[str, float | None]) -> float | None:
    vals = [v for v in d.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_demo(sim_yaml: Path = DEMO_YAML, *, run_dir: Path | None = None, fresh: bool = False) -> dict:
    """Run the federated demo and its centralized baseline; print and return the comparison."""
    sim, base, out = load_simulation(sim_yaml, "", run_dir or "")
    if fresh and out.exists():
        shutil.rmtree(out)
    if sim.train.threads:
        torch.set_num_threads(sim.train.threads)
    state = out / "state.json"
    if state.exists() and json.loads(state.read_text()).get("finished"):
        print(f"{out}: the federated run has finished already (use --fresh to run it again)")
    else:
        run_simulation(sim_yaml, run_dir=out)

    tasks = union_tasks(sim, base)
    fed_steps = 0
    for site in sim.sites:
        root = resolve_path(site.data_root, base) if site.data_root else base
        sizes = [len(td.train) for td in load_task_data(site.tasks, root, splits=("train",))]
        fed_steps += round(optimiser_steps(sizes, sim.train.batch_size) * sim.local_epochs * sim.rounds)
    central_dir = out / "centralized"
    print(f"centralized baseline: {sim.rounds * sim.local_epochs} epochs over the union of the "
          f"sites' data -> {central_dir}", flush=True)
    centralized_baseline(sim, tasks, central_dir)
    central_steps = optimiser_steps([len(td.train) for td in tasks], sim.train.batch_size) * round(
        sim.rounds * sim.local_epochs
    )

    central = {role: central_dir / f"{role}.safetensors" for role in ("teacher", "student")}
    if sim.head_calibration == "final":  # the baseline's heads are calibrated as the federation's
        central = {r: calibrated_copy(f, tasks, sim.train.batch_size) for r, f in central.items()}
    rows = {
        "federated master teacher": evaluate_file(out / "master_teacher.safetensors", tasks, sim),
        "federated master student": evaluate_file(out / "master_student.safetensors", tasks, sim),
        "centralized teacher": evaluate_file(central["teacher"], tasks, sim),
        "centralized student": evaluate_file(central["student"], tasks, sim),
    }
    names = [td.spec.name for td in tasks]
    print("\nvalidation AUC (union of the sites' validation splits)")
    print(f"{'model':<28}" + "".join(f"{n:>12}" for n in names) + f"{'mean':>10}")
    for label, aucs in rows.items():
        cells = "".join(f"{aucs[n]:>12.3f}" if aucs.get(n) is not None else f"{'-':>12}" for n in names)
        mean = _mean(aucs)
        print(f"{label:<28}{cells}{mean:>10.3f}" if mean is not None else f"{label:<28}{cells}")
    fed, cen = _mean(rows["federated master teacher"]), _mean(rows["centralized teacher"])
    ratio = ratio_with_ci(out / "master_teacher.safetensors", central["teacher"], tasks,
                          img_size=sim.model.img_size, work_size=sim.model.resolved_work_size,
                          batch_size=sim.train.batch_size)
    print(f"\noptimiser steps: federated {fed_steps}, centralized {central_steps}")
    if fed is not None and cen:
        ci = "[{:.3f}, {:.3f}]".format(*ratio["ci"]) if ratio["ci"] else "undefined"
        print(f"federated / centralized mean AUC (teachers): {fed:.3f} / {cen:.3f} = "
              f"{ratio['ratio']:.3f}, paired patient-level bootstrap 95% CI {ci}")
    summary = {
        "auc": rows,
        "federated_over_centralized": ratio["ratio"],
        "federated_over_centralized_ci": ratio["ci"],
        "optimiser_steps": {"federated": fed_steps, "centralized": central_steps},
        "run_dir": str(out),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    png, _ = write_report(out, compare=[central_dir])
    print(f"report: {png}")
    return summary


def run_dp_demo(
    noise_multiplier: float, clip_norm: float | None = None, sim_yaml: Path = DEMO_YAML,
    *, run_dir: Path | None = None, fresh: bool = False,
) -> dict:
    """The demo with site-level DP beside the run without (which runs first if needed).

    With DP on the teachers are not collected, so the comparison is of master students.
    ``clip_norm`` defaults to the median update norm of the run without DP (its audit log).
    """
    sim, base, out = load_simulation(sim_yaml, "", run_dir or "")
    state = out / "state.json"
    if not (state.exists() and json.loads(state.read_text()).get("finished")):
        run_demo(sim_yaml, run_dir=run_dir, fresh=True)
    if clip_norm is None:
        norms = sorted(r["norm"] for r in read_audit(out / "audit.jsonl")
                       if r.get("event") == "update" and r.get("accepted") and r.get("norm"))
        clip_norm = norms[len(norms) // 2]
    dp_out = out.parent / f"{out.name}-dp"
    if fresh and dp_out.exists():
        shutil.rmtree(dp_out)
    # Calibrated heads would not be privatised: a DP run delivers its noised heads as they are.
    dp_cfg = sim.model_copy(update={"privacy": PrivacyConfig(
        clip_norm=clip_norm, noise_multiplier=noise_multiplier), "head_calibration": "off"})
    dp_out.mkdir(parents=True, exist_ok=True)
    dp_yaml = dp_out / "simulation.yaml"
    dp_yaml.write_text(yaml.safe_dump(dp_cfg.model_dump(mode="json", exclude_none=True)))
    dp_state = dp_out / "state.json"
    if not (dp_state.exists() and json.loads(dp_state.read_text()).get("finished")):
        run_simulation(dp_yaml, run_dir=dp_out, data_root=base)
    tasks = union_tasks(sim, base)
    plain = evaluate_file(out / "master_student.safetensors", tasks, sim)
    noised = evaluate_file(dp_out / "master_student.safetensors", tasks, sim)
    privacy = json.loads((dp_out / "privacy.json").read_text())
    names = [td.spec.name for td in tasks]
    print(f"\nmaster student, validation AUC (DP: clip {clip_norm:.3f}, noise {noise_multiplier})")
    print(f"{'run':<20}" + "".join(f"{n:>12}" for n in names) + f"{'mean':>10}")
    for label, aucs in (("without DP", plain), ("with DP", noised)):
        cells = "".join(f"{aucs[n]:>12.3f}" if aucs.get(n) is not None else f"{'-':>12}" for n in names)
        mean = _mean(aucs)
        print(f"{label:<20}{cells}" + (f"{mean:>10.3f}" if mean is not None else ""))
    eps = privacy["epsilon"]
    eps_text = f"{eps:.2f}" if eps is not None else "unbounded (no noise)"
    print(f"privacy: epsilon {eps_text} at delta {privacy['delta']:g} after {sim.rounds} rounds")
    summary = {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier,
               "epsilon": privacy["epsilon"], "delta": privacy["delta"],
               "auc_without_dp": plain, "auc_with_dp": noised}
    (dp_out / "dp_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEMO_YAML, help="simulation YAML")
    p.add_argument("--run-dir", type=Path, help="override run_dir (default: runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    p.add_argument("--dp-noise", type=float, metavar="Z",
                   help="also run the demo with site-level DP at this noise multiplier")
    p.add_argument("--dp-clip", type=float, metavar="C",
                   help="DP clip norm (default: the median update norm of the run without DP)")


def run(args: argparse.Namespace) -> int:
    if args.dp_noise is None:
        run_demo(args.config, run_dir=args.run_dir, fresh=args.fresh)
    else:
        run_dp_demo(args.dp_noise, args.dp_clip, args.config, run_dir=args.run_dir, fresh=args.fresh)
    return 0
