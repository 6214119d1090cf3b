"""The compact downlink's server side: the reference the sites hold, and who holds it.

With ``transfer.downlink`` bf16 or int8 (:mod:`ark_core.fed.transfer`), the server keeps the
master as the sites rebuild it, the reference, one fp32 copy of the model (state kept on
purpose, beside the master). Each round :meth:`Downlink.advance` turns the new master into
the difference from the reference and the next reference; a node gets the difference only
if its last train reply proves it rebuilt the current reference for the same tasks, and
the next reference in fp32 otherwise (round 1, a site that missed a round, a server that
restarted: nothing of the reference is checkpointed, so a resumed run starts with fp32).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ark_core.fed.aggregate import head_task
from ark_core.fed.audit import tensors_sha256
from ark_core.fed.transfer import (
    MANIFEST_KEY,
    MASTER_KEY,
    REFERENCE_KEY,
    SCALES_KEY,
    Payload,
    encode_master,
    pack_scales,
    unpack_scales,
)

Tasks = tuple[str, ...]


class Downlink:
    """The reference of one run's sites, and the differences of one round.

    Args:
        dtype: ``bf16`` or ``int8``.
    """

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.reference: dict[str, torch.Tensor] | None = None
        self.holders: dict[int, Tasks] = {}  # node -> tasks of the reference part it rebuilt
        self._eligible: dict[int, Tasks] = {}
        self._payload: Payload | None = None
        self._scales: dict[str, np.ndarray] = {}
        self._sha: dict[Tasks, str] = {}  # task group -> hash of its part of the reference
        self._prev_sha: dict[Tasks, str] = {}

    def advance(self, master: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's master as every site will hold it; call once per train message round.

        With no node able to use a difference, the reference becomes the master, exactly.
        """
        self._eligible, self.holders = self.holders, {}
        self._prev_sha, self._sha = self._sha, {}
        if self.reference is None or not self._eligible:
            self.reference = {k: v.detach().cpu().float().clone() for k, v in master.items()}
            self._payload, self._scales = None, {}
        else:
            self._payload, self.reference = encode_master(master, self.reference, self.dtype)
            packed = self._payload.scales.get(SCALES_KEY)
            self._scales = {} if packed is None else unpack_scales(list(master), packed)
        return self.reference

    def sha(self, tasks: Tasks) -> str:
        """Hash of the part of the reference that a site of ``tasks`` holds (it is sent)."""
        if tasks not in self._sha:
            self._sha[tasks] = tensors_sha256(_part(self.reference or {}, tasks))
        return self._sha[tasks]

    def difference(self, node: int, tasks: Tasks) -> tuple[dict, dict[str, str], dict] | None:
        """``(arrays, manifest, scales)`` of the difference for ``node``, or None: send fp32.

        A node gets the difference only if it rebuilt the previous reference, for the same
        tasks, in the last train round.
        """
        if self._payload is None or self._eligible.get(node) != tasks or tasks not in self._prev_sha:
            return None
        arrays = _part(self._payload.arrays, tasks)
        manifest = {MANIFEST_KEY: self._payload.manifest[MANIFEST_KEY],
                    REFERENCE_KEY: self._prev_sha[tasks], MASTER_KEY: self.sha(tasks)}
        scales = ({SCALES_KEY: pack_scales({k: self._scales[k] for k in arrays})}
                  if self._scales else {})
        return arrays, manifest, scales

    def rebuilt(self, node: int, tasks: Tasks) -> None:
        """``node`` answered this round's train message: it holds the reference of ``tasks``."""
        self.holders[node] = tasks


def _part(tensors: Mapping, tasks: Tasks) -> dict:
    """The shared tensors and the heads of ``tasks``: what a site of those tasks is sent."""
    return {k: v for k, v in tensors.items() if head_task(k) in (None, *tasks)}
