"""The experiment harness on real films: arms x seeds through the real apps, AUCs that match
an independent evaluation, paired differences, outputs, and a rerun that trains nothing."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ark_core.config import ConfigError, load_config
from ark_core.eval.evaluate import evaluate
from ark_core.fed.federation import load_simulation
from ark_core.model.checkpoint import load_tensors
from ark_core.model.factory import load_model
from simulations.experiment import ExperimentConfig, held_out, run_experiment, select_arms, select_splits

TWO_SITES = Path(__file__).resolve().parent / "data" / "sim_two_sites.yaml"


def _write(tmp_path: Path, **over) -> Path:
    tmp_path.mkdir(exist_ok=True)
    exp = {"simulation": str(TWO_SITES), "seeds": [0, 1], "rounds": 2, "test_fraction": 0.3,
           "n_boot": 200, "out_dir": str(tmp_path / "out"),
           "arms": [{"name": "fedavg"}, {"name": "central", "centralized": True}], **over}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_the_harness_scores_every_arm_and_seed_on_the_same_held_out_films(tmp_path):
    path = _write(tmp_path)
    summary = run_experiment(path, progress=False)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results-test.csv")))
    assert {r["site_split"] for r in rows} == {"natural"}
    assert sorted((r["arm"], r["seed"], r["task"]) for r in rows) == sorted(
        (a, s, t) for a in ("central", "fedavg") for s in ("0", "1") for t in ("nih", "pediatric"))
    # Oracle: the delivered model of a run, evaluated by ark_core.eval.evaluate on the same split.
    sim, base, _ = load_simulation(out / "natural" / "fedavg" / "seed-1" / "simulation.yaml",
                                   str(TWO_SITES.parent), str(tmp_path / "x"))
    tasks = held_out(sim, base, "test")
    model = load_model(out / "natural" / "fedavg" / "seed-1" / "fed" / "master_teacher.safetensors")
    res = evaluate(model, tasks, img_size=32, work_size=40, batch_size=16, split="train")
    for r in rows:
        if (r["arm"], r["seed"]) == ("fedavg", "1"):
            assert float(r["auc"]) == pytest.approx(res[r["task"]]["auc_mean"], abs=1e-6)
    # The difference is the seed-averaged one, taken from the centralized (reference) arm.
    auc = {(r["arm"], r["seed"], r["task"]): float(r["auc"]) for r in rows}
    for task in ("nih", "pediatric"):
        want = np.mean([auc["fedavg", s, task] - auc["central", s, task] for s in ("0", "1")])
        d = summary["site_splits"]["natural"]["differences"][f"fedavg|{task}"]
        assert d["difference"] == pytest.approx(want, abs=2e-6)  # results.csv keeps 6 decimals
        assert d["ci"] is None or d["ci"][0] <= d["ci"][1]
    md = (out / "summary-test.md").read_text()
    assert "| fedavg | nih |" in md and "paired patient-level bootstrap" in md
    assert (out / "summary-test.png").stat().st_size > 0
    # A rerun reads the saved predictions: nothing is trained again, the tables are the same.
    (trained,) = (out / "centralized-runs").glob("seed-0-*")
    model_file = trained / "teacher.safetensors"
    before = model_file.stat().st_mtime_ns
    again = run_experiment(path, progress=False)
    assert model_file.stat().st_mtime_ns == before and again == summary
    # Predictions of other images (another order) are refused, never scored against the
    # wrong targets.
    file = out / "natural" / "fedavg" / "seed-0" / "predictions-test.npz"
    saved = dict(np.load(file))
    saved["nih.paths"] = saved["nih.paths"][::-1]
    np.savez(file, **saved)
    with pytest.raises(ValueError, match=r"predictions-test.npz: its nih predictions are of "
                                         r"other images .* delete the file"):
        run_experiment(path, progress=False)


def test_a_calibrated_centralized_arm_refits_only_the_heads_of_the_same_training(tmp_path):
    arms = [{"name": "central", "centralized": True},
            {"name": "central-cal", "centralized": True, "calibrate": True},
            {"name": "central-lr", "centralized": True, "train": {"lr": 0.02}}]
    run_experiment(_write(tmp_path, arms=arms, seeds=[0]), progress=False)
    runs = sorted((tmp_path / "out" / "centralized-runs").iterdir())
    assert len(runs) == 2  # central and central-cal share one training; central-lr has its own
    lrs = {yaml.safe_load((tmp_path / "out" / "natural" / a["name"] / "seed-0" /
                           "simulation.yaml").read_text())["train"]["lr"] for a in arms}
    assert lrs == {0.01, 0.02}
    (run,) = [r for r in runs if (r / "teacher_calibrated.safetensors").exists()]
    plain = load_tensors(run / "teacher.safetensors")
    calibrated = load_tensors(run / "teacher_calibrated.safetensors")
    assert plain.keys() == calibrated.keys()
    for k in plain:
        same = torch.equal(plain[k], calibrated[k])
        assert same if not k.startswith("heads.") else not same, k


def test_a_stopped_centralized_training_resumes_instead_of_being_scored(tmp_path):
    from ark_core.config import load_yaml
    from simulations.demo import calibrated_copy, centralized_baseline, union_tasks
    from simulations.experiment import SiteSplit, centralized_dir, simulation_for

    arms = [{"name": "central", "centralized": True},
            {"name": "central-cal", "centralized": True, "calibrate": True}]
    whole = run_experiment(_write(tmp_path / "whole", arms=arms, seeds=[0]), progress=False)
    # The same training, stopped after its first epoch (what a killed experiment leaves).
    path = _write(tmp_path, arms=arms, seeds=[0])
    exp = load_config(path, ExperimentConfig)
    run_dir = tmp_path / "out" / "natural" / "central" / "seed-0"
    run_dir.mkdir(parents=True)
    raw, _ = load_yaml(TWO_SITES)
    (run_dir / "simulation.yaml").write_text(yaml.safe_dump(simulation_for(
        exp, raw, SiteSplit(name="natural"), exp.arms[0], 0, TWO_SITES.parent)))
    sim, base, _ = load_simulation(run_dir / "simulation.yaml", str(TWO_SITES.parent),
                                   str(tmp_path / "x"))
    tasks = union_tasks(sim, base)
    trained = centralized_dir(run_dir, run_dir / "simulation.yaml", tasks)
    centralized_baseline(sim, tasks, trained, max_epochs=1)
    # A calibrated copy of the stopped teacher (what the previous version could leave).
    stale = calibrated_copy(trained / "teacher.safetensors", tasks, sim.train.batch_size)
    resumed = run_experiment(path, progress=False)
    assert resumed["site_splits"] == whole["site_splits"]  # as if never stopped
    # The calibrated arm was fitted to the finished teacher, not the stopped one.
    assert stale.stat().st_mtime_ns > (trained / "teacher.safetensors").stat().st_mtime_ns


def test_site_splits_deal_every_task_to_every_site_and_score_the_same_films(tmp_path):
    splits = [{"name": "natural"}, {"name": "iid", "method": "iid"},
              {"name": "skew", "method": "dirichlet", "alpha": 0.1}]
    summary = run_experiment(_write(tmp_path, seeds=[0], rounds=1, site_splits=splits),
                             progress=False, jobs=2)  # two processes side by side
    out = tmp_path / "out"
    dealt = yaml.safe_load((out / "iid" / "fedavg" / "seed-0" / "simulation.yaml").read_text())
    for i, site in enumerate(dealt["sites"]):
        assert [t["name"] for t in site["tasks"]] == ["pediatric", "nih"]
        assert all(t["partition"] == {"method": "iid", "num_sites": 2, "site": i, "seed": 0}
                   for t in site["tasks"])
    # Strong skew deals site-b no pediatric training image: it leaves that task out.
    skew = yaml.safe_load((out / "skew" / "fedavg" / "seed-0" / "simulation.yaml").read_text())
    assert [[t["name"] for t in s["tasks"]] for s in skew["sites"]] == [["pediatric", "nih"], ["nih"]]
    # Every site split is scored on the same held-out films (each task's split, whole).
    films = {}
    for ss in ("natural", "iid", "skew"):
        sim, base, _ = load_simulation(out / ss / "fedavg" / "seed-0" / "simulation.yaml",
                                       str(TWO_SITES.parent), str(tmp_path / "x"))
        films[ss] = {td.spec.name: sorted(td.train.paths) for td in held_out(sim, base, "test")}
    assert films["natural"] == films["iid"] == films["skew"] and all(films["iid"].values())
    # The pooled data are the same whatever the dealing: one centralized training serves all.
    assert len(list((out / "centralized-runs").iterdir())) == 1
    # The ratio is that of the mean over tasks of the arms' AUCs (one seed here).
    rows = list(csv.DictReader(open(out / "results-test.csv")))
    for ss in ("natural", "iid"):
        auc = {(r["arm"], r["task"]): float(r["auc"]) for r in rows if r["site_split"] == ss}
        want = np.mean([auc["fedavg", t] for t in ("nih", "pediatric")]) / np.mean(
            [auc["central", t] for t in ("nih", "pediatric")])
        r = summary["site_splits"][ss]["ratios"]["fedavg"]
        assert r["ratio"] == pytest.approx(want, abs=1e-5)
        assert r["ci"] is None or r["ci"][0] <= r["ci"][1]
    md = (out / "summary-test.md").read_text()
    assert all(f"## Site split: {ss}" in md for ss in ("natural", "iid", "skew"))


def test_an_unknown_reference_or_a_centralized_arm_with_settings_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reference 'nope' is not an arm"):
        load_config(_write(tmp_path, reference="nope"), ExperimentConfig)
    arms = [{"name": "a"}, {"name": "c", "centralized": True, "federation": {"prox_mu": 0.1}}]
    with pytest.raises(ConfigError, match="a centralized arm takes no federation settings"):
        load_config(_write(tmp_path, arms=arms), ExperimentConfig)


def test_arms_named_on_the_command_line_keep_the_reference_and_the_yamls_order(tmp_path):
    arms = [{"name": n} for n in ("ref", "a", "b", "c")]
    path = _write(tmp_path, arms=arms, reference="ref")
    exp = load_config(path, ExperimentConfig)
    assert [a.name for a in select_arms(exp, ["c", "a"], path).arms] == ["ref", "a", "c"]
    with pytest.raises(ValueError, match=r"no arm\(s\) \['d'\]; its arms are"):
        select_arms(exp, ["a", "d"], path)
    with pytest.raises(ValueError, match="leaves only the reference 'ref'"):
        select_arms(exp, ["ref"], path)


def test_site_splits_named_on_the_command_line_keep_the_yamls_order(tmp_path):
    splits = [{"name": "natural"}, {"name": "iid", "method": "iid"},
              {"name": "skew", "method": "dirichlet", "alpha": 0.5}]
    path = _write(tmp_path, site_splits=splits)
    exp = load_config(path, ExperimentConfig)
    assert [s.name for s in select_splits(exp, ["skew", "natural"], path).site_splits] == [
        "natural", "skew"]
    with pytest.raises(ValueError, match=r"no site split\(s\) \['x'\]; its site splits are"):
        select_splits(exp, ["iid", "x"], path)


def test_the_demo_ratio_is_that_of_the_evaluated_aucs_with_a_paired_ci(tiny_run):
    from conftest import demo_task

    from ark_core.config import TaskConfig
    from ark_core.data.loaders import load_task_data
    from simulations.demo import ratio_with_ci

    tasks = load_task_data([TaskConfig.model_validate(demo_task(n)) for n in ("pediatric", "nih")],
                           Path("."))
    sizes = {"img_size": 96, "work_size": 96, "batch_size": 32}
    files = {role: tiny_run / f"{role}.safetensors" for role in ("teacher", "student")}
    got = ratio_with_ci(files["teacher"], files["student"], tasks, **sizes, n_boot=300)
    # Oracle: ark_core.eval.evaluate's mean validation AUC of each model, averaged over tasks.
    mean = {role: np.mean([r["auc_mean"] for r in evaluate(load_model(f), tasks, **sizes).values()])
            for role, f in files.items()}
    assert got["ratio"] == pytest.approx(mean["teacher"] / mean["student"], abs=1e-6)
    assert got["ci"][0] < got["ratio"] < got["ci"][1]
    same = ratio_with_ci(files["teacher"], files["teacher"], tasks, **sizes, n_boot=300)
    assert same["ratio"] == 1.0 and same["ci"] == [1.0, 1.0]  # paired: no spread at all


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "simulations"
                                         / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_builds_a_valid_simulation_for_each_run(path):
    from ark_core.config import load_yaml
    from ark_core.fed.federation import SimulationConfig
    from simulations.experiment import SiteSplit, simulation_for

    exp = load_config(path, ExperimentConfig)
    raw, _ = load_yaml(path.parent / exp.simulation)
    natural = SiteSplit(name="natural")  # dealing reads the data, which may live elsewhere
    for arm in exp.arms:
        sim = SimulationConfig.model_validate(
            simulation_for(exp, raw, natural, arm, exp.seeds[0], path.parent.parent))
        assert sim.train.seed == exp.seeds[0]


def test_an_arm_with_site_heads_scores_each_sites_share_with_its_own_heads(tmp_path):
    """heads: per_site (FedArk's reference): the union over sites of each site's held-out
    share, scored with the delivered model and that site's own heads."""
    arms = [{"name": "fedark", "federation": {"heads": "per_site", "shared_weighting": "sites"}},
            {"name": "central", "centralized": True}]
    path = _write(tmp_path, arms=arms, seeds=[0], reference="central",
                  site_splits=[{"name": "natural"}, {"name": "iid", "method": "iid"}])
    run_experiment(path, progress=False)
    out = tmp_path / "out"
    rows = [r for r in csv.DictReader(open(out / "results-test.csv")) if r["arm"] == "fedark"]
    assert sorted((r["site_split"], r["task"]) for r in rows) == [
        ("iid", "nih"), ("iid", "pediatric"), ("natural", "nih"), ("natural", "pediatric")]
    # Oracle (natural split: each site holds one task whole): the master teacher with the
    # heads of that site's own teacher, evaluated on the task's held-out films.
    run = out / "natural" / "fedark" / "seed-0"
    sim, base, _ = load_simulation(run / "simulation.yaml", str(TWO_SITES.parent),
                                   str(tmp_path / "x"))
    tasks = {td.spec.name: td for td in held_out(sim, base, "test")}
    fingerprint = yaml.safe_load((run / "fed" / "state.json").read_text())["fingerprint"]
    auc = {r["task"]: float(r["auc"]) for r in rows if r["site_split"] == "natural"}
    for site, task in (("site-a", "pediatric"), ("site-b", "nih")):
        model = load_model(run / "fed" / "master_teacher.safetensors")
        untrained = evaluate(model, [tasks[task]], img_size=32, work_size=40, batch_size=16,
                             split="train")[task]["auc_mean"]
        (teacher,) = sorted((run / "fed" / "sites" / site / fingerprint).glob("teacher_round_002*"))
        model.load_state_dict({k: v for k, v in load_tensors(teacher).items()
                               if k.startswith("heads.")}, strict=False)
        res = evaluate(model, [tasks[task]], img_size=32, work_size=40, batch_size=16,
                       split="train")
        assert auc[task] == pytest.approx(res[task]["auc_mean"], abs=1e-6)
        assert untrained != pytest.approx(res[task]["auc_mean"], abs=1e-6)


def test_a_diverged_arm_is_recorded_and_the_experiment_goes_on(tmp_path):
    # A learning rate of 1e6 makes the first loss non-finite: each site fails its round and
    # the federation stops; the other arm, and the tables, still come out.
    arms = [{"name": "fedavg"}, {"name": "blowup", "train": {"lr": 1.0e6}}]
    path = _write(tmp_path, arms=arms, seeds=[0], rounds=1, reference="fedavg")
    summary = run_experiment(path, progress=False)
    res = summary["site_splits"]["natural"]
    assert set(res["failed"]) == {"blowup"} and "0" in res["failed"]["blowup"]
    assert "rounds" in res["failed"]["blowup"]["0"] or "round" in res["failed"]["blowup"]["0"]
    assert res["ratios"] == {} and res["differences"] == {}
    assert {k.split("|")[0] for k in res["table"]} == {"fedavg"}
    md = (tmp_path / "out" / "summary-test.md").read_text()
    assert "| blowup |" in md and "failed in seed(s) 0" in md and "- blowup seed 0:" in md
    rows = list(csv.DictReader(open(tmp_path / "out" / "results-test.csv")))
    assert {r["arm"] for r in rows} == {"fedavg"}
    # Recorded once: a rerun does not train it again, and says the same.
    failure = tmp_path / "out" / "natural" / "blowup" / "seed-0" / "failed-test.json"
    before = failure.stat().st_mtime_ns
    assert run_experiment(path, progress=False) == summary
    assert failure.stat().st_mtime_ns == before
