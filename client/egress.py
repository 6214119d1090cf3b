"""Data-egress guard: a ClientApp mod that lets only allow-listed content leave the site.

Every reply is checked before it is sent. Allowed:

- ``arrays`` (train and query replies only): tensors whose names and shapes are those of
  the model's shared parts and of this site's own heads (a ``train.heads`` reply: its own
  heads alone), as float32 or, in a train reply of
  a run with a compact ``transfer``, in exactly that encoding's wire dtype (float16, the
  uint16 pattern of bfloat16, int8), declared in an ``encoding`` record that holds
  ``{"arrays": <the run's encoding>}`` and nothing else, and, for int8, with one float32
  scalar per tensor in ``scales`` (see :mod:`ark_core.fed.transfer`);
- ``metrics``: finite numbers (never lists) under the names of :func:`allowed_metrics`
  (example counts, losses, schedule values, AUCs per task and label of this site's tasks);
- ``site``: exactly ``name`` (this site's name) and ``tasks`` (its task names).

Anything else (a string, bytes, an integer array, a per-image list, an unknown key or
record) is refused: the reply becomes an error message naming what was blocked, and the
block is logged. The guard ships inside the app bundle, so it protects a site against
mistakes in the code it runs, not against a hostile coordinator that ships another bundle:
that is what pinning the signed bundle in deployment is for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from flwr.app import Context, Error, Message, MessageType

from ark_core.fed.aggregate import float_state, head_task
from ark_core.fed.protocol import ARRAYS, ENCODING, HEADS, METRICS, SCALES, SITE
from ark_core.fed.transfer import check_declared
from ark_core.model.factory import create_model
from ark_core.tasks import TaskSpec
from client.message import instruction_of, site_of

log = logging.getLogger("flwr.ark.client.egress")

EGRESS_BLOCKED = 3001
"""Error code of a reply the guard refused to send."""

_ITEMSIZE = {"float32": 4, "float16": 2, "uint16": 2, "int8": 1}
_NPY_HEADER_MAX = 4096  # bytes an .npy header may add to a tensor's payload
_GLOBAL_METRICS = ("num-examples", "steps", "bad-files", "lr", "ema-step", "teacher-from-round",
                   "teacher-round", "optimizer-from-round")
_TASK_METRICS = ("num-examples", "steps", "loss", "task-loss", "consistency", "momentum", "lam")


class EgressBlocked(ValueError):
    """A reply holds something the allow-list does not; the message says what."""


def allowed_metrics(tasks: list[TaskSpec]) -> set[str]:
    """Every metric name a site training ``tasks`` may send."""
    names = set(_GLOBAL_METRICS)
    for t in tasks:
        names |= {f"{m}.{t.name}" for m in _TASK_METRICS}
        for role in ("student", "teacher"):
            names.add(f"{role}.auc.{t.name}")
            names |= {f"{role}.auc.{t.name}.{label}" for label in t.labels}
    return names


class EgressPolicy:
    """What one reply of one site may hold.

    Args:
        site: The site's name.
        tasks: The site's tasks (labels as in the federation's catalogue).
        tensors: Tensor name -> shape a reply's ``arrays`` may hold.
        arrays_allowed: Whether the reply may carry ``arrays`` at all.
        encoding: The encoding its arrays must carry (``fp32``: plain weights, no manifest).
    """

    def __init__(self, site: str, tasks: list[TaskSpec], tensors: Mapping[str, tuple[int, ...]],
                 *, arrays_allowed: bool, encoding: str = "fp32") -> None:
        self.site = site
        self.tasks = tasks
        self.tensors = dict(tensors)
        self.arrays_allowed = arrays_allowed
        self.encoding = encoding
        self.metrics = allowed_metrics(tasks)

    @classmethod
    def for_message(cls, msg: Message, context: Context) -> EgressPolicy:
        """The policy of the reply to ``msg``.

        The site's name and tasks come from its own config; tensor shapes from the master in
        ``msg`` or, without one, from the model the instruction describes.
        """
        site, ins = site_of(msg, context), instruction_of(msg)
        catalogue = {t.name: t for t in ins.tasks}
        tasks = [catalogue[n] for n in site.task_names if n in catalogue]
        if ARRAYS in msg.content.array_records:
            shapes = {k: tuple(a.shape) for k, a in msg.content.array_records[ARRAYS].items()}
        else:
            with torch.device("meta"):  # shapes only: no memory, no weights
                model = create_model(ins.model.model_copy(update={"init": "random"}), tasks)
            shapes = {k: tuple(v.shape) for k, v in float_state(model).items()}
        own = set(site.task_names)
        # A calibration reply carries its own heads alone: never the shared parts.
        sendable = own if msg.metadata.message_type == HEADS else {None, *own}
        shapes = {k: s for k, s in shapes.items() if head_task(k) in sendable}
        kind = msg.metadata.message_type.split(".")[0]
        return cls(site.cfg.name, tasks, shapes,
                   arrays_allowed=kind in (MessageType.TRAIN, MessageType.QUERY),
                   encoding=ins.transfer.encoding if msg.metadata.message_type == MessageType.TRAIN
                   else "fp32")

    def check(self, reply: Message) -> None:
        """Raise :class:`EgressBlocked` naming the first thing not on the allow-list."""
        c = reply.content
        arrays = set(c.array_records)
        allowed = {ARRAYS} if self.arrays_allowed else set()
        if self.arrays_allowed and self.encoding == "int8-delta":
            allowed.add(SCALES)
        if arrays - allowed:
            raise EgressBlocked(f"array records {sorted(arrays)} not allowed in this reply")
        configs = {SITE} if self.encoding == "fp32" else {SITE, ENCODING}
        if set(c.config_records) != configs:
            raise EgressBlocked(f"config records {sorted(c.config_records)}, expected "
                                f"{sorted(configs)}")
        if set(c.metric_records) != {METRICS}:
            raise EgressBlocked(f"metric records {sorted(c.metric_records)}, expected ['{METRICS}']")
        self._check_site(c.config_records[SITE])
        self._check_metrics(c.metric_records[METRICS])
        if ARRAYS in c.array_records:
            self._check_arrays(c.array_records[ARRAYS], c.config_records.get(ENCODING),
                               c.array_records.get(SCALES))

    def _check_site(self, rec: Mapping) -> None:
        if set(rec) != {"name", "tasks"}:
            raise EgressBlocked(f"'{SITE}' record keys {sorted(rec)}, expected ['name', 'tasks']")
        if rec["name"] != self.site:
            raise EgressBlocked(f"'{SITE}.name' is {rec['name']!r}, not this site's name")
        if list(rec["tasks"]) != [t.name for t in self.tasks]:
            raise EgressBlocked(f"'{SITE}.tasks' is {rec['tasks']!r}, not this site's tasks")

    def _check_metrics(self, rec: Mapping) -> None:
        for key, value in rec.items():
            if key not in self.metrics:
                raise EgressBlocked(f"metric {key!r} is not on the allow-list")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise EgressBlocked(f"metric {key!r} is a {type(value).__name__}, not a number")
            if not math.isfinite(value):
                raise EgressBlocked(f"metric {key!r} is not finite")

    def _check_arrays(self, rec: Mapping, manifest: Mapping | None, scales: Mapping | None) -> None:
        for key in rec:
            if key not in self.tensors:
                raise EgressBlocked(f"tensor {key!r} is not a shared tensor or an own head")
        try:  # exactly the declared encoding, its wire dtype and the tensors' shapes
            check_declared({k: (tuple(a.shape), a.dtype) for k, a in rec.items()}, manifest,
                           {k: (tuple(a.shape), a.dtype) for k, a in (scales or {}).items()},
                           self.encoding, self.tensors)
        except ValueError as e:
            raise EgressBlocked(str(e)) from None
        for key, a in [*rec.items(), *(scales or {}).items()]:
            if len(a.data) > math.prod(a.shape) * _ITEMSIZE[a.dtype] + _NPY_HEADER_MAX:
                raise EgressBlocked(f"tensor {key!r} carries more bytes than its shape needs")


def egress_guard(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: send the reply only if :class:`EgressPolicy` allows all of it."""
    # The policy is read from the message before the handler, which may take the master out.
    try:
        policy: EgressPolicy | Exception = EgressPolicy.for_message(msg, context)
    except (KeyError, OSError, ValueError) as e:  # blocks any reply but an error
        policy = e
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        if isinstance(policy, Exception):
            raise policy
        policy.check(reply)
    except (EgressBlocked, KeyError, ValueError) as e:
        log.error("egress guard BLOCKED the %s reply: %s", msg.metadata.message_type, e)
        return Message(Error(code=EGRESS_BLOCKED, reason=f"egress guard blocked the reply: {e}"),
                       reply_to=msg)
    return reply
