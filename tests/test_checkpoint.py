"""Model files, import of released Ark checkpoints, export of a timm backbone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from ark_core.commands.cli import main
from ark_core.config import ModelConfig
from ark_core.model.ark_import import infer_swin_config, load_released, timm_swin_name
from ark_core.model.checkpoint import (
    ModelFileError,
    load_tensors,
    read_metadata,
    save_model,
    save_tensors,
)
from ark_core.model.factory import create_model, init_from_file, load_model, load_pretrained
from ark_core.model.network import ArkModel
from ark_core.model.pretrained import default_cfgs
from ark_core.tasks import ARK_PLUS_TASKS, TaskSpec, TaskType

FIXTURES = Path(__file__).parent / "fixtures" / "ark_format"
RELEASED = FIXTURES / "ark_format_tiny.pth.tar"
TINY_KWARGS = {"window_size": 4, "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 3, 6]}
TASKS = (
    TaskSpec("alpha", ("a", "b", "c"), TaskType.MULTILABEL),
    TaskSpec("beta", ("x",), TaskType.BINARY),
)


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURES / "ark_format_tiny_reference.pt", weights_only=True)


def perturbed(model: ArkModel, seed: int = 0) -> ArkModel:
    """Random offsets on every parameter, so that a swapped or skipped tensor shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_model(tasks=TASKS, projector: str = "linear", seed: int = 0) -> ArkModel:
    torch.manual_seed(seed)
    model = ArkModel("swin_tiny_patch4_window7_224", tasks, img_size=64, projector=projector,
                     projector_dim=16, backbone_kwargs=TINY_KWARGS)
    return perturbed(model, seed)


def outputs(model: ArkModel, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model.embed(x), model(x)


def assert_same_outputs(a: ArkModel, b: ArkModel, x: torch.Tensor, atol: float = 1e-5) -> None:
    za, la = outputs(a, x)
    zb, lb = outputs(b, x)
    torch.testing.assert_close(za, zb, atol=atol, rtol=0)
    assert list(la) == list(lb)
    for name in la:
        torch.testing.assert_close(la[name], lb[name], atol=atol, rtol=0)


def to_released_layout(model: ArkModel) -> dict[str, torch.Tensor]:
    """The inverse of the importer: an ArkModel's state dict in the timm 0.5.4 Ark layout."""
    bb = model.backbone
    tensors = {**bb.state_dict(), **dict(bb.named_buffers())}  # + relative_position_index, attn_mask
    sd: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:  # timm 0.5.4 keeps patch merging at the end of the stage before
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        sd[f"module.{k}"] = v.clone()
    sd["module.head.weight"] = torch.randn(1000, bb.num_features)
    sd["module.head.bias"] = torch.randn(1000)
    for k, v in model.projector.state_dict().items():
        sd[f"module.projector.{k}"] = v.clone()
    for i, name in enumerate(model.task_names):
        for k, v in model.heads[name].state_dict().items():
            sd[f"module.omni_heads.{i}.{k}"] = v.clone()
    return sd


# ----------------------------------------------------------------------------- released format
def test_released_fixture_reproduces_reference_outputs(reference):
    model = load_model(RELEASED)
    assert not model.training
    assert model.task_names == [t.name for t in ARK_PLUS_TASKS]
    assert model.tasks["rsna_pneumonia"] == ARK_PLUS_TASKS[3]
    assert model.img_size == 64 and model.embed_dim == 32 and model.projector_kind == "linear"
    z, logits = outputs(model, reference["input"])
    torch.testing.assert_close(z, reference["teacher_embedding"], atol=1e-4, rtol=0)
    assert len(logits) == len(reference["teacher_head_logits"])
    for got, want in zip(logits.values(), reference["teacher_head_logits"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_released_student_is_the_state_dict_entry():
    raw = torch.load(RELEASED, weights_only=True)
    student = load_model(RELEASED, role="student")
    teacher = load_model(RELEASED)
    want = raw["state_dict"]["module.omni_heads.4.weight"]
    assert torch.equal(student.heads["vindr_cxr"].weight, want)
    assert not torch.equal(teacher.heads["vindr_cxr"].weight, want)


def test_infer_swin_config_of_the_fixture():
    raw = torch.load(RELEASED, weights_only=True)["teacher"]
    sd = {k.removeprefix("module."): v for k, v in raw.items()}
    cfg = infer_swin_config(sd)
    want = json.loads((FIXTURES / "ark_format_tiny.json").read_text())["swin_config"]
    assert cfg == {**want, "depths": tuple(want["depths"]), "num_heads": tuple(want["num_heads"]),
                   "in_chans": 3}


@pytest.mark.parametrize(
    ("name", "img_size", "want_name"),
    [("swin_large_patch4_window12_384", 768, "swin_large_patch4_window12_384"),  # Ark+
     ("swin_base_patch4_window7_224", 224, "swin_base_patch4_window7_224")],  # Ark
)
def test_paper_backbones_are_recognised(name, img_size, want_name):
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = ArkModel(name, ARK_PLUS_TASKS, img_size=img_size)
    sd = {k.removeprefix("module."): v for k, v in to_released_layout(model).items()}
    cfg = infer_swin_config(sd)
    assert cfg["img_size"] == img_size
    assert timm_swin_name(cfg) == (want_name, {})


def test_importer_is_general(tmp_path):
    """Another Swin (window, embed, depths, size, patch), an MLP projector, three heads."""
    kwargs = {"patch_size": 2, "window_size": 6, "embed_dim": 16, "depths": [1, 2, 3, 1],
              "num_heads": [2, 2, 4, 4]}
    tasks = [TaskSpec("t0", tuple("abcde"), "multilabel"), TaskSpec("t1", ("p", "q"), "multiclass"),
             TaskSpec("t2", tuple("uvwxyzs"), "multilabel")]
    source = perturbed(ArkModel("swin_tiny_patch4_window7_224", tasks, img_size=48, projector="mlp",
                                projector_dim=24, backbone_kwargs=kwargs), seed=3)
    teacher_sd = to_released_layout(source)
    # stage 0 has no shifted block: the size must come from a later stage's mask
    assert not any(k.startswith("module.layers.0.") and "attn_mask" in k for k in teacher_sd)
    path = tmp_path / "other.pth.tar"
    student_sd = {k: v + 1 if v.is_floating_point() else v for k, v in teacher_sd.items()}
    torch.save({"epoch": 3, "lossMIN": 0.5, "state_dict": student_sd, "teacher": teacher_sd}, path)

    loaded = load_model(path)
    assert loaded.img_size == 48 and loaded.projector_kind == "mlp" and loaded.embed_dim == 24
    assert loaded.task_names == ["task_0", "task_1", "task_2"]
    x = torch.randn(2, 3, 48, 48)
    z, logits = outputs(loaded, x)
    z_want, logits_want = outputs(source, x)
    torch.testing.assert_close(z, z_want, atol=1e-5, rtol=0)
    for got, want in zip(logits.values(), logits_want.values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump([t.to_dict() for t in tasks]))
    named = load_model(path, task_names=names)
    assert list(named.tasks.values()) == tasks
    assert_same_outputs(named, source, x)


def test_task_names_that_do_not_fit_the_heads_are_refused(tmp_path):
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump({"tasks": [{"name": f"t{i}", "labels": ["a", "b"]}
                                               for i in range(6)]}))
    with pytest.raises(ValueError, match=r"omni_heads\.0 has 14 outputs"):
        load_model(RELEASED, task_names=names)
    names.write_text(yaml.safe_dump({"tasks": [{"name": "t", "labels": ["a"], "colour": 1}]}))
    with pytest.raises(ValueError, match=r"names\.yaml:\d+: tasks\.0\.colour: unknown key"):
        load_model(RELEASED, task_names=names)


def test_released_file_without_teacher_or_damaged(tmp_path):
    raw = torch.load(RELEASED, weights_only=True)
    path = tmp_path / "student_only.pth.tar"
    torch.save({"epoch": 1, "state_dict": raw["state_dict"]}, path)
    with pytest.raises(ValueError, match=r"student_only\.pth\.tar: no 'teacher' entry"):
        load_model(path)
    assert load_model(path, role="student").task_names[0] == "mimic_cxr"
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(RELEASED.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.pth\.tar: not a readable torch checkpoint"):
        load_model(cut)


# ----------------------------------------------------------------------------- model file
def test_model_file_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "run" / "teacher.safetensors"
    provenance = {"rounds": 3, "sites": ["a", "b"], "data": {"alpha": "sha256:00ff"}}
    save_model(model, path, provenance=provenance, role="teacher")
    assert [p.name for p in path.parent.iterdir()] == ["teacher.safetensors"]  # no temp left

    meta = read_metadata(path)
    assert meta["role"] == "teacher" and meta["format"] == "ark-model"
    assert meta["provenance"] == provenance
    assert meta["tasks"] == list(TASKS)
    assert meta["config"]["backbone"] == "swin_tiny_patch4_window7_224"
    assert meta["config"]["backbone_kwargs"] == TINY_KWARGS
    assert meta["config"]["work_size"] == model.work_size
    from ark_core import __version__

    assert meta["code_version"] == __version__
    tensors = load_tensors(path)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in tensors)
    assert all(v.is_floating_point() for v in tensors.values())

    loaded = load_model(path)
    assert loaded.task_names == ["alpha", "beta"]
    assert_same_outputs(loaded, model, torch.randn(2, 3, 64, 64), atol=0)
    with pytest.raises(ModelFileError, match="holds the teacher, not the student"):
        load_model(path, role="student")


def test_bad_model_files_are_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(missing)

    good = tmp_path / "good.safetensors"
    save_model(tiny_model(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors"):
        load_model(cut)

    text = tmp_path / "text.safetensors"
    text.write_text("hello, not tensors")
    with pytest.raises(ModelFileError, match="text.safetensors: not a readable"):
        load_model(text)

    meta = {k: v for k, v in _raw_metadata(good).items() if k != "tasks"}
    no_tasks = tmp_path / "no_tasks.safetensors"
    save_tensors(load_tensors(good), no_tasks, meta)
    with pytest.raises(ModelFileError, match=r"no_tasks.safetensors: .*\['tasks'\]"):
        load_model(no_tasks)

    tensors = load_tensors(good)
    tensors["heads.beta.weight"] = torch.zeros(2, 16)
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata=_raw_metadata(good))
    with pytest.raises(ModelFileError, match=r"wrong.safetensors: tensor 'heads.beta.weight' has "
                                             r"shape \(2, 16\)"):
        load_model(wrong)

    del tensors["heads.beta.weight"]
    save_file(tensors, str(wrong), metadata=_raw_metadata(good))
    with pytest.raises(ModelFileError, match=r"wrong.safetensors: tensor 'heads.beta.weight' missing"):
        load_model(wrong)


def _raw_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_init_from_file_keeps_matching_heads(tmp_path):
    source = tiny_model()
    path = tmp_path / "m.safetensors"
    save_model(source, path)
    tasks = [TaskSpec("gamma", ("g",), "binary"),  # new
             TaskSpec("beta", ("x",), "binary"),  # same name and labels: kept
             TaskSpec("alpha", ("a", "b", "z"), "multilabel")]  # labels differ: fresh
    model = create_model(ModelConfig(init=str(path)), tasks)
    assert model.training
    assert model.task_names == ["gamma", "beta", "alpha"]
    assert torch.equal(model.heads["beta"].weight, source.heads["beta"].weight)
    assert not torch.equal(model.heads["alpha"].weight, source.heads["alpha"].weight)
    assert torch.equal(model.projector.weight, source.projector.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().embed(x), source.embed(x))
    with pytest.raises(ValueError, match="built for img_size 64"):
        init_from_file(ModelConfig(init=str(path), img_size=224), tasks)


def test_init_from_released_checkpoint():
    new = TaskSpec("covid", ("normal", "pneumonia", "covid"), "multiclass")
    model = create_model(ModelConfig(init=str(RELEASED)), [ARK_PLUS_TASKS[5], new])
    raw = torch.load(RELEASED, weights_only=True)["teacher"]
    assert torch.equal(model.heads["shenzhen"].weight, raw["module.omni_heads.5.weight"])
    assert model.heads["covid"].out_features == 3


# ----------------------------------------------------------------------------- commands
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_round_trip_through_timm(tmp_path, capsys, suffix):
    model = tiny_model()
    save_model(model, tmp_path / "teacher.safetensors", role="teacher")
    save_model(tiny_model(seed=1), tmp_path / "student.safetensors", role="student")
    out = tmp_path / f"backbone{suffix}"
    assert main(["export", str(tmp_path), "--out", str(out)]) == 0
    call = capsys.readouterr().out.splitlines()[-1].split("model = ", 1)[1]
    backbone = eval(call, {"timm": timm}).eval()  # the printed call, as a user would run it
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), model.forward_features(x))

    plain = timm.create_model(model.backbone_name, num_classes=0, img_size=64, **TINY_KWARGS)
    state = load_tensors(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    plain.load_state_dict(state, strict=True)

    assert main(["export", str(tmp_path), "--out", str(out), "--student"]) == 0
    call = capsys.readouterr().out.splitlines()[-1].split("model = ", 1)[1]
    with torch.no_grad():
        student = tiny_model(seed=1)
        assert torch.equal(eval(call, {"timm": timm}).eval()(x), student.forward_features(x))


def test_export_refuses_the_wrong_role(tmp_path, capsys):
    save_model(tiny_model(), tmp_path / "s.safetensors", role="student")
    assert main(["export", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "b.pth")]) == 2
    assert "holds the student" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "b.pth")]) == 2


def test_export_of_a_released_checkpoint(tmp_path, capsys, reference):
    out = tmp_path / "ark.safetensors"
    assert main(["export", str(RELEASED), "--out", str(out)]) == 0
    call = capsys.readouterr().out.splitlines()[-1].split("model = ", 1)[1]
    backbone = eval(call, {"timm": timm}).eval()
    teacher = load_model(RELEASED)
    with torch.no_grad():
        feats = backbone(reference["input"])
        torch.testing.assert_close(teacher.projector(feats), reference["teacher_embedding"],
                                   atol=1e-4, rtol=0)


def test_import_command(tmp_path, capsys, reference):
    out = tmp_path / "ark_plus.safetensors"
    assert main(["import", str(RELEASED), "--out", str(out)]) == 0
    assert "rsna_pneumonia (3)" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["role"] == "teacher"
    assert meta["provenance"]["imported"]["epoch"] == 49
    assert len(meta["provenance"]["imported"]["sha256"]) == 64
    model = load_model(out)
    z, logits = outputs(model, reference["input"])
    torch.testing.assert_close(z, reference["teacher_embedding"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits["shenzhen"], reference["teacher_head_logits"][5],
                               atol=1e-4, rtol=0)

    student = tmp_path / "student.safetensors"
    assert main(["import", str(RELEASED), "--out", str(student), "--student"]) == 0
    assert read_metadata(student)["role"] == "student"
    assert main(["import", str(RELEASED), "--out", str(tmp_path / "x.pth")]) == 2


# ----------------------------------------------------------------------------- registry
def test_published_weights_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("ARK_WEIGHTS_DIR", str(tmp_path))
    name = "ark_plus_swin_large_768.nature2025"
    cfg = default_cfgs[name]
    assert cfg["input_size"] == (3, 768, 768) and "non-commercial" in cfg["license"]
    assert [t["name"] for t in cfg["tasks"]] == [t.name for t in ARK_PLUS_TASKS]
    with pytest.raises(FileNotFoundError, match=r"not on this machine .*github\.com/jlianglab/Ark"):
        load_model(name)
    (tmp_path / cfg["file_name"]).write_bytes(RELEASED.read_bytes())  # a file in the right place
    assert load_pretrained(name).task_names == [t.name for t in ARK_PLUS_TASKS]
    with pytest.raises(KeyError, match="unknown weights"):
        load_pretrained("nope.none")


def test_load_released_keeps_train_mode():
    assert load_released(RELEASED).training
