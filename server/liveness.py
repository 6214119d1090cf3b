"""Is the run still moving? ark-server's watch over its SuperLink, gate and ServerApp.

A process that exits is easy to see; one that is alive but stuck is not. The SuperLink must
answer its health check. The ServerApp calls the SuperLink at least once a poll interval
while a round runs (pushes, pulls, node listings, retries of them) and touches a pulse file
on those calls, so once it has started, a pulse older than ``stall_s`` while the SuperLink
answers means its main thread is stuck. One that never starts is Flower's to end (the
ServerApp's heartbeat), and ark-server then reports the early stop.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

PULSE = "serverapp.pulse"  # in the run directory


class Pulse:
    """Touches ``path`` at most once every ``every_s`` seconds (the ServerApp's side)."""

    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path, self.every_s, self._last = path, every_s, float("-inf")

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            try:
                self.path.touch()
            except OSError:  # a full disk must not end the round; the watch will say so
                pass


class Watch:
    """Says why a run is stuck, or ``None`` while its processes live and move.

    Args:
        health_url: The SuperLink's ``/health`` (HTTPS on loopback).
        ctx: TLS context trusting the federation's CA.
        pulse: The ServerApp's pulse file.
        stall_s: How long the SuperLink may go unanswering, or the pulse stale.
        processes: Name -> process; any exit is reported at once.
    """

    def __init__(self, health_url: str, ctx: ssl.SSLContext, pulse: Path, stall_s: float,
                 processes: Mapping[str, subprocess.Popen]) -> None:
        self.health_url, self.ctx, self.pulse, self.stall_s = health_url, ctx, pulse, stall_s
        self.processes = processes
        self.started = time.time()  # a pulse left from before this start does not count
        self._answered = time.monotonic()

    def check(self) -> str | None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                return f"{name} exited (code {proc.returncode})"
        now = time.monotonic()
        if not answers(self.health_url, self.ctx):  # a ServerApp waiting on it is not to blame
            if now - self._answered > self.stall_s:
                return (f"the SuperLink is running but has not answered its health check for "
                        f"{now - self._answered:.0f} s")
            return None
        self._answered = now
        try:
            beat = self.pulse.stat().st_mtime
        except OSError:
            return None
        if beat < self.started:  # this run's ServerApp is still starting; Flower watches that
            return None
        idle = time.time() - beat
        if idle > self.stall_s:
            return f"the ServerApp is running but has made no call to the SuperLink for {idle:.0f} s"
        return None


def answers(health_url: str, ctx: ssl.SSLContext, timeout_s: float = 10.0) -> bool:
    """Whether the SuperLink answers its health check within ``timeout_s``."""
    try:
        with urllib.request.urlopen(health_url, context=ctx, timeout=timeout_s):
            return True
    except (urllib.error.URLError, OSError, TimeoutError):
        return False
