"""The site's SuperNode under ark-client: one instance per site, its output read, its end explained.

flower-supernode ends with Flower's ``Exit Code: N`` block when it cannot join, and ends
without one after the server answered 401 to a node it knew (the site's key was removed or
rotated, or the server started over with a new run directory and registry). ark-client
tells these apart: a refused or incompatible start ends ark-client with its own exit code
(:data:`EXIT_CODES`); an end after the node had joined is followed by a new SuperNode with
back-off, which either joins again (a new registry) or is refused (the key is gone).

A Flower 1.42 SuperNode whose connection meets an HTTP 5xx it does not retry (the SuperLink's
500, or a proxy's) logs ``Server error '5..'`` and stops working without exiting: its
main loop has ended, a server thread keeps the process alive. :class:`OutputTail` notices
that line; a SuperNode still alive :data:`STALL_GRACE_S` later is replaced as above.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import IO

from ark_core.io import ExclusiveLock, LockHeld

EXIT_CONFIG, EXIT_DATA, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_MISMATCH, EXIT_DUPLICATE = 2, 3, 4, 5, 6, 7
EXIT_CODES = {
    EXIT_CONFIG: "configuration or credentials",
    EXIT_DATA: "data",
    EXIT_UNREACHABLE: "server unreachable",
    EXIT_REFUSED: "the server refused this site's key",
    EXIT_MISMATCH: "TLS or Flower version mismatch with the server",
    EXIT_DUPLICATE: "another ark-client of this site is running",
}
LOCK_FILE = "ark-client.lock"  # in the state dir, locked while an ark-client runs
# Flower's exit codes (flwr.supercore.exit.ExitCode) that a SuperNode prints when it quits.
_FLWR_CONNECTION_ERROR, _FLWR_VERSION_INCOMPATIBLE = 305, 606
_STALL = re.compile(r"Server error '5\d\d ")
STALL_GRACE_S = 10.0
_TLS = re.compile(r"SSL|CERTIFICATE_VERIFY|certificate verify|TLSV1_ALERT|WRONG_VERSION_NUMBER")


class SiteError(Exception):
    """A problem the site must fix; ``code`` is the exit status."""

    def __init__(self, msg: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class Verdict:
    """Why a SuperNode ended, when ark-client must end too."""

    code: int
    message: str


def explain(output: str) -> Verdict | None:
    """What a SuperNode's output says about its end; None: it had joined, so rejoin."""
    codes = [int(c) for c in re.findall(r"Exit Code: (\d+)", output)]
    flower = codes[-1] if codes else None
    tail = _detail(output)
    if flower == _FLWR_VERSION_INCOMPATIBLE:
        return Verdict(EXIT_MISMATCH, "the server's Flower version does not work with this "
                       f"site's ({_flwr_version()}): install the version the coordinator "
                       f"names. Flower said: {tail}")
    if "Failed to activate SuperNode" in output:
        return Verdict(EXIT_REFUSED, "the server refused this site's key: it is not registered "
                       "(never, or removed or rotated since). The coordinator must register "
                       "the site's current .pub file (ark-server --sync-keys).")
    if flower == _FLWR_CONNECTION_ERROR and _TLS.search(output):
        return Verdict(EXIT_MISMATCH, f"the TLS connection to the server failed: {tail}. Check "
                       "ca_cert (the federation's ca.crt) and the server address.")
    if flower is not None:
        return Verdict(EXIT_UNREACHABLE, f"the SuperNode could not join (Flower exit code "
                       f"{flower}): {tail}")
    return None


def _detail(output: str) -> str:
    """The line after Flower's ``Exit Code`` line, or the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if re.search(r"Exit Code: \d+$", ln) and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else "(no output)"


def _flwr_version() -> str:
    return f"flwr {version('flwr')}"


class SiteLock(ExclusiveLock):
    """An exclusive lock on the site's state dir, held while this ark-client runs.

    A second ark-client of the same site would share the teacher store and the node key;
    it stops at once, naming the first one's process id.
    """

    def __init__(self, state_dir: Path, site: str) -> None:
        super().__init__(state_dir / LOCK_FILE)
        self.site = site

    def __enter__(self) -> SiteLock:
        try:
            super().__enter__()
        except LockHeld as e:
            raise SiteError(f"another ark-client of site {self.site} is running (pid {e.holder}, "
                            f"lock {self.path}); stop it first", EXIT_DUPLICATE) from None
        return self


class OutputTail:
    """Copies a process's output to ours and keeps its last lines."""

    def __init__(self, stream: IO[str], keep: int = 400) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self.stalled_at: float | None = None  # when a line said the node stopped working
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                sys.stdout.write(line)
                sys.stdout.flush()
                self.lines.append(line)
                if self.stalled_at is None and _STALL.search(line):
                    self.stalled_at = time.monotonic()

    def stalled(self) -> bool:
        """Whether the SuperNode said it stopped working, more than a grace period ago."""
        return self.stalled_at is not None and time.monotonic() - self.stalled_at > STALL_GRACE_S

    def text(self, timeout: float = 5.0) -> str:
        """The kept output, once the stream has ended (or after ``timeout``)."""
        self._thread.join(timeout)
        return "".join(self.lines)
