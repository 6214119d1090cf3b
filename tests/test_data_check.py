"""``ark data check``: passes on a clean tree and fails, naming the problem, on each kind of
broken one (real-format fixtures, stand-in images laid out as documented)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ark_core.commands.cli import main

FX = Path(__file__).parent / "fixtures"
DEMO_SIM = Path(__file__).parents[1] / "simulations" / "demo.yaml"


def _task(name, dataset, root, labels, **kw) -> dict:
    return {"name": name, "dataset": dataset, "root": str(root), "labels": labels,
            "split": {"val_fraction": 0.2, "test_fraction": 0.3}, **kw}


@pytest.fixture
def tree(tmp_path):
    """A two-site simulation: ChestX-ray14 at one site, RSNA (with its id map) at the other."""
    for name in ("chestxray14", "rsna_pneumonia"):
        shutil.copytree(FX / name, tmp_path / name)
    nih = _task("nih", "chestxray14", tmp_path / "chestxray14", ["Pneumonia"])
    rsna = _task("rsna", "rsna_pneumonia", tmp_path / "rsna_pneumonia", ["Lung Opacity"],
                 task_type="binary", options={"nih_mapping": "map.json"})
    (tmp_path / "rsna_pneumonia" / "map.json").write_text("[]")
    sim = yaml.safe_load(DEMO_SIM.read_text())
    sim["catalogue"] = [{"name": "nih", "labels": ["Pneumonia"], "task_type": "multilabel"},
                        {"name": "rsna", "labels": ["Lung Opacity"], "task_type": "binary"}]
    sim["sites"] = [{"name": "a", "tasks": [nih]}, {"name": "b", "tasks": [rsna]}]
    sim["run_dir"] = str(tmp_path / "run")

    def write(sites=None) -> Path:
        if sites is not None:
            sim["sites"] = sites
        (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
        return tmp_path / "sim.yaml"

    return {"tmp": tmp_path, "write": write, "nih": nih, "rsna": rsna}


def check(config: Path, tmp: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["data", "check", str(config), "--no-timing", "--out", str(tmp / "dc.png"),
                 *extra])
    return code, capsys.readouterr().out


def test_a_clean_tree_passes_and_is_tabled(tree, capsys):
    code, out = check(tree["write"](), tree["tmp"], capsys)
    assert code == 0, out
    assert "data check passed: 0 problem(s)" in out
    assert "a              nih              train" in out and "b              rsna" in out
    assert (tree["tmp"] / "dc.png").stat().st_size > 5000
    n_files = len(list((tree["tmp"] / "chestxray14" / "images").iterdir())) + \
        len(list((tree["tmp"] / "rsna_pneumonia" / "stage_2_train_images").iterdir()))
    assert f"{n_files:,} files sniffed" in out


def test_a_missing_and_a_cut_off_file_are_named(tree, capsys):
    images = sorted((tree["tmp"] / "chestxray14" / "images").iterdir())
    images[0].unlink()
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])
    code, out = check(tree["write"](), tree["tmp"], capsys)
    assert code == 1
    assert f"problem: unusable file: {images[0]}: file not found" in out
    assert f"problem: unusable file: {images[1]}: truncated PNG" in out
    # --deep decodes: the cut-off file fails there too.
    code, out = check(tree["write"](), tree["tmp"], capsys, "--deep")
    assert code == 1 and f"{images[1]}: " in out


def test_a_patient_at_two_sites_is_named(tree, capsys):
    """Two sites given the same release without a partition hold the same patients."""
    nih = tree["nih"]
    code, out = check(tree["write"]([{"name": "a", "tasks": [nih]}, {"name": "c", "tasks": [nih]}]),
                      tree["tmp"], capsys)
    assert code == 1
    assert "problem: patient at two sites: patient " in out
    assert "is at sites a (train), c (train)" in out or "is at sites a (test), c (test)" in out


def test_an_rsna_film_whose_chestxray14_twin_is_across_the_test_line_is_named(tree, capsys):
    from ark_core.config import TaskConfig
    from ark_core.data import build_manifests

    t = tree["tmp"]
    nih = build_manifests(TaskConfig.model_validate(tree["nih"]), t)
    rsna = build_manifests(TaskConfig.model_validate({**tree["rsna"], "options": {}}), t)
    nih_test = Path(nih["test"].paths[0]).name
    rsna_train = Path(rsna["train"].paths[0]).stem
    (t / "rsna_pneumonia" / "map.json").write_text(json.dumps(
        [{"subset_img_id": rsna_train, "img_id": nih_test}]))
    code, out = check(tree["write"](), t, capsys)
    assert code == 1
    assert (f"task 'rsna': 1 train film(s) are, or share a patient with, test films of a "
            f"release that shares films: stage_2_train_images/{rsna_train}.dcm is "
            f"nih:images/{nih_test}") in out
    # split.twins: drop leaves it out of training, and the check passes.
    site_b = {"name": "b", "tasks": [{**tree["rsna"], "split": {**tree["rsna"]["split"],
                                                                 "twins": "drop"}}]}
    code, out = check(tree["write"]([{"name": "a", "tasks": [tree["nih"]]}, site_b]), t, capsys)
    assert code == 0, out


def test_a_site_yaml_and_a_training_yaml_are_checked_too(tree, capsys):
    t = tree["tmp"]
    (t / "site.yaml").write_text(yaml.safe_dump({"name": "hosp", "tasks": [tree["nih"]]}))
    code, out = check(t / "site.yaml", t, capsys)
    assert code == 0 and "hosp           nih" in out
    train = {"model": {"preset": "tiny", "img_size": 64}, "tasks": [tree["nih"]],
             "train": {"batch_size": 4, "epochs": 1}}
    (t / "train.yaml").write_text(yaml.safe_dump(train))
    code = main(["data", "check", str(t / "train.yaml"), "--out", str(t / "x.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "one training step (batch 4" in out and "centralized:" in out and "per epoch" in out


def test_counts_unlike_the_published_ones_warn_and_fail_only_when_strict(capsys, tmp_path):
    code, out = check(DEMO_SIM, tmp_path, capsys)
    assert code == 0
    assert "warning: chestxray14 at" in out and "the release publishes 112,120" in out
    code, out = check(DEMO_SIM, tmp_path, capsys, "--strict")
    assert code == 1
