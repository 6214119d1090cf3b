"""The site's own audit log: a ClientApp mod appending to ``<state_dir>/audit.jsonl``.

One record per reply, written after the egress guard decided (so it logs what actually left,
or that the guard blocked it), appended and fsynced, never rewritten; read with
:func:`ark_core.fed.audit.read_audit`. Fields: ``event`` ("reply"), ``kind``, ``round``,
``run_fingerprint``, ``run_id``, ``master_sha256`` (of the master received, None without
one), ``received_bytes`` and ``received_heads`` (the tasks whose heads it held: only this
site's own), ``sent`` (tensor name -> bytes), ``payload_sha256`` (of the tensors sent, the same hash
the server can compute), ``bytes`` (the tensors, int8 scales and encoding manifest, as the
server counts them: :func:`ops.arrays.payload_nbytes`), ``encoding`` (of the tensors
sent), ``metrics``, ``error`` (the reason of an error reply) and
``bundle`` (the app bundle's directory name, which holds Flower's FAB id, version and hash
when installed from a FAB, and a SHA-256 over the code it ran).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from flwr.app import Context, Message

from ark_core.fed.aggregate import head_task
from ark_core.fed.audit import append_audit, tensors_sha256
from ark_core.fed.protocol import ARRAYS, CONFIG, ENCODING, METRICS, SCALES, InstructionError
from ark_core.fed.transfer import MASTER_KEY, declared_encoding
from client.message import instruction_of, site_of
from ops.arrays import Tensors, payload_nbytes

log = logging.getLogger("flwr.ark.client.audit")

_CODE_DIRS = ("ark_core", "client", "server")


@functools.lru_cache(maxsize=1)
def bundle_info() -> dict[str, str]:
    """Which app bundle runs: its directory name and a hash of its code and pyproject."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = sorted(p for d in _CODE_DIRS for p in (root / d).rglob("*.py"))
    files += [root / "pyproject.toml"] if (root / "pyproject.toml").exists() else []
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return {"app_dir": root.name, "code_sha256": h.hexdigest()}


def _fingerprint(msg: Message) -> str | None:
    try:
        return instruction_of(msg).fingerprint
    except InstructionError:  # logged as it came; the reply says what was wrong
        return None


def _master_sha(msg: Message) -> str | None:
    """Hash of the master received; of a difference, the master it rebuilds (checked on use)."""
    master = msg.content.array_records.get(ARRAYS)
    encoding = msg.content.config_records.get(ENCODING)
    if encoding is not None and MASTER_KEY in encoding:
        return str(encoding[MASTER_KEY])
    return tensors_sha256(Tensors(master)) if master is not None else None


def request_record(msg: Message) -> dict:
    """The audit record's fields about ``msg``, the message answered.

    Read before the handler runs: the train handler takes the master out of the message once
    the student holds it (so that it is not kept through training).
    """
    config = dict(msg.content.config_records.get(CONFIG, {}))
    master = msg.content.array_records.get(ARRAYS)
    return {
        "event": "reply", "kind": msg.metadata.message_type, "round": config.get("round"),
        "run_fingerprint": _fingerprint(msg), "run_id": msg.metadata.run_id,
        "master_sha256": _master_sha(msg),
        "received_bytes": sum(len(a.data) for a in master.values()) if master is not None else 0,
        "received_heads": sorted({t for k in master if (t := head_task(k))}) if master else [],
        "bundle": bundle_info(),
    }


def reply_record(rec: dict, reply: Message) -> dict:
    """The audit record of ``reply``, given :func:`request_record` of the message it answers."""
    if reply.has_error():
        return {**rec, "error": reply.error.reason, "sent": {}, "bytes": 0}
    sent = reply.content.array_records.get(ARRAYS)
    sizes = {k: len(a.data) for k, a in sent.items()} if sent is not None else {}
    manifest = reply.content.config_records.get(ENCODING)
    nbytes = payload_nbytes(sent, reply.content.array_records.get(SCALES), manifest)
    metrics = reply.content.metric_records.get(METRICS)
    return {**rec, "sent": sizes, "bytes": nbytes, "encoding": declared_encoding(manifest),
            "payload_sha256": tensors_sha256(Tensors(sent)) if sent is not None else None,
            "metrics": dict(metrics) if metrics is not None else {}}


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: log every reply in the site's state directory, then send it."""
    rec = request_record(msg)
    reply = call_next(msg, context)
    try:
        state_dir = site_of(msg, context).state_dir
    except (OSError, ValueError) as e:  # no site config: the reply is an error already
        log.warning("audit: no state directory to log in (%s)", e)
        return reply
    append_audit(Path(state_dir) / "audit.jsonl", reply_record(rec, reply))
    return reply
