"""Flower ClientApp of federated Ark+: messages in, :class:`client.site.Site` calls, messages out.

The site's configuration comes from ``node_config['site-config']`` (deployment: a site YAML)
or from the run config's ``sim-config``/``data-root``/``run-dir`` plus the node's
``partition-id`` (simulation). Record names and keys: :mod:`ark_core.fed.protocol`.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ark_core.fed.protocol import ARRAYS, ENCODING, METRICS, SCALES, SITE, TEACHER
from client.audit import audit_mod
from client.egress import egress_guard
from client.message import instruction_of, site_of
from client.site import Site
from ops.arrays import Tensors, raw_array

# The audit log wraps the guard, so it records what left the site (or that it was blocked).
app = ClientApp(mods=[audit_mod, egress_guard])


def _reply(msg: Message, site: Site, metrics: dict[str, float], arrays=None) -> Message:
    content = RecordDict(
        {
            METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
            SITE: ConfigRecord({"name": site.cfg.name, "tasks": site.task_names}),
        }
    )
    if arrays is not None:
        content[ARRAYS] = ArrayRecord(arrays)
    return Message(content, reply_to=msg)


def _take(content: RecordDict, name: str, required: bool = True) -> dict[str, torch.Tensor] | None:
    """Record ``name`` of ``content`` as tensors over its bytes, removed from ``content``."""
    if not required and name not in content:
        return None
    return dict(Tensors(content.pop(name)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: the master student in, this site's student (run's encoding) and metrics out."""
    site, ins = site_of(msg, context), instruction_of(msg)
    content = msg.content
    encoding, scales = content.config_records.get(ENCODING), content.array_records.get(SCALES)
    # The master and a server teacher are taken out of the message (the mods read what they
    # need before), so that once the models hold their values no copy is kept in training.
    master = site.receive(ins, _take(content, ARRAYS), encoding,
                          None if scales is None else Tensors(scales))
    base = dict(master) if ins.transfer.delta else None  # what the reply is a difference from
    student, metrics = site.train(ins, master, _take(content, TEACHER, required=False))
    payload = site.encode(ins, base, student)
    del student, base
    if not payload.manifest:  # plain fp32 weights: numpy Arrays, as Flower makes them
        return _reply(msg, site, metrics, {k: Array(v) for k, v in payload.arrays.items()})
    reply = _reply(msg, site, metrics, {k: raw_array(v) for k, v in payload.arrays.items()})
    reply.content[ENCODING] = ConfigRecord(payload.manifest)  # so the server and guard know
    if payload.scales:
        reply.content[SCALES] = ArrayRecord({k: raw_array(v) for k, v in payload.scales.items()})
    return reply


@app.train("heads")
def calibrate(msg: Message, context: Context) -> Message:
    """Head calibration: this site's heads fitted on the frozen model sent, and the counts."""
    site, ins = site_of(msg, context), instruction_of(msg)
    heads, counts = site.calibrate(ins, Tensors(msg.content[ARRAYS]))
    return _reply(msg, site, counts, {k: Array(v.numpy()) for k, v in heads.items()})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation AUC of the master student and the site's teacher (numbers only)."""
    site, ins = site_of(msg, context), instruction_of(msg)
    return _reply(msg, site, site.evaluate(ins, Tensors(msg.content[ARRAYS])))


@app.query("tasks")
def site_tasks(msg: Message, context: Context) -> Message:
    """The site's name and tasks, so the server sends it only its own heads.

    With per-task weighting also its training counts per task (numbers only).
    """
    site, ins = site_of(msg, context), instruction_of(msg)
    counts = site.train_counts(ins) if ins.shared_weighting == "tasks" else {}
    return _reply(msg, site, counts)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's latest teacher, asked for once at the end of the run."""
    site, ins = site_of(msg, context), instruction_of(msg)
    teacher, metrics = site.teacher(ins)
    return _reply(msg, site, metrics, teacher)
