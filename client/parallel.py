"""A site's round on several processes: the ClientApp starts one worker per rank and waits.

The ClientApp stays the site's one Flower client. For a round it writes what the ranks need
(the site, the instruction, the tensors it received) to a scratch folder in the site's state
directory, starts ``python -m client.rank FOLDER PID`` once per rank with torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and reads
back what rank 0 wrote: the trained student and the round's metrics, which it encodes and
sends as one process would (so the egress guard sees them). Rank 0 alone saves the teacher
and the other state.

Workers die with the ClientApp: the kernel kills each one when the ClientApp ends, killed
or not (Linux), and a rank that fails makes the ClientApp stop the others and fail the
site's round with that rank's exit and last output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ops.procs import child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
TAIL = 3000  # characters of a failed rank's output in the error


class RankFailed(RuntimeError):
    """A worker of a data-parallel round ended with an error; the site's round fails."""


def run_ranks(state_dir: Path, name: str, processes: int, **job: Any) -> dict[str, Any]:
    """Train site ``name``'s round on ``processes`` ranks; what rank 0 wrote.

    Args:
        state_dir: The site's state directory (the scratch folder goes there).
        name: The site's name, for errors.
        processes: How many ranks.
        **job: What :func:`client.rank.train_rank` reads: site, ins, master, server_teacher.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="round-", dir=state_dir))
    try:
        torch.save(job, folder / "round.pt")
        _wait(_start(folder, processes), folder, name)
        return torch.load(folder / "result.pt", weights_only=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start(folder: Path, size: int) -> list[subprocess.Popen]:
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(size),
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = []
    try:
        for rank in range(size):
            with open(folder / f"rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "client.rank", str(folder), str(os.getpid())],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                ))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _wait(procs: list[subprocess.Popen], folder: Path, name: str) -> None:
    """Until every rank has exited 0; the first that fails stops the others and raises."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if code:
                    raise RankFailed(
                        f"site {name!r}: rank {rank} of the {len(procs)} data-parallel processes "
                        f"{_ended(code)}, so this round fails; its last output:\n"
                        + (folder / f"rank{rank}.log").read_text(errors="replace")[-TAIL:])
            if all(code == 0 for code in codes):
                return
            time.sleep(0.2)
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
