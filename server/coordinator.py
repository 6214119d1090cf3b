"""The processes of one ark-server session: SuperLink, site keys, gate, and the run.

:class:`Coordinator` starts ``flower-superlink`` on loopback (TLS, site authentication, a
persistent database in the run directory), registers the listed sites' keys, opens the
gate, submits the run and follows its log while its liveness watch runs; ``ark-server``
(:mod:`server.cli`) drives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ark_core.config import ConfigError, resolve_path
from ark_core.fed.deployment import ServerDeployment
from ark_core.fed.federation import FederationConfig
from ark_core.io import atomic_write_text
from ops import procs
from server.enrolment import read_registry, write_registry
from server.liveness import PULSE, Watch, answers

CONNECTION = "ark"  # the SuperLink connection name in $FLWR_HOME/config.toml
STOPPED = "stopped.json"  # in the run directory after `flwr stop`


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def app_dir() -> Path:
    """The Flower app (the directory whose pyproject.toml has [tool.flwr.app])."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise FileNotFoundError(f"{root}: no pyproject.toml; run ark-server from a source checkout")
    return root


class Coordinator:
    """The processes of one ark-server session over a run directory."""

    def __init__(self, cfg_path: Path, cfg: FederationConfig, run_dir: Path, tls: Tls) -> None:
        if cfg.deployment is None:
            raise ConfigError(f"{cfg_path}: no deployment: section (host, port, keys, sites)")
        self.cfg_path, self.cfg, self.run_dir, self.tls = cfg_path, cfg, run_dir, tls
        self.dep: ServerDeployment = cfg.deployment
        self.base = cfg_path.parent
        self.flwr_home = run_dir / "flwr"
        self.logs = run_dir / "logs"
        self.env = procs.child_env(
            FLWR_HOME=str(self.flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1"
        )
        self.superlink: subprocess.Popen | None = None
        self.gate: subprocess.Popen | None = None
        self.port = 0
        self.stuck: str | None = None  # why the watch stopped the run, if it did
        self.watch_interval_s = min(10.0, self.dep.stall_s / 4)

    # -- SuperLink -----------------------------------------------------------------
    def start_superlink(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = self.dep.superlink_port or procs.free_port()
        cmd = [
            procs.flwr_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.run_dir / "superlink.db"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ]
        cmd += self._tls_args()
        self.superlink = procs.start(cmd, self.env, self.logs / "superlink.log", cwd=self.run_dir)
        self._write_connection()
        atomic_write_text(self.run_dir / "superlink.json",
                          json.dumps({"port": self.port, "pid": os.getpid()}))
        self._wait_ready()

    def _tls_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key)]

    def _write_connection(self) -> None:
        """The CLI's connection to our SuperLink, in a FLWR_HOME of its own (never ~/.flwr)."""
        auth = f'root-certificates = "{self.tls.ca}"'
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{auth}\n'
        )

    def _wait_ready(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        deadline = time.monotonic() + self.dep.startup_timeout_s
        while time.monotonic() < deadline:
            if self.superlink and self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            if answers(f"https://127.0.0.1:{self.port}/health", ctx, timeout_s=2):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SuperLink not ready after {self.dep.startup_timeout_s:.0f} s")

    def attach(self) -> None:
        """Use the SuperLink an ark-server already runs on this run directory."""
        info = self.run_dir / "superlink.json"
        if not info.exists():
            raise RuntimeError(f"{info}: no running ark-server on this run directory")
        data = json.loads(info.read_text())
        pid = data.get("pid")
        if pid is not None and not _alive(int(pid)):  # left by a crash
            info.unlink(missing_ok=True)
            raise RuntimeError(f"no running ark-server on {self.run_dir}: the ark-server that "
                               f"wrote {info.name} (pid {pid}) is gone; its stale file was removed")
        self.port = int(data["port"])
        self._wait_ready()

    # -- site keys -----------------------------------------------------------------
    def _flwr(self, *args: str) -> dict:
        cmd = [procs.flwr_bin("flwr"), *args, CONNECTION, "--format", "json"]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        start = res.stdout.find("{")  # JSON, maybe after a line of progress
        try:
            out = json.loads(res.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            out = {}
        if res.returncode != 0 or not out.get("success", False):
            detail = out.get("error-message") or res.stderr.strip() or res.stdout.strip()
            raise RuntimeError(f"flwr {' '.join(args[:2])}: {detail}")
        return out

    def sync_keys(self) -> None:
        """Register listed sites' keys; unregister replaced keys and removed sites.

        Then compare the SuperLink's registered nodes with the enrolment and warn about any
        node that is not enrolled (registered by hand, or left from an older run): the
        ServerApp sends it no work, but only unregistering it shuts it out.
        """
        registry = read_registry(self.run_dir)
        wanted = {s.name: resolve_path(s.public_key, self.base) for s in self.dep.sites}
        for name, entry in sorted(registry.items()):
            if name not in wanted:  # a removed site
                self._unregister(name, entry)
                del registry[name]
                write_registry(self.run_dir, registry)
        for name, pub in wanted.items():
            if not pub.exists():
                if name in registry:  # its key file is gone: it is shut out
                    self._unregister(name, registry.pop(name))
                    write_registry(self.run_dir, registry)
                raise FileNotFoundError(f"site {name}: public key {pub} not found")
            old = registry.get(name)
            if old is not None and _fingerprint(pub) == old["fingerprint"]:
                continue
            # A rotated key is registered before the old one is unregistered: the site's
            # SuperNode, refused with the old key, must find the new one already in place.
            out = self._flwr("supernode", "register", str(pub), "--name", name)
            registry[name] = {"node_id": int(out["node-id"]), "fingerprint": _fingerprint(pub)}
            write_registry(self.run_dir, registry)
            print(f"[ark-server] site {name}: key registered (node {out['node-id']})")
            if old is not None:
                self._unregister(name, old)
        self.check_enrolment(registry)

    def _unregister(self, name: str, entry: dict) -> None:
        self._flwr("supernode", "unregister", str(entry["node_id"]))
        print(f"[ark-server] site {name}: key unregistered (node {entry['node_id']})")

    def check_enrolment(self, registry: dict[str, dict]) -> None:
        """Warn about SuperLink nodes that no enrolled site owns."""
        enrolled = {int(v["node_id"]) for v in registry.values()}
        nodes = self._flwr("supernode", "list").get("nodes", [])
        for n in nodes:
            node_id, status = int(n["node-id"]), str(n.get("status", ""))
            if node_id not in enrolled and status != "unregistered":
                print(f"[ark-server] WARNING: node {node_id} ({status}) is registered on the "
                      "SuperLink but enrolled as no site of the federation YAML: it gets no "
                      f"work. Unregister it: FLWR_HOME={self.flwr_home} flwr supernode "
                      f"unregister {node_id} {CONNECTION}", file=sys.stderr, flush=True)

    # -- the sites' port -----------------------------------------------------------
    def start_gate(self) -> None:
        cmd = [sys.executable, "-m", "server.gate", "--host", self.dep.host,
               "--port", str(self.dep.port), "--upstream", f"https://127.0.0.1:{self.port}",
               *self._tls_args()]
        self.gate = procs.start(cmd, self.env, self.logs / "gate.log", cwd=app_dir())
        host = "127.0.0.1" if self.dep.host in ("0.0.0.0", "::", "") else self.dep.host
        if not procs.wait_listening(host, self.dep.port, self.gate, self.dep.startup_timeout_s):
            raise RuntimeError(f"the sites' port {self.dep.port} did not open; see {self.logs}")
        print(f"[ark-server] sites connect to {self.dep.host}:{self.dep.port} (Fleet API only)")

    # -- the run -------------------------------------------------------------------
    def finished(self) -> bool:
        state = self.run_dir / "state.json"
        return state.exists() and bool(json.loads(state.read_text()).get("finished"))

    def submit_and_follow(self) -> int:
        """Submit the run and stream its log; 0 once the run directory says finished.

        A log stream can end while the run goes on (a busy SuperLink answers a request with
        an error); then the stream is opened again, until Flower reports the run finished.
        """
        run_config = f'fed-config="{self.cfg_path}" run-dir="{self.run_dir}"'
        cmd = [procs.flwr_bin("flwr"), "run", str(app_dir()), CONNECTION,
               "--run-config", run_config, "--stream"]
        run_id, self.stuck = None, None
        watch = Watch(f"https://127.0.0.1:{self.port}/health",
                      ssl.create_default_context(cafile=str(self.tls.ca)),
                      self.run_dir / PULSE, self.dep.stall_s,
                      {"the SuperLink": self.superlink, "the gate": self.gate})
        while True:
            follower = procs.start(cmd, self.env, cwd=app_dir(), pipe=True)
            guard = self._guard(watch, follower)
            try:
                with open(self.logs / "run.log", "a", encoding="utf-8") as log:
                    assert follower.stdout
                    for line in follower.stdout:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                        log.write(line)
                        if run_id is None and (m := re.search(r"started run (\d+)", line)):
                            run_id = m.group(1)
                follower.wait()
            finally:
                guard.set()
                procs.stop(follower, grace_s=5)
            if self.stuck:
                print(f"[ark-server] {self.stuck}", file=sys.stderr, flush=True)
                return 1
            status = self._run_status(run_id) if run_id else ""
            if not status or status.startswith("finished"):
                break
            print(f"[ark-server] log stream of run {run_id} ended while it is {status}; "
                  "following it again", flush=True)
            cmd = [procs.flwr_bin("flwr"), "log", run_id, CONNECTION, "--stream"]
            time.sleep(2)
        if self.finished():
            print_summary(self.run_dir)
            return 0
        if status == "finished:stopped":
            atomic_write_text(self.run_dir / STOPPED,
                              json.dumps({"run_id": run_id, "at": time.time()}))
            print(f"[ark-server] run {run_id} was stopped (flwr stop) after round "
                  f"{last_round(self.run_dir)}; it does not resume by itself. To continue it: "
                  f"ark-server {self.cfg_path} --resume", file=sys.stderr)
            return 0
        print(f"[ark-server] the run stopped before its last round (Flower: {status or 'unknown'})"
              f": {last_error(self.logs / 'run.log')}\n  full log: {self.logs / 'run.log'}\n"
              "  start ark-server again on this run directory to resume", file=sys.stderr)
        return 1

    def _guard(self, watch: Watch, follower: subprocess.Popen) -> threading.Event:
        """Check ``watch`` every interval; a stuck run ends the log stream with the reason."""
        done = threading.Event()

        def run() -> None:
            while not done.wait(self.watch_interval_s):
                if reason := watch.check():
                    self.stuck = reason
                    procs.stop(follower, grace_s=5)
                    return

        threading.Thread(target=run, name="ark-liveness", daemon=True).start()
        return done

    def stop_stale_runs(self) -> None:
        """Stop runs an earlier start left unfinished in the SuperLink's database.

        Each start submits a new run that resumes from the run directory; Flower would also
        start the ServerApp of a run that was pending or running when the SuperLink went
        down, and two ServerApps would then share one run directory.
        """
        for run in self._flwr("list").get("runs", []):
            if not str(run.get("status", "")).startswith("finished"):
                self._flwr("stop", str(run["run-id"]))
                print(f"[ark-server] stopped run {run['run-id']}, left {run.get('status')} by an "
                      "earlier start (this start resumes it as a new run)", flush=True)

    def _run_status(self, run_id: str) -> str:
        """Flower's status of a run ('running', 'finished:completed', ...); '' if unknown."""
        for _ in range(5):  # the SuperLink may be briefly busy
            try:
                runs = self._flwr("list", "--run-id", run_id).get("runs", [])
                return str(runs[0]["status"]) if runs else ""
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(2)
        return ""

    def stop(self) -> None:
        procs.stop(self.gate, grace_s=5)
        procs.stop(self.superlink)
        self.gate = self.superlink = None
        (self.run_dir / "superlink.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_round(run_dir: Path) -> int:
    state = run_dir / "state.json"
    return int(json.loads(state.read_text()).get("last_round", 0)) if state.exists() else 0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_error(log: Path, most: int = 25) -> str:
    """The ServerApp's last traceback in ``log`` (its final lines), or its last error line."""
    try:
        lines = [_ANSI.sub("", ln.rstrip()) for ln in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no run log)"
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:
        tb = lines[starts[-1]:]
        end = next((i for i, ln in enumerate(tb[1:], 1) if ln and not ln.startswith(" ")), len(tb) - 1)
        return "\n" + "\n".join(tb[: end + 1][-most:])
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "rror:" in ln]
    return errors[-1].strip() if errors else "no error in the run log"


def _fingerprint(pub: Path) -> str:
    blob = pub.read_text().split()[1]  # "ecdsa-sha2-nistp384 BASE64 comment"
    return hashlib.sha256(blob.encode()).hexdigest()


def print_summary(run_dir: Path) -> None:
    """Rounds, the sites of each round and the last validation AUC per site and task."""
    state = json.loads((run_dir / "state.json").read_text())
    print(f"[ark-server] finished {state['last_round']} rounds; run directory {run_dir}")
    for r, rec in sorted(state.get("rounds", {}).items(), key=lambda kv: int(kv[0])):
        print(f"  round {r}: sites {', '.join(rec.get('sites', []))}")
    last: dict[tuple[str, str], float] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        m = json.loads(line)
        for k, v in m.items():
            if k.startswith("student.auc.") and k.count(".") == 2:  # per task, not per label
                last[(m.get("site", "?"), k.removeprefix("student.auc."))] = v
    for (site, task), auc in sorted(last.items()):
        print(f"  last AUC  site {site:<12} task {task:<16} {auc:.3f}")
