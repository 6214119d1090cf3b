"""Child processes of ark-server and ark-client: own process groups, clean stops, free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flwr_bin(name: str) -> str:
    """The Flower executable beside this Python (a venv or an image), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def child_env(**extra: str) -> dict[str, str]:
    """This environment plus ``extra``, with this Python's bin directory first on PATH.

    Flower's own processes start ``flower-superexec``, ``flwr-serverapp``... by name.
    """
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}",
            "PYTHONUNBUFFERED": "1", **extra}


def start(cmd: Sequence[str], env: dict[str, str], log: Path | None = None,
          cwd: Path | None = None, pipe: bool = False) -> subprocess.Popen:
    """Start ``cmd`` in its own session, so a stop reaches every process it spawns."""
    out = subprocess.PIPE if pipe else (open(log, "ab") if log else None)  # noqa: SIM115
    return subprocess.Popen(
        list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True, text=pipe or None,
    )


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``.

    Flower starts its SuperExec and app processes in sessions of their own (they exit when
    their parent dies); they are signalled too, so none outlives the stop.
    """
    if proc is None:
        return
    strays = descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + grace_s
        while _any_alive(proc.pid, strays) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _any_alive(proc.pid, strays):
            return


def _any_alive(pgid: int, pids: list[int]) -> bool:
    if _group_alive(pgid):
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def terminate_on_sigterm() -> None:
    """Make SIGINT and SIGTERM (docker stop, systemd) raise KeyboardInterrupt.

    SIGINT is set explicitly: a shell starts background jobs with it ignored.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until ``host:port`` accepts connections; False if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False
