"""Every dataset adapter on a fixture in its release's exact format, plus policies and splits."""

from __future__ import annotations

import csv
import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ark_core.config import ConfigError, SplitConfig, TaskConfig
from ark_core.data import ADAPTERS, DatasetError, build_manifest, build_manifests, task_spec_for
from ark_core.data.adapters import get_adapter
from ark_core.data.manifest import Manifest
from ark_core.data.splits import assign_splits
from ark_core.tasks import TaskSpec, TaskType

FX = Path(__file__).parent / "fixtures"


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- expected, computed from files
def expect_chestxray14(d: Path, _):
    r = rows(d / "Data_Entry_2017_v2020.csv")
    pos = {
        lab: sum(lab in x["Finding Labels"].split("|") for x in r) for lab in ("Pneumonia", "Effusion")
    }
    return len(r), {x["Patient ID"] for x in r}, pos


def expect_chexpert(d: Path, _):
    r = rows(d / "train.csv") + rows(d / "valid.csv")
    pos = {lab: sum(x[lab] == "1.0" or x[lab] == "-1.0" for x in r) for lab in ("Edema", "Cardiomegaly")}
    return len(r), {re.search(r"patient\d+", x["Path"]).group() for x in r}, pos


def expect_mimic(d: Path, _):
    lab = {(x["subject_id"], x["study_id"]): x for x in rows(d / "mimic-cxr-2.0.0-chexpert.csv")}
    r = [x for x in rows(d / "mimic-cxr-2.0.0-split.csv") if (x["subject_id"], x["study_id"]) in lab]
    pos = {
        c: sum(lab[(x["subject_id"], x["study_id"])][c] in ("1.0", "-1.0") for x in r)
        for c in ("Pleural Effusion", "No Finding")
    }
    return len(r), {x["subject_id"] for x in r}, pos


def expect_cxr_lt(d: Path, _):
    r = [x for f in ("train.csv", "development.csv", "test.csv") for x in rows(d / f)]
    pos = {c: sum(x[c] == "1" for x in r) for c in ("Pleural Effusion", "Subcutaneous Emphysema")}
    return len(r), {x["subject_id"] for x in r}, pos


def expect_rsna(d: Path, _):
    cls = {x["patientId"]: x["class"] for x in rows(d / "stage_2_detailed_class_info.csv")}
    pos = {c: sum(v == c for v in cls.values()) for c in ("Normal", "Lung Opacity")}
    return len(cls), set(cls), pos


def expect_vindr_kaggle(d: Path, _):
    r = rows(d / "train.csv")
    ids = {x["image_id"] for x in r}
    pe = {x["image_id"] for x in r if x["class_name"] == "Pleural effusion"}
    nf = {i for i in ids if all(x["class_name"] == "No finding" for x in r if x["image_id"] == i)}
    return len(ids), ids, {"Pleural effusion": len(pe), "No finding": len(nf)}


def expect_vindr_physionet(d: Path, _):
    tr, te = (
        rows(d / "annotations/image_labels_train.csv"),
        rows(d / "annotations/image_labels_test.csv"),
    )
    ids = {x["image_id"] for x in tr + te}
    tb = {x["image_id"] for x in tr + te if float(x["Tuberculosis"])}
    return len(ids), ids, {"Tuberculosis": len(tb)}


def expect_shenzhen(d: Path, _):
    names = [p.name for p in (d / "CXR_png").glob("*.png")]
    return (
        len(names),
        {n.split("_")[1] for n in names},
        {"Tuberculosis": sum(n.endswith("_1.png") for n in names)},
    )


def expect_pediatric(d: Path, opts):
    files = list(d.glob("*/*/*.jpeg"))
    pids = {re.match(r"(person\d+|(?:NORMAL2-)?IM-\d+)", f.name).group(1) for f in files}
    if opts.get("classes") == 3:
        pos = {"Viral pneumonia": sum("virus" in f.name for f in files)}
    else:
        pos = {"Pneumonia": sum(f.parent.name == "PNEUMONIA" for f in files)}
    return len(files), pids, pos


def expect_covidx(d: Path, _):
    lines = [x.split() for p in d.glob("*.txt") for x in p.read_text().splitlines() if x.strip()]
    return len(lines), {x[0] for x in lines}, {"COVID-19": sum(x[2] == "COVID-19" for x in lines)}


def expect_siim(d: Path, _):
    import pydicom

    with open(d / "train-rle.csv", newline="") as f:  # the header's " EncodedPixels" as released
        r = [(x["ImageId"], x[" EncodedPixels"]) for x in csv.DictReader(f)]
    films = {p.stem: p for p in (d / "dicom-images-train").rglob("*.dcm")}
    listed = {i for i, _ in r if i in films}
    patients = {pydicom.dcmread(films[i]).PatientID for i in listed}
    return len(listed), patients, {"Pneumothorax": len({i for i, v in r if v != "-1" and i in listed})}


def expect_tbx11k(d: Path, opts):
    lines = [x for s in ("train", "val") for x in (d / f"lists/TBX11K_{s}.txt").read_text().split()]
    tb = sum(x.startswith("tb/") for x in lines)
    pos = {"Tuberculosis": tb} if opts.get("classes") == 2 else {
        "Healthy": sum(x.startswith("health/") for x in lines), "Tuberculosis": tb}
    return len(lines), {Path(x).stem for x in lines}, pos


def expect_node21(d: Path, _):
    r = rows(d / "proccessed_data/metadata.csv")
    names = {x["img_name"] for x in r}
    return (len(names), {Path(n).stem for n in names},
            {"Nodule": len({x["img_name"] for x in r if x["label"] == "1"})})


def expect_chestdr(d: Path, _):
    lines = [x.split() for f in ("trainval.txt", "test_WithLabel.txt")
             for x in (d / f).read_text().splitlines()]
    pos = {lab: sum(v.split(",")[i] == "1" for _, v in lines)
           for i, lab in ((0, "pleural_effusion"), (10, "TB"))}
    return len(lines), {f"images/{n}" for n, _ in lines}, pos


def expect_csv(d: Path, _):
    r = rows(d / "labels.csv")
    return len(r), {x["patient"] for x in r}, {"Effusion": sum(x["Effusion"] == "1" for x in r)}


CASES = [
    ("chestxray14", "chestxray14", {}, expect_chestxray14),
    ("chexpert", "chexpert", {}, expect_chexpert),
    ("mimic_cxr", "mimic_cxr", {}, expect_mimic),
    ("cxr_lt", "cxr_lt", {}, expect_cxr_lt),
    ("rsna_pneumonia", "rsna_pneumonia", {}, expect_rsna),
    ("vindr_cxr", "vindr_cxr_kaggle", {}, expect_vindr_kaggle),
    ("vindr_cxr", "vindr_cxr_physionet", {"label_set": "full"}, expect_vindr_physionet),
    ("shenzhen", "shenzhen", {}, expect_shenzhen),
    ("pediatric_pneumonia", "pediatric_pneumonia", {}, expect_pediatric),
    ("pediatric_pneumonia", "pediatric_pneumonia", {"classes": 3}, expect_pediatric),
    ("covidx", "covidx", {}, expect_covidx),
    ("siim_acr", "siim_acr", {}, expect_siim),
    ("tbx11k", "tbx11k", {}, expect_tbx11k),
    ("tbx11k", "tbx11k", {"classes": 2}, expect_tbx11k),
    ("node21", "node21", {}, expect_node21),
    ("chestdr", "chestdr", {"patient_column": "none"}, expect_chestdr),
    ("csv", "csv", {"label_columns": ["Effusion", "Pneumonia"], "patient_column": "patient",
                    "split_column": "split"}, expect_csv),
]  # fmt: skip


def task(dataset: str, root: Path, **kw) -> TaskConfig:
    return TaskConfig(name=f"t_{dataset}", dataset=dataset, root=root, **kw)


def test_every_adapter_has_a_case():
    assert {c[0] for c in CASES} == set(ADAPTERS)


@pytest.mark.parametrize("dataset,folder,options,expect", CASES, ids=[c[1] + str(c[2]) for c in CASES])
def test_adapter_on_fixture(dataset, folder, options, expect):
    d = FX / folder
    cfg = task(dataset, Path(folder), options=options)
    m = build_manifest(cfg, "all", FX)
    spec = task_spec_for(cfg)
    n, patients, positives = expect(d, options)

    assert isinstance(m, Manifest) and m.task == spec and len(m) == n
    assert all((d / p).is_file() for p in m.paths), "every listed image exists in the fixture"
    assert set(m.patient_ids) == patients
    if spec.task_type is TaskType.MULTICLASS:
        assert m.targets.dtype == np.int64 and m.targets.shape == (n,)
        assert set(np.unique(m.targets)) <= set(range(len(spec.labels)))
    else:
        assert m.targets.dtype == np.float32 and m.targets.shape == (n, len(spec.labels))
        t = m.targets[~np.isnan(m.targets)]
        assert ((t == 0) | (t == 1) | ((t >= 0.55) & (t <= 0.85))).all()
    counts = m.label_counts()
    for label, pos in positives.items():
        assert counts[label]["positive"] == pos, label
    assert set(m.meta["split"]) <= {"train", "val", "test", ""}
    # splits are a partition of the rows
    parts = build_manifests(cfg, FX)
    assert sum(len(parts[s]) for s in ("train", "val", "test")) == n


# ----------------------------------------------------------------- label policies
def chexpert_uncertain_cells() -> np.ndarray:
    labels = task_spec_for(task("chexpert", FX / "chexpert")).labels
    r = rows(FX / "chexpert/train.csv") + rows(FX / "chexpert/valid.csv")
    return np.array([[x[c] == "-1.0" for c in labels] for x in r]), np.array(
        [[x[c] == "" for c in labels] for x in r]
    )


def test_lsr_ones_is_seeded_reproducible_and_in_range():
    unc, blank = chexpert_uncertain_cells()
    assert unc.sum() > 5
    a = build_manifest(task("chexpert", FX / "chexpert"), "all", FX).targets
    b = build_manifest(task("chexpert", FX / "chexpert"), "all", FX).targets
    c = build_manifest(task("chexpert", FX / "chexpert", split=SplitConfig(seed=1)), "all", FX).targets
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[unc], c[unc])
    assert ((a[unc] >= 0.55) & (a[unc] <= 0.85)).all() and len(np.unique(a[unc])) > 1
    assert (a[blank] == 0).all()
    assert set(np.unique(a[~unc & ~blank])) <= {0.0, 1.0}


@pytest.mark.parametrize("policy,value", [("ones", 1.0), ("zeros", 0.0), ("ignore", np.nan)])
def test_uncertain_policies(policy, value):
    unc, _ = chexpert_uncertain_cells()
    t = build_manifest(task("chexpert", FX / "chexpert", uncertain=policy), "all", FX).targets
    np.testing.assert_array_equal(t[unc], np.full(unc.sum(), value, dtype=np.float32))
    assert not np.isnan(t[~unc]).any()


def test_mimic_defaults_to_ones_and_drops_unlabelled_studies():
    m = build_manifest(task("mimic_cxr", FX / "mimic_cxr"), "all", FX)
    t = m.targets[:, m.task.labels.index("Cardiomegaly")]
    assert t.max() == 1.0  # the study's -1.0 became 1
    assert "10001401" not in m.patient_ids
    frontal = build_manifest(
        task("mimic_cxr", FX / "mimic_cxr", options={"frontal_only": True}), "all", FX
    )
    assert set(frontal.meta["view"]) == {"PA", "AP"} and len(frontal) < len(m)


def test_chexpert_frontal_only_and_valid_is_official_test():
    cfg = task("chexpert", FX / "chexpert", options={"frontal_only": True})
    m = build_manifest(cfg, "all", FX)
    assert set(m.meta["view"]) <= {"PA", "AP"} and "LATERAL" not in m.meta["view"]
    test = build_manifest(cfg, "test", FX)
    assert test.paths and all(p.startswith("valid/") for p in test.paths)


def test_chexpert_keeps_release_folder_when_it_exists(tmp_path):
    shutil.copytree(FX / "chexpert", tmp_path / "CheXpert-v1.0-small")
    m = build_manifest(task("chexpert", tmp_path), "all", tmp_path)
    assert all(p.startswith("CheXpert-v1.0-small/") and (tmp_path / p).is_file() for p in m.paths)


def test_nih_multi_folder_layout_and_official_lists(tmp_path):
    shutil.copytree(FX / "chestxray14", tmp_path / "nih")
    (tmp_path / "nih/images").rename(tmp_path / "nih/images_001")
    (tmp_path / "nih/images_001/images").mkdir()
    for f in (tmp_path / "nih/images_001").glob("*.png"):
        f.rename(tmp_path / "nih/images_001/images" / f.name)
    cfg = task("chestxray14", tmp_path / "nih")
    m = build_manifest(cfg, "all", tmp_path)
    assert all(p.startswith("images_001/images/") and (tmp_path / "nih" / p).is_file() for p in m.paths)
    test = build_manifest(cfg, "test", tmp_path)
    listed = (FX / "chestxray14/test_list.txt").read_text().split()
    assert sorted(Path(p).name for p in test.paths) == sorted(listed)
    nf = [i for i, p in enumerate(m.paths) if "00001362" in p]
    assert nf and (m.targets[nf] == 0).all()  # "No Finding" -> all zeros


def test_vindr_any_vs_majority_kaggle():
    d = FX / "vindr_cxr_kaggle"
    r = rows(d / "train.csv")
    votes: dict[str, dict[str, set]] = {}
    for x in r:
        votes.setdefault(x["image_id"], {}).setdefault(x["class_name"], set()).add(x["rad_id"])
    n_rads = {i: len({x["rad_id"] for x in r if x["image_id"] == i}) for i in votes}
    full = {"label_set": "full"}
    a = build_manifest(task("vindr_cxr", d, options={**full, "vote": "any"}), "all", FX)
    b = build_manifest(task("vindr_cxr", d, options={**full, "vote": "majority"}), "all", FX)
    c = a.task.labels.index("Pleural effusion")
    for k, iid in enumerate(a.patient_ids):
        marks = len(votes[iid].get("Pleural effusion", ()))
        assert a.targets[k, c] == (marks >= 1)
        assert b.targets[k, c] == (marks * 2 > n_rads[iid])
    assert (a.targets[:, c] != b.targets[:, c]).any(), "the fixture has a 1-of-3 vote"
    assert np.isnan(a.targets[:, a.task.labels.index("Tuberculosis")]).all()  # not in Kaggle


def test_vindr_physionet_ark6_mapping():
    d = FX / "vindr_cxr_physionet"
    m = build_manifest(task("vindr_cxr", d, options={"vote": "majority"}), "all", FX)
    assert m.task.labels == task_spec_for(task("vindr_cxr", d)).labels
    row = {iid: m.targets[k] for k, iid in enumerate(m.patient_ids)}
    lab = {name: i for i, name in enumerate(m.task.labels)}
    # PE by 2 of 3, pneumonia by 1 of 3 -> majority keeps PE only
    t = row["00053190460d56c53cc3e57321387478"]
    assert t[lab["Pleural effusion"]] == 1 and t[lab["Pneumonia"]] == 0 and t[lab["No finding"]] == 0
    # COPD by 1 of 3: no majority -> "No finding"
    assert row["0007d316f756b3fa0baea2ff514ce945"][lab["No finding"]] == 1
    anyv = build_manifest(task("vindr_cxr", d), "all", FX)
    i = anyv.patient_ids.index("0007d316f756b3fa0baea2ff514ce945")
    assert anyv.targets[i, lab["Other diseases"]] == 1  # COPD folds into Other diseases
    assert sorted(build_manifest(task("vindr_cxr", d), "test", FX).patient_ids) == sorted(
        r["image_id"] for r in rows(d / "annotations/image_labels_test.csv")
    )


def test_label_and_type_overrides():
    rsna = task("rsna_pneumonia", FX / "rsna_pneumonia", labels=["Lung Opacity"], task_type="binary")
    m = build_manifest(rsna, "all", FX)
    cls = rows(FX / "rsna_pneumonia/stage_2_detailed_class_info.csv")
    assert m.targets.sum() == len({x["patientId"] for x in cls if x["class"] == "Lung Opacity"})
    assert task_spec_for(rsna) == TaskSpec("t_rsna_pneumonia", ("Lung Opacity",), TaskType.BINARY)
    nih = task("chestxray14", FX / "chestxray14", labels=["Pneumonia"], task_type="binary")
    assert build_manifest(nih, "all", FX).targets.shape[1] == 1
    with pytest.raises(ConfigError, match="Nodule/Mass"):
        build_manifest(task("chestxray14", FX / "chestxray14", labels=["Nodule/Mass"]), "all", FX)


def test_covidx_two_way(tmp_path):
    shutil.copytree(FX / "covidx", tmp_path / "c")
    m = build_manifest(task("covidx", tmp_path / "c", options={"classes": 2}), "all", tmp_path)
    assert m.task.task_type is TaskType.BINARY and m.targets.sum() == 3
    (tmp_path / "c/test_COVIDx9A.txt").write_text("p1 a.png positive ricord\np2 b.png negative rsna\n")
    (tmp_path / "c/train_COVIDx9A.txt").unlink()
    m2 = build_manifest(task("covidx", tmp_path / "c", options={"classes": 2}), "all", tmp_path)
    assert m2.targets[:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(DatasetError, match=r"test_COVIDx9A.txt:1: .*2-way"):
        build_manifest(task("covidx", tmp_path / "c"), "all", tmp_path)


# ----------------------------------------------------------------- splits
def test_splits_are_deterministic_and_patient_disjoint():
    cfg = task("chestxray14", Path("../../simulations/demo_data/nih"), split=SplitConfig(seed=3))
    base = FX
    parts = build_manifests(cfg, base)
    again = build_manifests(cfg, base)
    ids = {s: set(parts[s].patient_ids) for s in ("train", "val", "test")}
    assert all(parts[s].paths == again[s].paths for s in parts)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    n = len(parts["all"])
    assert 0.03 * n < len(parts["val"]) < 0.2 * n and 0.03 * n < len(parts["test"]) < 0.2 * n
    other = build_manifests(cfg.model_copy(update={"split": SplitConfig(seed=4)}), base)
    assert other["test"].paths != parts["test"].paths


def test_adding_patients_moves_nobody():
    full = build_manifest(
        task("pediatric_pneumonia", Path("../../simulations/demo_data/pediatric")), "all", FX
    )
    cfg = SplitConfig(seed=0, use_official=False)
    small = full.subset(range(0, len(full), 3))
    where_full = dict(zip(full.paths, assign_splits(full, cfg), strict=True))
    where_small = dict(zip(small.paths, assign_splits(small, cfg), strict=True))
    assert all(where_full[p] == s for p, s in where_small.items())


def test_official_split_and_carved_val():
    cfg = task("pediatric_pneumonia", FX / "pediatric_pneumonia", split=SplitConfig(val_fraction=0.5))
    parts = build_manifests(cfg, FX)
    assert all(p.startswith("test/") for p in parts["test"].paths)
    assert parts["val"].paths and all(p.startswith("train/") for p in parts["val"].paths)
    off = build_manifests(cfg.model_copy(update={"split": SplitConfig(use_official=False)}), FX)
    assert any(p.startswith("test/") for p in off["train"].paths + off["val"].paths)


def test_exclude_from_test_keeps_those_patients_out_and_the_share(tmp_path):
    demo = FX / "../../simulations/demo_data/nih"
    rows = (demo / "Data_Entry_2017.csv").read_text().splitlines()
    subset = tmp_path / "subset"
    (subset / "images").mkdir(parents=True)
    keep = rows[:1] + rows[1::3]  # a third of the rows, as a demo subset would be drawn
    (subset / "Data_Entry_2017.csv").write_text("\n".join(keep) + "\n")
    for line in keep[1:]:
        name = line.split(",")[0]
        shutil.copy(demo / "images" / name, subset / "images" / name)
    split = SplitConfig(val_fraction=0.2, test_fraction=0.3, seed=1)
    cfg = task("chestxray14", demo.resolve(), split=split)
    plain = build_manifests(cfg, FX)
    ex = build_manifests(cfg.model_copy(update={"split": split.model_copy(
        update={"exclude_from_test": Path("subset")})}), tmp_path)
    excluded = {line.split(",")[3] for line in keep[1:]}
    patients = {s: set(ex[s].patient_ids) for s in ("train", "val", "test")}
    assert excluded and not patients["test"] & excluded
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    n = len(set(plain["all"].patient_ids))
    # test still holds ~30% of all patients, val ~20%: both drawn by the same patient hash
    assert abs(len(patients["test"]) / n - 0.3) < 0.06
    assert abs(len(patients["val"]) / n - 0.2) < 0.06
    # a patient test took without the exclusion, and still may, stays in test
    assert set(plain["test"].patient_ids) - excluded <= patients["test"]
    with pytest.raises(ConfigError, match=r"task 't_chestxray14': split.exclude_from_test: .*more than"):
        build_manifests(cfg.model_copy(update={"split": split.model_copy(update={
            "test_fraction": 0.7, "val_fraction": 0.1, "exclude_from_test": Path("subset")})}),
            tmp_path)

def test_max_images_keeps_whole_patients():
    cfg = task("chestxray14", FX / "chestxray14", max_images=8, split=SplitConfig(seed=1))
    m = build_manifest(cfg, "all", FX)
    full = build_manifest(task("chestxray14", FX / "chestxray14"), "all", FX)
    assert 0 < len(m) <= 8
    for pid in set(m.patient_ids):
        assert m.patient_ids.count(pid) == full.patient_ids.count(pid)
    assert build_manifest(cfg, "all", FX).paths == m.paths


# ----------------------------------------------------------------- bad input
def copy(src: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FX / src, tmp_path / src))


def edit_line(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("dataset", "file", "line", "old", "new", "match"),
    [
        pytest.param("chexpert", "train.csv", 4, ",1.0,", ",2.0,",
                     r"train\.csv:4: column .* value '2\.0'", id="unknown-chexpert-value"),
        pytest.param("chestxray14", "Data_Entry_2017_v2020.csv", 3, "Pneumonia", "Pneumonitis",
                     r"Data_Entry_2017_v2020\.csv:3: unknown finding 'Pneumonitis'",
                     id="unknown-nih-finding"),
        pytest.param("rsna_pneumonia", "stage_2_detailed_class_info.csv", 1, "class", "klass",
                     r"stage_2_detailed_class_info\.csv:1: missing column.*'class'",
                     id="missing-column"),
    ],
)
def test_error_names_file_and_line(tmp_path, dataset, file, line, old, new, match):
    d = copy(dataset, tmp_path)
    edit_line(d / file, line, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task(dataset, d), "all", tmp_path)


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "images/../../x.png"])
def test_error_path_outside_root(tmp_path, bad):
    d = copy("csv", tmp_path)
    edit_line(d / "labels.csv", 5, "images/c1.png", bad)
    opts = {"label_columns": ["Effusion"], "patient_column": "patient"}
    with pytest.raises(DatasetError, match=r"labels\.csv:5: image path .* leaves the dataset root"):
        build_manifest(task("csv", d, options=opts), "all", tmp_path)


def test_error_vindr_unknown_class_and_rsna_conflict(tmp_path):
    d = copy("vindr_cxr_kaggle", tmp_path)
    edit_line(d / "train.csv", 7, "Pleural effusion", "Pleural efusion")
    with pytest.raises(DatasetError, match=r"train\.csv:7: unknown class_name"):
        build_manifest(task("vindr_cxr", d), "all", tmp_path)
    r = copy("rsna_pneumonia", tmp_path)
    edit_line(r / "stage_2_train_labels.csv", 2, ",0", ",1")
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv:2: Target 1 disagrees"):
        build_manifest(task("rsna_pneumonia", r), "all", tmp_path)


def test_error_missing_root_and_bad_options(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*not found"):
        build_manifest(task("shenzhen", tmp_path / "nowhere"), "all", tmp_path)
    with pytest.raises(ConfigError, match="vote"):
        task_spec_for(task("vindr_cxr", tmp_path, options={"vote": "all"}))
    with pytest.raises(ConfigError, match="colour"):
        get_adapter("shenzhen").parse_options({"colour": 1})
    with pytest.raises(ValueError, match="unknown dataset"):
        task_spec_for(task("padchest", tmp_path))


# ------------------------------------------------------------- defects found on the real files
def test_a_label_file_that_is_not_utf8_names_its_line(tmp_path):
    d = copy("chestxray14", tmp_path)
    label = d / "Data_Entry_2017_v2020.csv"
    lines = label.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Pneumonia", b"Pneumonia\xe9", 1)  # a Latin-1 e-acute
    label.write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020\.csv:3: not UTF-8 \(byte "
                                           r"0xe9 .*\): re-save as UTF-8"):
        build_manifest(task("chestxray14", d), "all", tmp_path)
    label.write_bytes(label.read_bytes().replace(b"\xe9", b"").decode().encode("utf-16"))
    with pytest.raises(DatasetError, match=r"v2020\.csv: not UTF-8 \(it is UTF-16.*re-save"):
        build_manifest(task("chestxray14", d), "all", tmp_path)
    c = copy("covidx", tmp_path)
    listing = sorted(c.glob("*.txt"))[0]
    listing.write_bytes(listing.read_bytes() + b"\xff\n")
    n = listing.read_bytes().count(b"\n")
    with pytest.raises(DatasetError, match=rf"{listing.name}:{n}: not UTF-8"):
        build_manifest(task("covidx", c), "all", tmp_path)


def test_chestxray14_reads_a_gzipped_label_file(tmp_path):
    d = copy("chestxray14", tmp_path)
    plain = build_manifest(task("chestxray14", d), "all", tmp_path)
    label = d / "Data_Entry_2017_v2020.csv"
    (d / "Data_Entry_2017.csv.gz").write_bytes(gzip.compress(label.read_bytes()))
    label.unlink()
    zipped = build_manifest(task("chestxray14", d), "all", tmp_path)
    assert zipped.paths == plain.paths and np.array_equal(zipped.targets, plain.targets)


def test_the_kaggle_val_folder_does_not_become_the_validation_split(tmp_path):
    d = copy("pediatric_pneumonia", tmp_path)
    (d / "val" / "NORMAL").mkdir(parents=True)
    moved = sorted((d / "train" / "NORMAL").glob("*.jpeg"))[:1]
    for f in moved:
        f.rename(d / "val" / "NORMAL" / f.name)
    cfg = task("pediatric_pneumonia", d, split=SplitConfig(val_fraction=0.5))
    parts = build_manifests(cfg, tmp_path)
    n_train_patients = len(set(build_manifest(cfg, "all", tmp_path).patient_ids)) - len(
        set(parts["test"].patient_ids))
    # Half of the training patients validate, carved by val_fraction (not the 1 val/ image).
    assert len(set(parts["val"].patient_ids)) == pytest.approx(n_train_patients / 2, abs=1.5)
    assert any(p.startswith("val/") for p in parts["train"].paths + parts["val"].paths)


def test_vindr_majority_no_finding_is_its_own_vote(tmp_path):
    """Three radiologists, three different findings: no finding has a majority, and the
    image is not "No finding" either (no one said so)."""
    d = copy("vindr_cxr_kaggle", tmp_path)
    iid = "f" * 32
    with open(d / "train.csv", "a") as f:
        for rad, (name, cid) in zip(("R1", "R2", "R3"), (("Cardiomegaly", 3), ("ILD", 5),
                                                          ("Nodule/Mass", 8)), strict=True):
            f.write(f"{iid},{name},{cid},{rad},1.0,1.0,9.0,9.0\n")
    opts = {"label_set": "full", "vote": "majority"}
    m = build_manifest(task("vindr_cxr", d, options=opts), "all", tmp_path)
    k, nf = m.patient_ids.index(iid), m.task.labels.index("No finding")
    assert m.targets[k, nf] == 0 and np.nansum(m.targets[k]) == 0
    # An image two of whose three radiologists said "No finding" is "No finding".
    votes: dict[str, dict[str, set]] = {}
    for x in rows(d / "train.csv"):
        votes.setdefault(x["image_id"], {}).setdefault(x["class_name"], set()).add(x["rad_id"])
    for j, image in enumerate(m.patient_ids):
        n = len(set().union(*votes[image].values()))
        assert m.targets[j, nf] == (len(votes[image].get("No finding", ())) * 2 > n)
    anyvote = build_manifest(task("vindr_cxr", d, options={**opts, "vote": "any"}), "all", tmp_path)
    assert anyvote.targets[anyvote.patient_ids.index(iid), nf] == 0


@pytest.mark.parametrize(("old", "new", "match"), [
    (",3,R10,", ",5,R10,", r"train\.csv:4: class_id 5 contradicts class_name 'Cardiomegaly'"),
    (",3,R10,", ",3,,", r"train\.csv:4: empty radiologist id"),
])
def test_vindr_refuses_a_contradicting_class_id_and_an_empty_radiologist(tmp_path, old, new,
                                                                           match):
    d = copy("vindr_cxr_kaggle", tmp_path)
    edit_line(d / "train.csv", 4, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task("vindr_cxr", d), "all", tmp_path)


def test_generic_csv_needs_a_patient_column_unless_told_none(tmp_path, caplog):
    """Without patients, CheXpert-like files (many films per patient) leak across splits."""
    d = copy("csv", tmp_path)
    with pytest.raises(ConfigError, match=r"patient_column: .*required.*'patient_column: none'"):
        build_manifest(task("csv", d, options={"label_columns": ["Effusion"]}), "all", tmp_path)
    opts = {"label_columns": ["Effusion"], "patient_column": "none"}
    with caplog.at_level("WARNING"):
        m = build_manifest(task("csv", d, options=opts), "all", tmp_path)
    assert "labels.csv: patient_column: none: every image is its own patient" in caplog.text
    assert m.patient_ids == m.paths  # P1's two films are two patients now
    named = build_manifest(task("csv", d, options={**opts, "patient_column": "patient"}),
                           "all", tmp_path)
    assert named.patient_ids[:2] == ["P1", "P1"]


def _move_line(src: Path, dst: Path, line: int) -> None:
    """Move one line of an official list into another."""
    lines = src.read_text().splitlines(keepends=True)
    moved = lines.pop(line - 1)
    src.write_text("".join(lines))
    with open(dst, "a") as f:
        f.write(moved if moved.endswith("\n") else moved + "\n")


def _nih_patient_split_across_lists(d: Path) -> str:
    """Move one film of a train_val patient with several films into test_list.txt."""
    films: dict[str, list[str]] = {}
    for x in rows(d / "Data_Entry_2017_v2020.csv"):
        films.setdefault(x["Patient ID"], []).append(x["Image Index"])
    train_val = (d / "train_val_list.txt").read_text().split()
    pid = next(p for p, f in films.items() if len(f) > 1 and set(f) <= set(train_val))
    _move_line(d / "train_val_list.txt", d / "test_list.txt", train_val.index(films[pid][0]) + 1)
    return pid


@pytest.mark.parametrize(("dataset", "folder", "edit", "patient"), [
    ("chestxray14", "chestxray14", _nih_patient_split_across_lists, None),
    ("mimic_cxr", "mimic_cxr", lambda d: edit_line(
        d / "mimic-cxr-2.0.0-split.csv", 3, ",train", ",test"), "10000032"),
    ("chexpert", "chexpert", lambda d: edit_line(
        d / "valid.csv", 2, "patient64541", "patient00001"), "patient00001"),
    ("covidx", "covidx", lambda d: _move_line(
        d / "train_COVIDx9A.txt", d / "test_COVIDx9A.txt", 2), "3"),
])
def test_a_patient_in_two_official_splits_is_named_or_dropped(tmp_path, caplog, dataset, folder,
                                                               edit, patient):
    d = copy(folder, tmp_path)
    patient = edit(d) or patient
    # Without official splits every patient is carved whole: nothing to refuse.
    before = build_manifest(task(dataset, d, split=SplitConfig(use_official=False)), "all",
                            tmp_path)
    with pytest.raises(DatasetError, match=rf"official split puts 1 patient\(s\) .* patient "
                                           rf"{re.escape(patient)}: .*split.official_conflicts"):
        build_manifests(task(dataset, d), tmp_path)
    with caplog.at_level("WARNING"):
        parts = build_manifests(task(dataset, d, split=SplitConfig(official_conflicts="drop")),
                                tmp_path)
    n = before.patient_ids.count(patient)
    assert f"dropped 1 patient(s) ({n} images)" in caplog.text
    assert patient not in parts["all"].patient_ids
    assert len(parts["all"]) == len(before) - n
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(parts[a].patient_ids) & set(parts[b].patient_ids)


def test_mimic_counts_the_images_of_unlabelled_studies_it_leaves_out(tmp_path, caplog):
    d = copy("mimic_cxr", tmp_path)
    labelled = {(x["subject_id"], x["study_id"]) for x in rows(d / "mimic-cxr-2.0.0-chexpert.csv")}
    split = rows(d / "mimic-cxr-2.0.0-split.csv")
    out = [x for x in split if (x["subject_id"], x["study_id"]) not in labelled]
    assert out  # the fixture holds a study without labels
    with caplog.at_level("WARNING"):
        m = build_manifest(task("mimic_cxr", d), "all", tmp_path)
    studies = len({x["study_id"] for x in out})
    assert (f"mimic-cxr-2.0.0-split.csv: {len(out)} image(s) of {studies} study(ies) have no "
            "row in mimic-cxr-2.0.0-chexpert.csv: left out") in caplog.text
    assert len(m) == len(split) - len(out)


def test_rsna_binary_needs_only_the_box_labels_and_reads_views_from_the_header_dump(tmp_path):
    d = copy("rsna_pneumonia", tmp_path)
    three = build_manifest(task("rsna_pneumonia", d), "all", tmp_path)
    (d / "stage_2_detailed_class_info.csv").unlink()
    with pytest.raises(DatasetError, match=r"stage_2_detailed_class_info\.csv: file not found.*"
                                           r"options\.classes: 2"):
        build_manifest(task("rsna_pneumonia", d), "all", tmp_path)
    two = build_manifest(task("rsna_pneumonia", d, options={"classes": 2}), "all", tmp_path)
    target = {x["patientId"]: float(x["Target"]) for x in rows(d / "stage_2_train_labels.csv")}
    assert two.task.labels == ("Lung Opacity",) and two.task.task_type is TaskType.BINARY
    assert two.targets[:, 0].tolist() == [target[p] for p in two.patient_ids]
    assert two.meta["boxes"] == [sum(x["patientId"] == p and x["Target"] == "1"
                                     for x in rows(d / "stage_2_train_labels.csv"))
                                 for p in two.patient_ids]
    # The same patients and films as the 3-class task, Lung Opacity where it is the class.
    assert sorted(two.paths) == sorted(three.paths)
    opacity = three.task.labels.index("Lung Opacity")
    assert {p: float(c == opacity) for p, c in zip(three.patient_ids, three.targets,
                                                   strict=True)} == target
    header = {x["PatientID"]: x for x in rows(d / "kaggle_stage_2_train_images_dicom_headers.csv")}
    for m in (two, three):
        assert m.meta["view"] == [header[p]["ViewPosition"] for p in m.patient_ids]
        assert m.meta["sex"] == [header[p]["PatientSex"] for p in m.patient_ids]
        assert m.meta["age"] == [int(header[p]["PatientAge"]) for p in m.patient_ids]
    assert {"PA", "AP"} <= set(two.meta["view"])
    edit_line(d / "stage_2_train_labels.csv", 7, ",1\n", ",0\n")  # 2nd box row of a patient
    with pytest.raises(DatasetError, match=r"labels\.csv:7: 00436515-\S+ has Target 0 here but "
                                           r"not on line 6"):
        build_manifest(task("rsna_pneumonia", d, options={"classes": 2}), "all", tmp_path)


def test_siim_reads_masks_patients_and_views_and_counts_listed_images_without_a_file(
        tmp_path, caplog):
    d = copy("siim_acr", tmp_path)
    with caplog.at_level("WARNING"):
        m = build_manifest(task("siim_acr", d), "all", tmp_path)
    assert "train-rle.csv: 1 listed image(s) have no file under dicom-images-train (first: " \
           "1.2.276.0.7230010.3.1.4.8323329.90007.1517875107.390007, line 9): left out" in caplog.text
    by_id = {Path(p).stem.rsplit(".", 3)[1]: i for i, p in enumerate(m.paths)}
    assert m.meta["masks"][by_id["90002"]] == 2 and m.targets[by_id["90002"], 0] == 1
    assert m.meta["masks"][by_id["90001"]] == 0 and m.targets[by_id["90001"], 0] == 0
    # Two films of one DICOM PatientID are one patient; the film without a row is not read.
    assert m.patient_ids[by_id["90001"]] == m.patient_ids[by_id["90003"]]
    assert "90008" not in by_id
    assert (m.meta["view"][by_id["90002"]], m.meta["sex"][by_id["90002"]],
            m.meta["age"][by_id["90002"]]) == ("AP", "F", 57)
    # A flat PNG copy has no header: the ImageId is its patient.
    film = d / m.paths[by_id["90004"]]
    flat = d / "png"
    flat.mkdir()
    (flat / f"{film.stem}.png").write_bytes((FX / "chestxray14/images/00000150_002.png").read_bytes())
    png = build_manifest(task("siim_acr", d, options={"image_dir": "png"}), "all", tmp_path)
    assert png.paths == [f"png/{film.stem}.png"] and png.patient_ids == [film.stem]
    assert png.meta["view"] == [""] and png.targets.tolist() == [[1.0]]


@pytest.mark.parametrize(("line", "old", "new", "match"), [
    (5, "90004.1517875104.390004", "90003.1517875103.390003",
     r"train-rle\.csv:5: \S+90003\S* has a mask here but no mask \(-1\) on line 4"),
    (6, "700 2 30 4", "-1", r"train-rle\.csv:6: .*90002\S* has no mask \(-1\) here but a mask "
                            r"on line 3"),
    (5, "118 4 28 6 26 7", "118 4 28", r"train-rle\.csv:5: EncodedPixels '118 4 28' is neither"),
    (2, ",-1", ",", r"train-rle\.csv:2: EncodedPixels '' is neither -1 nor run-length pairs"),
])
def test_siim_refuses_contradicting_and_malformed_rows(tmp_path, line, old, new, match):
    d = copy("siim_acr", tmp_path)
    edit_line(d / "train-rle.csv", line, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task("siim_acr", d), "all", tmp_path)


def test_siim_a_repeated_minus_one_names_its_line(tmp_path):
    d = copy("siim_acr", tmp_path)
    rows = (d / "train-rle.csv").read_text().splitlines()
    (d / "train-rle.csv").write_text("\n".join([*rows, rows[1]]) + "\n")
    with pytest.raises(DatasetError, match=r"train-rle\.csv:10: \S+ repeats the -1 of line 2"):
        build_manifest(task("siim_acr", d), "all", tmp_path)


def test_tbx11k_val_list_is_the_test_split(tmp_path):
    d = copy("tbx11k", tmp_path)
    test = build_manifest(task("tbx11k", d), "test", tmp_path)
    val = (d / "lists/TBX11K_val.txt").read_text().split()
    assert sorted(test.paths) == sorted(f"imgs/{x}" for x in val)
    assert test.task.labels == ("Healthy", "Sick but non-TB", "Tuberculosis")
    assert sorted(test.targets.tolist()) == [0, 1, 2]


@pytest.mark.parametrize(("file", "line", "old", "new", "match"), [
    ("TBX11K_train.txt", 3, "sick/s0001.png", "extra/shenzhen/CHNCXR_0001_0.png",
     r"TBX11K_train\.txt:3: 'extra/shenzhen/CHNCXR_0001_0\.png' is not an image of health/, "
     r"sick/, tb/ under imgs/"),
    ("TBX11K_val.txt", 2, "sick/s0801.png", "sick/s0001.png",
     r"TBX11K_val\.txt:2: sick/s0001\.png is listed again \(first at \S+TBX11K_train\.txt:3\)"),
    ("TBX11K_train.txt", 1, "health/h0001.png", "../h0001.png",
     r"TBX11K_train\.txt:1: image path '\.\./h0001\.png' is absolute or leaves"),
])
def test_tbx11k_refuses_a_line_outside_its_folders_and_a_film_listed_twice(tmp_path, file, line,
                                                                            old, new, match):
    d = copy("tbx11k", tmp_path)
    edit_line(d / "lists" / file, line, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task("tbx11k", d), "all", tmp_path)
    for f in (d / "lists").glob("TBX11K_*.txt"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"none of \['lists/TBX11K_train\.txt'"):
        build_manifest(task("tbx11k", d), "all", tmp_path)


def test_node21_reads_mha_films_boxes_and_sources_and_leaves_out_a_source(tmp_path, caplog):
    from ark_core.data.readers import read_image

    d = copy("node21", tmp_path)
    m = build_manifest(task("node21", d), "all", tmp_path)
    at = {Path(p).name: i for i, p in enumerate(m.paths)}
    assert m.meta["boxes"][at["n0002.mha"]] == 2 and m.meta["boxes"][at["c0002.mha"]] == 0
    assert m.meta["source"][at["n0002.mha"]] == "chestxray14"
    assert read_image(d / m.paths[at["n0001.mha"]]).shape == (32, 32)  # the .mha film itself
    with caplog.at_level("WARNING"):
        kept = build_manifest(task("node21", d, options={"exclude_sources": ["chestxray14"]}),
                              "all", tmp_path)
    assert "2 film(s) from chestxray14 left out" in caplog.text
    assert sorted(Path(p).name for p in kept.paths) == ["c0002.mha", "c0003.mha", "n0001.mha",
                                                        "n0003.mha"]
    # PNG copies of the films, and the first Zenodo version's layout (metadata.csv at the root).
    flat = tmp_path / "v1"
    (flat / "images").mkdir(parents=True)
    shutil.copy(d / "proccessed_data/metadata.csv", flat / "metadata.csv")
    for p in m.paths:
        (flat / "images" / f"{Path(p).stem}.png").write_bytes(b"")
    png = build_manifest(task("node21", flat, options={"image_suffix": ".png"}), "all", tmp_path)
    assert sorted(png.paths) == sorted(f"images/{Path(p).stem}.png" for p in m.paths)
    assert set(png.meta["source"]) == {""}
    with pytest.raises(DatasetError, match=r"exclude_sources needs \['original_data/"):
        build_manifest(task("node21", flat, options={"exclude_sources": ["jsrt"]}), "all", tmp_path)


@pytest.mark.parametrize(("line", "old", "new", "match"), [
    (3, "c0001.mha,0,0,0,0,0", "n0001.mha,0,0,0,0,0",
     r"metadata\.csv:3: n0001\.mha has label 0 here but 1 on line 2"),
    (4, ",1\n", ",2\n", r"metadata\.csv:4: needs img_name and a label of 0 or 1, got "
                       r"'n0002\.mha', '2'"),
    (1, "label", "nodule", r"metadata\.csv:1: missing column\(s\) \['label'\]"),
])
def test_node21_refuses_contradicting_and_malformed_rows(tmp_path, line, old, new, match):
    d = copy("node21", tmp_path)
    edit_line(d / "proccessed_data/metadata.csv", line, old, new)
    with pytest.raises(DatasetError, match=match):
        build_manifest(task("node21", d), "all", tmp_path)


def _raw_views(dataset: str, d: Path) -> dict[str, str]:
    """Each film's view as its release writes it, read here without the adapter."""
    if dataset == "chestxray14":
        return {f"images/{x['Image Index']}": x["View Position"]
                for x in rows(d / "Data_Entry_2017_v2020.csv")}
    if dataset == "chexpert":
        return {x["Path"].split("/", 1)[1]: x["AP/PA"] if x["Frontal/Lateral"] == "Frontal"
                else "LATERAL" for x in rows(d / "train.csv") + rows(d / "valid.csv")}
    if dataset == "mimic_cxr":
        return {x["dicom_id"]: x["ViewPosition"] for x in rows(d / "mimic-cxr-2.0.0-metadata.csv")}
    return {f"stage_2_train_images/{x['PatientID']}.dcm": x["ViewPosition"]
            for x in rows(d / "kaggle_stage_2_train_images_dicom_headers.csv")}


@pytest.mark.parametrize("dataset", ["chestxray14", "chexpert", "mimic_cxr", "rsna_pneumonia"])
@pytest.mark.parametrize("views", [["PA"], ["AP"], ["PA", "AP"], ["LATERAL"]])
def test_views_keep_the_films_of_those_views(tmp_path, dataset, views):
    d = copy(dataset, tmp_path)
    raw = _raw_views(dataset, d)
    every = build_manifest(task(dataset, d), "all", tmp_path)
    key = (lambda p: Path(p).stem) if dataset == "mimic_cxr" else (lambda p: p)
    want = [p for p in every.paths
            if {"LL": "LATERAL", "RL": "LATERAL"}.get(raw[key(p)], raw[key(p)]) in views]
    if not want:
        return  # no film of this view in the fixture (NIH and RSNA have no laterals)
    m = build_manifest(task(dataset, d, views=views), "all", tmp_path)
    assert m.paths == want
    assert set(m.meta["view"]) <= set(views)


def test_views_need_a_dataset_that_records_them(tmp_path):
    d = copy("vindr_cxr_kaggle", tmp_path)
    with pytest.raises(ConfigError, match=r"views: dataset 'vindr_cxr' at .* records no view"):
        build_manifest(task("vindr_cxr", d, views=["PA"]), "all", tmp_path)
    with pytest.raises(ValueError, match="views"):
        task("chestxray14", d, views=["Frontal"])  # not a shared view name


def test_metadata_uses_one_spelling_for_sex_and_view(tmp_path):
    spelled = {x["Sex"] for x in rows(FX / "chexpert" / "train.csv")}
    assert {"Male", "Female"} <= spelled  # the release spells them out
    for dataset, folder in (("chexpert", "chexpert"), ("chestxray14", "chestxray14"),
                            ("rsna_pneumonia", "rsna_pneumonia")):
        m = build_manifest(task(dataset, FX / folder), "all", FX)
        assert set(m.meta["sex"]) == {"M", "F"}
        assert set(m.meta["view"]) <= {"PA", "AP", "LATERAL"}
        assert all(a is None or 0 < a < 120 for a in m.meta["age"])
    d = copy("csv", tmp_path)
    lines = (d / "labels.csv").read_text().splitlines()
    extra = ["view,sex,age", "PA,Male,51", "ap,F,", "LL,female,7", "PA,M,33", "AP,,60"]
    (d / "labels.csv").write_text("\n".join(f"{a},{b}" for a, b in zip(lines, extra,
                                                                         strict=True)) + "\n")
    opts = {"label_columns": ["Effusion"], "patient_column": "patient", "view_column": "view",
            "sex_column": "sex", "age_column": "age"}
    m = build_manifest(task("csv", d, options=opts), "all", tmp_path)
    assert m.meta["view"] == ["PA", "AP", "LATERAL", "PA", "AP"]
    assert m.meta["sex"] == ["M", "F", "F", "M", ""]
    assert m.meta["age"] == [51, None, 7, 33, 60]


def test_a_centralized_runs_fingerprint_ignores_the_added_task_options_at_their_defaults():
    """Runs made before views and official_conflicts existed must still resume."""
    import hashlib
    import json

    from ark_core.config import TRAIN_OPTIONS_ADDED, ArkConfig
    from ark_core.train.centralized import config_fingerprint

    cfg = ArkConfig.model_validate({"model": {"preset": "tiny"}, "tasks": [
        {"name": "nih", "dataset": "chestxray14", "root": "nih"}]})
    old = cfg.model_dump(mode="json", exclude={"output_dir": True, "train": {"workers", "device"}})
    del old["tasks"][0]["views"], old["tasks"][0]["split"]["official_conflicts"]
    del old["tasks"][0]["split"]["twins"]
    for option in TRAIN_OPTIONS_ADDED:  # the training options added before, at defaults
        old["train"].pop(option)
    assert config_fingerprint(cfg) == hashlib.sha256(
        json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    for change in ({"views": ["PA"]}, {"split": SplitConfig(official_conflicts="drop")},
                   {"split": SplitConfig(twins="drop")}):
        other = cfg.model_copy(update={"tasks": [cfg.tasks[0].model_copy(update=change)]})
        assert config_fingerprint(other) != config_fingerprint(cfg)


def test_a_truncated_gzipped_label_file_is_named(tmp_path):
    d = copy("chestxray14", tmp_path)
    data = gzip.compress((d / "Data_Entry_2017_v2020.csv").read_bytes())
    (d / "Data_Entry_2017_v2020.csv").unlink()
    (d / "Data_Entry_2017_v2020.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020\.csv\.gz: truncated or corrupt "
                                           r"gzip file .*download it again"):
        build_manifest(task("chestxray14", d), "all", tmp_path)
