"""A site's state directory: its teacher after each round, per run.

Layout::

    <state_dir>/<run fingerprint>/teacher_round_NNN.safetensors
    <state_dir>/<run fingerprint>/optimizer_round_NNN.safetensors   (keep_site_optimizer)
    <state_dir>/<run fingerprint>/residual_round_NNN.safetensors    (error feedback)
    <state_dir>/<run fingerprint>/heads_round_NNN.safetensors       (heads: per_site)
    <state_dir>/<run fingerprint>/reference_round_NNN.safetensors   (compact downlink)

Round r trains from the teacher saved after the latest round before r (the master in round
1), so a round the server replays starts again from the teacher before it, and a state
directory of another run (another fingerprint) is never read. Files are written to a
temporary name, synced and renamed, so a crash leaves either the old or the new teacher.
The teacher never enters Flower's ``Context.state`` (the deployment runtime drops large
states).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ark_core.model.checkpoint import load_tensors, save_tensors


class TeacherStore:
    """The teachers one site keeps for one run.

    Args:
        state_dir: The site's state directory.
        fingerprint: The run's fingerprint.
        keep: Teachers kept (the latest rounds); older ones are deleted after a save.
    """

    prefix = "teacher"

    def __init__(self, state_dir: Path, fingerprint: str, keep: int = 3) -> None:
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"invalid run fingerprint {fingerprint!r}")
        self.dir = Path(state_dir) / fingerprint
        self.keep = keep

    def path(self, round_: int) -> Path:
        return self.dir / f"{self.prefix}_round_{round_:03d}.safetensors"

    def rounds(self) -> list[int]:
        """Rounds with a saved teacher, ascending."""
        if not self.dir.is_dir():
            return []
        pattern = re.compile(rf"{self.prefix}_round_(\d{{3,}})\.safetensors")
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := pattern.fullmatch(p.name)))

    def latest_before(self, round_: int) -> int | None:
        """The latest saved round < ``round_`` (the teacher round ``round_`` starts from)."""
        earlier = [r for r in self.rounds() if r < round_]
        return earlier[-1] if earlier else None

    def load(self, round_: int) -> dict[str, torch.Tensor]:
        return load_tensors(self.path(round_))

    def save(self, round_: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Save the tensors after ``round_``; drop those of later rounds (a replay) and old ones."""
        path = self.path(round_)
        save_tensors(tensors, path, {"round": str(round_)})
        rounds = self.rounds()
        for r in rounds:
            if r > round_:
                self.path(r).unlink(missing_ok=True)
        for r in [r for r in rounds if r <= round_][: -self.keep]:
            self.path(r).unlink(missing_ok=True)
        return path


class OptimizerStore(TeacherStore):
    """The optimiser state one site keeps for one run (``keep_site_optimizer``).

    ``optimizer_round_NNN.safetensors`` holds the state after round NNN; a round starts from
    the state of the same round as its teacher, so a replayed round rolls both back together.
    """

    prefix = "optimizer"


class ResidualStore(TeacherStore):
    """The error-feedback residuals one site keeps for one run (see ``ark_core.fed.transfer``).

    ``residual_round_NNN.safetensors`` holds what round NNN's quantised difference lost;
    round r adds the residual of the latest round before r, so a replayed round starts from
    the same residual as the first time.
    """

    prefix = "residual"


class HeadStore(TeacherStore):
    """The site's own heads of its tasks for one run (``heads: per_site``).

    ``heads_round_NNN.safetensors`` holds the student's heads after round NNN; a round starts
    from those of the latest round before it, so a replayed round rolls them back too.
    """

    prefix = "heads"


class ReferenceStore(TeacherStore):
    """The master as this site rebuilt it, per run (``transfer.downlink`` bf16 or int8).

    ``reference_round_NNN.safetensors`` holds the master of round NNN; the next compact
    master is a difference from it (see ``ark_core.fed.transfer``).
    """

    prefix = "reference"
