import json
import warnings

import numpy as np
import yaml
from PIL import Image

from ark_core.commands.cli import main
from ark_core.eval.metrics import task_metrics
from ark_core.eval.model_card import write_model_card
from ark_core.eval.report import read_metrics


def _check_png(path, width, height):
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (height, width, 3)
    assert len(np.unique(im.reshape(-1, 3), axis=0)) > 10  # axes, lines in several colours


def test_report_of_a_real_run(tiny_run, tmp_path):
    rows = read_metrics(tiny_run)
    tasks = {r.task for r in rows if r.metric == "auc"}
    assert tasks == {"pediatric", "nih"}
    assert {r.role for r in rows if r.metric == "auc"} == {"teacher", "student"}
    epochs = yaml.safe_load((tiny_run / "config.yaml").read_text())["train"]["epochs"]
    assert max(r.step for r in rows) == epochs
    assert main(["report", str(tiny_run), "--out", str(tmp_path)]) == 0
    _check_png(tmp_path / "report.png", 550 * len(tasks), 800)
    md = (tmp_path / "report.md").read_text()
    assert "![report](report.png)" in md and "| pediatric |" in md


def test_report_reads_federated_lines_beside_centralized(tiny_run, tmp_path):
    fed = tmp_path / "fed"
    fed.mkdir()
    with open(fed / "metrics.jsonl", "w") as f:
        for r in (1, 2):
            for site in ("site-a", "site-b"):
                f.write(json.dumps({"round": r, "site": site, "loss.nih": 0.7 / r,
                                    "teacher.auc.nih": 0.6 + r / 20,
                                    "teacher.auc.nih.Pneumonia": 0.6 + r / 20}) + "\n")
    rows = read_metrics(fed)
    assert {(r.site, r.step) for r in rows if r.metric == "auc"} == {
        (s, r) for s in ("site-a", "site-b") for r in (1, 2)}
    assert any(r.metric == "auc:Pneumonia" for r in rows)
    assert main(["report", str(fed), "--compare", str(tiny_run)]) == 0
    _check_png(fed / "report.png", 1100, 800)
    assert "site-a" in (fed / "report.md").read_text()


def test_report_of_a_run_without_validation_lines(tmp_path):
    """evaluate_every: 0 (as the experiments run): AUC panels say so, no empty legend."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in (1, 2):
            f.write(json.dumps({"round": r, "kind": "train", "site": "site-a",
                                "loss.nih": 0.7 / r}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["report", str(tmp_path)]) == 0
    _check_png(tmp_path / "report.png", 550, 800)


def test_model_card(tiny_run):
    rng = np.random.default_rng(0)
    y = (rng.random((80, 1)) < 0.5).astype(np.float32)
    from ark_core.tasks import TaskSpec, TaskType

    spec = TaskSpec("pediatric", ("Pneumonia",), TaskType.BINARY)
    m = task_metrics(y + rng.random((80, 1)), y, spec, n_boot=50)
    card = write_model_card(tiny_run / "teacher.safetensors", sites={"site-a": {"pediatric": 150}},
                            datasets={"pediatric": "pediatric_pneumonia", "nih": "chestxray14"},
                            evaluation={"pediatric": m})
    text = card.read_text()
    assert card.name == "teacher.md"
    for s in ("Pneumonia", "site-a", "150", "not a medical device", "CC BY 4.0", "95% CI"):
        assert s in text


def test_tensorboard_events_hold_every_numeric_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ark_core.eval.tblog import write_scalars

    write_scalars(tmp_path, [{"epoch": 1, "loss.nih": 0.5, "note": "text"}])
    write_scalars(tmp_path, [{"round": 2, "kind": "train", "site": "site-a", "loss.nih": 0.25,
                              "accepted": True, "node_id": 7}])
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == ["loss.nih", "train/site-a/loss.nih"]
    [event] = ea.Scalars("train/site-a/loss.nih")
    assert (event.step, event.value) == (2, 0.25)
