"""The Ark+ method's math: schedules, EMA, losses, heads by name, configs."""

import math

import numpy as np
import pytest
import torch

from ark_core.config import ArkConfig, ConfigError, ModelConfig, load_config
from ark_core.model.factory import create_model
from ark_core.model.loss import task_loss
from ark_core.model.network import ArkModel, ema_update, make_teacher
from ark_core.schedule import consistency_weight, cosine_scheduler, lr_at, momentum_schedule
from ark_core.tasks import ARK_PLUS_TASKS, TaskSpec, TaskType

TINY = ModelConfig(preset="tiny")


def tiny_model(tasks=ARK_PLUS_TASKS[:3]) -> ArkModel:
    torch.manual_seed(0)
    return create_model(TINY, tasks)


# ----------------------------------------------------------------------------- schedules
def test_momentum_schedule_is_cosine_from_m0_towards_one():
    m = momentum_schedule(10, 0.9)
    assert len(m) == 10
    assert m[0] == pytest.approx(0.9)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0
    # DINO-style closed form: 1 - (1 - m0) * (cos(pi k / K) + 1) / 2
    k = np.arange(10)
    assert np.allclose(m, 1 - 0.1 * (np.cos(np.pi * k / 10) + 1) / 2)


def test_consistency_weight_follows_momentum():
    assert consistency_weight(0.9, 0.9, 0.5) == pytest.approx(0.0)
    assert consistency_weight(1.0, 0.9, 0.5) == pytest.approx(0.5)
    assert consistency_weight(0.95, 0.9, 0.5) == pytest.approx(0.25)


def test_cosine_scheduler_warmup_and_length():
    s = cosine_scheduler(1.0, 0.0, 12, warmup_steps=2)
    assert len(s) == 12
    assert s[0] == 0.0 and s[1] == pytest.approx(0.5) and s[2] == pytest.approx(1.0)
    assert np.all(np.diff(s[2:]) < 0)
    with pytest.raises(ValueError):
        cosine_scheduler(1.0, 0.0, 0)


def test_lr_at_warmup_then_cosine():
    lrs = [lr_at(e, 10, 1e-2, 0.0, 2) for e in range(10)]
    assert lrs[0] > 0 and lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] == pytest.approx(0.5 * 1e-2 * (1 + math.cos(math.pi * 7 / 8)))
    with pytest.raises(ValueError):
        lr_at(10, 10, 1e-2, 0.0, 0)


# ----------------------------------------------------------------------------- EMA
def test_ema_update_all_parameters_and_heads_by_name():
    student = tiny_model()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * s[n]), n


def test_teacher_gets_no_gradients_and_is_eval():
    student = tiny_model()
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 64, 64)
    z_s, logits = student.forward_task(x, "chexpert")
    loss = logits.sum() + ((z_s - teacher.embed(x)) ** 2).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


# ----------------------------------------------------------------------------- losses
def test_loss_per_task_type():
    torch.manual_seed(0)
    ml = TaskSpec("a", ("x", "y"), TaskType.MULTILABEL)
    logits = torch.randn(4, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.7, 1.0], [0.0, 0.0]])
    mask = ~torch.isnan(target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[mask], target[mask]
    )
    assert task_loss(logits, target, ml) == pytest.approx(expected.item(), rel=1e-6)

    mc = TaskSpec("b", ("n", "o", "l"), TaskType.MULTICLASS)
    logits = torch.randn(3, 3)
    target = torch.tensor([0, 2, -1])
    expected = torch.nn.functional.cross_entropy(logits[:2], target[:2])
    assert task_loss(logits, target, mc) == pytest.approx(expected.item(), rel=1e-6)
    assert task_loss(logits, torch.tensor([-1, -1, -1]), mc).item() == 0.0

    binary = TaskSpec("c", ("tb",), TaskType.BINARY)
    logits = torch.randn(3, 1)
    target = torch.tensor([[1.0], [0.0], [1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert task_loss(logits, target, binary) == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- heads
def test_heads_keyed_by_name_survive_reordering():
    a = tiny_model(ARK_PLUS_TASKS[:3])
    b = create_model(TINY, [ARK_PLUS_TASKS[2], ARK_PLUS_TASKS[0], ARK_PLUS_TASKS[1]])
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 3, 64, 64)
    out_a, out_b = a(x), b(x)
    assert list(out_b) == ["chestxray14", "mimic_cxr", "chexpert"]
    for name in out_a:
        assert torch.allclose(out_a[name], out_b[name], atol=1e-6)


def test_add_task_leaves_other_heads_untouched():
    m = tiny_model(ARK_PLUS_TASKS[:2]).eval()
    x = torch.randn(2, 3, 64, 64)
    before = m(x)
    m.add_task(TaskSpec("covidx", ("normal", "pneumonia", "COVID-19"), TaskType.MULTICLASS))
    after = m(x)
    assert after["covidx"].shape == (2, 3)
    for name in before:
        assert torch.equal(before[name], after[name])
    with pytest.raises(ValueError):
        m.add_task(ARK_PLUS_TASKS[0])


def test_presets_build_the_paper_architectures():
    plus = ModelConfig(preset="ark_plus")
    assert (plus.img_size, plus.projector, plus.projector_dim) == (768, "linear", 1376)
    assert plus.resolved_work_size == 896
    ark = ModelConfig(preset="ark")
    assert (ark.img_size, ark.projector) == (224, "mlp")
    # An override next to a preset wins.
    assert ModelConfig(preset="tiny", img_size=96).img_size == 96


# ----------------------------------------------------------------------------- config
def test_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: tiny\n  projectr: linear\n"
        "tasks:\n  - name: a\n    dataset: csv\n    root: data\n    uncertain: maybe\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path, ArkConfig)
    msg = str(e.value)
    assert f"{path}:3: model.projectr: unknown key" in msg
    assert f"{path}:8: tasks.0.uncertain:" in msg


def test_config_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny\n tasks: [\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path, ArkConfig)


def test_duplicate_task_names_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "tasks:\n  - {name: a, dataset: csv, root: x}\n  - {name: a, dataset: csv, root: y}\n"
    )
    with pytest.raises(ConfigError, match="repeated"):
        load_config(path, ArkConfig)
