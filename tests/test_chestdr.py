"""ChestDR (MedFMC) read from the MedFM baseline's lists: splits, labels, the patient opt-out, errors.

The fixture (tests/fixtures/chestdr/) is synthetic: ChestDR is not redistributed here, so no
row, image name or pixel of the release is in it. Its lists are written in the published
format (the file name, a space, 19 comma-separated 0/1 values) with names in the release's
pattern; the pixels are NIH ChestX-ray14 stand-ins.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from ark_core.config import ConfigError, TaskConfig
from ark_core.data import DatasetError, build_manifest, build_manifests
from ark_core.data.adapters.chestdr import CHESTDR_LABELS
from ark_core.data.harmonise import pathology, shared_labels
from ark_core.tasks import CHESTXRAY14_LABELS

FX = Path(__file__).parent / "fixtures" / "chestdr"
DOC = Path(__file__).parents[1] / "docs" / "datasets.md"
NONE = {"patient_column": "none"}


def task(root: Path, **options) -> TaskConfig:
    return TaskConfig(name="chestdr", dataset="chestdr", root=root, options={**NONE, **options})


def lines(path: Path) -> list[tuple[str, list[str]]]:
    return [(n, v.split(",")) for n, v in (x.split() for x in path.read_text().splitlines())]


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FX, tmp_path / "chestdr"))


def edit(path: Path, line: int, old: str, new: str) -> None:
    text = path.read_text().splitlines(keepends=True)
    assert old in text[line - 1]
    text[line - 1] = text[line - 1].replace(old, new, 1)
    path.write_text("".join(text))


def test_the_lists_are_the_splits_and_the_values_the_labels(tmp_path):
    parts = build_manifests(task(FX), tmp_path)
    listed = {s: lines(FX / f) for s, f in (("train", "trainval.txt"), ("test", "test_WithLabel.txt"))}
    assert sorted(parts["test"].paths) == sorted(f"images/{n}" for n, _ in listed["test"])
    assert len(parts["train"]) + len(parts["val"]) == len(listed["train"])
    m = parts["all"]
    assert m.task.labels == CHESTDR_LABELS and m.patient_ids == m.paths
    for name, values in listed["train"] + listed["test"]:
        row = m.targets[m.paths.index(f"images/{name}")]
        assert row.tolist() == [float(v) for v in values]


def test_the_findings_meet_the_other_releases_under_shared_names():
    assert {CHESTDR_LABELS[s[0]] for s in shared_labels(CHESTDR_LABELS, CHESTXRAY14_LABELS).values()} \
        == {"pleural_effusion", "nodule", "pneumonia", "cardiomegaly", "fibrosis", "thickened_pleura",
            "pneumothorax", "emphysema", "atelectasis", "pulmonary_edema", "consolidation"}
    assert pathology("aortic_calcification") == "Calcification of the Aorta"  # CXR-LT's name
    assert pathology("TB") == "Tuberculosis"  # TBX11K's and Shenzhen's
    assert len({pathology(x) for x in CHESTDR_LABELS}) == len(CHESTDR_LABELS)


def test_patients_must_be_waived_explicitly_and_a_warning_says_so(tmp_path, caplog):
    for options in ({}, {"patient_column": "patient_id"}):
        with pytest.raises(ConfigError, match=r"patient_column.*no patient.*'patient_column: none'"):
            build_manifest(TaskConfig(name="c", dataset="chestdr", root=FX, options=options),
                           "all", tmp_path)
    with caplog.at_level("WARNING"):
        build_manifest(task(FX), "all", tmp_path)
    assert "ChestDR names no patient (patient_column: none)" in caplog.text


@pytest.mark.parametrize(("file", "line", "old", "new", "match"), [
    ("trainval.txt", 2, ",0,0\n", ",0\n",
     r"trainval\.txt:2: 18 label values; ChestDR has 19"),
    ("test_WithLabel.txt", 2, "0,1,1,0", "0,1,2,0",
     r"test_WithLabel\.txt:2: elevated_diaphragm is '2'; expected 0 or 1"),
    ("trainval.txt", 3, "1,0,1,", "1,0,-1,",
     r"trainval\.txt:3: pneumonia is '-1'; expected 0 or 1"),
    ("trainval.txt", 4, "5B9F0D36E2A7C41.png", "5B9F0D36E2A7C40.png",
     r"trainval\.txt:4: image images/5B9F0D36E2A7C40\.png not found under"),
    ("test_WithLabel.txt", 1, "5D06B3C92E8A4F5.png", "5A0C3E71B2D94F1.png",
     r"test_WithLabel\.txt:1: images/5A0C3E71B2D94F1\.png is listed again \(first at "
     r"\S+trainval\.txt:1\)"),
    ("trainval.txt", 5, ".png ", ".png 1 ",
     r"trainval\.txt:5: expected '<image> <19 comma-separated 0/1 values>', got 3 fields"),
    ("trainval.txt", 1, "5A0C3E71B2D94F1.png", "../../5A0C3E71B2D94F1.png",
     r"trainval\.txt:1: image path .* leaves the dataset root"),
])
def test_a_malformed_line_is_named(d, tmp_path, file, line, old, new, match):
    edit(d / file, line, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task(d), "all", tmp_path)


def test_other_lists_can_be_named_and_a_named_list_must_exist(d, tmp_path):
    train = (d / "trainval.txt").read_text().splitlines(keepends=True)
    (d / "train_20.txt").write_text("".join(train[:3]))
    (d / "val_20.txt").write_text("".join(train[3:]))
    parts = build_manifests(task(d, train="train_20.txt", val="val_20.txt", test=None), tmp_path)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [3, len(train) - 3, 0]
    (d / "test_WithLabel.txt").unlink()  # the default test list may be absent, a named one not
    assert len(build_manifest(task(d), "all", tmp_path)) == len(train)
    with pytest.raises(DatasetError, match=r"test_WithLabel\.txt: file not found"):
        build_manifest(task(d, test="test_WithLabel.txt"), "all", tmp_path)


def test_the_documented_task_reads_the_release(d, tmp_path):
    section = DOC.read_text(encoding="utf-8").split("`dataset: chestdr`", 1)[1].split("\n### ")[0]
    documented = yaml.safe_load(re.search(r"```text\n(  - name: .*?)```", section, re.S).group(1))[0]
    m = build_manifest(TaskConfig(**{**documented, "root": d}), "all", tmp_path)
    assert len(m) == sum(len(lines(FX / f)) for f in ("trainval.txt", "test_WithLabel.txt"))
