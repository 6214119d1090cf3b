"""Configuration a person writes: pydantic models and YAML loading.

Every model forbids unknown keys. A YAML error or a validation error becomes a
``ConfigError`` whose message names the file, the line (where it can be found) and the
field path, e.g. ``site.yaml:12: tasks.0.uncertain: Input should be 'lsr-ones', ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .tasks import TaskSpec, TaskType


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Shorthand(Strict):
    """A section that may be written as one bare value of its main field (``transfer: bf16``)."""

    shorthand: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _from_bare_value(cls, data: Any) -> Any:
        return {cls.shorthand: data} if isinstance(data, str) else data


def require_unique(items: list, what: str) -> list:
    """``items`` unchanged, or a ValueError naming the repeated ``.name``s."""
    names = [x.name for x in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique, repeated: {dup}")
    return items


# ----------------------------------------------------------------------------- model
# Presets give the architecture of the paper's models; any field set next to a preset
# overrides it.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Ark+ (Nature 2025): Swin-L at 768, window 12, linear projector to 1376.
    "ark_plus": {
        "backbone": "swin_large_patch4_window12_384",
        "img_size": 768,
        "work_size": 896,
        "projector": "linear",
        "projector_dim": 1376,
        "backbone_kwargs": {"window_size": 12},
    },
    # Ark (MICCAI 2023): Swin-B at 224, MLP projector to 1376.
    "ark": {
        "backbone": "swin_base_patch4_window7_224",
        "img_size": 224,
        "work_size": 256,
        "projector": "mlp",
        "projector_dim": 1376,
        "backbone_kwargs": {},
    },
    # A tiny Swin for CPU tests and the embedded demo.
    "tiny": {
        "backbone": "swin_tiny_patch4_window7_224",
        "img_size": 64,
        "work_size": 72,
        "projector": "linear",
        "projector_dim": 64,
        "backbone_kwargs": {
            "window_size": 4,
            "embed_dim": 32,
            "depths": [2, 2, 2, 2],
            "num_heads": [1, 2, 4, 8],
        },
    },
}


class ModelConfig(Strict):
    """The network: timm backbone -> projector -> one head per task."""

    preset: Literal["ark_plus", "ark", "tiny"] | None = Field(
        None, description="Fill the architecture from a paper preset; other fields override it."
    )
    backbone: str = Field(
        "swin_large_patch4_window12_384", description="timm model name of the backbone."
    )
    img_size: int = Field(768, gt=0, description="Network input size (square).")
    work_size: int | None = Field(
        None, gt=0, description="Images are first resized to this (default: img_size * 7/6)."
    )
    projector: Literal["linear", "mlp", "none"] = Field(
        "linear", description="Ark+ uses one Linear; Ark used Linear-ReLU-Linear."
    )
    projector_dim: int = Field(1376, gt=0, description="Embedding size (projector output).")
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model keywords (window_size, ...)."
    )
    init: str = Field(
        "random",
        description="'random', 'imagenet' (timm pretrained weights, needs network), or a path to "
        "a model file (.safetensors) or a released Ark checkpoint (.pth.tar).",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        # Only well-typed values are merged; anything else is left for validation to report.
        if isinstance(data, dict) and isinstance(data.get("preset"), str):
            preset = MODEL_PRESETS.get(data["preset"])
            if preset is not None:
                merged = {**preset, **data}
                extra = data.get("backbone_kwargs", {})
                if isinstance(extra, dict):
                    merged["backbone_kwargs"] = {**preset.get("backbone_kwargs", {}), **extra}
                return merged
        return data

    @property
    def resolved_work_size(self) -> int:
        return self.work_size or int(round(self.img_size * 7 / 6))


# ----------------------------------------------------------------------------- tasks
class SplitConfig(Strict):
    """Patient-disjoint split, deterministic in ``seed``; official splits win where they exist."""

    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of patients for validation.")
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of patients for test when there is no official test."
    )
    seed: int = Field(0, description="Seed of the patient hash that assigns splits.")
    use_official: bool = Field(True, description="Use the dataset's official split files.")
    exclude_from_test: Path | None = Field(
        None, description="Another copy of this dataset in the same layout (e.g. a subset drawn "
        "from this release): its patients never go to test, and test takes a larger share of the "
        "other patients so that it still holds test_fraction of all of them.",
    )
    official_conflicts: Literal["error", "drop"] = Field(
        "error", description="A patient whose images the official split puts in more than one "
        "split: 'error' names them; 'drop' leaves them out and logs how many.",
    )
    twins: Literal["error", "drop"] = Field(
        "error", description="A training or validation film whose film or patient is a test "
        "film of a release read beside it (ChestX-ray14, RSNA, COVIDx share films): 'error' "
        "names both; 'drop' leaves it out of training and logs how many.",
    )


class PartitionConfig(Strict):
    """Which share of a task a site holds in a simulation."""

    method: Literal["iid", "dirichlet"] = Field("iid", description="How patients are dealt out.")
    num_sites: int = Field(gt=0, description="Number of parts the task is split into.")
    site: int = Field(ge=0, description="Which part (0-based) this site holds.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (label skew).")
    seed: int = Field(0, description="Seed of the partition.")

    @model_validator(mode="after")
    def _site_in_range(self) -> PartitionConfig:
        if self.site >= self.num_sites:
            raise ValueError(f"site {self.site} out of range for num_sites {self.num_sites}")
        return self


class TaskConfig(Strict):
    """One task: a dataset in its public layout and how its labels are read."""

    name: str = Field(description="Task name (the head's key); unique in a config.")
    dataset: str = Field(
        description="Adapter: chestxray14, chexpert, mimic_cxr, cxr_lt, rsna_pneumonia, vindr_cxr, "
        "shenzhen, pediatric_pneumonia, covidx, siim_acr, tbx11k, node21 or csv."
    )
    root: Path = Field(description="Dataset root directory (relative paths resolve against the "
                       "config file's directory or the data root).")
    labels: list[str] | None = Field(None, description="Override the adapter's label list.")
    task_type: TaskType | None = Field(None, description="Override the adapter's task type.")
    uncertain: Literal["lsr-ones", "ones", "zeros", "ignore"] | None = Field(
        None, description="Policy for uncertain (-1) labels; default: the adapter's (paper's)."
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_images: int | None = Field(
        None, gt=0, description="Keep at most this many images (whole patients, seeded)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Adapter-specific options (see the adapter's docs)."
    )
    partition: PartitionConfig | None = Field(
        None, description="Simulations: hold only this site's patient-disjoint share of the task."
    )
    views: list[Literal["PA", "AP", "LATERAL"]] | None = Field(
        None, min_length=1, description="Keep only films of these views (datasets that "
        "record the view: chestxray14, chexpert, mimic_cxr, rsna_pneumonia with its DICOM "
        "header dump, pediatric_pneumonia, csv with view_column).",
    )


# ----------------------------------------------------------------------------- training
TRAIN_OPTIONS_ADDED = {"task_order": "fixed", "optimizer_reset": "never", "long_tail": "none",
                       "long_tail_tau": 1.0, "long_tail_beta": 0.999}
"""Training options added after runs were made, with their defaults: a run's fingerprint
leaves them out at these values, so that runs made before them resume."""


def drop_added_defaults(train: dict) -> None:
    """Remove from a dumped TrainConfig the added options that hold their defaults."""
    for option, default in TRAIN_OPTIONS_ADDED.items():
        if train.get(option) == default:
            train.pop(option)


def drop_added_task_defaults(task: dict) -> None:
    """Remove from a dumped TaskConfig the added options that hold their defaults."""
    if task.get("views", 0) is None:
        task.pop("views")
    for option in ("official_conflicts", "twins"):
        if task.get("split", {}).get(option) == "error":
            task["split"].pop(option)


class TrainConfig(Strict):
    """Optimisation and the teacher-student schedule."""

    optimizer: Literal["sgd", "adamw"] = Field(
        "adamw", description="'sgd' is SGD with Nesterov momentum 0.9 as in the paper."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate after warm-up.")
    min_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine.")
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs (or rounds).")
    epochs: int = Field(10, gt=0, description="Passes over all tasks (centralized run).")
    batch_size: int = Field(32, gt=0)
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    ema_m0: float = Field(0.9, ge=0, lt=1, description="Initial teacher momentum m0.")
    lam_max: float = Field(0.5, ge=0, le=1, description="Final consistency weight.")
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="'auto' uses bf16 autocast on GPUs that support it."
    )
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm.")
    task_order: Literal["fixed", "rotating"] = Field(
        "fixed", description="fixed: every pass trains the tasks in the same order, so the last "
        "one leaves the strongest mark; rotating: each pass starts one task later than the one "
        "before (the pass count is the schedule position, so rounds rotate too).",
    )
    optimizer_reset: Literal["never", "every_task"] = Field(
        "never", description="every_task: clear the optimiser's state (momentum, moments) before "
        "each task-epoch, so that momentum built on one task's loss does not move the shared "
        "weights while the next task trains; never: one state across tasks.",
    )
    long_tail: Literal["none", "logit_adjust", "class_balanced"] = Field(
        "none", description="none: the method's loss; logit_adjust: add tau * log(p / (1 - p)) "
        "(cross-entropy: tau * log(p)) of each label's positive rate p in the site's training "
        "split to the logits of the training loss (Menon et al., ICLR 2021); class_balanced: "
        "weigh each label by (1 - beta) / (1 - beta ** positives), normalised to mean 1 (Cui "
        "et al., CVPR 2019).",
    )
    long_tail_tau: float = Field(1.0, gt=0, description="Logit-adjustment temperature tau.")
    long_tail_beta: float = Field(0.999, gt=0, lt=1, description="Class-balanced beta.")
    bad_file_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop when more than this share of files is unreadable."
    )
    seed: int = 0
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads.")
    channels_last: bool = Field(
        True, description="Keep images and convolution weights in NHWC on CUDA (faster with AMP)."
    )
    compile: bool = Field(
        False, description="torch.compile the student and teacher on CUDA (minutes of start-up; "
        "pays off over long epochs)."
    )
    grad_checkpointing: bool = Field(
        False, description="Recompute the backbone's activations in the backward pass: less GPU "
        "memory (larger batches) for about a third more compute."
    )
    cache_dir: Path | None = Field(
        None, description="Read images from `ark cache` copies under this directory where they "
        "are current (the sources otherwise); a relative path is relative to the data root."
    )

    def with_paths_under(self, data_root: Path) -> TrainConfig:
        """This config with a relative ``cache_dir`` resolved against ``data_root``."""
        if self.cache_dir is None or self.cache_dir.is_absolute():
            return self
        return self.model_copy(update={"cache_dir": resolve_path(self.cache_dir, data_root)})


class ArkConfig(Strict):
    """A centralized Ark+ run (``ark train CONFIG``)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: Path = Field(Path("runs/centralized"), description="Run directory.")
    data_root: Path | None = Field(
        None, description="Relative task roots resolve against this (default: the config's dir)."
    )

    @model_validator(mode="after")
    def _unique_task_names(self) -> ArkConfig:
        require_unique(self.tasks, "task")
        return self


# ----------------------------------------------------------------------------- loading
M = TypeVar("M", bound=BaseModel)


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _loc_part(x: object) -> str:
    """A field path component as written, or JSON-quoted where it would not read back."""
    text = str(x)
    plain = (text and text == text.strip() and text.isprintable()
             and not any(c in text for c in '.:"'))
    return text if plain else json.dumps(text)


def format_validation_error(err: ValidationError, source: str, text: str | None = None) -> str:
    """One line per problem: ``source:line: field.path: message``."""
    key_lines = _key_lines(text) if text else {}
    out = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"])
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in key_lines:
                line = key_lines[loc[:n]]
                break
        where = f"{source}:{line}" if line else source
        field = ".".join(_loc_part(x) for x in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{where}: {field}: {msg}")
    return "\n".join(out)


def parse_config(data: Any, cls: type[M], source: str = "<config>", text: str | None = None) -> M:
    """Validate a mapping into ``cls``; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, text)) from None


def load_yaml(path: str | Path) -> tuple[Any, str]:
    """Read a YAML file; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        problem = " ".join(str(problem).split()).replace(' in "<unicode string>",', "")
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: file is empty")
    return data, text


def load_config(path: str | Path, cls: type[M] = ArkConfig) -> M:  # type: ignore[assignment]
    """Load and validate a YAML config file into ``cls``.

    Relative ``root``/``data_root``/``output_dir`` paths are kept as written; callers resolve
    them with :func:`resolve_path` against the file's directory.
    """
    data, text = load_yaml(path)
    return parse_config(data, cls, source=str(path), text=text)


def resolve_path(p: Path, base: Path) -> Path:
    """``p`` if absolute, else ``base / p`` (never the working directory)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (Path(base) / p)


def task_spec_of(cfg: TaskConfig, default: TaskSpec) -> TaskSpec:
    """The task spec a config describes: the adapter's default with overrides applied."""
    return TaskSpec(
        name=cfg.name,
        labels=tuple(cfg.labels) if cfg.labels else default.labels,
        task_type=cfg.task_type or default.task_type,
    )
