"""The paper-scale simulation configs: valid, and ``ark data check`` passes on a stand-in
tree laid out as docs/datasets.md documents (the adapters' real-format fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ark_core.commands.cli import main
from ark_core.fed.federation import load_simulation
from ark_core.tasks import ARK_PLUS_TASKS

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "simulations" / "paper"
FX = Path(__file__).parent / "fixtures"
LAYOUT = {  # where each config's roots point, under datasets/ -> the fixture laid out there
    "mimic-cxr-jpg/2.0.0": "mimic_cxr", "chestxray14": "chestxray14",
    "rsna-pneumonia": "rsna_pneumonia", "chexpert": "chexpert",
    "vindr-cxr/1.0.0": "vindr_cxr_physionet", "shenzhen": "shenzhen",
}


@pytest.fixture
def tree(tmp_path) -> Path:
    """datasets/ three levels above a copy of simulations/paper, as beside a checkout."""
    for where, fixture in LAYOUT.items():
        shutil.copytree(FX / fixture, tmp_path / "datasets" / where)
    # RSNA's id map: one RSNA film is the ChestX-ray14 test film's twin.
    nih_test = (FX / "chestxray14" / "test_list.txt").read_text().split()[0]
    rsna_id = (FX / "rsna_pneumonia" / "stage_2_train_labels.csv").read_text().splitlines()[1]
    (tmp_path / "datasets" / "rsna-pneumonia" /
     "pneumonia-challenge-dataset-mappings_2018.json").write_text(json.dumps(
         [{"subset_img_id": rsna_id.split(",")[0], "img_id": nih_test}]))
    shutil.copytree(PAPER, tmp_path / "checkout" / "simulations" / "paper")
    return tmp_path / "checkout" / "simulations" / "paper"


def test_the_six_dataset_config_is_the_papers_catalogue_in_three_sites():
    sim, _, _ = load_simulation(PAPER / "six_datasets.yaml")
    assert [t.spec() for t in sim.catalogue] == list(ARK_PLUS_TASKS)
    assert len(sim.sites) == 3 and sim.model.backbone.startswith("swin_large")
    held = [t.name for s in sim.sites for t in s.tasks]
    assert sorted(held) == sorted(t.name for t in ARK_PLUS_TASKS)  # each release at one site
    nih_site = next(s for s in sim.sites if any(t.dataset == "chestxray14" for t in s.tasks))
    assert {t.dataset for t in nih_site.tasks} == {"chestxray14", "rsna_pneumonia"}


@pytest.mark.parametrize("config", ["six_datasets.yaml", "chestxray14_8_sites_iid.yaml",
                                    "chestxray14_8_sites_dirichlet.yaml"])
def test_data_check_passes_on_a_clean_stand_in_tree(tree, tmp_path, capsys, config):
    code = main(["data", "check", str(tree / config), "--no-timing",
                 "--out", str(tmp_path / "dc.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "data check passed: 0 problem(s)" in out
    sim, _, _ = load_simulation(tree / config)
    assert all(f"\n{s.name:<14} " in out for s in sim.sites)  # every site tabled


def test_data_check_fails_on_the_six_dataset_tree_with_a_missing_film(tree, tmp_path, capsys):
    film = sorted((tree.parents[2] / "datasets" / "chexpert" / "train").rglob("*.jpg"))[0]
    film.unlink()
    code = main(["data", "check", str(tree / "six_datasets.yaml"), "--no-timing",
                 "--out", str(tmp_path / "dc.png")])
    assert code == 1
    assert f"problem: unusable file: {film}: file not found" in capsys.readouterr().out
