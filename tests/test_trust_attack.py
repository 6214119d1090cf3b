"""One site of three attacks every round: the median keeps the master near the clean run's.

Fixed seeds, the real ClientApp over the in-process grid, the tiny model on the demo's
pediatric set split over three sites. The attacker trains honestly, then sends
``master - 10 * (its student - master)`` (a sign-flipped, x10 update); it sits outside the
egress guard, as a hostile site would.
"""

import json
import math

import pytest
import torch
from fed_helpers import hostile_app, write_sim
from flwr.app import ArrayRecord

from ark_core.fed.audit import read_audit
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

torch.set_num_threads(1)
ROUNDS = 3
ATTACKER = "hosp-c"
FLIP = -10.0


def _attack_mod(msg, context, call_next):
    # Read before the handler, which takes the master out of the message it is given.
    master = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else None
    reply = call_next(msg, context)
    if (msg.metadata.message_type == "train" and not reply.has_error()
            and reply.content["site"]["name"] == ATTACKER):
        mine = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(
            {k: master[k] + FLIP * (v - master[k]) for k, v in mine.items()})
    return reply


attack_app = hostile_app(_attack_mod)


def _sites() -> list[dict]:
    def task(i):
        return {"name": "ped", "dataset": "pediatric_pneumonia", "root": "pediatric",
                "max_images": 120, "split": {"val_fraction": 0.4, "test_fraction": 0.0, "seed": 0},
                "partition": {"method": "iid", "num_sites": 3, "site": i, "seed": 0}}
    return [{"name": n, "tasks": [task(i)]} for i, n in enumerate(["hosp-a", "hosp-b", ATTACKER])]


def _run(tmp_path, name, app, **fed):
    d = tmp_path / name
    d.mkdir()
    rc = write_sim(d, sites=_sites(), rounds=ROUNDS, evaluate_every=ROUNDS,
                   catalogue=[{"name": "ped", "labels": ["Pneumonia"], "task_type": "binary"}],
                   train={"batch_size": 16, "lr": 1e-3, "threads": 1, "seed": 0}, **fed)
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(InProcessGrid(app, 3, rc))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [x for x in lines if x["kind"] == "evaluate" and x["round"] == ROUNDS]
    assert len(ev) == 3 and all("student.auc.ped" in x for x in ev)
    n = sum(x["num-examples.ped"] for x in ev)
    auc = sum(x["student.auc.ped"] * x["num-examples.ped"] for x in ev) / n
    return run_dir, load_tensors(run_dir / "rounds" / f"round_{ROUNDS:03d}.safetensors"), auc


def _dist(a, b):
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


@pytest.mark.slow
def test_median_resists_a_sign_flipping_site(tmp_path):
    clean_dir, clean, auc_clean = _run(tmp_path, "clean", client_app)
    mean_dir, mean, auc_mean = _run(tmp_path, "mean", attack_app)
    _, median, auc_median = _run(tmp_path, "median", attack_app, aggregation="median")
    start = load_tensors(clean_dir / "rounds" / "round_000.safetensors")
    travel = _dist(clean, start)  # how far clean training moved the master
    print(f"\nAUC clean {auc_clean:.3f}  mean+attack {auc_mean:.3f}  "
          f"median+attack {auc_median:.3f}; distance to clean master: mean "
          f"{_dist(mean, clean):.3f}, median {_dist(median, clean):.3f}, travel {travel:.3f}")
    assert _dist(mean, clean) > 3 * travel
    # The median of three follows one honest site per coordinate, not the clean mean, so it
    # drifts from the clean master (about 1.7x its travel here), but far less than the mean.
    assert _dist(median, clean) < 0.4 * _dist(mean, clean)
    assert auc_median > auc_mean + 0.1
    assert auc_median > auc_clean - 0.1
    # The server's audit log shows the attacker: an update norm far above the others'.
    rec = [r for r in read_audit(mean_dir / "audit.jsonl")
           if r["event"] == "update" and r["kind"] == "train" and r["round"] == 1]
    norms = {r["site"]: r["norm"] for r in rec}
    assert norms[ATTACKER] > 5 * max(norms["hosp-a"], norms["hosp-b"])
