"""The federation's numbers do not move: a 2-round tiny run against figures recorded from it.

The real ServerApp loop and ClientApp over the in-process grid, fixed seeds, one thread. It
records each site's losses per round and, per tensor of the final master student, its sum
and norm (float64). Losses must agree within 1e-6; the master's figures within 1e-4, since
two rounds of training carry a one-ulp difference in the first loss (a new Pillow or numpy
decoding or resizing a pixel differently: 5e-8 there) to about 2e-5 relative in a head's
sum, while a change of the method moves them by far more. A change of the method is meant
to change them: regenerate with ``ARK_GOLDEN_UPDATE=1 pytest tests/test_golden.py`` and say
why in the commit. A refactoring must leave them as they are.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from fed_helpers import write_sim

from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

GOLDEN = Path(__file__).parent / "golden" / "federation_2rounds.json"
TOL = 1e-6
MASTER_TOL = 1e-4
LOSSES = ("loss.", "task-loss.", "consistency.")


def _figures(tmp_path: Path) -> dict:
    torch.set_num_threads(1)
    rc = write_sim(tmp_path, rounds=2, evaluate_every=2)
    cfg, run_dir = federation_from_run_config(rc)
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(InProcessGrid(client_app, 2, rc))
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m["kind"] == "train":
            losses[f"round {m['round']} {m['site']}"] = {
                k: v for k, v in sorted(m.items()) if k.startswith(LOSSES)}
    master = load_tensors(run_dir / "master_student.safetensors")
    tensors = {k: [float(t.double().sum()), float(t.double().norm())]
               for k, t in sorted(master.items()) if t.is_floating_point()}
    return {"losses": losses, "master": tensors}


def test_a_two_round_federation_gives_the_recorded_figures(tmp_path):
    got = _figures(tmp_path)
    if os.environ.get("ARK_GOLDEN_UPDATE") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n", encoding="utf-8")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert got["losses"].keys() == want["losses"].keys()
    for run_site, figures in want["losses"].items():
        assert got["losses"][run_site].keys() == figures.keys(), run_site
        for k, v in figures.items():
            assert math.isclose(got["losses"][run_site][k], v, rel_tol=TOL, abs_tol=TOL), (
                run_site, k, got["losses"][run_site][k], v)
    assert got["master"].keys() == want["master"].keys()
    off = {k: (g, w) for k, w in want["master"].items()
           for g in [got["master"][k]]
           if not all(math.isclose(a, b, rel_tol=MASTER_TOL, abs_tol=MASTER_TOL)
                      for a, b in zip(g, w, strict=True))}
    assert not off, f"{len(off)} tensor(s) of the master changed, e.g. {next(iter(off.items()))}"
