"""The server's audit log (``<run_dir>/audit.jsonl``) and privacy report (``privacy.json``).

Records (one JSON object a line, append-only, fsynced; read with
:func:`ark_core.fed.audit.read_audit`):

- ``{"event": "master", "round", "kind", "sha256", "tasks", "sites"}``: the master sent out
  for a round to ``sites``, the sites that train exactly ``tasks``: its shared tensors and
  those tasks' heads, which is what ``sha256`` covers; ``kind`` the message type, as the
  sites' audit logs record it (``train``, ``evaluate``, ``train.heads``).
- ``{"event": "stranger", "round", "node_id"}``: a connected node that is not enrolled;
  it got no work that round.
- ``{"event": "update", "round", "kind", "site", "node_id", "arrived", "bytes", "encoding",
  "norm", "accepted", "reason", "master_sha256", "clipped"}``: one reply; ``site`` the site
  its node is enrolled as (a deployment), whatever the reply says; ``bytes`` its tensor payload
  (:func:`ops.arrays.payload_nbytes`: arrays, int8 scales and encoding manifest),
  ``encoding`` what its manifest declares (``fp32`` without one), ``norm`` the L2 norm of its
  difference from that master (None when rejected before it could be measured);
  ``master_sha256`` the hash of the master part that site was sent; ``clipped`` the example
  counts cut to the site's cap (``{key: [claimed, used]}``), or None.

Lines of a round that was interrupted and replayed stay: the log records what happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ark_core.fed.audit import append_audit, tensors_sha256
from ark_core.io import atomic_write_text


class ServerAudit:
    """Appends the server's audit records of one run directory.

    Args:
        run_dir: The run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "audit.jsonl"

    def master(self, round_: int, kind: str, tensors: Mapping[str, Any] | str, *,
               tasks: list[str], sites: list[str]) -> str:
        """Log the hash of the master part about to be sent to ``sites``; returns it.

        ``tensors`` may be that hash already (a compact downlink's reference part).
        """
        sha = tensors if isinstance(tensors, str) else tensors_sha256(tensors)
        append_audit(self.path, {"event": "master", "round": round_, "kind": kind, "sha256": sha,
                                 "tasks": tasks, "sites": sites})
        return sha

    def update(self, round_: int, kind: str, *, site: str | None, node_id: int, arrived: float,
               nbytes: int, norm: float | None, accepted: bool, reason: str = "",
               master_sha256: str = "", encoding: str = "fp32", clipped: dict | None = None) -> None:
        """Log one reply and what became of it (``nbytes``: its tensor payload as received)."""
        append_audit(self.path, {
            "event": "update", "round": round_, "kind": kind, "site": site, "node_id": node_id,
            "arrived": arrived, "bytes": nbytes,
            "encoding": encoding, "norm": norm,
            "accepted": accepted, "reason": reason, "master_sha256": master_sha256,
            "clipped": clipped,
        })

    def stranger(self, round_: int, node_id: int) -> None:
        """Log a connected node that is not enrolled (it gets no work)."""
        append_audit(self.path, {"event": "stranger", "round": round_, "node_id": node_id})


def write_privacy(run_dir: str | Path, report: dict) -> Path:
    """Write ``privacy.json`` (what the run spent) atomically."""
    path = Path(run_dir) / "privacy.json"
    atomic_write_text(path, json.dumps(report, indent=1))
    return path
