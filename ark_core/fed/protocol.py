"""What the server and a site say to each other: record names and config/metric keys.

Framework-free: the Flower apps put these keys into ``ConfigRecord``/``MetricRecord`` and
the tensors into an ``ArrayRecord``.

Server -> site (``train``, ``train.heads``, ``evaluate``, ``query`` and ``query.tasks``
messages)
    ``arrays`` (ArrayRecord): the master student's shared float tensors (backbone,
    projector) and the heads of the receiving site's own tasks, no other head; absent in
    ``query`` and ``query.tasks``. ``teacher`` (ArrayRecord, ``train`` of a run with
    ``teacher: server`` only): the server's teacher, the same tensors. The server learns a
    site's tasks from a ``query.tasks`` message (answered with the ``site`` record and, for
    per-task weighting, its training counts) before it first sends it a master. With
    ``transfer.downlink`` bf16 or int8, a ``train`` message's ``arrays`` may instead hold the
    master's difference from the reference the site keeps, declared by an ``encoding``
    record (``arrays``, ``reference`` and ``master`` hashes) with int8 ``scales`` as in a
    reply. ``config`` (ConfigRecord): ``instruction``, the :class:`Instruction` as one JSON value
    (``version``, ``round``, ``num_rounds``, ``lr``, ``local_epochs``, ``fingerprint``,
    ``model``, ``train``, ``catalogue``, ``transfer``, ``prox_mu``, ``keep_optimizer``,
    ``head_refit``, ``shared_weighting``, ``teacher``, ``heads``), and ``round`` again as a plain
    number for logs and audit lines.

Site -> server (replies)
    ``arrays`` (ArrayRecord): ``train``: the student's float tensors, shared parts and this
    site's heads only (shared parts alone with ``heads: per_site``); ``query``: the site's
    teacher, same tensors; ``train.heads`` (head
    calibration, :mod:`ark_core.train.calibrate`): this site's heads re-fitted on the frozen
    model it was sent, and nothing else, fp32. ``evaluate``: none.
    ``metrics`` (MetricRecord, numbers only): ``num-examples``, ``num-examples.<task>``,
    ``steps``, ``steps.<task>`` (local optimiser steps), ``loss.<task>``, ... (train);
    ``<student|teacher>.auc.<task>`` (mean AUC),
    ``<student|teacher>.auc.<task>.<label>`` and ``num-examples.<task>`` (evaluate);
    ``teacher-round``, ``num-examples``, ``num-examples.<task>`` (query);
    ``num-examples``, ``num-examples.<task>`` (train.heads); ``query.tasks``: none, or with
    ``shared_weighting: tasks`` the training split's ``num-examples`` and
    ``num-examples.<task>`` (one epoch).
    ``site`` (ConfigRecord): ``name`` (str) and ``tasks`` (list of task names).
    ``encoding`` (ConfigRecord, train replies of a run whose transfer is not fp32 weights):
    ``{"arrays": <encoding>}``; ``scales`` (ArrayRecord, int8 only): one float32 vector, the
    scale of each int8 tensor in sorted name order. See :mod:`ark_core.fed.transfer`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ..config import ModelConfig, Strict, TrainConfig, format_validation_error
from ..tasks import TaskSpec
from .federation import CatalogueTask, FederationConfig, check_local_epochs, run_fingerprint
from .transfer import TransferConfig

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
ENCODING = "encoding"
SCALES = "scales"
TEACHER = "teacher"  # the server's teacher in a train message (teacher: server)
TASKS_QUERY = "query.tasks"  # message type: "which tasks do you train?"
HEADS = "train.heads"  # message type: "fit your tasks' heads on this frozen model"
INSTRUCTION = "instruction"  # the config record's key holding the Instruction as JSON
INSTRUCTION_VERSION = 6  # 2: prox_mu, keep_optimizer; 3: train.task_order, optimizer_reset,
# head_refit, fractional local_epochs; 4: shared_weighting, teacher, heads; 5: train.long_tail;
# 6: transfer.downlink, int8 scales packed in one Array


class InstructionError(ValueError):
    """A message's instruction is missing, of an unknown version, or invalid (field named)."""


class Instruction(Strict):
    """The schedule and settings a message carries to a site, as one versioned JSON value.

    Args:
        version: The instruction's format; a site refuses one newer than it understands.
        round: Current round (1-based; 0 for messages outside training).
        num_rounds: Rounds of the run.
        lr: This round's learning rate.
        local_epochs: Passes over the site's tasks per round, or 1/k of an epoch (version 3).
        fingerprint: The run's fingerprint (keys the site's teacher store).
        model: The architecture.
        train: Training settings (the site applies its overrides).
        catalogue: Every task of the run.
        transfer: How the site encodes its train reply.
        prox_mu: FedProx weight of the proximal term at the site (version 2; 0: none).
        keep_optimizer: The site keeps its optimiser state across rounds (version 2).
        head_refit: The site re-fits its heads on the frozen master before it trains
            (version 3).
        shared_weighting: ``tasks``: the site states its training counts per task when
            asked its tasks (version 4; see :mod:`ark_core.fed.task_weights`).
        teacher: ``server``: the message carries the round's teacher (``teacher`` record),
            the fixed consistency target; the site keeps none (version 4).
        heads: ``per_site``: the site trains its own heads, kept in its state directory,
            and sends the shared tensors only (version 4).
    """

    version: int = INSTRUCTION_VERSION
    round: int = Field(ge=0)
    num_rounds: int = Field(ge=1)
    lr: float = Field(ge=0)
    local_epochs: int | float = Field(gt=0)
    fingerprint: str
    model: ModelConfig
    train: TrainConfig
    catalogue: list[CatalogueTask]
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    prox_mu: float = Field(0.0, ge=0)
    keep_optimizer: bool = False
    head_refit: bool = False
    shared_weighting: Literal["examples", "tasks", "sites"] = "examples"
    teacher: Literal["sites", "server"] = "sites"
    heads: Literal["averaged", "per_site"] = "averaged"

    @field_validator("local_epochs")
    @classmethod
    def _whole_or_one_kth(cls, v: int | float) -> int | float:
        check_local_epochs(v)
        return v

    @property
    def tasks(self) -> list[TaskSpec]:
        """The catalogue as task specs."""
        return [t.spec() for t in self.catalogue]

    @classmethod
    def for_round(cls, cfg: FederationConfig, round_: int, lr: float = 0.0) -> Instruction:
        return cls(
            round=round_, num_rounds=cfg.rounds, lr=lr, local_epochs=cfg.local_epochs,
            fingerprint=run_fingerprint(cfg), model=cfg.model, train=cfg.train,
            catalogue=cfg.catalogue, transfer=cfg.transfer, prox_mu=cfg.prox_mu,
            keep_optimizer=cfg.keep_site_optimizer, head_refit=cfg.head_refit,
            shared_weighting=cfg.shared_weighting, teacher=cfg.teacher, heads=cfg.heads,
        )

    def to_config(self) -> dict[str, str | int]:
        """The ConfigRecord content: the instruction as JSON, and its round for the logs."""
        return {INSTRUCTION: self.model_dump_json(), "round": self.round}

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> Instruction:
        """Inverse of :meth:`to_config`.

        Raises:
            InstructionError: No instruction, a version this code does not know, or a value
                that does not validate; the message names the field.
        """
        raw = c.get(INSTRUCTION)
        if not isinstance(raw, str):
            raise InstructionError(
                f"the message carries no {INSTRUCTION!r} (keys: {sorted(c)}): the server runs "
                "another version of this software; run the same version on both sides")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InstructionError(f"instruction: not JSON ({e})") from None
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, int) or not 1 <= version <= INSTRUCTION_VERSION:
            raise InstructionError(
                f"instruction version {version!r}: this site understands versions 1 to "
                f"{INSTRUCTION_VERSION}; update it to the server's version")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InstructionError(format_validation_error(e, "instruction")) from None
