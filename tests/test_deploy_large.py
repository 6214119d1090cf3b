"""A model of more than 100M float parameters crosses a deployment round over loopback.

ark-server and two ark-client sites with TLS and site authentication, one round of the tiny
Swin with a 384,000-wide projector (103M parameters, 413 MB in float32) and one training
step per site. The round must complete within the configured timeouts; the test prints the
bytes each site sent and received and the peak memory (VmHWM) of the SuperLink, the
ServerApp and the site processes, the figures deploy/README.md quotes.
"""

from __future__ import annotations

import json
import math

import pytest
from deploy_helpers import (
    NIH,
    PED,
    PeakRss,
    own_processes,
    processes,
    wait_for,
    write_federation,
    write_site,
)
from safetensors import safe_open

from ops.procs import free_port

pytestmark = pytest.mark.slow
PROJECTOR_DIM = 384_000  # tiny Swin (256 features) -> 98.3M projector weights, 103.3M in all
MIB = 2**20


def _float_params(path) -> int:
    """Float parameters in a model file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if f.get_slice(k).get_dtype() in ("F32", "F16", "BF16"))


def test_large_model_round_over_loopback(tmp_path, keys):
    port = free_port()
    sites = {"site-a": [NIH], "site-b": [PED]}  # one task each: one training step each
    fed = write_federation(
        tmp_path, keys, port, list(sites), rounds=1, evaluate_every=0, round_timeout_s=600,
        model={"preset": "tiny", "projector_dim": PROJECTOR_DIM},
        train={"batch_size": 8, "lr": 1e-3, "threads": 1, "optimizer": "sgd"},
    )
    run = tmp_path / "run"
    with processes(tmp_path) as procs, PeakRss(procs, {
        "superlink": r"flower-superlink", "serverapp": r"flwr-serverapp",
        "clientapp": r"flwr-clientapp", "supernode": r"flower-supernode", "gate": r"server\.gate",
    }) as rss:
        server = procs.start("server", "ark-server", str(fed))
        for name, tasks in sites.items():
            procs.start(name, "ark-client", str(write_site(
                tmp_path, name, keys, port, tasks=tasks, startup_retries=120, retry_wait_s=1)))
        assert server.wait(timeout=600) == 0, procs.log(server)
    wait_for(lambda: not own_processes(str(tmp_path)), 30, "every process to end")

    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and sorted(state["rounds"]["1"]["sites"]) == sorted(sites)
    params = _float_params(run / "master_student.safetensors")
    assert params >= 100_000_000
    with safe_open(str(run / "master_student.safetensors"), "np") as f:
        head_bytes = {t: 4 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                                 if k.startswith(f"heads.{t}.")) for t in ("nih", "ped")}

    # What crossed the sites' port: the master down, the student up (train), the teacher up
    # (once per run); the payload bytes each side logged in its audit log.
    audit = [json.loads(ln) for ln in (run / "audit.jsonl").read_text().splitlines()]
    updates = {(a["kind"], a["site"]): a["bytes"] for a in audit if a["event"] == "update"}
    for name in sites:
        site_log = [json.loads(ln) for ln in
                    (tmp_path / "sites" / name / "audit.jsonl").read_text().splitlines()]
        sent = {a["kind"]: a["bytes"] for a in site_log if a.get("event") == "reply"}
        got = {a["kind"]: a["received_bytes"] for a in site_log if a.get("event") == "reply"}
        assert sent["train"] >= 4 * 100_000_000 and sent["query"] >= 4 * 100_000_000
        assert updates[("train", name)] == sent["train"]
        # The master minus the other site's head (n labels x 384,000 weights), plus an .npy
        # header of a few hundred bytes per tensor.
        other = "ped" if name == "site-a" else "nih"
        expected = 4 * params - head_bytes[other]
        assert expected <= got["train"] < expected + 2**16
        print(f"\n{name}: received master {got['train'] / MIB:.0f} MiB, sent student "
              f"{sent['train'] / MIB:.0f} MiB (train), teacher {sent['query'] / MIB:.0f} MiB "
              "(query, once per run)")
    db = sum(f.stat().st_size for f in run.glob("superlink.db*"))
    print(f"{params / 1e6:.1f}M float parameters; round 1 took "
          f"{state['rounds']['1'].get('seconds', float('nan')):.0f} s; SuperLink database "
          f"{db / MIB:.0f} MiB; peak RSS (VmHWM) MiB: "
          + ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.peak_kib.items()))
    assert rss.peak_kib["superlink"] > 0 and rss.peak_kib["serverapp"] > 0
