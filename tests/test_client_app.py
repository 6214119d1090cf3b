"""The ClientApp driven with real Flower Messages: training, the teacher store, replies."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fed_helpers import PED, write_sim
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from ark_core.fed.aggregate import float_state
from ark_core.fed.federation import load_simulation, run_fingerprint
from ark_core.fed.protocol import Instruction, InstructionError
from ark_core.model.checkpoint import load_tensors
from ark_core.model.factory import create_model
from client.app import app
from client.state import TeacherStore
from simulations.inprocess import set_server_identity

torch.set_num_threads(1)
set_server_identity()  # messages below are built as the ServerApp builds them


def _setup(tmp_path, **fed):
    rc = write_sim(tmp_path, **fed)
    sim, _, run_dir = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed_cfg = sim.federation()
    torch.manual_seed(0)
    master = float_state(create_model(fed_cfg.model, fed_cfg.task_specs()))
    return rc, fed_cfg, master, run_dir


def _message(kind, fed_cfg, round_, master=None, node=1):
    ins = Instruction.for_round(fed_cfg, round_, 1e-3)
    content = RecordDict({"config": ConfigRecord(ins.to_config())})
    if master is not None:
        content["arrays"] = ArrayRecord({k: v.clone() for k, v in master.items()})
    msg = Message(content, dst_node_id=node, message_type=kind, group_id=str(round_))
    msg.metadata.__dict__["_message_id"] = f"{kind}-{round_}-{node}"  # the SuperLink's job
    return msg


def _context(rc, partition=0):
    # A fresh Context per message: nothing survives in Context.state between messages.
    return Context(run_id=1, node_id=partition + 1,
                   node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config=dict(rc))


def _call(rc, msg, partition=0):
    reply = app(msg, _context(rc, partition))
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    return reply


def test_train_reply_and_teacher_rollback(tmp_path):
    rc, fed_cfg, master, run_dir = _setup(tmp_path)
    store = TeacherStore(run_dir / "sites" / "hosp-a", run_fingerprint(fed_cfg))

    r1 = _call(rc, _message("train", fed_cfg, 1, master))
    m1 = r1.content["metrics"]
    assert m1["teacher-from-round"] == 0  # round 1 starts its teacher from the master
    assert m1["num-examples"] == m1["num-examples.nih"] + m1["num-examples.ped"] > 0
    assert dict(r1.content["site"]) == {"name": "hosp-a", "tasks": ["nih", "ped"]}
    sent = r1.content["arrays"]
    assert set(sent) == set(master)  # hosp-a trains both catalogue tasks
    assert all(sent[k].dtype == "float32" for k in sent)
    assert store.rounds() == [1]

    # Round 2 in a fresh Context: the teacher comes from the state directory.
    student1 = r1.content["arrays"].to_torch_state_dict()
    r2 = _call(rc, _message("train", fed_cfg, 2, student1))
    assert r2.content["metrics"]["teacher-from-round"] == 1
    assert store.rounds() == [1, 2]
    teacher2 = load_tensors(store.path(2))

    # The server replays round 2 (it crashed): the site rolls back to the teacher of round 1
    # and, from the same master, reproduces the same teacher.
    r2b = _call(rc, _message("train", fed_cfg, 2, student1))
    assert r2b.content["metrics"]["teacher-from-round"] == 1
    replayed = load_tensors(store.path(2))
    for k in teacher2:
        torch.testing.assert_close(replayed[k], teacher2[k])
    # ... whereas starting from the master again would give another teacher.
    assert any(not torch.equal(teacher2[k], load_tensors(store.path(1))[k]) for k in teacher2)


def test_site_restart_in_a_new_process_continues_teacher(tmp_path):
    rc, fed_cfg, master, run_dir = _setup(tmp_path)
    r1 = _call(rc, _message("train", fed_cfg, 1, master, node=2), partition=1)
    assert set(r1.content["arrays"]) == {k for k in master if not k.startswith("heads.nih.")}
    # Round 2 runs in a separate Python process (a restarted site).
    msg_path = tmp_path / "student1.pt"
    torch.save(r1.content["arrays"].to_torch_state_dict(), msg_path)
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_client_app import _call, _message
from ark_core.fed.federation import load_simulation
rc = {rc!r}
sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
student = torch.load({str(msg_path)!r})
reply = _call(rc, _message("train", sim.federation(), 2, student, node=2), partition=1)
print("TEACHER-FROM", int(reply.content["metrics"]["teacher-from-round"]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TEACHER-FROM 1" in out.stdout
    store = TeacherStore(run_dir / "sites" / "hosp-b", run_fingerprint(fed_cfg))
    assert store.rounds() == [1, 2]


def test_other_run_never_reads_this_runs_teacher(tmp_path):
    rc, fed_cfg, master, run_dir = _setup(tmp_path)
    _call(rc, _message("train", fed_cfg, 1, master, node=2), partition=1)
    other = fed_cfg.model_copy(update={"rounds": 3})
    assert run_fingerprint(other) != run_fingerprint(fed_cfg)
    reply = _call(rc, _message("train", other, 2, master, node=2), partition=1)
    assert reply.content["metrics"]["teacher-from-round"] == 0


def test_evaluate_and_query_replies_are_numbers_and_the_teacher(tmp_path):
    rc, fed_cfg, master, run_dir = _setup(tmp_path)
    r1 = _call(rc, _message("train", fed_cfg, 1, master))
    ev = _call(rc, _message("evaluate", fed_cfg, 1, master))
    assert "arrays" not in ev.content
    metrics = dict(ev.content["metrics"])
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["num-examples.nih"] > 0 and metrics["teacher-round"] == 1
    assert any(k.startswith("student.auc.ped") for k in metrics)
    assert any(k.startswith("teacher.auc.") for k in metrics)
    q = _call(rc, _message("query", fed_cfg, 0))
    teacher = q.content["arrays"].to_torch_state_dict()
    saved = load_tensors(TeacherStore(run_dir / "sites" / "hosp-a", run_fingerprint(fed_cfg)).path(1))
    assert set(teacher) == set(r1.content["arrays"]) == set(saved)
    assert all(torch.equal(teacher[k], saved[k]) for k in saved)
    assert q.content["metrics"]["teacher-round"] == 1


def test_site_with_other_labels_is_refused(tmp_path):
    # The site reads the pediatric set 3-way under the catalogue's binary task name.
    sites = [{"name": "odd", "tasks": [{"name": "ped", "dataset": "pediatric_pneumonia",
                                        "root": "pediatric", "max_images": 12,
                                        "options": {"classes": 3}}]}]
    rc, fed_cfg, master, _ = _setup(tmp_path, sites=sites)
    with pytest.raises(ValueError, match=r"site 'odd': task 'ped' has labels \['Normal'"):
        app(_message("train", fed_cfg, 1, master), _context(rc))


def test_a_site_without_training_images_of_a_task_says_so(tmp_path):
    # One share of 64 dealt from 16 images: none (every site holds whole patients).
    sites = [{"name": "bare", "tasks": [{**PED, "partition": {"num_sites": 64, "site": 63}}]}]
    rc, fed_cfg, master, _ = _setup(tmp_path, sites=sites)
    with pytest.raises(ValueError, match=r"site 'bare': no training images of task\(s\) \['ped'\]"):
        app(_message("train", fed_cfg, 1, master), _context(rc))


@pytest.mark.parametrize(("change", "says"), [
    (lambda d: d.update(version=7), "instruction version 7: this site understands versions 1 to 6"),
    (lambda d: d.update(lr=-1.0), "instruction: lr: Input should be greater than or equal to 0"),
    (lambda d: d["train"].update(batch_size="eight"), "instruction: train.batch_size:"),
    (lambda d: d.pop("catalogue"), "instruction: catalogue: Field required"),
])
def test_an_instruction_the_site_cannot_read_is_answered_with_why(tmp_path, change, says):
    """A newer server's instruction, or a broken one: the ClientApp fails with what is wrong,
    which Flower sends back as the reply's error and the server logs."""
    rc, fed_cfg, master, _ = _setup(tmp_path)
    msg = _message("train", fed_cfg, 1, master)
    data = json.loads(msg.content["config"]["instruction"])
    change(data)
    msg.content["config"]["instruction"] = json.dumps(data)
    with pytest.raises(InstructionError, match=re.escape(says)):
        app(msg, _context(rc))


@pytest.mark.parametrize("transfer, kept", [({}, False),
                                            ({"dtype": "int8", "delta": True}, True)])
def test_received_master_is_not_kept_through_training(tmp_path, monkeypatch, transfer, kept):
    """The train handler frees the master's bytes once the student holds them; a delta reply
    needs the master after training, so then (only) it stays."""
    import gc
    import weakref

    import client.site
    import ops.arrays

    rc, fed_cfg, master, _ = _setup(tmp_path, transfer=transfer)
    views, alive = [], []
    to_tensor, train_cyclic = ops.arrays.to_tensor, client.site.train_cyclic

    def watched_to_tensor(array):  # the real decoder; remembers the tensors over the message
        t = to_tensor(array)
        views.append(weakref.ref(t))
        return t

    def watched_train_cyclic(*args, **kwargs):  # the real training, once it starts
        gc.collect()
        alive.append(sum(ref() is not None for ref in views))
        return train_cyclic(*args, **kwargs)

    monkeypatch.setattr(ops.arrays, "to_tensor", watched_to_tensor)
    monkeypatch.setattr(client.site, "train_cyclic", watched_train_cyclic)
    msg = _message("train", fed_cfg, 1, master)
    reply = _call(rc, msg)
    assert len(views) >= len(master) and len(alive) == 1
    assert alive[0] == (len(master) if kept else 0)
    assert "arrays" not in msg.content  # taken out by the handler ...
    audit = [json.loads(line) for line in (Path(rc["run-dir"]) / "sites" / "hosp-a" / "audit.jsonl")
             .read_text().splitlines()]
    assert audit[-1]["received_bytes"] > 0  # ... after the audit log read what it records
    assert audit[-1]["master_sha256"] is not None and "error" not in audit[-1]
    assert reply.content["arrays"]
