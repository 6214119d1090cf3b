"""A site's round on several processes: the ClientApp starts one worker per rank and waits.

The ClientApp stays the site's one Flower client. For a round it writes what the ranks need
(the site and the instruction as JSON, the tensors it received as safetensors) to a scratch
folder in the site's state directory, starts ``python -m client.rank FOLDER PID`` once per
rank with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), and reads back what rank 0 wrote: the trained student and the round's
metrics, which it encodes and sends as one process would (so the egress guard sees them).
Rank 0 alone saves the teacher and the other state.

With a launcher (``deployment.launcher``: torchrun, or srun in a Slurm job) the ClientApp
starts that one command instead, with the rank's command appended; the ranks take their
places from the launcher's variables (:class:`ark_core.train.distributed.World`).

Workers die with the ClientApp: the kernel kills each one (or the launcher, and the ranks
with it) when the ClientApp ends, killed or not (Linux), and a rank that fails makes the
ClientApp stop the others and fail the site's round with that rank's exit and last output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ark_core.model.checkpoint import load_tensors, save_tensors
from ops.procs import child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
TAIL = 3000  # characters of a failed rank's output in the error


class RankFailed(RuntimeError):
    """A worker of a data-parallel round ended with an error; the site's round fails."""


def run_ranks(state_dir: Path, name: str, processes: int, launcher: Sequence[str] | None,
              job: Mapping[str, Any], tensors: Mapping[str, MutableMapping[str, torch.Tensor]],
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train site ``name``'s round on ``processes`` ranks (or the launcher's).

    Args:
        state_dir: The site's state directory (the scratch folder goes there).
        name: The site's name, for errors.
        processes: How many ranks (without a launcher).
        launcher: A command that starts the ranks itself (``deployment.launcher``).
        job: What :func:`client.rank.train_rank` reads, as JSON (``site``, ``ins``).
        tensors: Named sets of tensors it reads (``master``, ``server_teacher``), handed
            over: each is emptied once written, so this process keeps no copy while the
            ranks train.

    Returns:
        Rank 0's trained student and metrics.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="round-", dir=state_dir))
    try:  # safetensors and JSON: nothing a rank reads can run code
        (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        for key, value in tensors.items():
            save_tensors(value, folder / f"{key}.safetensors")
            value.clear()
        _wait(_start(folder, processes, launcher), folder, name, launcher)
        return (load_tensors(folder / "student.safetensors"),
                json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start(folder: Path, size: int, launcher: Sequence[str] | None) -> list[subprocess.Popen]:
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rank_cmd = [sys.executable, "-m", "client.rank", str(folder)]
    if launcher:  # one process: the launcher, tied to this one, starting the ranks
        cmds = [([sys.executable, "-m", "client.rank", "--exec", str(os.getpid()), *launcher,
                  *rank_cmd, "0"], {})]
    else:
        cmds = [([*rank_cmd, str(os.getpid())],
                 {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(size)})
                for r in range(size)]
    procs = []
    try:
        for r, (cmd, world) in enumerate(cmds):
            with open(folder / f"rank{r}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, env={**env, **world}, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=ROOT))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _wait(procs: list[subprocess.Popen], folder: Path, name: str,
          launcher: Sequence[str] | None) -> None:
    """Until every rank has exited 0; the first that fails stops the others and raises."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if code:
                    who = (f"the launcher ({' '.join(launcher)})" if launcher else
                           f"rank {rank} of the {len(procs)} data-parallel processes")
                    raise RankFailed(
                        f"site {name!r}: {who} {_ended(code)}, so this round fails; its last "
                        "output:\n"
                        + (folder / f"rank{rank}.log").read_text(errors="replace")[-TAIL:])
            if all(code == 0 for code in codes):
                return
            time.sleep(0.2)
    finally:
        _stop(procs)
        _echo(folder, len(procs))


def _echo(folder: Path, size: int) -> None:
    """The ranks' output (warnings about unreadable files, ...) on the ClientApp's stderr."""
    for rank in range(size):
        log = folder / f"rank{rank}.log"
        for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
            print(f"[rank {rank}] {line}", file=sys.stderr)


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
