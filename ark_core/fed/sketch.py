"""How alike the sites' updates are, measured without keeping them (count sketches).

Sites whose updates to the shared backbone and projector point apart (cosine near -1) pull
the master between them; the per-round cosines say when that happens. Streaming aggregation
never holds two updates, so each accepted update's difference from the master is reduced to
a ``dim``-sized sketch as it is folded in: every coordinate ``i`` of a shared tensor is
added, with a random sign ``s(i)``, to a random bucket ``h(i)`` (a count sketch; ``h`` and
``s`` drawn from a generator seeded by the tensor's name, the round and the slice of
:data:`SLICE` coordinates ``i`` falls in, the same for every site; slices keep the hashes'
memory to a few times a slice, whatever the tensor's size). The inner product of two
sketches is an unbiased estimate of the inner product of the two differences; with 4,096
buckets a cosine is off by about 1/sqrt(4096) = 0.016.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from itertools import combinations
from typing import Any

import torch

from .aggregate import as_tensor, head_task

__all__ = ["SLICE", "UpdateSketch"]

SLICE = 1 << 20  # coordinates hashed at a time


class UpdateSketch:
    """Count sketches of the sites' shared-weight differences in one round.

    Args:
        master: The master the differences are taken from.
        dim: Buckets per sketch.
        seed: Seed of the buckets and signs (the same for every site of a round).
    """

    def __init__(self, master: Mapping[str, torch.Tensor], dim: int = 4096, seed: int = 0) -> None:
        self.master, self.dim, self.seed = master, dim, seed
        self.sketches: dict[str, torch.Tensor] = {}

    def _hash(self, name: str, part: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ self.seed) + (part << 32))
        buckets = torch.randint(0, self.dim, (n,), generator=g)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return buckets, signs

    def add(self, site: str, update: Mapping[str, Any]) -> None:
        """Sketch ``site``'s difference from the master over the shared tensors it sent."""
        sketch = torch.zeros(self.dim, dtype=torch.float64)
        for name in update:
            if head_task(name) is not None:
                continue
            x = as_tensor(update[name]).flatten()
            ref = self.master[name].detach().cpu().flatten()
            for part, start in enumerate(range(0, x.numel(), SLICE)):
                d = x[start:start + SLICE].float() - ref[start:start + SLICE].float()
                buckets, signs = self._hash(name, part, d.numel())
                sketch.index_add_(0, buckets, (d * signs).double())
        self.sketches[site] = sketch

    def cosines(self) -> dict[str, float]:
        """``"<site>~<site>"`` -> estimated cosine, for each pair whose shared parts moved."""
        out = {}
        for a, b in combinations(sorted(self.sketches), 2):
            x, y = self.sketches[a], self.sketches[b]
            denom = float(x.norm() * y.norm())
            if denom > 0:
                out[f"{a}~{b}"] = round(float(x @ y) / denom, 6)
        return out
