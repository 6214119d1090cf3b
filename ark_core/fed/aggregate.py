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
    "Wrapper",
    "as_tensor",
    "check_no_state",
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
    """Numpy-style dtype name of a numpy array or torch tensor."""
    dt = value.dtype
    if isinstance(dt, torch.dtype):
        return str(dt).removeprefix("torch.")
    return np.dtype(dt).name


def as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A CPU tensor of a torch tensor or numpy array (a view where it can be)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    with warnings.catch_warnings():  # a read-only view: nothing here writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))


def float_state(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state dict: what sites and the server exchange."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    return {k: v for k, v in state.items() if torch.is_floating_point(v)}


class UpdateValidator:
    """Checks a site's update against the master and the site's declared tasks.

    Args:
        master: The master's float tensors (every catalogue task's head).
        heads_only: A head-only round: updates hold the heads of their tasks and nothing of
            the shared backbone and projector.
    """

    def __init__(self, master: Mapping[str, Any], *, heads_only: bool = False) -> None:
        self.specs = {k: TensorSpec(tuple(v.shape), _dtype_name(v)) for k, v in master.items()}
        self.tasks = {t for k in self.specs if (t := head_task(k)) is not None}
        self.heads_only = heads_only

    def expected(self, tasks: Iterable[str]) -> dict[str, TensorSpec]:
        """Tensors an update of a site training ``tasks`` must hold, exactly."""
        tasks = set(tasks)
        unknown = sorted(tasks - self.tasks)
        if unknown:
            raise UpdateRejected(
                f"declares tasks {unknown} that are not in the catalogue {sorted(self.tasks)}"
            )
        groups = tasks if self.heads_only else {None, *tasks}
        return {k: s for k, s in self.specs.items() if head_task(k) in groups}

    def check(self, update: Mapping[str, Any], tasks: Iterable[str], *, values: bool = True) -> None:
        """Raise :class:`UpdateRejected` with the reason if ``update`` is not acceptable.

        Args:
            update: Tensor name -> torch tensor or numpy array, read one at a time (a view
                that decodes on access is fine); or an encoded reply
                (:class:`ark_core.fed.transfer.EncodedUpdate`), whose payloads are checked
                against its declared encodings instead of the master's dtypes.
            tasks: The tasks the site declares it trained.
            values: Also check that every value is finite.
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
        for name, spec in expected.items():
            x = update[name]
            shape, dtype = tuple(x.shape), _dtype_name(x)
            if shape != spec.shape:
                raise UpdateRejected(f"{name}: shape {list(shape)}, expected {list(spec.shape)}")
            if dtype != spec.dtype:
                raise UpdateRejected(f"{name}: dtype {dtype}, expected {spec.dtype}")
            # A sum is NaN/Inf iff a value is, or the values are too large to sum (~1e38, no
            # model's weights): one read pass at add speed, no mask as large as the tensor.
            x = as_tensor(x)
            if values and not torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32))):
                raise UpdateRejected(f"{name}: holds NaN or Inf values (or sums past 1e38)")


@dataclass
class AggregateReport:
    """Who contributed to what in one aggregation.

    Attributes:
        contributors: Group (``"shared"`` or a task name) -> sites whose update was folded in.
        weights: Same keys -> total weight (examples) behind the average.
        rejected: Site -> reason its update was rejected.
        kept: Tensors nobody sent, which keep the master's values.
        accepted: Sites whose update was folded in, in arrival order.
        noise_std: Group -> std of the Gaussian noise added (differential privacy only).
    """

    contributors: dict[str, list[str]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    noise_std: dict[str, float] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """Sites whose update was accepted, in arrival order."""
        return list(self.accepted)


@runtime_checkable
class Aggregator(Protocol):
    """An aggregation strategy, as the round loop uses it, one object for the whole run.

    Every strategy (weighted mean, norm-bounded mean, median, trimmed mean, DP) starts each
    round with :meth:`begin_round`, validates an update when it is added, folds it in (or
    holds it) reading one tensor at a time, and reports who contributed to what. What it
    carries from round to round (a server optimiser's moments, say) is in :meth:`state_dict`,
    which the run directory checkpoints with the master so that a resumed run continues it.
    """

    report: AggregateReport
    norms: Mapping[str, float]  # site -> norm of its update's difference, where measured

    @property
    def num_accepted(self) -> int: ...

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        """Start a round against ``master``'s float tensors; forget the last round's replies.

        ``heads_only``: updates hold their tasks' heads only; the shared parts keep
        ``master``'s values.
        """

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        """Validate and fold in (or hold) one site's update, reading one tensor at a time.

        Raises:
            UpdateRejected: With the reason; the round's result is as if it never came.
        """

    def result(self) -> dict[str, torch.Tensor]:
        """The new master's float tensors (the master's dtypes)."""

    def apply(self, model: nn.Module) -> None:
        """Load :meth:`result` into ``model`` (integer buffers stay as they are)."""

    def nbytes(self) -> int:
        """Bytes of tensors the aggregator holds now (running sums, held updates, state)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What carries over to the next round (empty for a stateless strategy)."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from :meth:`state_dict` of an earlier run (raises on foreign keys)."""


class Wrapper:
    """Base of strategies that post-process an inner one's result.

    Server optimisers and step normalisation: the inner strategy validates, folds and
    reports; subclasses implement :meth:`step` (and :meth:`add` where they change weights).
    """

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner
        self._result: dict[str, torch.Tensor] | None = None

    @property
    def report(self) -> AggregateReport:
        return self.inner.report

    @property
    def norms(self) -> Mapping[str, float]:
        return self.inner.norms

    @property
    def num_accepted(self) -> int:
        return self.inner.num_accepted

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        self.master = master
        self.inner.begin_round(master, heads_only=heads_only)
        self._result = None

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        self.inner.add(site, update, num_examples, task_examples)

    def step(self, name: str, d: torch.Tensor) -> torch.Tensor:
        """The master's step for tensor ``name`` given the aggregate's ``d = a - x`` (fp32)."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        """The master plus each tensor's :meth:`step` (master dtypes), computed once a round.

        Tensors nobody sent keep the master's values and take no step.
        """
        if self._result is not None:
            return self._result
        aggregate = self.inner.result()
        kept = set(self.inner.report.kept)
        out: dict[str, torch.Tensor] = {}
        for name, ref in self.master.items():
            if name in kept:
                out[name] = aggregate[name]
                continue
            x = ref.detach().cpu().float()
            out[name] = (x + self.step(name, aggregate[name].float() - x)).to(ref.dtype)
        self._result = out
        return out

    def apply(self, model: nn.Module) -> None:
        model.load_state_dict(self.result(), strict=False)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


def check_no_state(strategy: str, state: Mapping[str, Any]) -> None:
    """``load_state_dict`` of a stateless strategy: only an empty state belongs to it."""
    if state:
        raise ValueError(f"{strategy} keeps no state across rounds, got {sorted(state)[:5]}")


class StreamingAggregator:
    """Folds sites' updates in one at a time into fp32 running sums, then divides.

    Stateless across rounds. Tensors no accepted update holds keep the master's values, and
    the result keeps the master's dtypes.

    Args:
        master: Begin the first round against these float tensors (else call
            :meth:`begin_round`).
        heads_only: That first round is a head-only round.
    """

    def __init__(self, master: Mapping[str, torch.Tensor] | None = None, *,
                 heads_only: bool = False) -> None:
        self.norms: dict[str, float] = {}  # the plain mean does not measure them
        self.report = AggregateReport()
        self._sums: dict[str, torch.Tensor] = {}
        self._result: dict[str, torch.Tensor] | None = None
        if master is not None:
            self.begin_round(master, heads_only=heads_only)

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        self.master = master
        self.validator = UpdateValidator(master, heads_only=heads_only)
        self._sums, self._weights = {}, {}
        self.report = AggregateReport()
        self._result = None

    @property
    def num_accepted(self) -> int:
        return len(self.report.accepted)

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
            update: Tensor name -> tensor (see :meth:`UpdateValidator.check`); read, not kept.
            num_examples: Weight of the shared tensors (the site's examples this round).
            task_examples: Task -> weight of that task's head; the keys are the site's
                declared tasks.

        Raises:
            UpdateRejected: With the reason; the running sums are unchanged.
        """
        if self._result is not None:
            raise RuntimeError("this round is already averaged: call begin_round first")
        try:
            if site in self.report.accepted:
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
            self._fold(name, as_tensor(update[name]), w)
        self._credit(site, num_examples, task_examples)

    def _fold(self, name: str, x: torch.Tensor, weight: float) -> None:
        """Add one tensor of one update, weighted, to its fp32 running sum."""
        x = x.to(torch.float32)
        acc = self._sums.get(name)
        if acc is None:
            self._sums[name] = x * weight
        else:
            acc.add_(x, alpha=weight)
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def _credit(self, site: str, num_examples: float, task_examples: Mapping[str, float]) -> None:
        self.report.accepted.append(site)
        groups = {} if self.validator.heads_only else {SHARED: float(num_examples)}
        groups.update({t: float(w) for t, w in task_examples.items() if w > 0})
        for g, w in groups.items():
            self.report.contributors.setdefault(g, []).append(site)
            self.report.weights[g] = self.report.weights.get(g, 0.0) + w

    def apply(self, model: nn.Module) -> None:
        model.load_state_dict(self.result(), strict=False)

    def nbytes(self) -> int:
        held = self._sums.values() if self._result is None else self._result.values()
        return sum(t.numel() * t.element_size() for t in held)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_no_state(type(self).__name__, state)

    def result(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (master dtypes); also fills ``report.kept``.

        The sums are divided in place and handed over (no second model-sized allocation);
        the round is then closed: later calls return the same result.
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
