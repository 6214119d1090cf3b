"""Shared setup of the deployment tests: keys, a federation YAML, site YAMLs, real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from ark_core.commands.keys import make_ca, make_server_cert, make_site_key, server_names
from server.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "simulations" / "demo_data"
BIN = Path(sys.executable).parent
NIH_LABELS = ["Pneumonia", "Infiltration", "Atelectasis", "Edema", "Effusion"]
SPLIT = {"val_fraction": 0.3, "test_fraction": 0.0}
NIH = {"name": "nih", "dataset": "chestxray14", "root": str(DEMO / "nih"), "max_images": 10,
       "labels": NIH_LABELS, "split": SPLIT}
PED = {"name": "ped", "dataset": "pediatric_pneumonia", "root": str(DEMO / "pediatric"),
       "max_images": 10, "split": SPLIT}
SITE_TASKS = {"site-a": [NIH, PED], "site-b": [NIH], "site-c": [PED]}


def make_keys(keys: Path, sites: list[str]) -> None:
    make_ca(keys)
    make_server_cert(keys, server_names(["localhost"], []))
    for s in sites:
        make_site_key(keys, s)


def write_federation(tmp: Path, keys: Path, port: int, sites: list[str], **fed) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "catalogue": [
            {"name": "nih", "labels": NIH_LABELS, "task_type": "multilabel"},
            {"name": "ped", "labels": ["Pneumonia"], "task_type": "binary"},
        ],
        "rounds": 2,
        "min_sites": 2,
        "train": {"batch_size": 8, "lr": 1e-3, "threads": 1},
        "round_timeout_s": 120,
        "retries": 0,
        "evaluate_every": 2,  # validation AUC in the last round only (CI time)
        "run_dir": str(tmp / "run"),
        "deployment": {
            "host": "127.0.0.1", "port": port, "server_names": ["localhost"],
            "keys_dir": str(keys),
            "sites": [{"name": s, "public_key": str(keys / "sites" / f"{s}.pub")} for s in sites],
            "startup_timeout_s": 60,
        },
        **fed,
    }
    path = tmp / "federation.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def write_site(tmp: Path, name: str, keys: Path, port: int, key_name: str | None = None,
               tasks: list[dict] | None = None, **dep) -> Path:
    cfg = {
        "name": name,
        "tasks": tasks if tasks is not None else SITE_TASKS[name],
        "state_dir": str(tmp / "sites" / name),
        "train": {"threads": 1},
        "deployment": {
            "server": f"localhost:{port}", "ca_cert": str(keys / "ca.crt"),
            "private_key": str(keys / "sites" / f"{key_name or name}.key"),
            "runtime_port": free_port(), "startup_retries": 3, "retry_wait_s": 0.5, **dep,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class Procs:
    """Processes a test started; each in its own session, all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr_home"), "PYTHONUNBUFFERED": "1"}
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, cwd=self.tmp,
                             stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                             start_new_session=True)
        self.started.append((p, log))
        return p

    def log(self, p: subprocess.Popen) -> str:
        return next(log for q, log in self.started if q is p).read_text(errors="replace")

    def interrupt(self, p: subprocess.Popen, timeout: float = 60) -> int:
        """Ctrl-C as a terminal would send it (to the leader only: it must stop its children)."""
        p.send_signal(signal.SIGINT)
        return p.wait(timeout=timeout)

    def stop_all(self) -> None:
        for p, _ in reversed(self.started):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
                try:
                    p.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue


@contextlib.contextmanager
def processes(tmp: Path) -> Iterator[Procs]:
    procs = Procs(tmp)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_for(pred, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
