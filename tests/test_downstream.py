import json

import numpy as np
import pytest
import torch
from conftest import demo_task
from sklearn.metrics import roc_auc_score

from ark_core.commands.cli import main
from ark_core.config import TaskConfig
from ark_core.data import build_manifests
from ark_core.eval.downstream import embed, zero_shot, zero_shot_scores
from ark_core.eval.evaluate import predict
from ark_core.eval.subgroups import subgroup_metrics, subgroup_values
from ark_core.model.factory import load_model
from ark_core.model.network import ArkModel


@pytest.fixture(scope="module")
def teacher(tiny_run):
    return load_model(tiny_run / "teacher.safetensors")


@pytest.fixture(scope="module")
def splits():
    return {name: build_manifests(TaskConfig.model_validate(demo_task(name)), ".")
            for name in ("pediatric", "nih")}


def random_like(model: ArkModel) -> ArkModel:
    torch.manual_seed(123)
    c = model.config_dict()
    return ArkModel(c["backbone"], model.tasks.values(), img_size=c["img_size"],
                    projector=c["projector"], projector_dim=c["projector_dim"],
                    backbone_kwargs=c["backbone_kwargs"], work_size=c["work_size"]).eval()


def test_linear_probe_trained_beats_random_init(pediatric_run):
    """Probe fitted on the training split, scored on held-out test patients."""
    from conftest import DEMO, PEDIATRIC_SPLIT

    from ark_core.eval.downstream import linear_probe

    trained = load_model(pediatric_run / "teacher.safetensors")
    cfg = TaskConfig(name="pediatric", dataset="pediatric_pneumonia", root=DEMO / "pediatric",
                     split=PEDIATRIC_SPLIT)
    parts = build_manifests(cfg, ".")
    assert set(parts["train"].patient_ids).isdisjoint(parts["test"].patient_ids)

    def probe(model):
        emb = {k: embed(model, parts[k]) for k in ("train", "val", "test")}
        return linear_probe(emb["train"], emb["test"], emb["val"], n_boot=0)["auc_mean"]

    ours, baseline = probe(trained), probe(random_like(trained))
    assert ours > baseline, (ours, baseline)


def test_zero_shot_reads_the_mapped_head(teacher, splits):
    test = splits["pediatric"]["test"]
    mapping = {"Pneumonia": {"task": "nih", "label": "Pneumonia"}}
    scores, idx = zero_shot_scores(teacher, test, {"Pneumonia": [("nih", 0)]})
    direct = predict(teacher, test, img_size=teacher.img_size, work_size=teacher.work_size,
                     tasks=["nih", "pediatric"])
    np.testing.assert_allclose(scores[:, 0], direct["probs.nih"][:, 0], rtol=1e-5)
    assert not np.allclose(scores[:, 0], direct["probs.pediatric"][:, 0])
    m = zero_shot(teacher, test, mapping, splits["pediatric"]["val"], n_boot=50)
    y = test.targets[idx, 0]
    assert m["classes"]["Pneumonia"]["auc"] == pytest.approx(roc_auc_score(y, scores[:, 0]))
    with pytest.raises(ValueError, match="no label"):
        zero_shot(teacher, test, {"Pneumonia": {"task": "nih", "label": "Cardiomegaly"}}, n_boot=0)


def test_subgroups_match_direct_computation(teacher, splits):
    s = splits["nih"]
    pred = predict(teacher, s["test"], img_size=teacher.img_size, work_size=teacher.work_size,
                   tasks=["nih"])
    vpred = predict(teacher, s["val"], img_size=teacher.img_size, work_size=teacher.work_size,
                    tasks=["nih"])
    idx = pred["index"]
    sex = subgroup_values(s["test"], "sex", idx)
    assert set(sex) == {"F", "M"}
    r = subgroup_metrics(pred["probs.nih"], pred["target"], s["test"].task, sex,
                         val_probs=vpred["probs.nih"], val_target=vpred["target"],
                         patient_ids=[s["test"].patient_ids[i] for i in idx], n_boot=100)
    thr = r["thresholds"]["Pneumonia"]
    vp = vpred["probs.nih"][:, 0]
    assert thr in set(vp.tolist())  # chosen among validation scores, not test ones
    y, p, g = pred["target"][:, 0], pred["probs.nih"][:, 0], np.array(sex)
    aucs = {}
    for grp in ("F", "M"):
        e = r["groups"][grp]["classes"]["Pneumonia"]
        rows = g == grp
        aucs[grp] = roc_auc_score(y[rows], p[rows])
        assert e["auc"] == pytest.approx(aucs[grp])
        pos = rows & (y == 1)
        assert e["false_negative_rate"] == pytest.approx((p[pos] < thr).mean())
        assert e["n"] == rows.sum()
    assert r["gap"]["Pneumonia"]["auc"]["gap"] == pytest.approx(abs(aucs["F"] - aucs["M"]))


def test_commands_print_tables_and_write_json(tiny_run, tmp_path, capsys):
    task = tmp_path / "ped.yaml"
    task.write_text(json.dumps(demo_task("pediatric")))
    mapping = tmp_path / "map.yaml"
    mapping.write_text(json.dumps({"Pneumonia": {"task": "nih", "label": "Pneumonia"}}))
    model = str(tiny_run / "teacher.safetensors")
    common = ["--data", str(task), "--n-boot", "20"]
    assert main(["embed", model, *common, "--out", str(tmp_path / "emb")]) == 0
    emb = np.load(tmp_path / "emb.npy")
    rows = (tmp_path / "emb.csv").read_text().splitlines()
    assert emb.shape == (len(rows) - 1, teacher_dim(tiny_run)) and emb.shape[0] == 300
    assert main(["linear-probe", model, *common, "--out", str(tmp_path / "lp.json")]) == 0
    assert main(["few-shot", model, *common, "--shots", "2", "--repeats", "2",
                 "--out", str(tmp_path / "fs.json")]) == 0
    assert main(["zero-shot", model, *common, "--mapping", str(mapping),
                 "--out", str(tmp_path / "zs.json")]) == 0
    assert main(["tsne", model, *common, "--out", str(tmp_path / "tsne.png")]) == 0
    assert main(["finetune", model, *common, "--epochs", "1", "--out", str(tmp_path / "ft.json")]) == 0
    out = capsys.readouterr().out
    assert "mean AUC" in out and "AUC [95% CI]" in out
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["classes"]["Pneumonia"]["auc_ci"] is not None
    fs = json.loads((tmp_path / "fs.json").read_text())
    assert len(fs["shots"]["2"]["runs"]) == 2
    ft = json.loads((tmp_path / "ft.json").read_text())
    assert ft["best_epoch"] == 1 and ft["classes"]["Pneumonia"]["auc"] is not None
    assert (tmp_path / "tsne.png").stat().st_size > 1000


def teacher_dim(run) -> int:
    return load_model(run / "teacher.safetensors").embed_dim


def test_subgroups_command(tiny_run, tmp_path):
    task = tmp_path / "nih.yaml"
    task.write_text(json.dumps(demo_task("nih")))
    out = tmp_path / "sg.json"
    assert main(["subgroups", str(tiny_run / "teacher.safetensors"), "--data", str(task),
                 "--by", "sex", "age_band", "view", "--n-boot", "20", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["subgroups"]
    assert set(r) == {"sex", "age_band", "view"} and set(r["view"]["groups"]) <= {"AP", "PA"}
    assert out.with_suffix(".png").stat().st_size > 1000


def test_evaluate_scores_another_datasets_films_through_the_shared_names(tiny_run, tmp_path,
                                                                         capsys):
    """The nih head (Pneumonia) on the demo films relabelled in another release's spelling."""
    import csv

    from conftest import DEMO

    with open(DEMO / "nih" / "Data_Entry_2017.csv", newline="") as f:
        entries = list(csv.DictReader(f))[:160]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "pneumonia", "Edema"])  # COVIDx spells it lower case
        for e in entries:
            found = e["Finding Labels"].split("|")
            w.writerow([f"images/{e['Image Index']}", e["Patient ID"],
                        int("Pneumonia" in found), int("Edema" in found)])
    (tmp_path / "images").symlink_to(DEMO / "nih" / "images")
    task = {"name": "other", "dataset": "csv", "root": str(tmp_path),
            "options": {"label_columns": ["pneumonia", "Edema"], "patient_column": "patient"},
            "split": {"val_fraction": 0.25, "test_fraction": 0.4}}
    data = tmp_path / "other.yaml"
    data.write_text(json.dumps(task))
    model = str(tiny_run / "teacher.safetensors")
    common = [model, "--data", str(data), "--n-boot", "20"]
    assert main(["evaluate", *common, "--head", "nih", "--out", str(tmp_path / "ev.json")]) == 0
    assert "no counterpart in head 'nih' (undefined, not in the mean): ['Edema']" in \
        capsys.readouterr().out
    mapping = tmp_path / "map.yaml"
    mapping.write_text(json.dumps({"pneumonia": {"task": "nih", "label": "Pneumonia"}}))
    assert main(["zero-shot", *common, "--mapping", str(mapping),
                 "--out", str(tmp_path / "zs.json")]) == 0
    ev, zs = (json.loads((tmp_path / f).read_text()) for f in ("ev.json", "zs.json"))
    assert ev["classes"]["pneumonia"]["auc"] == zs["classes"]["pneumonia"]["auc"] is not None
    assert ev["classes"]["Edema"]["auc"] is None and ev["auc_mean"] == ev["classes"]["pneumonia"]["auc"]
    # The pediatric head scores Pneumonia too; without --head the data's task must be a head.
    assert main(["evaluate", *common, "--head", "pediatric", "--out",
                 str(tmp_path / "ped.json")]) == 0
    assert main(["evaluate", *common, "--out", str(tmp_path / "x.json")]) == 2
    assert "the model has no head 'other'" in capsys.readouterr().err
