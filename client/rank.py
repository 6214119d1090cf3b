"""One rank of a site's data-parallel round: ``python -m client.rank FOLDER PARENT_PID``.

Started by :mod:`client.parallel`. It ties its life to the ClientApp's before anything
heavy loads, then trains the round with the others; rank 0 writes the result.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` (which started it) ends (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def train_rank(folder: Path) -> None:
    """Join the site's process group, train the round, and (rank 0) write the result."""
    import torch  # noqa: PLC0415 - loaded once this rank is tied to its parent

    from ark_core.fed.federation import site_train_config  # noqa: PLC0415
    from ark_core.model.runtime import resolve_device  # noqa: PLC0415
    from ark_core.train import distributed  # noqa: PLC0415

    job = torch.load(folder / "round.pt", weights_only=False, mmap=True)
    site, ins = job["site"], job["ins"]
    world = distributed.World.from_env()
    distributed.start(world, resolve_device(site_train_config(ins.train, site.cfg.train).device))
    try:
        student, metrics = site.train(ins, job["master"], job["server_teacher"], world=world)
        if world.main:
            torch.save({"student": student, "metrics": metrics}, folder / "result.pt")
    finally:
        distributed.stop()


if __name__ == "__main__":
    die_with_parent(int(sys.argv[2]))
    train_rank(Path(sys.argv[1]))
