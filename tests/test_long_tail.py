"""The long-tail loss options against independent numpy computations; the default is the
method's loss, bit for bit; the terms come from the training split a site holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ark_core.config import ConfigError, TrainConfig, drop_added_defaults, parse_config
from ark_core.model.loss import long_tail_terms, task_loss
from ark_core.tasks import TaskSpec, TaskType

ML = TaskSpec("ml", ("a", "b", "c"), TaskType.MULTILABEL)
MC = TaskSpec("mc", ("x", "y", "z"), TaskType.MULTICLASS)
COUNTS = {"a": {"positive": 900, "negative": 100}, "b": {"positive": 30, "negative": 970},
          "c": {"positive": 0, "negative": 1000}}
MC_COUNTS = {"x": {"positive": 700, "negative": 300}, "y": {"positive": 250, "negative": 750},
             "z": {"positive": 50, "negative": 950}}


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3, generator=g) * 2
    target = (torch.rand(6, 3, generator=g) > 0.6).float()
    target[1, 2] = target[4, 0] = float("nan")  # ignored cells
    target[3, 1] = 0.7  # a soft (LSR-Ones) label
    return logits, target


def _bce(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def _pos_neg(counts, labels):
    return (np.array([counts[k]["positive"] for k in labels], float),
            np.array([counts[k]["negative"] for k in labels], float))


def test_the_default_is_the_methods_loss_bit_for_bit():
    logits, target = _data()
    assert long_tail_terms("none", COUNTS, ML) is None
    mask = ~torch.isnan(target)
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
    assert torch.equal(task_loss(logits, target, ML), (bce * mask).sum() / mask.sum())
    assert torch.equal(task_loss(logits, target, ML, None), task_loss(logits, target, ML))
    y = torch.tensor([0, 2, -1, 1, 1, 0])
    assert torch.equal(task_loss(logits, y, MC), F.cross_entropy(logits, y, ignore_index=-1))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjustment_multilabel(tau):
    logits, target = _data()
    pos, neg = _pos_neg(COUNTS, ML.labels)
    p = (pos + 1) / (pos + neg + 2)
    x = logits.double().numpy() + tau * np.log(p / (1 - p))
    y = target.double().numpy()
    ok = ~np.isnan(y)
    expected = _bce(x, np.nan_to_num(y))[ok].mean()
    lt = long_tail_terms("logit_adjust", COUNTS, ML, tau=tau)
    assert lt.weight is None
    assert task_loss(logits, target, ML, lt).item() == pytest.approx(expected, rel=1e-5)


def test_class_balanced_multilabel():
    logits, target = _data(1)
    beta = 0.99
    pos, _ = _pos_neg(COUNTS, ML.labels)
    w = (1 - beta) / (1 - beta ** np.maximum(pos, 1))
    w = w / w.sum() * 3
    y = target.double().numpy()
    ok = ~np.isnan(y)
    expected = (_bce(logits.double().numpy(), np.nan_to_num(y)) * w)[ok].sum() / ok.sum()
    lt = long_tail_terms("class_balanced", COUNTS, ML, beta=beta)
    assert lt.offset is None and lt.weight.sum().item() == pytest.approx(3.0)
    assert lt.weight[2] > lt.weight[1] > lt.weight[0]  # rarer classes weigh more
    assert task_loss(logits, target, ML, lt).item() == pytest.approx(expected, rel=1e-5)


def test_multiclass_options():
    logits, _ = _data(2)
    y = np.array([0, 2, -1, 1, 1, 0])
    pos, neg = _pos_neg(MC_COUNTS, MC.labels)
    ok = y >= 0

    def ce(z, weights=None):
        z = z - z.max(1, keepdims=True)
        nll = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(y)), np.maximum(y, 0)]
        w = np.ones(3) if weights is None else weights
        return (w[y[ok]] * nll[ok]).sum() / ok.sum()

    adj = long_tail_terms("logit_adjust", MC_COUNTS, MC, tau=1.0)
    z = logits.double().numpy() + np.log((pos + 1) / (pos + neg + 2))
    assert task_loss(logits, torch.tensor(y), MC, adj).item() == pytest.approx(ce(z), rel=1e-5)
    cb = long_tail_terms("class_balanced", MC_COUNTS, MC, beta=0.999)
    w = (1 - 0.999) / (1 - 0.999 ** pos)
    w = w / w.sum() * 3
    assert task_loss(logits, torch.tensor(y), MC, cb).item() == \
        pytest.approx(ce(logits.double().numpy(), w), rel=1e-5)
    assert task_loss(logits, torch.full((6,), -1), MC, cb).item() == 0.0


def test_a_class_without_positives_keeps_finite_terms():
    for how in ("logit_adjust", "class_balanced"):
        lt = long_tail_terms(how, COUNTS, ML)
        terms = lt.offset if lt.offset is not None else lt.weight
        assert torch.isfinite(terms).all()
    logits, target = _data()
    target[:, 2] = 0.0
    assert torch.isfinite(task_loss(logits, target, ML, long_tail_terms("logit_adjust", COUNTS, ML)))


def test_the_options_round_trip_and_leave_old_fingerprints_alone():
    cfg = parse_config({"long_tail": "logit_adjust", "long_tail_tau": 0.5}, TrainConfig)
    assert TrainConfig.model_validate(cfg.model_dump()) == cfg
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert parse_config({"long_tail": "class_balanced"}, TrainConfig).long_tail_beta == 0.999
    with pytest.raises(ConfigError, match="long_tail"):
        parse_config({"long_tail": "focal"}, TrainConfig)
    with pytest.raises(ConfigError, match="long_tail_beta"):
        parse_config({"long_tail_beta": 1.0}, TrainConfig)
    plain = TrainConfig().model_dump(mode="json")
    drop_added_defaults(plain)
    assert not any(k.startswith("long_tail") for k in plain)
    chosen = cfg.model_dump(mode="json")
    drop_added_defaults(chosen)
    assert chosen["long_tail"] == "logit_adjust" and chosen["long_tail_tau"] == 0.5
    assert "long_tail_beta" not in chosen


def test_training_uses_the_terms_of_the_training_split(monkeypatch):
    from conftest import DEMO, demo_task

    from ark_core.config import ModelConfig, TaskConfig
    from ark_core.data.loaders import load_task_data
    from ark_core.model.factory import create_model
    from ark_core.model.network import make_teacher
    from ark_core.train import cyclic

    (td,) = load_task_data([TaskConfig.model_validate(demo_task("nih"))], DEMO)
    td.train = td.train.subset(range(8))
    seen = []

    def spy(logits, target, spec, long_tail=None):
        seen.append(long_tail)
        return task_loss(logits, target, spec, long_tail)

    monkeypatch.setattr(cyclic, "task_loss", spy)
    torch.manual_seed(0)
    student = create_model(ModelConfig(preset="tiny", img_size=32, work_size=32), [td.spec])
    for how in ("none", "logit_adjust"):
        seen.clear()
        cfg = TrainConfig(batch_size=4, long_tail=how, long_tail_tau=0.5, threads=1)
        cyclic.train_cyclic(student, make_teacher(student), [td], cfg, img_size=32, work_size=32,
                            lr=0.01, local_epochs=1, ema_step=0, ema_total_steps=1, progress=False)
        assert seen
        if how == "none":
            assert all(x is None for x in seen)
            continue
        want = long_tail_terms(how, td.train.label_counts(), td.spec, tau=0.5)
        assert all(torch.equal(x.offset, want.offset) for x in seen)
