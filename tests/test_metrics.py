import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from ark_core.eval.metrics import bootstrap_weights, task_metrics, weighted_auc, youden_threshold
from ark_core.tasks import TaskSpec, TaskType

ML = TaskSpec("ml", ("a", "b", "c"), TaskType.MULTILABEL)
MC = TaskSpec("mc", ("x", "y", "z"), TaskType.MULTICLASS)


def _data(n=300, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.5, 0.2]).astype(np.float32)
    probs = np.clip(0.35 * y + rng.random((n, 3)) * 0.7, 0, 1)
    return y, probs


def test_weighted_auc_matches_sklearn_with_weights_and_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    w = rng.integers(0, 4, size=(5, 200)).astype(float)
    got = weighted_auc(y, s, w)
    want = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_task_metrics_match_sklearn():
    y, p = _data()
    yv, pv = _data(seed=2)
    m = task_metrics(p, y, ML, val_probs=pv, val_target=yv, n_boot=0)
    for c, label in enumerate(ML.labels):
        e = m["classes"][label]
        assert e["auc"] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
        assert e["ap"] == pytest.approx(average_precision_score(y[:, c], p[:, c]))
        fpr, tpr, thr = roc_curve(yv[:, c], pv[:, c])
        assert e["threshold"] == pytest.approx(thr[np.argmax(tpr - fpr)])
        pred = p[:, c] >= e["threshold"]
        assert e["f1"] == pytest.approx(f1_score(y[:, c], pred))
        assert e["sensitivity"] == pytest.approx(pred[y[:, c] == 1].mean())
        assert e["specificity"] == pytest.approx(1 - pred[y[:, c] == 0].mean())
        assert e["false_negative_rate"] == pytest.approx(1 - e["sensitivity"])
    assert m["auc_mean"] == pytest.approx(np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(3)]))


def test_threshold_comes_from_validation_not_test():
    y, p = _data()
    shifted = task_metrics(p, y, ML, val_probs=np.clip(_data(seed=2)[1] + 0.2, 0, 1),
                           val_target=_data(seed=2)[0], n_boot=0)
    own = task_metrics(p, y, ML, val_probs=p, val_target=y, n_boot=0)
    assert shifted["classes"]["a"]["threshold"] != own["classes"]["a"]["threshold"]
    assert task_metrics(p, y, ML, n_boot=0)["classes"]["a"]["threshold"] is None


def test_multiclass_one_vs_rest_and_ignored_rows():
    rng = np.random.default_rng(3)
    t = rng.integers(-1, 3, size=400)
    logits = rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[np.maximum(t, 0)]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = task_metrics(p, t, MC, n_boot=0)
    ok = t >= 0
    for c, label in enumerate(MC.labels):
        assert m["classes"][label]["auc"] == pytest.approx(roc_auc_score(t[ok] == c, p[ok, c]))
        assert m["classes"][label]["n"] == ok.sum()


def test_one_valued_class_is_undefined_not_half():
    y, p = _data()
    y[:, 1] = 0.0
    y[:5, 2] = np.nan
    m = task_metrics(p, y, ML, val_probs=p, val_target=y, n_boot=50)
    b = m["classes"]["b"]
    assert b["auc"] is None and b["auc_ci"] is None and b["ap"] is None and b["threshold"] is None
    assert m["auc_mean"] == pytest.approx(np.mean([m["classes"][k]["auc"] for k in ("a", "c")]))
    assert m["classes"]["c"]["n"] == len(y) - 5


def test_ci_seeded_contains_point_and_resamples_patients():
    y, p = _data(n=240)
    patients = np.repeat(np.arange(60), 4)
    a = task_metrics(p, y, ML, patient_ids=patients, n_boot=300, seed=7)
    b = task_metrics(p, y, ML, patient_ids=patients, n_boot=300, seed=7)
    c = task_metrics(p, y, ML, patient_ids=patients, n_boot=300, seed=8)
    assert a == b
    assert a["classes"]["a"]["auc_ci"] != c["classes"]["a"]["auc_ci"]
    for e in a["classes"].values():
        lo, hi = e["auc_ci"]
        assert lo <= e["auc"] <= hi and hi - lo > 0
    lo, hi = a["auc_mean_ci"]
    assert lo <= a["auc_mean"] <= hi
    assert a["patients"] == 60
    # each replicate's weights are whole patients: equal within a patient, sum = images
    for w in bootstrap_weights(patients, 240, 20, seed=0, chunk=20):
        assert (w.reshape(20, 60, 4) == w.reshape(20, 60, 4)[:, :, :1]).all()
        np.testing.assert_array_equal(w.sum(1), 240)


def test_youden_undefined_for_one_class():
    assert youden_threshold(np.ones(5), np.linspace(0, 1, 5)) is None
