"""Head calibration: each task's head re-fitted on frozen embeddings of the site's own data.

Averaged heads can miss what the averaged backbone still encodes: the sites' heads drift
apart while the shared parts are pulled between tasks. Calibration keeps the backbone and
projector as they are, embeds the site's training images (whole images, no augmentation),
and fits each of its tasks' heads by L2-regularised logistic regression: one binary model
per label (multi-label, binary; uncertain labels left out), or a multinomial one
(multi-class). The fit runs on standardised embeddings and is folded back into the head's
weight and bias, so the result is an ordinary linear head on the raw embedding that the
server can average over the sites that own the task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.loaders import TaskData
from ..eval.downstream import embed
from ..model.network import ArkModel
from ..tasks import TaskSpec, TaskType

__all__ = ["fit_head", "fit_heads"]

ABSENT_LOGIT = -20.0
"""Bias of a class the site never saw: its probability stays ~2e-9 until others teach it."""


def _fit(x: np.ndarray, y: np.ndarray, c: float, standardise: bool
         ) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (K, D) and intercepts (K,) of a logistic regression, on raw ``x``."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - slow import, one use

    if standardise:
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
    else:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / scale, y)
    coef = clf.coef_ / scale
    return coef, clf.intercept_ - coef @ mean


def fit_head(z: np.ndarray, target: np.ndarray, spec: TaskSpec, current: torch.nn.Linear, *,
             c: float = 1.0, standardise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's weight (C, D) and bias (C,) fitted on embeddings ``z`` (N, D).

    ``standardise`` fits on standardised embeddings, which regularises every dimension alike
    (the best scores); off, the L2 penalty acts on the head's own weight, which keeps it as
    small as a head trained with weight decay: the start a head needs if it is to be trained
    on (standardising divides by the tiny spread of an untrained backbone's dimensions).

    A label with one value only gets a zero weight and that value's (clipped) log-odds; a
    label without any known value keeps ``current``'s row.
    """
    w = current.weight.detach().cpu().double().numpy().copy()
    b = current.bias.detach().cpu().double().numpy().copy()
    z = z.astype(np.float64)
    if spec.task_type is TaskType.MULTICLASS:
        ok = target >= 0
        classes = np.unique(target[ok]).astype(int)
        if len(classes) >= 2:
            coef, icpt = _fit(z[ok], target[ok].astype(int), c, standardise)
            if len(classes) == 2:  # sklearn's binary form: the log-odds of the second class
                coef, icpt = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
            w[:], b[:] = 0.0, ABSENT_LOGIT
            w[classes], b[classes] = coef, icpt
        elif len(classes) == 1:
            w[:], b[:] = 0.0, ABSENT_LOGIT
            b[classes[0]] = 0.0
    else:
        t = target.reshape(len(target), -1).astype(np.float64)
        for col in range(spec.num_outputs):
            ok = ~np.isnan(t[:, col])
            y = t[ok, col]
            if len(y) == 0:
                continue
            if 0 < y.sum() < len(y):
                coef, icpt = _fit(z[ok], y.astype(int), c, standardise)
                w[col], b[col] = coef[0], icpt[0]
            else:
                p = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
                w[col], b[col] = 0.0, np.log(p / (1 - p))
    dtype = current.weight.dtype
    return torch.from_numpy(w).to(dtype), torch.from_numpy(b).to(dtype)


def fit_heads(model: ArkModel, tasks: Sequence[TaskData], *, batch_size: int = 64,
              device: torch.device | str = "cpu", c: float = 1.0, standardise: bool = True,
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every task's head fitted on ``model``'s frozen embeddings of the task's training split.

    ``standardise``: see `fit_head`.

    Returns:
        ``heads.<task>.weight`` / ``.bias`` tensors, and the examples each fit saw
        (``num-examples.<task>`` and ``num-examples``), the weights of the average.
    """
    heads: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for td in tasks:
        name = td.spec.name
        e = embed(model, td.train, batch_size=batch_size, device=device)
        weight, bias = fit_head(e.embedding, e.target, td.spec, model.heads[name], c=c,
                                standardise=standardise)
        heads[f"heads.{name}.weight"], heads[f"heads.{name}.bias"] = weight, bias
        counts[f"num-examples.{name}"] = float(len(e.index))
    counts["num-examples"] = float(sum(counts.values()))
    return heads, counts
