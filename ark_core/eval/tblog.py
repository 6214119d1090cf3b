"""TensorBoard event files beside metrics.jsonl: every numeric metric as a scalar.

Tags are ``<kind>/<site>/<metric>`` for federated lines and ``<metric>`` for centralized
ones, stepped by round or epoch, so ``tensorboard --logdir RUN_DIR`` shows the same figures
as the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_STEP_KEYS = ("round", "epoch")
_WRITERS: dict[Path, object] = {}  # one event file per run directory and process
_SKIP = {"round", "epoch", "node_id", "accepted"}


def write_scalars(run_dir: str | Path, records: Iterable[dict]) -> None:
    """Append the numeric fields of metrics records to the run's TensorBoard events."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - TensorBoard's writer is slow to import and optional
    except ImportError:  # tensorboard is a declared dependency; stay quiet if it is missing
        log.debug("tensorboard not installed: no event files")
        return
    records = list(records)
    if not records:
        return
    log_dir = Path(run_dir).resolve() / "tensorboard"
    writer = _WRITERS.get(log_dir)
    if writer is None:
        writer = _WRITERS[log_dir] = SummaryWriter(log_dir=str(log_dir))
    for rec in records:
        step = next((int(rec[k]) for k in _STEP_KEYS if k in rec), 0)
        prefix = "/".join(str(rec[k]) for k in ("kind", "site") if rec.get(k))
        for key, value in rec.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            writer.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), step)
    writer.flush()
