"""What the server and a site say to each other: record names and config/metric keys.

Framework-free: the Flower apps put these keys into ``ConfigRecord``/``MetricRecord`` and
the tensors into an ``ArrayRecord``.

Server -> site (``train``, ``evaluate``, ``query`` and ``query.tasks`` messages)
    ``arrays`` (ArrayRecord): the master student's shared float tensors (backbone,
    projector) and the heads of the receiving site's own tasks, no other head; absent in
    ``query`` and ``query.tasks``. The server learns a site's tasks from a ``query.tasks``
    message (answered with the ``site`` record alone) before it first sends it a master.
    ``config`` (ConfigRecord): see :class:`Instruction` (``round``, ``num-rounds``, ``lr``,
    ``local-epochs``, ``run-fingerprint``, ``model-config``, ``train-config``,
    ``catalogue``, ``transfer-config``; the last four are JSON strings).

Site -> server (replies)
    ``arrays`` (ArrayRecord): ``train``: the student's float tensors, shared parts and this
    site's heads only; ``query``: the site's teacher, same tensors. ``evaluate``: none.
    ``metrics`` (MetricRecord, numbers only): ``num-examples``, ``num-examples.<task>``,
    ``loss.<task>``, ... (train); ``<student|teacher>.auc.<task>`` (mean AUC),
    ``<student|teacher>.auc.<task>.<label>`` and ``num-examples.<task>`` (evaluate);
    ``teacher-round``, ``num-examples``, ``num-examples.<task>`` (query).
    ``site`` (ConfigRecord): ``name`` (str) and ``tasks`` (list of task names).
    ``encoding`` (ConfigRecord, train replies of a run whose transfer is not fp32 weights):
    ``{"arrays": <encoding>}``; ``scales`` (ArrayRecord, int8 only): tensor name -> float32
    scale. See :mod:`ark_core.transfer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import ModelConfig, TrainConfig
from .federation import CatalogueTask, FederationConfig, run_fingerprint
from .tasks import TaskSpec
from .transfer import TransferConfig

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
ENCODING = "encoding"
SCALES = "scales"
TASKS_QUERY = "query.tasks"  # message type: "which tasks do you train?"


@dataclass
class Instruction:
    """The schedule and settings a message carries to a site.

    Args:
        round: Current round (1-based; 0 for messages outside training).
        num_rounds: Rounds of the run.
        lr: This round's learning rate.
        local_epochs: Passes over the site's tasks per round.
        fingerprint: The run's fingerprint (keys the site's teacher store).
        model: The architecture.
        train: Training settings (the site applies its overrides).
        catalogue: Every task of the run.
        transfer: How the site encodes its train reply.
    """

    round: int
    num_rounds: int
    lr: float
    local_epochs: int
    fingerprint: str
    model: ModelConfig
    train: TrainConfig
    catalogue: list[TaskSpec]
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @classmethod
    def for_round(cls, cfg: FederationConfig, round_: int, lr: float = 0.0) -> Instruction:
        return cls(
            round=round_, num_rounds=cfg.rounds, lr=lr, local_epochs=cfg.local_epochs,
            fingerprint=run_fingerprint(cfg), model=cfg.model, train=cfg.train,
            catalogue=cfg.task_specs(), transfer=cfg.transfer,
        )

    def to_config(self) -> dict[str, int | float | str]:
        """Flat scalar mapping for a ConfigRecord."""
        return {
            "round": self.round,
            "num-rounds": self.num_rounds,
            "lr": float(self.lr),
            "local-epochs": self.local_epochs,
            "run-fingerprint": self.fingerprint,
            "model-config": self.model.model_dump_json(),
            "train-config": self.train.model_dump_json(),
            "catalogue": json.dumps([t.to_dict() for t in self.catalogue]),
            "transfer-config": self.transfer.model_dump_json(),
        }

    @classmethod
    def from_config(cls, c: dict) -> Instruction:
        """Inverse of :meth:`to_config`; raises ``KeyError``/``ValueError`` on a bad message."""
        return cls(
            round=int(c["round"]),
            num_rounds=int(c["num-rounds"]),
            lr=float(c["lr"]),
            local_epochs=int(c["local-epochs"]),
            fingerprint=str(c["run-fingerprint"]),
            model=ModelConfig.model_validate_json(c["model-config"]),
            train=TrainConfig.model_validate_json(c["train-config"]),
            catalogue=[CatalogueTask.model_validate(t).spec() for t in json.loads(c["catalogue"])],
            # A server from before the option sends none: plain fp32 weights.
            transfer=TransferConfig.model_validate_json(c.get("transfer-config") or "{}"),
        )
