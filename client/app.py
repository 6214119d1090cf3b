"""Flower ClientApp of federated Ark+: messages in, :class:`client.site.Site` calls, messages out.

The site's configuration comes from ``node_config['site-config']`` (deployment: a site YAML)
or from the run config's ``sim-config``/``data-root``/``run-dir`` plus the node's
``partition-id`` (simulation). Record names and keys: :mod:`ark_core.protocol`.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ark_core.protocol import ARRAYS, CONFIG, METRICS, SITE, Instruction

from .audit import audit_mod
from .egress import egress_guard
from .site import Site

# The audit log wraps the guard, so it records what left the site (or that it was blocked).
app = ClientApp(mods=[audit_mod, egress_guard])


def _site(context: Context) -> Site:
    return Site.from_flower_config(context.node_config, context.run_config)


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: the master student in, this site's student tensors and metrics out."""
    site = _site(context)
    ins = Instruction.from_config(dict(msg.content[CONFIG]))
    student, metrics = site.train(ins, msg.content[ARRAYS])
    return _reply(msg, site, metrics, student)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation AUC of the master student and the site's teacher (numbers only)."""
    site = _site(context)
    ins = Instruction.from_config(dict(msg.content[CONFIG]))
    return _reply(msg, site, site.evaluate(ins, msg.content[ARRAYS]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's latest teacher, asked for once at the end of the run."""
    site = _site(context)
    ins = Instruction.from_config(dict(msg.content[CONFIG]))
    teacher, metrics = site.teacher(ins)
    return _reply(msg, site, metrics, teacher)
