"""Audit logs: append-only JSON lines, synced to disk, that survive restarts.

Two logs use this format: the server's ``<run_dir>/audit.jsonl`` (per round and site: when an
update arrived, its size, its norm, accepted or rejected and why, and the hash of the master
sent out) and each site's ``<state_dir>/audit.jsonl`` (what it sent, with hashes, and which
app bundle and master it ran). Hashes of tensors come from :func:`tensors_sha256`, so the
master hash a site logs can be matched with the one the server logged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import append_jsonl

__all__ = ["append_audit", "read_audit", "tensors_sha256"]


def _numpy(v: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().numpy()
    if isinstance(v, np.ndarray):
        return v
    raise TypeError(f"cannot hash a {type(v).__name__}: pass torch tensors or numpy arrays")


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order.

    Args:
        tensors: Name -> torch tensor or numpy array (the same values in either give the
            same hash).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(_numpy(tensors[name]))
        h.update(f"{name}|{a.dtype.name}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def append_audit(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record (a ``time`` field is added if absent), flushed and fsynced."""
    append_jsonl(path, {"time": time.time(), **record})


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """All records of an audit log, oldest first.

    A last line cut short by a crash is ignored; damage anywhere else raises ``ValueError``
    naming the line, since an audit log must not be silently incomplete.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: damaged audit record") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: audit record is not an object")
        out.append(rec)
    return out
