"""What becomes of each reply: read, checked, weighed, folded into an aggregator, audited.

:class:`TrainFold` handles one training round's replies, :class:`Collect` those collected
once at the end (teachers, calibrated heads). The round policy (:mod:`server.loop`) decides
what is asked and when; these only need the :class:`Federation` they report to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from flwr.app import Message

from ark_core.fed.aggregate import Aggregator, UpdateRejected
from ark_core.fed.audit import tensors_sha256
from ark_core.fed.caps import Bounded, ExampleCaps
from ark_core.fed.federation import FederationConfig
from ark_core.fed.protocol import ARRAYS
from ark_core.fed.robust import update_norm
from ark_core.fed.sketch import UpdateSketch
from ark_core.fed.step_norm import StepNormalised, steps_of
from ark_core.fed.transfer import declared_encoding
from server.audit import ServerAudit
from server.downlink import Downlink
from server.exchange import Exchange, Reply

log = logging.getLogger("flwr.ark.server")


class Federation(Protocol):
    """What a fold reads of the run (:class:`server.loop.ArkFederation`)."""

    cfg: FederationConfig
    exchange: Exchange
    audit: ServerAudit
    caps: ExampleCaps | None
    normaliser: StepNormalised | None  # step_normalisation: the sites' steps go here
    downlink: Downlink | None  # transfer.downlink bf16/int8: who holds the reference

    def capped_weights(self, r: Reply) -> Bounded: ...

    def shared_weight(self, w: Bounded) -> float: ...

    def head_weights(self, w: Bounded) -> dict[str, float]: ...


class Collect:
    """Replies collected once at the end (teachers, calibrated heads).

    Each is read, weighed by its (capped) example counts, folded in as plain fp32 tensors,
    audited and logged.

    Args:
        fed: The federation.
        kind: The audit and metrics kind (``query``, ``calibrate``).
        what: What a reply holds, for log lines.
        state: The tensors sent (or the master the replies' norms are measured against).
        agg: Where the replies are folded in.
        role: Which model they belong to (``student``, ``teacher``), for the metrics lines.
    """

    def __init__(self, fed: Federation, kind: str, what: str, state: Mapping[str, torch.Tensor],
                 agg: Aggregator, role: str | None = None) -> None:
        self.fed, self.kind, self.what, self.state, self.agg = fed, kind, what, state, agg
        self.extra = {"role": role} if role else {}
        self.sha = tensors_sha256(state)
        self.lines: list[dict] = []

    def __call__(self, msg: Message, node: int) -> None:
        fed, arrived, r, w = self.fed, time.time(), None, None
        rounds = fed.cfg.rounds
        try:
            r = fed.exchange.read(msg, node)
            if r.arrays is None:
                raise ValueError(f"node {r.node_id}: {self.kind} reply without '{ARRAYS}'")
            w = fed.capped_weights(r)  # these travel once, as fp32, whatever the transfer
            self.agg.add(r.site, r.update(self.state, "fp32"), w.num_examples,
                         fed.head_weights(w))
        except (ValueError, UpdateRejected) as e:
            log.warning("%s not used: %s", self.what, e)
            fed.audit.update(rounds, self.kind, site=r.site if r else fed.exchange.site_of(node),
                             node_id=node, arrived=arrived, nbytes=r.nbytes if r else 0,
                             norm=None, accepted=False, reason=str(e), master_sha256=self.sha)
            return
        fed.audit.update(rounds, self.kind, site=r.site, node_id=r.node_id, arrived=arrived,
                         nbytes=r.nbytes, norm=update_norm(r.arrays, self.state), accepted=True,
                         master_sha256=self.sha, clipped=w.clipped or None)
        self.lines.append({"round": rounds, "kind": self.kind, **self.extra, "site": r.site,
                           "node_id": r.node_id, **r.metrics})


class TrainFold:
    """One training round's replies: read, checked, weighed, folded in, and logged.

    Each reply is checked against what its site was sent, weighed by its (capped) example
    counts, folded into the aggregator, and written to the audit log and metrics lines.
    """

    def __init__(self, fed: Federation, round_: int, state: Mapping[str, torch.Tensor],
                 agg: Aggregator) -> None:
        self.fed, self.round, self.state, self.agg = fed, round_, state, agg
        self.expected = fed.cfg.transfer.encoding
        self.sketch = UpdateSketch(state, seed=round_)  # how alike the sites' updates are
        self.lines: list[dict] = []
        self.clipped: dict[str, dict] = {}
        self.weights: dict[str, float] = {}  # site -> shared weight, where not its examples

    def __call__(self, msg: Message, node: int) -> None:
        arrived = time.time()
        try:
            r = self.fed.exchange.read(msg, node)
            if r.arrays is None:
                raise ValueError(f"node {r.node_id}: train reply without '{ARRAYS}'")
        except ValueError as e:
            log.warning("round %d: reply rejected: %s", self.round, e)
            self.fed.audit.update(self.round, "train", site=self.fed.exchange.site_of(node),
                                  node_id=node, arrived=arrived, nbytes=0, norm=None,
                                  accepted=False, reason=str(e))
            return
        if self.fed.downlink is not None:  # it rebuilt this round's reference before training
            self.fed.downlink.rebuilt(node, tuple(self.fed.exchange.sent.get(node, ([], ""))[0]))
        update = r.update(self.state, self.expected)
        try:
            self._fold(r, update)
            accepted, reason = True, ""
        except UpdateRejected as e:
            accepted, reason = False, str(e)
            self.agg.report.rejected.setdefault(r.site, reason)
            log.warning("round %d: update of site %s (node %d) REJECTED, master unchanged by "
                        "it: %s", self.round, r.site, r.node_id, e)
        self._record(r, update, arrived, accepted, reason)

    def _fold(self, r: Reply, update: Mapping[str, Any]) -> None:
        exchange = self.fed.exchange
        sent_tasks = exchange.sent.get(r.node_id, ([], ""))[0]
        if sorted(r.tasks) != sent_tasks:
            if self.fed.cfg.shared_weighting == "tasks":  # asked again, with its counts
                exchange.node_sites.pop(r.node_id, None)
            else:
                exchange.node_sites[r.node_id] = (r.site, r.tasks)  # next round sends those heads
            raise UpdateRejected(f"declares tasks {r.tasks}, but was sent the heads of "
                                 f"{sent_tasks}")
        missing = [t for t in r.tasks if f"num-examples.{t}" not in r.metrics]
        if missing:
            raise UpdateRejected(f"no example counts for tasks {missing}")
        w = self.fed.capped_weights(r)
        shared = self.fed.shared_weight(w)
        if self.fed.normaliser is not None:
            self.fed.normaliser.expect(r.site, steps_of(r.metrics, r.tasks))
        self.agg.add(r.site, update, shared, self.fed.head_weights(w))
        if shared != w.num_examples:
            self.weights[r.site] = shared
        self.sketch.add(r.site, update)
        if self.fed.caps is not None:
            self.fed.caps.accept(r.site, w)
        if w.clipped:
            self.clipped[r.site] = w.clipped
            log.warning("round %d: site %s claims more examples than its cap; clipped "
                        "({key: [claimed, used]}): %s", self.round, r.site, w.clipped)
        log.info("round %d: update of site %s (node %d) folded in: %s", self.round, r.site,
                 r.node_id, _losses(r.metrics))

    def _record(self, r: Reply, update: Mapping[str, Any], arrived: float, accepted: bool,
                reason: str) -> None:
        norm = self.agg.norms.get(r.site)
        if accepted and norm is None:
            norm = update_norm(update, self.state)
        encoding = declared_encoding(r.manifest)
        self.fed.audit.update(self.round, "train", site=r.site, node_id=r.node_id,
                              arrived=arrived, norm=norm, accepted=accepted,
                              reason=reason, master_sha256=self.fed.exchange.sent.get(
                                  r.node_id, ([], ""))[1],
                              nbytes=r.nbytes, encoding=encoding, clipped=self.clipped.get(r.site))
        self.lines.append({"round": self.round, "kind": "train", "site": r.site,
                           "node_id": r.node_id, "accepted": accepted,
                           **({"reason": reason} if reason else {}), "bytes": r.nbytes,
                           **({"update_norm": norm} if norm is not None else {}),
                           **({"shared_weight": self.weights[r.site]}
                              if r.site in self.weights else {}),
                           "encoding": encoding, **r.metrics})


def _losses(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss."))

