"""Head calibration: the fit against an independent logistic regression, on real films; and
the federated step, where only heads and counts leave a site and the server averages them."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import DEMO, NIH, PED, write_sim
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ark_core.config import ConfigError, ModelConfig, parse_config
from ark_core.data.loaders import load_task_data
from ark_core.eval.downstream import embed, fit_probe
from ark_core.fed.aggregate import float_state, head_task
from ark_core.fed.federation import FederationConfig, SiteConfig, load_simulation
from ark_core.fed.protocol import HEADS, Instruction
from ark_core.model.checkpoint import load_tensors, read_metadata
from ark_core.model.factory import create_model
from ark_core.tasks import TaskSpec, TaskType
from ark_core.train.calibrate import ABSENT_LOGIT, fit_head, fit_heads
from client.app import app as client_app
from client.egress import EGRESS_BLOCKED, egress_guard
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid, set_server_identity

torch.set_num_threads(1)


def _head(spec: TaskSpec, dim: int = 6) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(dim, spec.num_outputs)


def _probs(w, b, z, spec):
    logits = torch.from_numpy(z).double() @ w.double().T + b.double()
    return (logits.softmax(-1) if spec.task_type is TaskType.MULTICLASS else logits.sigmoid()).numpy()


@pytest.mark.parametrize("task_type", [TaskType.MULTILABEL, TaskType.MULTICLASS])
def test_the_head_predicts_what_a_standardised_logistic_regression_predicts(task_type):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(120, 6)) * [1, 5, 0.1, 2, 1, 3] + [0, 10, -1, 0, 2, 0]
    spec = TaskSpec("t", ("a", "b", "c"), task_type)
    if task_type is TaskType.MULTILABEL:
        target = (z[:, :3] + rng.normal(size=(120, 3)) > [0, 10, -1]).astype(float)
        target[::7, 1] = np.nan  # uncertain labels are left out of the fit
    else:
        target = np.argmax(z[:, :3] - [0, 10, -1] + rng.normal(size=(120, 3)), 1)  # int64, as manifests
    w, b = fit_head(z, target, spec, _head(spec))
    np.testing.assert_allclose(_probs(w, b, z, spec), fit_probe(z, target, spec)(z), atol=2e-4)


def test_an_unstandardised_fit_keeps_a_head_on_barely_spread_embeddings_small():
    # An untrained backbone embeds every film alike: dimensions spread by 1e-2.
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 6)) * 1e-2 + 0.3
    spec = TaskSpec("t", ("a",), TaskType.BINARY)
    target = (z[:, 0] + rng.normal(size=200) * 1e-2 > 0.3).astype(float)[:, None]
    # At the optimum of an L2 logistic regression with a free intercept, sum_i (y_i - p_i) = 0
    # and w = C * sum_i (y_i - p_i) (z_i - mean z): the raw weight's norm is at most
    # C * sum_i ||z_i - mean z||. Standardising lifts that bound by 1 / spread.
    bound = np.linalg.norm(z - z.mean(0), axis=1).sum()
    raw, _ = fit_head(z, target, spec, _head(spec), standardise=False)
    standardised, _ = fit_head(z, target, spec, _head(spec))
    assert raw.norm() <= bound
    assert standardised.norm() > 10 * bound


def test_labels_the_site_cannot_fit_keep_a_safe_head():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 6))
    ml = TaskSpec("ml", ("pos", "const", "unknown"), TaskType.MULTILABEL)
    target = np.stack([z[:, 0] > 0, np.ones(40), np.full(40, np.nan)], 1).astype(float)
    current = _head(ml)
    w, b = fit_head(z, target, ml, current)
    assert torch.all(w[1] == 0) and b[1] == pytest.approx(np.log(0.9999 / 0.0001))  # all ones
    assert torch.equal(w[2], current.weight[2].detach()) and b[2] == current.bias[2]  # no value
    mc = TaskSpec("mc", ("x", "y", "z"), TaskType.MULTICLASS)
    two = np.where(z[:, 0] > 0, 2, 0)  # class 1 never seen
    w, b = fit_head(z, two, mc, _head(mc))
    assert b[1] == ABSENT_LOGIT and torch.all(w[1] == 0)
    np.testing.assert_allclose(_probs(w, b, z, mc)[:, [0, 2]], fit_probe(z, two, mc)(z)[:, [0, 2]],
                               atol=2e-4)


def test_fit_heads_on_real_films_matches_a_probe_on_the_same_embeddings():
    site = SiteConfig(name="s", tasks=[NIH, PED])
    tasks = load_task_data(site.tasks, DEMO, splits=("train",))
    model = create_model(ModelConfig(preset="tiny", img_size=64), [t.spec for t in tasks])
    heads, counts = fit_heads(model, tasks, batch_size=8)
    assert sorted(heads) == ["heads.nih.bias", "heads.nih.weight", "heads.ped.bias",
                             "heads.ped.weight"]
    for td in tasks:
        e = embed(model, td.train, batch_size=8)
        assert counts[f"num-examples.{td.spec.name}"] == len(e.index) > 0
        w, b = heads[f"heads.{td.spec.name}.weight"], heads[f"heads.{td.spec.name}.bias"]
        np.testing.assert_allclose(_probs(w, b, e.embedding, td.spec),
                                   fit_probe(e.embedding, e.target, td.spec)(e.embedding), atol=1e-3)
    assert counts["num-examples"] == counts["num-examples.nih"] + counts["num-examples.ped"]


def test_calibration_is_the_default_but_with_privacy_only_if_not_asked_for():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    assert parse_config(base, FederationConfig).head_calibration == "final"
    base["privacy"] = {"clip_norm": 1.0, "noise_multiplier": 1.0}
    assert parse_config(base, FederationConfig).head_calibration == "off"
    with pytest.raises(ConfigError, match="head_calibration fits heads .* would not be privatised"):
        parse_config({**base, "head_calibration": "final"}, FederationConfig)


def test_a_calibration_reply_may_carry_its_own_heads_and_nothing_else(tmp_path):
    rc = write_sim(tmp_path, head_calibration="final")
    sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed = sim.federation()
    master = float_state(create_model(fed.model, fed.task_specs()))
    set_server_identity()
    sent = {k: v for k, v in master.items() if head_task(k) in (None, "ped")}
    msg = Message(RecordDict({"config": ConfigRecord(Instruction.for_round(fed, 2).to_config()),
                              "arrays": ArrayRecord(sent)}),
                  dst_node_id=2, message_type=HEADS, group_id="2")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config=dict(rc))

    def reply(names):
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(sent[k].numpy()) for k in names}),
            "metrics": MetricRecord({"num-examples": 8.0, "num-examples.ped": 8.0}),
            "site": ConfigRecord({"name": "hosp-b", "tasks": ["ped"]})}), reply_to=msg)

    heads = [k for k in sent if head_task(k) == "ped"]
    ok = reply(heads)
    assert egress_guard(msg, ctx, lambda m, c: ok) is ok
    shared = next(k for k in sent if head_task(k) is None)
    blocked = egress_guard(msg, ctx, lambda m, c: reply([*heads, shared]))
    assert blocked.has_error() and blocked.error.code == EGRESS_BLOCKED
    assert shared in blocked.error.reason


def test_a_federation_calibrates_the_delivered_heads_at_the_owning_sites(tmp_path):
    rc = write_sim(tmp_path, rounds=2, evaluate_every=0, head_calibration="final")
    cfg, run_dir = federation_from_run_config(rc)
    replies: list[Message] = []
    grid = InProcessGrid(client_app, 2, rc, on_reply=lambda m: replies.append(m))
    ArkFederation(cfg, run_dir, poll_interval=0.01).start(grid)
    calibrations = [m for m in replies if m.metadata.message_type == HEADS]
    assert len(calibrations) == 4  # 2 sites x (student, teacher)
    for m in calibrations:
        site = m.content.config_records["site"]
        arrays = m.content.array_records["arrays"]
        assert {head_task(k) for k in arrays} == set(site["tasks"])  # own heads, nothing shared
        assert set(m.content.metric_records["metrics"]) == {
            "num-examples", *(f"num-examples.{t}" for t in site["tasks"])}
    # The delivered student: the last round's shared parts, the example-weighted mean of the
    # sites' calibrated heads (student calibrations come first).
    last = load_tensors(run_dir / "rounds" / "round_002.safetensors")
    student = load_tensors(run_dir / "master_student.safetensors")
    assert all(torch.equal(student[k], last[k]) for k in last if head_task(k) is None)
    fits = calibrations[:2]
    for k in (k for k in student if head_task(k) is not None):
        task = head_task(k)
        parts = [(m.content.array_records["arrays"][k].numpy(),
                  m.content.metric_records["metrics"][f"num-examples.{task}"])
                 for m in fits if k in m.content.array_records["arrays"]]
        want = sum(a * n for a, n in parts) / sum(n for _, n in parts)
        np.testing.assert_allclose(student[k].numpy(), want, rtol=1e-5, atol=1e-6)
    assert read_metadata(run_dir / "master_student.safetensors")["provenance"][
        "heads_calibrated_at"] == {"student": ["hosp-a", "hosp-b"], "teacher": ["hosp-a", "hosp-b"]}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((x["role"], x["site"]) for x in lines if x["kind"] == "calibrate") == [
        ("student", "hosp-a"), ("student", "hosp-b"), ("teacher", "hosp-a"), ("teacher", "hosp-b")]
