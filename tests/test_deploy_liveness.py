"""A SuperLink that is alive but stuck is noticed, restarted, and the run finishes.

Real processes on loopback: ark-server and two ark-client sites, TLS on. Once the run has
started, the SuperLink is frozen (SIGSTOP): it keeps its process and its port, so nothing
exits, but it answers nothing. ark-server's watch must notice within ``stall_s``, stop it,
start it again on the same database and resume, with no ServerApp of the frozen run
left beside the new one; the sites must rejoin by themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal

import deploy_helpers as dh
import pytest

from ops.procs import descendants, free_port

pytestmark = pytest.mark.slow


def _superlink_pid(server_pid: int) -> int | None:
    for pid in descendants(server_pid):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flower-superlink") for part in cmd[:2]):
            return pid
    return None


def test_a_frozen_superlink_is_restarted_and_the_run_finishes(tmp_path, keys):
    port = free_port()
    sites = {"site-a": [dh.NIH], "site-b": [dh.PED]}
    fed = dh.write_federation(tmp_path, keys, port, list(sites), rounds=2, evaluate_every=0,
                           deployment={"stall_s": 60})
    run = tmp_path / "run"
    with dh.processes(tmp_path) as procs:
        server = procs.start("server", "ark-server", str(fed))
        for name, tasks in sites.items():
            procs.start(name, "ark-client", str(dh.write_site(
                tmp_path, name, keys, port, tasks=tasks, startup_retries=120, retry_wait_s=1)))
        dh.wait_for(lambda: "started run" in procs.log(server), 300, "the run to start")
        frozen = _superlink_pid(server.pid)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        assert server.wait(timeout=600) == 0, procs.log(server)
        out = procs.log(server)
    dh.wait_for(lambda: not dh.own_processes(str(tmp_path)), 30, "every process to end")

    assert re.search(r"the SuperLink is running but has not answered its health check for "
                     r"\d+ s", out), out
    assert "restarting the SuperLink and resuming after round" in out
    first, resumed = re.findall(r"started run (\d+)", out)  # the first run, then its resume
    # The first run was still pending or running in the SuperLink's database: the restart
    # stops it, or Flower would start its ServerApp beside the resumed one's.
    assert f"stopped run {first}, left" in out and f"stopped run {resumed}" not in out
    assert not os.path.exists(f"/proc/{frozen}")  # the frozen SuperLink was killed
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and state["last_round"] == 2
    assert all(sorted(state["rounds"][r]["sites"]) == sorted(sites) for r in ("1", "2"))
