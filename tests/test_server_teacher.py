"""The server-side teacher: its EMA rule, its refusals, and real federations that send it,
deliver it, and resume it."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim

from ark_core.config import ConfigError, parse_config
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.protocol import Instruction
from ark_core.fed.server_teacher import ServerTeacher, split_state
from ark_core.model.checkpoint import load_tensors
from ark_core.schedule import momentum_schedule
from client.app import app as client_app
from client.site import Site
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 2, generator=g) for k in ("backbone.w", "heads.a.weight",
                                                          "heads.b.weight")}


def test_the_teacher_is_the_ema_of_the_masters_with_a_full_site_momentum():
    init, masters = _state(0), [_state(1), _state(2), _state(3)]
    teacher = ServerTeacher(init, rounds=3, local_epochs=1, m0=0.5)
    # Two catalogue tasks: a round is two task-epochs of the method's schedule over 6 steps.
    schedule = momentum_schedule(6, 0.5)
    want = {k: v.double() for k, v in init.items()}
    for r, master in enumerate(masters, start=1):
        m = schedule[2 * r - 2] * schedule[2 * r - 1]
        assert teacher.momentum(r) == pytest.approx(m)
        teacher.update(master, r)
        want = {k: m * want[k] + (1 - m) * master[k].double() for k in want}
    for k in init:
        np.testing.assert_allclose(teacher.tensors[k].numpy(), want[k].numpy(), rtol=1e-6)
    # The master passed in is not modified, and the state round-trips by name.
    assert all(torch.equal(masters[0][k], _state(1)[k]) for k in init)
    agg, saved = split_state({"m.backbone.w": torch.zeros(1), **teacher.state_dict()})
    assert set(agg) == {"m.backbone.w"} and set(saved) == set(init)
    other = ServerTeacher(init, rounds=3, local_epochs=1, m0=0.5)
    other.load(saved)
    assert all(torch.equal(other.tensors[k], teacher.tensors[k]) for k in init)
    with pytest.raises(ValueError, match="does not match the model"):
        other.load({"backbone.w": saved["backbone.w"]})


def test_a_quarter_epoch_round_takes_one_task_epoch_step_per_task():
    teacher = ServerTeacher(_state(0), rounds=8, local_epochs=0.25, m0=0.9)
    schedule = momentum_schedule(16, 0.9)  # 8 rounds x 2 tasks, one step per task a round
    assert teacher.momentum(3) == pytest.approx(schedule[4] * schedule[5])


def test_the_config_refuses_a_kept_site_optimizer_and_keeps_old_fingerprints():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    on = parse_config({**base, "teacher": "server"}, FederationConfig)
    plain = parse_config(base, FederationConfig)
    assert run_fingerprint(on) != run_fingerprint(plain)
    assert run_fingerprint(parse_config({**base, "teacher": "sites"}, FederationConfig)) \
        == run_fingerprint(plain)
    assert Instruction.from_config(Instruction.for_round(on, 1).to_config()).teacher == "server"
    with pytest.raises(ConfigError, match="with teacher: server the site keeps no teacher"):
        parse_config({**base, "teacher": "server", "keep_site_optimizer": True}, FederationConfig)


def test_a_site_refuses_a_server_teacher_round_without_the_teacher(tmp_path):
    rc = write_sim(tmp_path, rounds=1, teacher="server")
    cfg, _ = federation_from_run_config(rc)
    site = Site.from_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"], 1)
    with pytest.raises(ValueError, match="the train message carries none"):
        site.train(Instruction.for_round(cfg, 1, 1e-3), {})


def test_a_federation_sends_delivers_and_resumes_the_server_teacher(tmp_path):
    """Real ClientApp/ServerApp code: 2 rounds straight == 1 round, stop, resume; the master
    teacher is the EMA of the round masters; the sites store no teacher."""
    teachers = {}
    for how in ("straight", "resumed"):
        (tmp_path / how).mkdir()
        rc = write_sim(tmp_path / how, rounds=2, evaluate_every=0, head_calibration="off",
                       teacher="server", train={"batch_size": 8, "lr": 1e-3, "threads": 1,
                                                "ema_m0": 0.5})
        cfg, run_dir = federation_from_run_config(rc)
        if how == "resumed":
            ArkFederation(cfg, run_dir, poll_interval=0.01).start(
                InProcessGrid(client_app, 2, rc), max_rounds=1)
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
        state = json.loads((run_dir / "state.json").read_text())
        assert state["finished"] and state["teacher_sites"] == []
        teachers[how] = load_tensors(run_dir / "master_teacher.safetensors")
        # Every train message carried the teacher beside the master, both in the audit log.
        audit = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
        kinds = [(a["round"], a["kind"]) for a in audit if a["event"] == "master"]
        for r in (1, 2):
            assert kinds.count((r, "train")) == kinds.count((r, "train.teacher")) == 2
        assert not any(a.get("kind") == "query" for a in audit)  # no site teacher collected
        sites_dir = run_dir.parent / "run" / "sites"
        assert not list(sites_dir.rglob("teacher_round_*"))
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sorted((x["round"], x["teacher-from-round"]) for x in lines
                      if x.get("kind") == "train") == [(1, 0), (1, 0), (2, 1), (2, 1)]
    assert all(torch.equal(teachers["straight"][k], teachers["resumed"][k])
               for k in teachers["straight"])
    # The EMA of round 0 (the initial master), 1 and 2, written out from the saved masters.
    rounds = run_dir / "rounds"
    masters = [load_tensors(rounds / f"round_{r:03d}.safetensors") for r in (0, 1, 2)]
    schedule = momentum_schedule(4, 0.5)  # 2 rounds x 2 catalogue tasks
    want = {k: v.double() for k, v in masters[0].items() if torch.is_floating_point(v)}
    for r in (1, 2):
        m = schedule[2 * r - 2] * schedule[2 * r - 1]
        want = {k: m * want[k] + (1 - m) * masters[r][k].double() for k in want}
    for k, v in want.items():
        np.testing.assert_allclose(teachers["straight"][k].double().numpy(), v.numpy(),
                                   rtol=1e-5, atol=1e-6)
    # The teacher is not the master student: it lags it.
    student = load_tensors(run_dir / "master_student.safetensors")
    assert any(not torch.equal(student[k], teachers["straight"][k]) for k in want)
