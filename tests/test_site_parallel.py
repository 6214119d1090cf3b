"""A site deployed with two processes: its ClientApp's reply matches one process's, and a
worker that dies fails the round with a clear error and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fed_helpers import NIH, PED, write_sim
from test_client_app import _call, _message

from ark_core.fed.aggregate import float_state
from ark_core.fed.deployment import SiteDeployment
from ark_core.fed.federation import load_simulation
from ark_core.fed.protocol import Instruction
from ark_core.model.factory import create_model
from client.site import Site
from client.state import TeacherStore
from ops.procs import descendants

TESTS = Path(__file__).resolve().parent
# Only data_parallel matters here: a simulation site never uses the rest.
DEPLOYMENT = {"server": "127.0.0.1:9092", "ca_cert": "ca.crt", "private_key": "site.key"}


def _sim(tmp: Path, **deployment) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    site = {"name": "hosp-a", "tasks": [NIH, PED]}
    if deployment:
        site["deployment"] = {**DEPLOYMENT, **deployment}
    # Drop-path draws its own randomness per rank: without it the ranks match one process.
    return write_sim(tmp, sites=[site], model={"preset": "tiny",
                                             "backbone_kwargs": {"drop_path_rate": 0.0}})


def _train_reply(tmp: Path, **deployment):
    rc = _sim(tmp, **deployment)
    sim, _, run_dir = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed_cfg = sim.federation()
    torch.manual_seed(0)
    master = float_state(create_model(fed_cfg.model, fed_cfg.task_specs()))
    reply = _call(rc, _message("train", fed_cfg, 1, master))
    arrays = {k: torch.from_numpy(v.numpy()) for k, v in reply.content["arrays"].items()}
    return arrays, dict(reply.content["metrics"]), run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train_reply(tmp_path_factory.mktemp("one"))


TORCHRUN = {"launcher": [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                        "--nproc-per-node=2", "--no-python"]}
TWO_WAYS = pytest.mark.parametrize("deployment", [{"data_parallel": 2}, TORCHRUN],
                                   ids=["ranks", "torchrun"])


@TWO_WAYS
def test_client_app_on_two_ranks_replies_as_one_process(tmp_path, one_process, deployment):
    two, m2, run2 = _train_reply(tmp_path / "two", **deployment)
    one, m1, _ = one_process
    assert two.keys() == one.keys()
    diff = {k: (two[k] - one[k]).abs().max().item() for k in one}
    assert max(diff.values()) <= 1e-5, (sorted(diff.items(), key=lambda kv: -kv[1])[:3], m1, m2)
    for key in ("loss.nih", "loss.ped", "num-examples", "steps", "bad-files"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4), key
    # Rank 0 saved the teacher; the scratch folder of the round is gone.
    site_dir = run2 / "sites" / "hosp-a"
    (fingerprint,) = [p.name for p in site_dir.iterdir() if p.is_dir()]
    assert TeacherStore(site_dir, fingerprint).rounds() == [1]


PARENT = """
import sys
sys.path[:0] = {paths!r}
from test_site_parallel import start_round
start_round({tmp!r}, {deployment!r})
"""


def start_round(tmp: str, deployment: dict) -> None:
    """A two-rank round of a site, in this process (the ClientApp's part)."""
    rc = _sim(Path(tmp), **deployment)
    sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed_cfg = sim.federation()
    master = float_state(create_model(fed_cfg.model, fed_cfg.task_specs()))
    site = Site.from_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"], 0)
    site.train(Instruction.for_round(fed_cfg, 1, 1e-3), master)


def _parent_with_ranks(tmp: Path, deployment: dict) -> tuple[subprocess.Popen, dict[int, int]]:
    """A process training a two-rank round, once both ranks run: it and {rank: pid}."""
    code = PARENT.format(paths=[str(TESTS), str(TESTS.parent)], tmp=str(tmp),
                         deployment=deployment)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranks: dict[int, int] = {}
        for pid in descendants(parent.pid):  # parents before children: a rank before its own
            if (rank := _rank(pid)) is not None:
                ranks.setdefault(rank, pid)
        if set(ranks) == {0, 1}:
            return parent, ranks
        assert parent.poll() is None, parent.communicate()[0]
        time.sleep(0.05)
    parent.kill()
    raise AssertionError("the two workers did not start")


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # dead, waiting for a reaper
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_killed_worker_fails_the_round_and_leaves_no_process(tmp_path):
    parent, ranks = _parent_with_ranks(tmp_path, {"data_parallel": 2})
    os.kill(ranks[1], signal.SIGKILL)
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode != 0
    assert "RankFailed: site 'hosp-a': rank 1 of the 2 data-parallel processes was killed by " \
           "SIGKILL, so this round fails" in out
    assert all(_gone(pid, within_s=10) for pid in ranks.values())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@TWO_WAYS
def test_workers_die_with_a_killed_client_app(tmp_path, deployment):
    parent, ranks = _parent_with_ranks(tmp_path, deployment)
    everyone = descendants(parent.pid)  # with torchrun: it, and the ranks below it
    parent.kill()
    parent.wait()
    # At once: left alone, a worker would live on for seconds (imports, then its round).
    assert all(_gone(pid, within_s=2) for pid in everyone)


def test_ranks_of_a_deployment():
    assert SiteDeployment(**DEPLOYMENT).processes == 1
    assert SiteDeployment(**DEPLOYMENT, gpus=[]).processes == 1
    assert SiteDeployment(**DEPLOYMENT, gpus=[0, 1, 2, 3]).processes == 4
    assert SiteDeployment(**DEPLOYMENT, gpus=[0, 1, 2, 3], data_parallel=2).processes == 2
    assert SiteDeployment(**DEPLOYMENT, data_parallel=2).processes == 2  # CPU ranks, or a job's GPUs
    with pytest.raises(ValueError, match="data_parallel: 3 ranks for the 2 GPUs"):
        SiteDeployment(**DEPLOYMENT, gpus=[0, 1], data_parallel=3)
