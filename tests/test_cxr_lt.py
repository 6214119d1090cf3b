"""CXR-LT 2023: its films are MIMIC-CXR's, its labels meet the shared names, and its metrics
come per head, medium and tail bucket. The fixture shares film ids with the MIMIC-CXR one,
split differently, so that the releases' test lines cross."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ark_core.config import TaskConfig
from ark_core.data import DatasetError, build_manifest, build_manifests, build_task_splits
from ark_core.data.adapters.cxr_lt import CXR_LT_LABELS
from ark_core.data.harmonise import shared_labels
from ark_core.data.twins import twin_keys
from ark_core.eval.buckets import bucket_metrics, bucket_of, bucket_table
from ark_core.tasks import CHESTXRAY14_LABELS, CHEXPERT_LABELS

FX = Path(__file__).parent / "fixtures"


def _task(name: str, dataset: str, root: Path, twins: str = "drop") -> TaskConfig:
    return TaskConfig(name=name, dataset=dataset, root=root, split={"twins": twins})


def _films(m, who=None) -> set[str]:
    return {Path(p).stem for p, pid in zip(m.paths, m.patient_ids, strict=True)
            if who is None or pid in who}


def test_a_cxr_lt_test_film_is_never_a_mimic_training_film():
    mimic, lt = _task("mimic", "mimic_cxr", FX / "mimic_cxr"), _task("lt", "cxr_lt", FX / "cxr_lt")
    alone = [build_manifests(c, FX) for c in (mimic, lt)]
    together = build_task_splits([mimic, lt], FX)
    tested = {k for parts in together for keys in twin_keys(parts["test"]) for k in keys}
    for parts in together:
        for split in ("train", "val"):
            assert not any(tested & set(keys) for keys in twin_keys(parts[split]))
    # CXR-LT tests on patients 10000764 and 10001217, whom MIMIC-CXR trains on; MIMIC-CXR tests
    # on 10001176, whom CXR-LT trains on. Each loses those patients' training films, only those.
    (m_alone, l_alone), (m_with, l_with) = alone, together
    assert _films(m_alone["train"]) - _films(m_with["train"]) == \
        _films(m_alone["train"], {"10000764", "10001217"}) != set()
    assert _films(l_alone["train"]) - _films(l_with["train"]) == \
        _films(l_alone["train"], {"10001176"}) != set()
    for a, t in zip(alone, together, strict=True):
        assert a["test"].paths == t["test"].paths and a["val"].paths == t["val"].paths


def test_by_default_the_crossing_is_refused_by_name():
    cfgs = [_task("mimic", "mimic_cxr", FX / "mimic_cxr", "error"),
            _task("lt", "cxr_lt", FX / "cxr_lt", "error")]
    with pytest.raises(DatasetError, match=r"task 'mimic': 3 train film\(s\) .*096052b7-[0-9a-f-]+"
                                           r"\.jpg is lt:files/p10/p10000764/"):
        build_task_splits(cfgs, FX)


def test_reads_the_release_splits_views_and_the_2023_folder(tmp_path):
    d = tmp_path / "lt"
    shutil.copytree(FX / "cxr_lt" / "files", d / "files")
    (d / "cxr-lt-2023").mkdir()
    for f in ("train.csv", "development.csv", "test.csv"):
        shutil.copy(FX / "cxr_lt" / f, d / "cxr-lt-2023" / f)
    m = build_manifest(_task("lt", "cxr_lt", d), "all", tmp_path)
    assert m.task.labels == CXR_LT_LABELS and len(CXR_LT_LABELS) == 26
    assert m.meta["split"].count("train") == 7 and m.meta["split"].count("val") == 2
    assert set(m.meta["view"]) == {"PA", "AP", "LATERAL"}  # MIMIC's "LL" is lateral
    assert m.meta["twins"][0] == ("mimic:02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
                                  "mimic-patient:10000032")


def test_a_development_file_without_labels_is_read_unlabelled(tmp_path, caplog):
    d = tmp_path / "lt"
    shutil.copytree(FX / "cxr_lt", d)
    lines = (d / "development.csv").read_text().splitlines()
    (d / "development.csv").write_text("\n".join(",".join(x.split(",")[:5]) for x in lines) + "\n")
    with caplog.at_level("WARNING"):
        parts = build_manifests(_task("lt", "cxr_lt", d), tmp_path)
    assert "development.csv: no finding columns: its 2 image(s) are read unlabelled" in caplog.text
    assert np.isnan(parts["val"].targets).all() and not np.isnan(parts["train"].targets).any()


@pytest.mark.parametrize(("old", "new", "match"), [
    ("1,0,0,0,0,0\n", "1,0,0,0,0,-1\n",
     r"test\.csv:2: column 'Tortuous Aorta' has value '-1'; expected 0 or 1"),
    ("s57375967/096052b7", "s57375967/b79e55c3",
     r"test\.csv:2: path 'files/p10/p10000764/s57375967/b79e55c3.*' is not the film its ids name"),
])
def test_errors_name_the_file_and_line(tmp_path, old, new, match):
    d = tmp_path / "lt"
    shutil.copytree(FX / "cxr_lt", d)
    text = (d / "test.csv").read_text()
    assert text.count(old) == 1
    (d / "test.csv").write_text(text.replace(old, new))
    with pytest.raises(DatasetError, match=match):
        build_manifest(_task("lt", "cxr_lt", d), "all", tmp_path)


def test_the_26_findings_meet_every_chestxray14_and_chexpert_label():
    nih = shared_labels(CXR_LT_LABELS, CHESTXRAY14_LABELS)
    assert set(nih) == set(CHESTXRAY14_LABELS)
    assert CXR_LT_LABELS[nih["Effusion"][0]] == "Pleural Effusion"
    assert CXR_LT_LABELS[nih["Pleural_Thickening"][0]] == "Pleural Thickening"
    assert set(shared_labels(CXR_LT_LABELS, CHEXPERT_LABELS)) == set(CHEXPERT_LABELS)


# ----------------------------------------------------------------- head, medium and tail
def test_bucket_bounds():
    assert [bucket_of(n) for n in (10_001, 10_000, 1_000, 999, 0)] == \
        ["head", "medium", "medium", "tail", "tail"]


def test_bucket_means_by_hand():
    classes = {  # auc, ap; train positives
        "A": (0.90, 0.80), "B": (0.70, 0.60), "C": (0.80, 0.30), "D": (None, 0.10),
        "E": (0.60, None), "F": (0.50, 0.05),
    }
    train = {"A": 50_000, "B": 12_000, "C": 5_000, "D": 1_000, "E": 999, "F": 3}
    m = {"classes": {k: {"auc": a, "ap": p} for k, (a, p) in classes.items()}}
    b = bucket_metrics(m, train)
    assert b["head"]["classes"] == ["A", "B"] and b["medium"]["classes"] == ["C", "D"]
    assert b["tail"]["classes"] == ["E", "F"]
    assert b["head"]["auc_mean"] == pytest.approx((0.90 + 0.70) / 2)
    assert b["head"]["ap_mean"] == pytest.approx((0.80 + 0.60) / 2)
    assert b["medium"]["auc_mean"] == pytest.approx(0.80)  # D has no AUC: left out
    assert b["medium"]["ap_mean"] == pytest.approx((0.30 + 0.10) / 2)
    assert b["tail"]["auc_mean"] == pytest.approx((0.60 + 0.50) / 2)
    assert b["tail"]["ap_mean"] == pytest.approx(0.05)
    assert b["all"]["auc_mean"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.6 + 0.5) / 5)
    assert b["all"]["ap_mean"] == pytest.approx((0.8 + 0.6 + 0.3 + 0.1 + 0.05) / 5)
    assert bucket_metrics(m, train, head_above=100, tail_below=10)["tail"]["classes"] == ["F"]
    assert bucket_metrics({"classes": {"A": {"auc": None, "ap": None}}}, {"A": 5})["tail"] \
        == {"classes": ["A"], "auc_mean": None, "ap_mean": None}
    table = bucket_table(b)
    assert "head > 10,000, tail < 1,000" in table and "tail" in table.splitlines()[3]


def test_evaluate_reports_the_buckets_of_the_training_counts(tmp_path, capsys):
    from ark_core.commands.cli import main
    from ark_core.config import ModelConfig
    from ark_core.data import task_spec_for
    from ark_core.model.checkpoint import save_model
    from ark_core.model.factory import create_model

    cfg = TaskConfig(name="lt", dataset="cxr_lt", root=FX / "cxr_lt")
    model = create_model(ModelConfig(preset="tiny", img_size=32, work_size=32), [task_spec_for(cfg)])
    save_model(model, tmp_path / "m.safetensors")
    data = tmp_path / "lt.yaml"
    data.write_text(json.dumps(cfg.model_dump(mode="json")))
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(tmp_path / "m.safetensors"), "--data", str(data), "--n-boot", "0",
                 "--buckets", "--out", str(out)]) == 0
    b = json.loads(out.read_text())["buckets"]
    # The fixture's training split has at most 3 positives of a finding: every class is tail.
    assert b["head"]["classes"] == b["medium"]["classes"] == []
    assert b["tail"]["classes"] == list(CXR_LT_LABELS)
    assert "tail" in capsys.readouterr().out
