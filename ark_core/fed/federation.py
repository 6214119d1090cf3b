"""Federation and site configuration, and the per-round schedule both sides agree on.

A federation YAML (the coordinator's) holds the model, the task catalogue (every task any
site may train, with its labels and type), the number of rounds and the training settings.
A site YAML holds the site's name, its tasks (datasets on its disk; each must be a catalogue
task with identical labels), its state directory and local overrides (batch size, workers,
device, threads). A simulation YAML is a federation YAML with a ``sites:`` list.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import (
    ModelConfig,
    Strict,
    TaskConfig,
    TrainConfig,
    drop_added_defaults,
    load_config,
    require_unique,
    resolve_path,
)
from ..schedule import lr_at
from ..tasks import TaskSpec, TaskType, check_same_labels
from .deployment import ServerDeployment, SiteDeployment
from .privacy import PrivacyConfig
from .robust import AggregationConfig
from .server_opt import ServerOptConfig
from .transfer import TransferConfig

__all__ = [
    "CatalogueTask",
    "FederationConfig",
    "SimulationConfig",
    "SiteConfig",
    "SiteTrainOverrides",
    "check_site_tasks",
    "ema_position",
    "round_lr",
    "run_fingerprint",
    "site_train_config",
]


class CatalogueTask(Strict):
    """One task of the federation's catalogue (the master holds a head for each)."""

    name: str = Field(description="Task name (the head's key).")
    labels: list[str] = Field(min_length=1, description="Label names in output order.")
    task_type: TaskType = Field(description="multilabel, binary or multiclass.")

    @model_validator(mode="after")
    def _valid_spec(self) -> CatalogueTask:
        self.spec()  # raises ValueError on a binary task with two labels, duplicates, ...
        return self

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, tuple(self.labels), self.task_type)


class FederationConfig(Strict):
    """A federated Ark+ run (the coordinator's YAML).

    ``train`` is read per round: ``lr``/``min_lr``/``warmup_epochs`` schedule the learning
    rate over rounds (``warmup_epochs`` = warm-up rounds); ``train.epochs`` is not used.
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    catalogue: list[CatalogueTask] = Field(min_length=1, description="Every task of the run.")
    rounds: int = Field(gt=0, description="Federated rounds.")
    local_epochs: int | float = Field(
        1, gt=0, description="Passes over the site's tasks per round; a fraction 1/k (0.5, "
        "0.25, ...) trains each task on the k-th part of an epoch each round, so that k rounds "
        "make one epoch (more, shorter rounds at the same compute).",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    min_sites: int = Field(1, gt=0, description="Valid replies a round needs.")
    round_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="How long a round waits for replies (Swin-L: hours)."
    )
    retries: int = Field(2, ge=0, description="Retries of a round with too few valid replies.")
    keep_rounds: int = Field(3, ge=1, description="Round checkpoints kept (besides round 0).")
    evaluate_every: int = Field(
        1, ge=0, description="Ask sites for validation AUC every N rounds (0: never)."
    )
    run_dir: Path = Field(Path("runs/federated"), description="The server's run directory.")
    deployment: ServerDeployment | None = Field(
        None, description="ark-server: port, server names, keys, sites allowed to join."
    )
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig,
        description="mean, median, trimmed_mean or norm_bounded (see ark_core.fed.robust).",
    )
    privacy: PrivacyConfig | None = Field(
        None, description="Differential privacy of the master (see ark_core.fed.privacy); with it "
        "on, the sites' teachers are not collected."
    )
    transfer: TransferConfig = Field(
        default_factory=TransferConfig,
        description="How sites send their students: dtype fp32/fp16/bf16/int8, delta (the "
        "difference from the master), error_feedback (see ark_core.fed.transfer).",
    )
    prox_mu: float = Field(
        0.0, ge=0, description="FedProx: weight mu of the proximal term (mu/2)||w - w_master||^2 "
        "in each site's local training (0: plain local training; the paper's range 1e-3 to 1).",
    )
    keep_site_optimizer: bool = Field(
        False, description="Each site keeps its optimiser state (momentum, moments) from round "
        "to round in its state directory, rolled back with its teacher when a round is "
        "replayed; off: a fresh optimiser every round.",
    )
    head_calibration: Literal["off", "final"] = Field(
        "final", description="final (the default, chosen on validation and confirmed on held-"
        "out test data, see the README): after the last round, the sites that own each task "
        "re-fit its head on frozen embeddings of their training images (the master student's "
        "and the master teacher's), and the server averages them (see "
        "ark_core.train.calibrate); off: the heads as averaged. With privacy the default is "
        "off (the fitted heads would not be privatised).",
    )
    head_refit: bool = Field(
        False, description="At the start of every round each site re-fits its own tasks' heads "
        "on the frozen master student's embeddings of its training images, then trains "
        "jointly from there (the start FedBABU and FedRep give a round: heads that fit the "
        "shared features); the heads then travel and are averaged as usual. Off: a round "
        "starts from the averaged heads.",
    )
    server_optimizer: ServerOptConfig | None = Field(
        None, description="fedavgm, fedadam or fedyogi on the aggregate's pseudo-gradient, any "
        "aggregation (see ark_core.fed.server_opt); none: the aggregate is the new master.",
    )
    heads: Literal["averaged", "per_site"] = Field(
        "averaged", description="averaged (the published method): each task's head is "
        "averaged over the sites that train it. per_site: every site keeps its own head of "
        "each of its tasks in its state directory, trained on from round to round and never "
        "sent (FedArk's heads); only the shared backbone and projector are averaged, and a "
        "site scores its own tasks with its own heads. The master's heads stay as initialised.",
    )
    teacher: Literal["sites", "server"] = Field(
        "sites", description="sites (the published method): each site keeps its own EMA "
        "teacher on its disk, and the master teacher is the average of the sites' teachers, "
        "collected once at the end. server: the server keeps an EMA of the master students "
        "(see ark_core.fed.server_teacher), sends it with every train message as the round's "
        "fixed consistency target, and delivers it as the master teacher; the sites keep none.",
    )
    shared_weighting: Literal["examples", "tasks", "sites"] = Field(
        "examples", description="How the sites' backbone and projector are weighted in the "
        "average. examples: by each site's examples this round; tasks: every task carries the "
        "same total weight, shared among its sites by their examples of it (see "
        "ark_core.fed.task_weights), so that the tasks with the most images do not set the "
        "shared features alone; sites: every site the same (1/K, as FedArk averages). Heads "
        "are weighted by their task's examples either way.",
    )
    step_normalisation: bool = Field(
        False, description="FedNova-style: each site's update counts per local optimiser step, "
        "and the average steps by the sites' mean step count, so that sites taking more local "
        "steps do not set the direction (see ark_core.fed.step_norm); off: plain FedAvg weights.",
    )

    @field_validator("local_epochs")
    @classmethod
    def _whole_or_one_kth(cls, v: int | float) -> int | float:
        check_local_epochs(v)
        return v

    @model_validator(mode="after")
    def _unique_tasks(self) -> FederationConfig:
        require_unique(self.catalogue, "catalogue task")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_default_calibration_with_privacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("privacy") is not None
                                       or data.get("heads") == "per_site"):
            data = {"head_calibration": "off", **data}  # asked for explicitly: refused below
        return data

    @model_validator(mode="after")
    def _calibration_without_privacy(self) -> FederationConfig:
        if self.privacy is not None and self.head_calibration != "off":
            raise ValueError(
                "head_calibration fits heads on the sites' data after the last noised round; "
                "those heads would not be privatised or accounted: turn one of them off")
        return self

    @model_validator(mode="after")
    def _kept_optimizer_is_not_reset(self) -> FederationConfig:
        if self.keep_site_optimizer and self.train.optimizer_reset != "never":
            raise ValueError(
                "keep_site_optimizer keeps the optimiser's state from round to round, and "
                f"train.optimizer_reset: {self.train.optimizer_reset} clears it before every "
                "task: the kept state would never be used; turn one of them off")
        return self

    @model_validator(mode="after")
    def _step_normalisation_without_privacy(self) -> FederationConfig:
        if self.privacy is not None and self.step_normalisation:
            raise ValueError(
                "step_normalisation reweighs and rescales the sites' updates after they are "
                "clipped, which the privacy accountant does not model: turn one of them off")
        return self

    @model_validator(mode="after")
    def _site_heads_are_not_averaged(self) -> FederationConfig:
        if self.heads == "per_site" and self.head_calibration != "off":
            raise ValueError(
                "head_calibration averages heads fitted at the sites into the master; with "
                "heads: per_site every site keeps its own: turn one of them off")
        return self

    @model_validator(mode="after")
    def _server_teacher_without_kept_optimizer(self) -> FederationConfig:
        if self.teacher == "server" and self.keep_site_optimizer:
            raise ValueError(
                "keep_site_optimizer stores the site's optimiser beside its teacher and rolls "
                "both back together when a round is replayed; with teacher: server the site "
                "keeps no teacher: turn one of them off")
        return self

    @model_validator(mode="after")
    def _task_weights_are_used(self) -> FederationConfig:
        if self.shared_weighting == "tasks" and self.privacy is not None:
            raise ValueError(
                "shared_weighting: tasks weighs the sites' updates, but privacy averages the "
                "clipped updates with equal weights (what its accountant models): turn one of "
                "them off")
        if self.shared_weighting == "tasks" and self.aggregation.method in ("median",
                                                                               "trimmed_mean"):
            raise ValueError(
                f"shared_weighting: tasks weighs the sites' updates, but aggregation "
                f"{self.aggregation.method!r} is coordinate-wise and unweighted: use mean or "
                "norm_bounded, or weigh by examples")
        return self

    @model_validator(mode="after")
    def _privacy_with_mean(self) -> FederationConfig:
        # The DP analysis holds for the clipped mean; a median's sensitivity is another story.
        if self.privacy is not None and self.aggregation.method != "mean":
            raise ValueError(
                f"privacy needs aggregation 'mean' (it clips to privacy.clip_norm itself), "
                f"not {self.aggregation.method!r}"
            )
        return self

    def task_specs(self) -> list[TaskSpec]:
        return [t.spec() for t in self.catalogue]


class SiteTrainOverrides(Strict):
    """What a site may choose for itself; unset fields keep the federation's values."""

    batch_size: int | None = Field(None, gt=0)
    workers: int | None = Field(None, ge=0)
    device: str | None = Field(None, description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads.")


class SiteConfig(Strict):
    """A hospital site: its tasks on local disk and where it keeps its teacher."""

    name: str = Field(min_length=1, description="Site name (appears in the server's logs).")
    tasks: list[TaskConfig] = Field(min_length=1)
    state_dir: Path | None = Field(
        None, description="Teacher store (default: 'state' beside the site YAML; in "
        "simulation: <run_dir>/sites/<name>)."
    )
    data_root: Path | None = Field(
        None, description="Relative task roots resolve against this (default: the YAML's dir)."
    )
    train: SiteTrainOverrides = Field(default_factory=SiteTrainOverrides)
    deployment: SiteDeployment | None = Field(
        None, description="ark-client: server address, CA certificate, private key, GPUs."
    )
    twin_tasks: list[TaskConfig] = Field(
        default_factory=list, description="Releases that share films with this site's tasks "
        "(e.g. ChestX-ray14 beside RSNA): no film or patient of their test splits is trained "
        "on here. A simulation adds the other sites' tasks itself.",
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        return require_unique(tasks, "task")


class SimulationConfig(FederationConfig):
    """A simulation on one node: the federation plus its sites (one per partition id)."""

    sites: list[SiteConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _sites_match_catalogue(self) -> SimulationConfig:
        require_unique(self.sites, "site")
        catalogue = {t.name: t for t in self.catalogue}
        for site in self.sites:
            for task in site.tasks:
                if task.name not in catalogue:
                    raise ValueError(
                        f"site {site.name!r}: task {task.name!r} is not in the catalogue "
                        f"{sorted(catalogue)}"
                    )
                # Labels left to the adapter are checked by the site once its data is read.
                if task.labels is not None:
                    cat = catalogue[task.name]
                    got = TaskSpec(task.name, tuple(task.labels), task.task_type or cat.task_type)
                    check_same_labels(cat.spec(), got, f"site {site.name!r}")
        return self

    def tasks_beside(self, index: int, base: Path) -> list[TaskConfig]:
        """The other sites' tasks, whole, roots absolute: site ``index``'s ``twin_tasks``."""
        out: dict[str, TaskConfig] = {}
        for i, site in enumerate(self.sites):
            if i == index:
                continue
            root = resolve_path(site.data_root, base) if site.data_root else base
            for t in site.tasks:
                whole = t.model_copy(update={"partition": None,
                                             "root": resolve_path(t.root, root)})
                out.setdefault(whole.model_dump_json(), whole)
        return list(out.values())

    def federation(self) -> FederationConfig:
        """The federation part (what the server fingerprints)."""
        return FederationConfig.model_validate(self.model_dump(exclude={"sites"}))


# Operational settings may change between restarts without changing the run.
_NOT_FINGERPRINTED = {
    "min_sites", "round_timeout_s", "retries", "keep_rounds", "evaluate_every", "run_dir", "sites",
    "deployment",
}  # fmt: skip


def run_fingerprint(cfg: FederationConfig) -> str:
    """Hash of what determines the run's result: model, catalogue, rounds, training."""
    d = cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)
    # Defaults leave the fingerprints of runs made before these options unchanged.
    for option in ("privacy", "server_optimizer"):
        if d.get(option) is None:
            d.pop(option, None)
    if d.get("head_calibration") == "off":
        d.pop("head_calibration")
    if d.get("prox_mu") == 0:
        d.pop("prox_mu")
    if d.get("keep_site_optimizer") is False:
        d.pop("keep_site_optimizer")
    if d.get("step_normalisation") is False:
        d.pop("step_normalisation")
    if d.get("head_refit") is False:
        d.pop("head_refit")
    if d.get("shared_weighting") == "examples":
        d.pop("shared_weighting")
    if d.get("teacher") == "sites":
        d.pop("teacher")
    if d.get("heads") == "averaged":
        d.pop("heads")
    if d.get("aggregation") == AggregationConfig().model_dump(mode="json"):
        d.pop("aggregation", None)
    if d.get("transfer") == TransferConfig().model_dump(mode="json"):
        d.pop("transfer", None)
    elif d.get("transfer", {}).get("downlink") == "fp32":
        d["transfer"].pop("downlink")
    d["train"].pop("workers", None)
    d["train"].pop("device", None)
    d["train"].pop("threads", None)
    drop_added_defaults(d["train"])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_site_tasks(site: str, specs: Sequence[TaskSpec], catalogue: Sequence[TaskSpec]) -> None:
    """Raise ``ValueError`` unless every site task is a catalogue task with the same labels."""
    by_name = {t.name: t for t in catalogue}
    for spec in specs:
        if spec.name not in by_name:
            raise ValueError(
                f"site {site!r}: task {spec.name!r} (labels {list(spec.labels)}) is not in the "
                f"federation's catalogue {sorted(by_name)}"
            )
        check_same_labels(by_name[spec.name], spec, f"site {site!r}")


def round_lr(train: TrainConfig, round_: int, num_rounds: int) -> float:
    """Learning rate of round ``round_`` (1-based): warm-up rounds, then cosine."""
    return lr_at(round_ - 1, num_rounds, train.lr, train.min_lr, train.warmup_epochs)


def check_local_epochs(v: float) -> None:
    """A whole number of passes, or one k-th of an epoch (k rounds tile an epoch)."""
    whole = v >= 1 and float(v).is_integer()
    if not whole and not (v < 1 and abs(1 / v - round(1 / v)) < 1e-9):
        raise ValueError(f"local_epochs {v}: a whole number of passes, or 1/k of an epoch "
                         "(0.5, 0.25, ...) so that k rounds make one epoch")


def round_passes(local_epochs: float) -> tuple[int, int]:
    """(passes over the tasks per round, rounds per epoch): (n, 1), or (1, k) for 1/k."""
    if local_epochs >= 1:
        return int(local_epochs), 1
    return 1, round(1 / local_epochs)


def ema_position(round_: int, num_rounds: int, local_epochs: float, num_tasks: int) -> tuple[int, int]:
    """A site's (EMA step before ``round_``, total EMA steps) over its own task-epochs.

    With 1/k of an epoch a round, a round's part of a task-epoch takes one EMA step.
    """
    per_round = round_passes(local_epochs)[0] * num_tasks
    return (round_ - 1) * per_round, num_rounds * per_round


def site_train_config(train: TrainConfig, overrides: SiteTrainOverrides) -> TrainConfig:
    """The federation's training settings with the site's local overrides applied."""
    return train.model_copy(update=overrides.model_dump(exclude_none=True))


def load_simulation(
    sim_config: str | Path, data_root: str | Path = "", run_dir: str | Path = ""
) -> tuple[SimulationConfig, Path, Path]:
    """Read a simulation YAML the way ``flwr run`` names it in the run config.

    Args:
        sim_config: The YAML's path; relative paths resolve against ``data_root`` if given.
        data_root: Directory relative data and output paths resolve against (default: the
            YAML's directory; never the working directory of the engine).
        run_dir: Overrides the YAML's ``run_dir``.

    Returns:
        The config, the directory relative task roots resolve against, the absolute run dir.
    """
    root = Path(data_root).expanduser() if str(data_root) else None
    path = Path(sim_config).expanduser()
    if root is not None and not path.is_absolute():
        path = root / path
    path = path.resolve()
    cfg = load_config(path, SimulationConfig)
    base = root.resolve() if root is not None else path.parent
    out = resolve_path(Path(run_dir) if str(run_dir) else cfg.run_dir, base).resolve()
    return cfg, base, out
