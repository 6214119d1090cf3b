"""One rank of a site's data-parallel round, started by :mod:`client.parallel`.

``python -m client.rank FOLDER PARENT_PID``: a rank. It ties its life to its parent's (the
ClientApp, or a launcher: PARENT_PID 0) before anything heavy loads, then trains the round
with the others; rank 0 writes the result. ``python -m client.rank --exec PARENT_PID CMD...``
ties its life to the ClientApp's and becomes ``CMD`` (a launcher such as torchrun or srun,
which keeps the tie across exec).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the one that started it ends (Linux).

    ``parent``: that process's id, checked in case it ended already; 0 skips the check.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def train_rank(folder: Path) -> None:
    """Join the site's process group, train the round, and (rank 0) write the result."""
    import json  # noqa: PLC0415 - loaded once this rank is tied to its parent

    from ark_core.fed.federation import site_train_config  # noqa: PLC0415
    from ark_core.fed.protocol import Instruction  # noqa: PLC0415
    from ark_core.model.checkpoint import load_tensors, save_tensors  # noqa: PLC0415
    from ark_core.model.runtime import resolve_device  # noqa: PLC0415
    from ark_core.train import distributed  # noqa: PLC0415
    from client.site import Site  # noqa: PLC0415

    job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    site, ins = Site.from_json(job["site"]), Instruction.from_config(job["ins"])
    fixed = folder / "server_teacher.safetensors"
    world = distributed.World.from_env()
    distributed.start(world, resolve_device(site_train_config(ins.train, site.cfg.train).device))
    try:
        student, metrics = site.train(ins, load_tensors(folder / "master.safetensors"),
                                      load_tensors(fixed) if fixed.exists() else None, world=world)
        if world.main:
            save_tensors(student, folder / "student.safetensors")
            (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    finally:
        distributed.stop()


if __name__ == "__main__":
    if sys.argv[1] == "--exec":
        die_with_parent(int(sys.argv[2]))
        os.execvp(sys.argv[3], sys.argv[3:])
    die_with_parent(int(sys.argv[2]))
    train_rank(Path(sys.argv[1]))
