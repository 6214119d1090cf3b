"""Helpers shared by the benchmarks: fresh-process runs, peak RSS, timing, alternation, output."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size now (from /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), "--child", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} --child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(
    fn: Callable[[], object],
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds ``fn`` takes (``sync`` waits for queued device work before each clock read).

    CPU runs pass ``time.process_time``: CPU seconds of this process, which other processes
    sharing the cores do not inflate as they inflate wall time.
    """
    sync()
    t = clock()
    fn()
    sync()
    return clock() - t


def machine() -> str:
    """A one-line description of where the figures come from."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), load average {load:.1f} at the start; {gpu}; "
            f"torch {torch.__version__}")


def ratio_line(name: str, value: float, goal: str) -> str:
    """The line the smoke tests look for: ``RATIO <name> = <value> (goal <goal>)``."""
    return f"RATIO {name} = {value:.3f} (goal {goal})"


def spread(values: Sequence[float], fmt: str = ".3f") -> str:
    """``median [min, max]`` of repeated measurements."""
    return (f"{statistics.median(values):{fmt}} "
            f"[{min(values):{fmt}}, {max(values):{fmt}}]")


def ratio_spread_line(name: str, values: Sequence[float], goal: str) -> str:
    """A ``RATIO`` line whose value is the median of ``values``, with their count and range."""
    return (f"RATIO {name} = {statistics.median(values):.3f} (goal {goal}; median of "
            f"{len(values)}, min {min(values):.3f}, max {max(values):.3f})")


def alternate(
    arms: dict[str, Callable[[], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run the arms in turn ``warmup + reps`` times; the measurements after warm-up, per arm.

    Each repetition rotates which arm goes first, so none always runs on a warm (or cold)
    cache; repetition i of one arm pairs with repetition i of another for per-pair ratios.
    """
    names = list(arms)
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            value = arms[name]()
            if i >= warmup:
                out[name].append(value)
    return out


def pair_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Ratios of repetition i of one arm over repetition i of another."""
    return [a / b for a, b in zip(num, den, strict=True)]
