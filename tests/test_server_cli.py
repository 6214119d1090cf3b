"""ark-server's own decisions that need no running SuperLink: why a run stopped, stale files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from deploy_helpers import write_federation

from ops.procs import free_port
from server import cli, coordinator

# What `flwr log` streamed into run.log when the ServerApp raised (Flower's log format).
RUN_LOG = """\x1b[92mINFO \x1b[0m:      round 1/3 done in 12.0 s: sites site-a, site-b
\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: HTTP 500
Traceback (most recent call last):
  File "/app/server/loop.py", line 210, in _exchange
    for reply in grid.pull_messages([mid]):
  File "/venv/flwr/superlink/grid/http_grid.py", line 318, in pull_messages
    raise
httpx.HTTPStatusError: Server error '500 Internal Server Error' for url '/v1/runtime/pull-messages'
\x1b[92mINFO \x1b[0m:      Run finished
"""


def test_the_servers_last_exception_is_named(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(RUN_LOG)
    why = coordinator.last_error(log)
    assert why.splitlines()[1] == "Traceback (most recent call last):"
    assert why.splitlines()[-1].startswith("httpx.HTTPStatusError: Server error '500")
    assert "Run finished" not in why
    log.write_text("\x1b[91mERROR \x1b[0m:     round 2: no site is enrolled\nINFO: bye\n")
    assert coordinator.last_error(log) == "ERROR :     round 2: no site is enrolled"
    assert coordinator.last_error(tmp_path / "missing.log") == "(no run log)"


@pytest.fixture()
def fed(tmp_path, keys):
    return write_federation(tmp_path, keys, free_port(), ["site-a"])


def test_a_stopped_run_is_not_resumed_without_asking(fed, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / coordinator.STOPPED).write_text(json.dumps({"run_id": "1", "at": 0}))
    assert cli.main([str(fed)]) == 0
    assert "pass --resume" in capsys.readouterr().err
    assert not (run / "superlink.json").exists(), "nothing was started"


def test_sync_keys_after_a_crash_names_the_stale_file(fed, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / "superlink.json").write_text(json.dumps({"port": free_port(), "pid": gone.pid}))
    assert not os.path.exists(f"/proc/{gone.pid}")
    assert cli.main([str(fed), "--sync-keys"]) == 2
    assert f"(pid {gone.pid}) is gone" in capsys.readouterr().err
    assert not (run / "superlink.json").exists()
