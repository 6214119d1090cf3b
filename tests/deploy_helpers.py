"""Shared setup of the deployment tests: keys, a federation YAML, site YAMLs, real processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from fed_helpers import two_tasks

from ark_core.fed.pki import make_ca, make_server_cert, make_site_key, server_names
from ops import procs as ops_procs
from ops.procs import free_port

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


SESSION_SITES = ["site-a", "site-b", "site-c", "stranger"]
_session_keys: Path | None = None


def make_keys(keys: Path, sites: list[str]) -> None:
    make_ca(keys)
    make_server_cert(keys, server_names(["localhost"], []))
    for s in sites:
        make_site_key(keys, s)


def session_keys(tmp_path_factory) -> Path:
    """One CA, server certificate and key pairs of ``SESSION_SITES`` for the whole session.

    Shared by every deployment test module; a test that changes keys works on a copy
    (:func:`copy_keys`).
    """
    global _session_keys
    if _session_keys is None:
        _session_keys = tmp_path_factory.mktemp("session_keys")
        make_keys(_session_keys, SESSION_SITES)
    return _session_keys


def copy_keys(keys: Path, dest: Path) -> Path:
    shutil.copytree(keys, dest)
    return dest


def write_federation(tmp: Path, keys: Path, port: int, sites: list[str],
                     deployment: dict | None = None, **fed) -> Path:
    cfg = {
        **two_tasks(NIH_LABELS, 120),
        "min_sites": 2,
        "evaluate_every": 2,  # validation AUC in the last round only (CI time)
        "run_dir": str(tmp / "run"),
        "deployment": {
            "host": "127.0.0.1", "port": port, "server_names": ["localhost"],
            "keys_dir": str(keys),
            "sites": [{"name": s, "public_key": str(keys / "sites" / f"{s}.pub")} for s in sites],
            "startup_timeout_s": 60,
            "site_wait_s": 60,
            **(deployment or {}),
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

    def kill(self, p: subprocess.Popen) -> None:
        """A crash: SIGKILL the process and everything below it (Flower's own sessions too)."""
        for pid in [*ops_procs.descendants(p.pid), p.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def stop_all(self) -> None:
        """SIGTERM, then SIGKILL, every process started and everything it spawned."""
        for p, _ in reversed(self.started):
            ops_procs.stop(p, grace_s=15)


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


def own_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a tmp path of one test)."""
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            out.append(text)
    return out


class PeakRss:
    """Polls the peak resident memory (VmHWM) of the processes a test started and below.

    The kernel keeps VmHWM per process until it exits, so each reading holds the peak so far;
    a process growing in its last ``every`` seconds is missed by that much. The process tree
    is scanned every ``rescan`` seconds, the known processes read every ``every`` seconds.

    Args:
        procs: The test's processes (read at every scan, so later starts count too).
        patterns: Name -> regular expression searched in each command line.
    """

    def __init__(self, procs: Procs, patterns: dict[str, str], every: float = 0.05,
                 rescan: float = 0.5) -> None:
        self.procs, self.every, self.rescan = procs, every, rescan
        self.patterns = {k: re.compile(v) for k, v in patterns.items()}
        self.peak_kib: dict[str, int] = dict.fromkeys(patterns, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _scan(self) -> dict[int, list[str]]:
        """Pid -> names of the patterns its command line matches."""
        roots = [p.pid for p, _ in self.procs.started if p.poll() is None]
        found = {}
        for pid in {q for r in roots for q in [r, *ops_procs.descendants(r)]}:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, UnicodeDecodeError):
                continue
            names = [k for k, rx in self.patterns.items() if rx.search(cmd)]
            if names:
                found[pid] = names
        return found

    def _poll(self) -> None:
        watched: dict[int, list[str]] = {}
        next_scan = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_scan:
                watched, next_scan = self._scan(), time.monotonic() + self.rescan
            for pid, names in watched.items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
                for name in names if m else []:
                    self.peak_kib[name] = max(self.peak_kib[name], int(m.group(1)))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
