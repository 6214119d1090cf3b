"""The ServerApp's round loop driven over real Flower Messages to the real ClientApp."""

import json
import math

import pytest
import torch
from fed_helpers import write_sim
from flwr.app import Array, Context, Error, Message, RecordDict

from ark_core.fed.aggregate import head_task
from ark_core.fed.audit import read_audit
from ark_core.fed.federation import load_simulation
from ark_core.fed.transfer import ENCODINGS
from ark_core.model.checkpoint import load_tensors, read_metadata
from ark_core.model.factory import create_model
from client.app import app as client_app
from server.app import app as server_app
from server.app import federation_from_run_config
from server.loop import ArkFederation, FederationStopped
from server.rundir import RunDir, RunDirError
from simulations.inprocess import InProcessGrid

torch.set_num_threads(1)
SITE_TASKS = {"hosp-a": {"nih", "ped"}, "hosp-b": {"ped"}}


def _lines(run_dir, kind=None):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if kind is None or x["kind"] == kind]


def _inspect(reply: Message, seen: list, encoding: str = "fp32") -> None:
    """Every reply holds only the expected records, tensors and numeric metrics.

    ``encoding``: the run's transfer encoding, which train replies must declare (manifest
    ``{"arrays": encoding}``) and send every tensor in (its wire dtype; int8 with one float32
    scale each); other replies send fp32.
    """
    assert not reply.has_error(), reply.error.reason
    c = reply.content
    kind = reply.metadata.message_type
    encoded = kind == "train" and encoding != "fp32"
    site = dict(c.config_records["site"])
    assert set(site) == {"name", "tasks"} and set(site["tasks"]) == SITE_TASKS[site["name"]]
    assert set(c.config_records) == ({"site", "encoding"} if encoded else {"site"})
    assert set(c.metric_records) == {"metrics"}
    for k, v in c.metric_records["metrics"].items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
        assert k.split(".")[0] in {
            "num-examples", "steps", "loss", "task-loss", "consistency", "momentum", "lam",
            "bad-files", "lr", "ema-step", "teacher-from-round", "student", "teacher", "teacher-round",
        }, k
    if kind in ("evaluate", "query.tasks"):
        assert not c.array_records
    else:
        arrays = c.array_records["arrays"]
        scaled = encoded and encoding == "int8-delta"
        assert set(c.array_records) == ({"arrays", "scales"} if scaled else {"arrays"})
        heads = {head_task(k) for k in arrays} - {None}
        assert heads == SITE_TASKS[site["name"]]
        wire = ENCODINGS[encoding] if encoded else "float32"
        assert all(a.dtype == wire for a in arrays.values())
        if encoded:
            assert dict(c.config_records["encoding"]) == {"arrays": encoding}
        if scaled:
            scales = c.array_records["scales"]  # one vector: a scale per int8 tensor
            assert list(scales) == ["int8"]
            assert scales["int8"].dtype == "float32" and tuple(scales["int8"].shape) == (len(arrays),)
    seen.append((kind, site["name"]))


class CountingGrid(InProcessGrid):
    """Records how many message ids each pull asks for."""

    pulls: list[int]

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.pulls = [*getattr(self, "pulls", []), len(ids)]
        return super().pull_messages(ids)


def test_full_run_layout_provenance_and_reply_contents(tmp_path):
    rc = write_sim(tmp_path)
    seen: list = []
    grid = CountingGrid(client_app, 2, rc, on_reply=lambda m: _inspect(m, seen))
    # Through the ServerApp object, as Flower calls it.
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(rc)))
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    assert state["last_round"] == 2 and state["finished"] and state["num_rounds"] == 2
    assert len(state["schedule"]["lr"]) == 2
    contributors = {g: sorted(s) for g, s in state["rounds"]["1"]["contributors"].items()}
    assert contributors == {"shared": ["hosp-a", "hosp-b"], "nih": ["hosp-a"],
                            "ped": ["hosp-a", "hosp-b"]}
    assert sorted(p.name for p in (run / "rounds").iterdir()) == [
        "round_000.safetensors", "round_001.safetensors", "round_002.safetensors"]
    assert (run / "config.yaml").exists()
    meta = read_metadata(run / "master_teacher.safetensors")
    prov = meta["provenance"]
    assert prov["rounds"] == 2 and prov["sites"] == ["hosp-a", "hosp-b"]
    assert sorted(prov["teacher_sites"]) == ["hosp-a", "hosp-b"]
    assert prov["tasks"]["nih"] == ["hosp-a"] and sorted(prov["tasks"]["ped"]) == ["hosp-a", "hosp-b"]
    assert meta["role"] == "teacher" and [t.name for t in meta["tasks"]] == ["nih", "ped"]
    assert read_metadata(run / "master_student.safetensors")["role"] == "student"
    train = _lines(run, "train")
    assert sorted((x["round"], x["site"]) for x in train) == [
        (1, "hosp-a"), (1, "hosp-b"), (2, "hosp-a"), (2, "hosp-b")]
    assert all(x["accepted"] for x in train)
    # Diagnostics: each update's norm as audited, and per round the cosine of the two sites'
    # shared-weight updates (from sketches), in state.json and the round's metrics line.
    audited = {(r["round"], r["site"]): r["norm"] for r in read_audit(run / "audit.jsonl")
               if r["event"] == "update" and r["kind"] == "train"}
    assert all(x["update_norm"] == audited[x["round"], x["site"]] > 0 for x in train)
    for rnd in ("1", "2"):
        cos = state["rounds"][rnd]["cosine"]["hosp-a~hosp-b"]
        assert -1 <= cos <= 1
        assert _lines(run, "round")[int(rnd) - 1]["cosine.hosp-a~hosp-b"] == cos
    ev = _lines(run, "evaluate")
    assert len(ev) == 4 and all("student.auc.ped" in x for x in ev)
    assert sorted(k for k, _ in seen) == (
        ["evaluate"] * 4 + ["query"] * 2 + ["query.tasks"] * 2 + ["train"] * 4
        + ["train.heads"] * 4)  # the default head calibration: student, then teacher, per site
    # One reply held at a time, however many are ready: each pull asks for one message id.
    assert grid.pulls and set(grid.pulls) == {1}
    # Each site was asked its tasks once and then sent only its own tasks' heads (ARK_METHOD).
    for name, tasks in SITE_TASKS.items():
        recs = read_audit(run / "sites" / name / "audit.jsonl")
        assert [r["kind"] for r in recs].count("query.tasks") == 1
        got = [r for r in recs if r["kind"] in ("train", "evaluate")]
        assert len(got) == 4 and all(r["received_heads"] == sorted(tasks) for r in got)
        assert all(0 < r["received_bytes"] for r in got)
    server = read_audit(run / "audit.jsonl")
    sent: dict[tuple, list[str]] = {}  # train.heads goes out twice: the student, the teacher
    for r in server:
        if r["event"] == "master":
            for s in r["sites"]:
                sent.setdefault((r["round"], r["kind"], s), []).append(r["sha256"])
    assert sorted(k for k in sent if k[1] == "train") == [
        (1, "train", "hosp-a"), (1, "train", "hosp-b"), (2, "train", "hosp-a"),
        (2, "train", "hosp-b")]
    for name in SITE_TASKS:
        for r in read_audit(run / "sites" / name / "audit.jsonl"):
            if r["kind"] in ("train", "evaluate", "train.heads"):
                assert r["master_sha256"] in sent[r["round"], r["kind"], name], (name, r["round"])
    # The master student is the last round's checkpoint, with its heads calibrated.
    last = load_tensors(run / "rounds" / "round_002.safetensors")
    final = load_tensors(run / "master_student.safetensors")
    assert all(torch.equal(last[k], final[k]) != k.startswith("heads.") for k in last)


def test_rejected_update_leaves_master_unchanged_by_it(tmp_path, caplog):
    rc = write_sim(tmp_path, rounds=1, evaluate_every=0)
    good: dict = {}

    def tamper(reply: Message):
        if reply.has_error():
            return None
        name = reply.content.config_records["site"]["name"]
        arrays = reply.content.array_records.get("arrays")
        if reply.metadata.message_type != "train":
            return None
        if name == "hosp-b":  # a poisoned update: NaN in one tensor
            k = next(iter(arrays))
            x = arrays[k].numpy().copy()
            x.flat[0] = float("nan")
            arrays[k] = Array(x)
        else:
            good.update(arrays.to_torch_state_dict())
        return None

    grid = InProcessGrid(client_app, 2, rc, on_reply=tamper)
    cfg, run_dir = federation_from_run_config(rc)
    with caplog.at_level("WARNING", logger="flwr.ark.server"):
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(grid)
    assert any("hosp-b" in r.getMessage() and "REJECTED" in r.getMessage() for r in caplog.records)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds"]["1"]["sites"] == ["hosp-a"]
    assert "NaN" in state["rounds"]["1"]["rejected"]["hosp-b"]
    # One valid site: the master is exactly its update (both heads are hosp-a's).
    master = load_tensors(run_dir / "rounds" / "round_001.safetensors")
    assert set(master) == set(good)
    for k in good:  # x * w / w: equal up to float rounding
        torch.testing.assert_close(master[k], good[k], rtol=1e-6, atol=1e-7)
    line = [x for x in _lines(run_dir, "train") if x["site"] == "hosp-b"][0]
    assert line["accepted"] is False and "NaN" in line["reason"]


def test_error_reply_made_by_the_superlink_is_put_down_to_its_site(tmp_path):
    # A lost or expired message comes back as an error the SuperLink makes, naming itself
    # (node 1) as the sender; the audit log must still name the site it was sent to.
    rc = write_sim(tmp_path, rounds=1, evaluate_every=0, min_sites=1)

    def expire(reply: Message):
        if reply.metadata.message_type == "train" and reply.metadata.src_node_id == 2:
            lost = Message(Error(code=0, reason="message expired"), reply_to=reply)
            lost.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID, as Flower does
            lost.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
            return lost
        return None

    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(InProcessGrid(client_app, 2, rc,
                                                                   on_reply=expire))
    rejected = [r for r in read_audit(run_dir / "audit.jsonl")
                if r["event"] == "update" and not r["accepted"]]
    assert len(rejected) == 1 and rejected[0]["node_id"] == 2
    assert "node 2 replied with an error: message expired" in rejected[0]["reason"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds"]["1"]["sites"] == ["hosp-a"]


def test_resume_after_kill_mid_round(tmp_path):
    rc = write_sim(tmp_path, rounds=2, evaluate_every=0)
    cfg, run_dir = federation_from_run_config(rc)
    # Killed in round 2 after both sites trained (and saved their round-2 teachers): the
    # replies are 2 to query.tasks, 2 in round 1 and 2 in round 2.
    grid = InProcessGrid(client_app, 2, rc, crash_after=6)
    with pytest.raises(KeyboardInterrupt):
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(grid)
    assert json.loads((run_dir / "state.json").read_text())["last_round"] == 1
    # A metric line of the unfinished round left behind by the crash is dropped on restart.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 2, "kind": "train", "site": "ghost"}) + "\n")
    seen = []
    grid2 = InProcessGrid(client_app, 2, rc, on_reply=lambda m: seen.append(
        (m.metadata.message_type, dict(m.content.metric_records["metrics"]))))
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(grid2)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last_round"] == 2 and state["finished"] and sorted(state["rounds"]) == ["1", "2"]
    train = _lines(run_dir, "train")
    assert sorted((x["round"], x["site"]) for x in train) == [
        (1, "hosp-a"), (1, "hosp-b"), (2, "hosp-a"), (2, "hosp-b")]
    # The replayed round 2 starts each site's teacher from round 1 (rolled back).
    replayed = [m for kind, m in seen if kind == "train"]
    assert len(replayed) == 2 and all(m["teacher-from-round"] == 1 for m in replayed)
    # Restarting a finished run does nothing more.
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 2, rc))
    assert len(_lines(run_dir, "train")) == 4


def test_too_few_sites_retries_then_stops_with_master_intact(tmp_path):
    rc = write_sim(tmp_path, rounds=1, min_sites=2, retries=1, round_timeout_s=0.5,
                   evaluate_every=0)
    cfg, run_dir = federation_from_run_config(rc)
    grid = InProcessGrid(client_app, 2, rc, silent={2})
    with pytest.raises(FederationStopped, match="round 1 did not get 2 valid"):
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(grid)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last_round"] == 0 and not state["finished"]
    assert grid.produced == 3  # the site that answered said its tasks once, trained twice
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["round_000.safetensors"]
    assert not (run_dir / "metrics.jsonl").exists()


def _run_dir(tmp_path):
    """A fresh run directory of a 6-round simulation keeping 2 rounds, and its model."""
    rc = write_sim(tmp_path, rounds=6, keep_rounds=2)
    sim, _, run_dir = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    cfg = sim.federation()
    return cfg, run_dir, RunDir(run_dir, cfg), create_model(cfg.model, cfg.task_specs())


def test_changed_config_is_refused_and_pruning(tmp_path):
    cfg, run_dir, rd, model = _run_dir(tmp_path)
    for r in range(0, 5):
        rd.commit_round(r, model, {"sites": []})
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
        "round_000.safetensors", "round_003.safetensors", "round_004.safetensors"]
    with pytest.raises(RunDirError, match="round 6 follows round 4"):
        rd.commit_round(6, model)
    # Operational settings may change; what determines the result may not.
    RunDir(run_dir, cfg.model_copy(update={"round_timeout_s": 5.0, "min_sites": 2}))
    changed = cfg.model_copy(update={"rounds": 8, "local_epochs": 2})
    with pytest.raises(RunDirError, match="changed: local_epochs, rounds"):
        RunDir(run_dir, changed)
    assert RunDir(run_dir, cfg).last_round == 4


def test_the_aggregator_state_is_checkpointed_with_its_round(tmp_path):
    cfg, run_dir, rd, model = _run_dir(tmp_path)
    rd.commit_round(0, model)
    assert rd.load_server_state() == {}
    for r in range(1, 5):
        rd.commit_round(r, model, {"sites": []}, {"momentum.w": torch.full((3,), float(r))})
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
        "round_000.safetensors", "round_003.safetensors", "round_004.safetensors",
        "server_003.safetensors", "server_004.safetensors"]
    assert torch.equal(RunDir(run_dir, cfg).load_server_state()["momentum.w"], torch.full((3,), 4.0))
    # A resumed run hands that state to its aggregator; the plain mean keeps none and says so.
    with pytest.raises(ValueError, match=r"keeps no state across rounds, got \['momentum.w'\]"):
        ArkFederation(cfg, run_dir, poll_interval=0.01)._initial_master()


def test_failing_site_gives_a_clean_stop(tmp_path):
    # A ClientApp raising in every message (no data at its root) makes error replies only:
    # the round fails cleanly instead of crashing the server.
    rc = write_sim(tmp_path, rounds=1, sites=[{"name": "lost", "tasks": [
        {"name": "ped", "dataset": "pediatric_pneumonia", "root": "nowhere"}]}],
        retries=0, evaluate_every=0)
    cfg, run_dir = federation_from_run_config(rc)
    with pytest.raises(FederationStopped):
        ArkFederation(cfg, run_dir, poll_interval=0.01).start(InProcessGrid(client_app, 1, rc))
    assert json.loads((run_dir / "state.json").read_text())["last_round"] == 0
