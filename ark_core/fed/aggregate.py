"""Task-aware federated averaging of Ark+ students (and teachers), one update at a time.

Every site sends the float tensors of its model: the shared parts (backbone, projector) and
the heads of its own tasks (``heads.<task>.*``). Each tensor is averaged over the sites that
sent it, weighted by examples: shared tensors by the site's total examples, a head by the
site's examples of that task. Updates are checked first (names, shapes, dtypes, finite
values); a rejected update leaves the result untouched. The aggregator keeps one fp32 running
sum per tensor, so memory stays at about one model beside the master whatever the number of
sites; tensors nobody sent keep the master's values.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "AggregateReport",
    "Aggregator",
    "StreamingAggregator",
    "TensorSpec",
    "UpdateRejected",
    "UpdateValidator",
    "as_numpy",
    "as_tensor",
    "float_state",
    "head_task",
]

SHARED = "shared"  # contributor group of the backbone and projector tensors


class UpdateRejected(ValueError):
    """A site's update failed validation; the message is the reason."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype name (numpy spelling, e.g. ``float32``) a tensor must have."""

    shape: tuple[int, ...]
    dtype: str


def head_task(name: str) -> str | None:
    """The task a tensor belongs to (``heads.<task>.weight`` -> ``task``), else None."""
    if name.startswith("heads."):
        task, _, rest = name[len("heads."):].rpartition(".")
        return task or None if rest else None
    return None


def _dtype_name(value: Any) -> str:
    """Numpy-style dtype name of a numpy array, torch tensor or Flower ``Array``."""
    dt = value.dtype
    if isinstance(dt, torch.dtype):
        return str(dt).removeprefix("torch.")
    return np.dtype(dt).name


def as_tensor(value: Any) -> torch.Tensor:
    """A CPU tensor view of a numpy array, torch tensor or anything with ``.numpy()``.

    A Flower ``Array`` holding a serialised numpy array is viewed in place (no copy): it is
    only read, and decoding a 745 MiB model twice per reply would cost more than averaging it.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    value = as_numpy(value)
    with warnings.catch_warnings():  # a read-only view: nothing here writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(value))


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array, or a read-only view of an array-like's payload (a Flower ``Array``)."""
    if isinstance(value, np.ndarray):
        return value
    return _npy_view(value) if _is_npy(value) else value.numpy()


def _is_npy(value: Any) -> bool:
    return getattr(value, "stype", None) == "numpy.ndarray" and isinstance(
        getattr(value, "data", None), bytes
    )


def _npy_view(value: Any) -> np.ndarray:
    """A read-only array over the bytes of an ``.npy`` payload (what Flower's Array holds)."""
    buf = io.BytesIO(value.data)
    major, _ = np.lib.format.read_magic(buf)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise UpdateRejected("array of Python objects")
    count = int(np.prod(shape))
    arr = np.frombuffer(value.data, dtype=dtype, count=count, offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def float_state(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state dict: what sites and the server exchange."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    return {k: v for k, v in state.items() if torch.is_floating_point(v)}


def _decode(name: str, value: Any, spec: TensorSpec) -> torch.Tensor:
    """The tensor a payload decodes to; UpdateRejected if it does not decode to ``spec``.

    A Flower ``Array`` declares its dtype and shape beside bytes that may say otherwise.
    """
    try:
        x = as_tensor(value)
    except UpdateRejected:
        raise
    except Exception as e:  # noqa: BLE001 - a forged payload fails in the decoder, any way
        raise UpdateRejected(f"{name}: payload does not decode ({type(e).__name__})") from None
    if tuple(x.shape) != spec.shape or _dtype_name(x) != spec.dtype:
        raise UpdateRejected(f"{name}: payload holds {_dtype_name(x)} {list(x.shape)}, not the "
                             f"declared {spec.dtype} {list(spec.shape)}")
    return x


class UpdateValidator:
    """Checks a site's update against the master and the site's declared tasks.

    Args:
        master: The master's float tensors (every catalogue task's head).
    """

    def __init__(self, master: Mapping[str, Any]) -> None:
        self.specs = {k: TensorSpec(tuple(v.shape), _dtype_name(v)) for k, v in master.items()}
        self.tasks = {t for k in self.specs if (t := head_task(k)) is not None}

    def expected(self, tasks: Iterable[str]) -> dict[str, TensorSpec]:
        """Tensors an update of a site training ``tasks`` must hold, exactly."""
        tasks = set(tasks)
        unknown = sorted(tasks - self.tasks)
        if unknown:
            raise UpdateRejected(
                f"declares tasks {unknown} that are not in the catalogue {sorted(self.tasks)}"
            )
        return {k: s for k, s in self.specs.items() if head_task(k) in (None, *tasks)}

    def check(self, update: Mapping[str, Any], tasks: Iterable[str], *, values: bool = True) -> None:
        """Raise :class:`UpdateRejected` with the reason if ``update`` is not acceptable.

        Args:
            update: Tensor name -> numpy array, torch tensor or Flower ``Array``; or an
                encoded reply (:class:`ark_core.fed.transfer.EncodedUpdate`), whose payloads
                are checked against its declared encodings instead of the master's dtypes.
            tasks: The tasks the site declares it trained.
            values: Also check that every value is finite (decodes each tensor once).
        """
        expected = self.expected(tasks)
        extra = sorted(set(update) - set(expected))
        if extra:
            raise UpdateRejected(f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
        missing = sorted(set(expected) - set(update))
        if missing:
            raise UpdateRejected(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        check_encoding = getattr(update, "check_encoding", None)
        if check_encoding is not None:  # ark_core.fed.transfer.EncodedUpdate: wire dtypes declared
            check_encoding(expected)
        else:
            for name, spec in expected.items():
                v = update[name]
                shape, dtype = tuple(v.shape), _dtype_name(v)
                if shape != spec.shape:
                    raise UpdateRejected(f"{name}: shape {list(shape)}, expected {list(spec.shape)}")
                if dtype != spec.dtype:
                    raise UpdateRejected(f"{name}: dtype {dtype}, expected {spec.dtype}")
        if values:
            for name in expected:
                # A sum is NaN/Inf iff a value is, or the values are too large to sum (~1e38,
                # no model's weights): one read pass at add speed, no mask as large as the tensor.
                x = _decode(name, update[name], expected[name])
                if not torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32))):
                    raise UpdateRejected(f"{name}: holds NaN or Inf values (or sums past 1e38)")


@dataclass
class AggregateReport:
    """Who contributed to what in one aggregation.

    Attributes:
        contributors: Group (``"shared"`` or a task name) -> sites whose update was folded in.
        weights: Same keys -> total weight (examples) behind the average.
        rejected: Site -> reason its update was rejected.
        kept: Tensors nobody sent, which keep the master's values.
    """

    contributors: dict[str, list[str]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """Sites whose update was accepted, in arrival order."""
        return list(self.contributors.get(SHARED, []))


@runtime_checkable
class Aggregator(Protocol):
    """One round's aggregation strategy, as the round loop uses it.

    Every strategy (weighted mean, norm-bounded mean, median, trimmed mean, DP) validates an
    update when it is added, folds or holds it, and reports who contributed to what.
    """

    report: AggregateReport
    norms: Mapping[str, float]  # site -> norm of its update's difference, where measured

    @property
    def num_accepted(self) -> int: ...

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        """Validate and fold in (or hold) one site's update; raise UpdateRejected if invalid."""

    def result(self) -> dict[str, torch.Tensor]:
        """The new master's float tensors (the master's dtypes)."""

    def apply(self, model: nn.Module) -> None:
        """Load :meth:`result` into ``model`` (integer buffers stay as they are)."""

    def nbytes(self) -> int:
        """Bytes of tensors the aggregator holds now (running sums, held updates)."""


class StreamingAggregator:
    """Folds sites' updates in one at a time into fp32 running sums, then divides.

    Args:
        master: The master's float tensors; the result keeps their dtypes, and tensors no
            accepted update holds keep their values.
    """

    def __init__(self, master: Mapping[str, torch.Tensor]) -> None:
        self.master = master
        self.validator = UpdateValidator(master)
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self.report = AggregateReport()
        self.norms: dict[str, float] = {}  # the plain mean does not measure them
        self._result: dict[str, torch.Tensor] | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.report.sites)

    def add(
        self,
        site: str,
        update: Mapping[str, Any],
        num_examples: float,
        task_examples: Mapping[str, float],
    ) -> None:
        """Validate ``update`` and fold it in; on rejection nothing changes and it raises.

        Args:
            site: The site's name (for the report).
            update: Tensor name -> array (see :meth:`UpdateValidator.check`); read, not kept.
            num_examples: Weight of the shared tensors (the site's examples this round).
            task_examples: Task -> weight of that task's head; the keys are the site's
                declared tasks.

        Raises:
            UpdateRejected: With the reason; the running sums are unchanged.
        """
        if self._result is not None:
            raise RuntimeError("this round is already averaged: start a new aggregator")
        try:
            if site in self.report.sites:
                raise UpdateRejected("sent a second update in the same round")
            if not np.isfinite(num_examples) or num_examples <= 0:
                raise UpdateRejected(f"num-examples is {num_examples}, expected > 0")
            bad = {t: w for t, w in task_examples.items() if not np.isfinite(w) or w < 0}
            if bad:
                raise UpdateRejected(f"invalid per-task examples {bad}")
            self.validator.check(update, task_examples)
        except UpdateRejected as e:
            self.report.rejected[site] = str(e)
            raise
        for name in self.validator.expected(task_examples):
            task = head_task(name)
            w = float(num_examples if task is None else task_examples[task])
            if w == 0:  # a declared task without examples this round: its head is untrained
                continue
            x = as_tensor(update[name]).to(torch.float32)
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = x * w
            else:
                acc.add_(x, alpha=w)
            self._weights[name] = self._weights.get(name, 0.0) + w
        groups = {SHARED: float(num_examples)}
        groups.update({t: float(w) for t, w in task_examples.items() if w > 0})
        for g, w in groups.items():
            self.report.contributors.setdefault(g, []).append(site)
            self.report.weights[g] = self.report.weights.get(g, 0.0) + w

    def apply(self, model: nn.Module) -> None:
        model.load_state_dict(self.result(), strict=False)

    def nbytes(self) -> int:
        held = self._sums.values() if self._result is None else self._result.values()
        return sum(t.numel() * t.element_size() for t in held)

    def result(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (master dtypes); also fills ``report.kept``.

        The sums are divided in place and handed over (no second model-sized allocation);
        the aggregator is then closed: later calls return the same result.
        """
        if self._result is not None:
            return self._result
        out: dict[str, torch.Tensor] = {}
        kept = []
        for name, ref in self.master.items():
            if name in self._sums:
                out[name] = self._sums.pop(name).div_(self._weights[name]).to(ref.dtype)
            else:
                out[name] = ref.detach().clone()
                kept.append(name)
        self.report.kept = kept
        self._result = out
        return out
