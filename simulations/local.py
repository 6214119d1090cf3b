"""A private local SuperLink for `flwr run .`: fresh state, free ports, stopped afterwards.

`flwr run .` starts a local SuperLink in simulation mode when none answers on its HTTP port,
and leaves it running. A SuperLink that already answers there (from another project, another
Flower version or another FLWR_HOME) would be reused silently; so this module gives each run
its own FLWR_HOME and free ports, and stops the SuperLink it started, by process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """Environment for `flwr run`: private FLWR_HOME and ports, no runtime installs."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # flower-superlink lives beside this python
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return env


def superlink_pids(control_port: int) -> list[int]:
    """Process ids of flower-superlink processes serving this control port."""
    needle = f"127.0.0.1:{control_port}"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd if c]
        if any("flower-superlink" in a for a in args[:2]) and needle in args:
            pids.append(int(proc.name))
    return pids


def stop_pids(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that nobody reaped counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


@contextlib.contextmanager
def private_superlink(flwr_home: Path) -> Iterator[dict[str, str]]:
    """Yield the environment for `flwr run`; stop the local SuperLink it starts on exit."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    while control_port == http_port:
        control_port = free_port()
    try:
        yield flower_env(flwr_home, http_port, control_port)
    finally:
        stop_pids(superlink_pids(control_port))
