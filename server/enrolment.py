"""The sites enrolled in a deployment: ``<run_dir>/site_keys.json``, written by ``ark-server``.

``{site: {"node_id": N, "fingerprint": SHA-256 of the public key}}``. A site's identity is
the node id its registered key authenticates as, never a name a reply carries: the round
loop sends work only to enrolled node ids and names their replies from this file, read
afresh each round so that ``ark-server --sync-keys`` takes effect on the running run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ark_core.io import atomic_write_text

FILE = "site_keys.json"


class EnrolmentError(RuntimeError):
    """The enrolment file is unreadable; the message names it."""


def read_registry(run_dir: Path) -> dict[str, dict]:
    """Site -> ``{"node_id", "fingerprint"}``; empty if nothing is enrolled yet."""
    path = Path(run_dir) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise EnrolmentError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("node_id"), int) for v in data.values()):
        raise EnrolmentError(f"{path}: expected {{site: {{node_id: int, fingerprint}}}}")
    return data


def write_registry(run_dir: Path, registry: dict[str, dict]) -> None:
    """Replace the enrolment file atomically."""
    atomic_write_text(Path(run_dir) / FILE, json.dumps(registry, indent=1))


def enrolled_nodes(run_dir: Path) -> dict[int, str]:
    """Node id -> site name of every enrolled site."""
    return {int(v["node_id"]): name for name, v in read_registry(run_dir).items()}
