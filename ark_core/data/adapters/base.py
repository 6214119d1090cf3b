"""What every dataset adapter shares: the contract, label policies and careful CSV reading.

An adapter reads one public release in its own layout and exposes, like TorchXRayVision's
datasets, ``pathologies`` (its label names), ``labels`` (targets before any override) and
row-aligned ``paths``, ``patient_ids`` and ``meta``. ``meta["split"]`` holds the release's
official split per image (``train``/``val``/``test``, or ``""`` where it has none); where a
release records them, ``meta`` has ``view`` (PA/AP/LATERAL), ``sex`` (M/F) and ``age``
in those shared spellings (:mod:`..harmonise`).
"""

from __future__ import annotations

import csv
import gzip
import posixpath
import zlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ...config import ConfigError, format_validation_error
from ...tasks import TaskSpec, TaskType
from ..harmonise import normalise_meta
from ..manifest import Manifest
from .table import Table, TableBuilder, read_columns

Uncertain = Literal["lsr-ones", "ones", "zeros", "ignore"]
LSR_ONES_RANGE = (0.55, 0.85)


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message names the file and line."""


class AdapterOptions(BaseModel):
    """Base of every adapter's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def where(path: Path, line: int | None = None) -> str:
    """``path:line`` as an editor shows it (1-based)."""
    return f"{path}:{line}" if line else str(path)


def not_utf8(path: Path) -> DatasetError:
    """The error for a label file that is not UTF-8, naming its first bad line and byte."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return DatasetError(f"{path}: not UTF-8 (it is UTF-16, by its byte-order mark): "
                            "re-save as UTF-8")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return DatasetError(f"{where(path, line)}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                            f"{column} of the line): re-save as UTF-8")
    return DatasetError(f"{path}: not UTF-8: re-save as UTF-8")


def read_text(path: Path) -> str:
    """A text label file (UTF-8, optionally gzipped); any other encoding raises naming the line.

    Raises:
        DatasetError: The file is missing or not UTF-8.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt gzip file ({e}): download it again") \
            from None


def read_csv(
    path: Path, required: list[str] | tuple[str, ...] = (), delimiter: str = ","
) -> tuple[list[str], Table]:
    """Read a CSV (optionally gzipped) into ``(header, table)``, held as columns.

    Iterating the table yields ``(line, row)`` with the record's 1-based line number and a
    read-only mapping of stripped values, as the dict-per-row reader did. Blank lines are
    skipped; fields past the header's count must be empty.

    Args:
        path: The file.
        required: Columns that must be present.
        delimiter: Field separator.

    Returns:
        The header and its :class:`~.table.Table`.

    Raises:
        DatasetError: When the file is missing or not UTF-8, a column is missing or a row
            has fewer fields than the header (or extra non-empty ones).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        parsed = read_columns(path, delimiter)
        if parsed is None:
            return _read_rows(path, required, delimiter)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt gzip file ({e}): download it again") \
            from None
    _check_columns(path, parsed[0], required)
    return parsed


def _check_columns(path: Path, header: list[str], required: list[str] | tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{where(path, 1)}: missing column(s) {missing}; the header has {header}")


def _read_rows(path: Path, required: list[str] | tuple[str, ...], delimiter: str
               ) -> tuple[list[str], Table]:
    """Python's csv module reads the files Arrow does not take (see :func:`.table.read_columns`)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader, [])]
            _check_columns(path, header, required)
            n = len(header)
            rows = TableBuilder(header)
            for fields in reader:
                if not fields:
                    continue
                if len(fields) < n or any(x.strip() for x in fields[n:]):
                    raise DatasetError(
                        f"{where(path, reader.line_num)}: expected {n} fields as in the header, "
                        f"got {len(fields)}"
                    )
                rows.append(reader.line_num, [x.strip() for x in fields[:n]])
        except csv.Error as e:
            raise DatasetError(f"{where(path, reader.line_num)}: {e}") from None
    return header, rows.finish()


def find_file(root: Path, names: list[str]) -> Path | None:
    """The first of ``names`` (relative to ``root``) that exists, else None."""
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def safe_relpath(rel: str, source: Path, line: int | None) -> str:
    """Normalise a path from a list file; refuse absolute paths and ones that leave the root.

    Args:
        rel: The path as written in the list.
        source: The list file (for the message).
        line: The line in ``source``.

    Returns:
        The normalised posix path relative to the dataset root.
    """
    p = rel.replace("\\", "/")
    norm = posixpath.normpath(p)
    if not p or p.startswith("/") or (len(p) > 1 and p[1] == ":") or norm.startswith(".."):
        raise DatasetError(
            f"{where(source, line)}: image path {rel!r} is absolute or leaves the dataset root"
        )
    return norm


_CELL = {"": float("nan"), "1": 1.0, "0": 0.0, "-1": -1.0, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0}


def parse_label_value(value: str, column: str, source: Path, line: int) -> float:
    """A CheXpert-style cell: 1/0/-1 (or 1.0/0.0/-1.0) or blank (-> NaN)."""
    x = _CELL.get(value.strip())
    if x is None:
        raise DatasetError(
            f"{where(source, line)}: column {column!r} has value {value!r}; expected 1, 0, -1 or blank"
        )
    return x


def apply_uncertain(values: np.ndarray, policy: Uncertain, seed: int, salt: str) -> np.ndarray:
    """Replace uncertain (-1) cells by the policy's value.

    ``lsr-ones`` draws one value per cell, once, uniformly in [0.55, 0.85] from a generator
    seeded by ``seed`` and ``salt`` (the dataset), so a manifest is reproducible; ``ones``
    and ``zeros`` map to 1 or 0; ``ignore`` to NaN (masked out of the loss).

    Args:
        values: Float (N, C) array with -1 marking uncertain cells.
        policy: The policy.
        seed: Seed of the LSR-Ones draw.
        salt: Distinguishes datasets sharing a seed.

    Returns:
        A new array without -1 cells.
    """
    out = np.array(values, dtype=np.float32)
    mask = out == -1
    if policy == "lsr-ones":
        rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
        draw = rng.uniform(*LSR_ONES_RANGE, size=out.shape).astype(np.float32)
        out[mask] = draw[mask]
    else:
        out[mask] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    return out


def labeler_targets(rows: list[list[float]], n_labels: int) -> np.ndarray:
    """(N, C) targets of CheXpert-labeler rows: blank (not mentioned) counts as negative."""
    labels = np.array(rows, dtype=np.float32).reshape(-1, n_labels)
    return np.nan_to_num(labels, nan=0.0)


class Adapter:
    """One public chest X-ray release read from its own files.

    Subclasses set ``name``, ``Options``, ``default_uncertain``, their task (``fixed_labels`` and
    ``fixed_task_type``, or ``default_labels`` / ``default_task_type`` where it depends on the
    options) and implement ``_read``, which fills ``paths``, ``labels``, ``patient_ids`` and
    ``meta``. Multi-label ``labels`` may contain -1 for uncertain cells; the base applies the
    uncertainty policy.

    Args:
        root: The release's root directory.
        options: Adapter options (a mapping or the ``Options`` model).
        uncertain: Policy for uncertain labels (None: the adapter's default).
        seed: Seed of the LSR-Ones draw.
    """

    name: ClassVar[str]
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    default_uncertain: ClassVar[Uncertain] = "ignore"
    fixed_labels: ClassVar[tuple[str, ...]] = ()
    fixed_task_type: ClassVar[TaskType] = TaskType.MULTILABEL
    # The releases whose films this one's rows name in meta["twins"] (..twins): twin keys
    # of two releases can only meet where these overlap.
    twin_releases: ClassVar[frozenset[str]] = frozenset()

    pathologies: tuple[str, ...]
    labels: np.ndarray
    paths: list[str]
    patient_ids: list[str]
    meta: dict[str, list]

    def __init__(
        self,
        root: str | Path,
        options: dict[str, Any] | AdapterOptions | None = None,
        uncertain: Uncertain | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.options = self.parse_options(options)
        self.uncertain: Uncertain = uncertain or self.default_uncertain
        self.seed = seed
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root of {self.name!r} not found")
        self.pathologies = tuple(self.default_labels(self.options))
        self.task_type = self.default_task_type(self.options)
        self.meta = {}
        self._read()
        if self.task_type is not TaskType.MULTICLASS:
            self.labels = apply_uncertain(self.labels, self.uncertain, seed, self.name)
        self.meta.setdefault("split", [""] * len(self.paths))
        normalise_meta(self.meta)

    @classmethod
    def parse_options(cls, options: dict[str, Any] | AdapterOptions | None) -> AdapterOptions:
        """Validate options; errors name the adapter and the field."""
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"options of dataset {cls.name!r}")) from None

    @classmethod
    def default_labels(cls, options: AdapterOptions) -> tuple[str, ...]:
        if not cls.fixed_labels:
            raise NotImplementedError
        return cls.fixed_labels

    @classmethod
    def default_task_type(cls, options: AdapterOptions) -> TaskType:
        return cls.fixed_task_type

    @classmethod
    def default_spec(cls, name: str, options: AdapterOptions) -> TaskSpec:
        """The task this adapter yields without overrides."""
        return TaskSpec(name, cls.default_labels(options), cls.default_task_type(options))

    def _read(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.paths)

    def to_manifest(self, spec: TaskSpec) -> Manifest:
        """A manifest for ``spec``: the adapter's labels selected, reordered or converted.

        Multi-label columns are picked by name; a multi-class source becomes one-hot for a
        multi-label/binary spec (e.g. RSNA's "Lung Opacity" as a binary task); a multi-label
        source becomes multi-class where exactly one of the chosen labels is 1 (else -1).
        """
        unknown = [lab for lab in spec.labels if lab not in self.pathologies]
        if unknown:
            raise ConfigError(
                f"task {spec.name!r}: label(s) {unknown} are not in dataset {self.name!r}, "
                f"which has {list(self.pathologies)}"
            )
        cols = [self.pathologies.index(lab) for lab in spec.labels]
        if self.task_type is TaskType.MULTICLASS:
            src = np.asarray(self.labels, dtype=np.int64)
            if spec.task_type is TaskType.MULTICLASS:
                remap = np.full(len(self.pathologies) + 1, -1, dtype=np.int64)
                remap[cols] = np.arange(len(cols))
                targets = remap[src]  # -1 indexes the last slot, which stays -1
            else:
                onehot = np.zeros((len(src), len(self.pathologies)), dtype=np.float32)
                onehot[src >= 0, src[src >= 0]] = 1.0
                onehot[src < 0] = np.nan
                targets = onehot[:, cols]
        else:
            sub = np.asarray(self.labels, dtype=np.float32)[:, cols]
            if spec.task_type is TaskType.MULTICLASS:
                one = (sub == 1).sum(1) == 1
                one &= ((sub == 1) | (sub == 0)).all(1)
                targets = np.where(one, np.argmax(sub == 1, axis=1), -1)
            else:
                targets = sub
        return Manifest(
            task=spec,
            root=self.root,
            paths=list(self.paths),
            targets=targets,
            patient_ids=list(self.patient_ids),
            meta={k: list(v) for k, v in self.meta.items()},
        )


class TwoOrThreeClasses(Adapter):
    """An adapter whose ``options.classes`` picks a binary task (2) or a 3-way multi-class one (3).

    Subclasses set ``binary_labels`` and ``three_class_labels`` and give their ``Options`` a
    ``classes`` field.
    """

    binary_labels: ClassVar[tuple[str, ...]]
    three_class_labels: ClassVar[tuple[str, ...]]

    @classmethod
    def default_labels(cls, options: AdapterOptions) -> tuple[str, ...]:
        return cls.three_class_labels if options.classes == 3 else cls.binary_labels

    @classmethod
    def default_task_type(cls, options: AdapterOptions) -> TaskType:
        return TaskType.MULTICLASS if options.classes == 3 else TaskType.BINARY

    def _set_labels(self, labels: list) -> None:
        """Class indices (3 classes) or one float column (binary)."""
        three = self.options.classes == 3
        self.labels = np.array(labels, dtype=np.int64 if three else np.float32)
        if not three:
            self.labels = self.labels.reshape(-1, 1)
