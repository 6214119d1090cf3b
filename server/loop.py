"""The federated Ark+ round loop on a Flower ``Grid`` (push/pull, not ``Strategy.start``).

Each round the server sends the master student to every connected site in a ``train``
message: its shared tensors and the heads of that site's own tasks (the site says which in
its answer to a ``query.tasks`` message, sent once per node before its first master), and
the round's :class:`ark_core.fed.protocol.Instruction` (the round, the learning rate of warm-up
rounds then cosine, local epochs, the run's fingerprint that keys the site's teacher store,
the architecture, training settings, task catalogue, and how the site encodes its reply:
:mod:`ark_core.fed.transfer`). The master goes out in fp32; replies are decoded tensor by
tensor and summed in fp32. :mod:`server.exchange` does the Flower side (push, pull,
time-outs, who is connected and enrolled); this module decides the rounds.

In a deployment (a ``deployment:`` section) only the sites enrolled in the run directory
(:mod:`server.enrolment`) get messages, and a reply's site is the one its node id is
enrolled as: a connected node that is not enrolled is logged and gets no work, and a reply
that names another site is rejected as an impersonation attempt. The example counts that
weigh each update are clipped to the site's cap (:mod:`ark_core.fed.caps`).

Replies are validated and folded into running sums as they arrive
(:class:`ark_core.fed.aggregate.StreamingAggregator`; ``aggregation`` selects a robust rule of
:mod:`ark_core.fed.robust`, ``privacy`` the clipped, noised mean of :mod:`ark_core.fed.privacy`),
then dropped. Every master sent and every reply is logged in ``audit.jsonl``, and each train
reply's size (``bytes``: tensors, scales and manifest) and ``encoding`` also in its
``metrics.jsonl`` line. A round needs ``min_sites``
valid replies within ``round_timeout_s``; otherwise it is retried ``retries`` times and then
the run stops (:class:`FederationStopped`), the last master intact in the run directory.
After the last round the server asks every site once for its teacher (``query``) and averages
the teachers it receives into the master teacher; with ``privacy`` on it does not (the
teachers are not privatised) and writes ``privacy.json`` instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from ark_core.fed.aggregate import (
    Aggregator,
    StreamingAggregator,
    UpdateRejected,
    float_state,
)
from ark_core.fed.audit import tensors_sha256
from ark_core.fed.caps import Bounded, ExampleCaps
from ark_core.fed.federation import FederationConfig
from ark_core.fed.privacy import DPAggregator, privacy_report
from ark_core.fed.protocol import (
    ARRAYS,
    Instruction,
)
from ark_core.fed.robust import make_aggregator, update_norm
from ark_core.fed.server_opt import ServerOptimizer
from ark_core.fed.transfer import declared_encoding
from ark_core.model.factory import create_model
from ark_core.model.network import ArkModel, make_teacher
from ark_core.train.cyclic import seed_everything
from server.audit import ServerAudit, write_privacy
from server.exchange import Exchange, Reply
from server.liveness import PULSE, Pulse
from server.retry import RetryingGrid
from server.rundir import RunDir

log = logging.getLogger("flwr.ark.server")


class FederationStopped(RuntimeError):
    """A round could not gather enough valid replies; the run directory keeps the last master."""


class ArkFederation:
    """Federated Ark+ on a Grid, resumable from its run directory.

    Args:
        cfg: The federation config.
        run_dir: The run directory (created, or resumed if it holds this run).
        poll_interval: Seconds between pulls of replies.
        node_wait_s: How long to wait for ``min_sites`` sites to connect before a round
            (default: ``round_timeout_s``).
    """

    def __init__(
        self,
        cfg: FederationConfig,
        run_dir: str | Path,
        *,
        poll_interval: float = 1.0,
        node_wait_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = RunDir(run_dir, cfg)
        self.poll_interval = poll_interval
        self.node_wait_s = cfg.round_timeout_s if node_wait_s is None else node_wait_s
        self.audit = ServerAudit(self.run.path)
        self.exchange = Exchange(cfg, self.run.path, self.audit, poll_interval=poll_interval,
                                 node_wait_s=self.node_wait_s)
        # A deployment: the example counts that weigh updates are capped per site.
        # One aggregator for the run: what it carries across rounds is checkpointed per round.
        self.aggregator: Aggregator = (DPAggregator(None, cfg.privacy) if cfg.privacy
                                       else make_aggregator(None, cfg.aggregation))
        if cfg.server_optimizer is not None:
            self.aggregator = ServerOptimizer(self.aggregator, cfg.server_optimizer)
        dep = cfg.deployment
        self.caps = ExampleCaps({s.name: s.max_examples for s in dep.sites},
                                self.run.state.get("example_caps")) if dep else None

    # -- round policy ------------------------------------------------------------
    def capped_weights(self, r: Reply) -> Bounded:
        """The reply's example counts, clipped to the site's caps in a deployment."""
        tasks = {t: r.metrics.get(f"num-examples.{t}", 0.0) for t in r.tasks}
        num = r.metrics.get("num-examples", 0.0)
        return Bounded(num, tasks) if self.caps is None else self.caps.bound(r.site, num, tasks)

    # -- one training round ----------------------------------------------------------
    def train_round(self, grid: Grid, master: ArkModel, round_: int) -> dict | None:
        """Send, fold in, and (with enough valid replies) load the average into ``master``.

        Returns:
            The round's record for state.json, or None if the round failed.
        """
        state = float_state(master)
        ins = Instruction.for_round(self.cfg, round_, self.run.lr(round_))
        agg = self.aggregator
        agg.begin_round(state)
        fold = _TrainFold(self, round_, state, agg)
        sent = self.exchange.send(grid, MessageType.TRAIN, ins, round_, fold, state=state)
        lines, clipped = fold.lines, fold.clipped
        if agg.num_accepted < self.cfg.min_sites:
            log.warning("round %d: %d valid update(s) from %d site(s) asked, %d needed",
                        round_, agg.num_accepted, sent, self.cfg.min_sites)
            return None
        agg.apply(master)
        self.run.append_metrics(lines)
        rep = agg.report
        record = {"sites": rep.sites, "contributors": rep.contributors, "weights": rep.weights,
                  "rejected": rep.rejected, "kept": len(rep.kept)}
        if clipped:
            record["clipped"] = clipped
        if self.cfg.privacy is not None:
            record["privacy"] = {**privacy_report(self.cfg.privacy, round_),
                                 "noise_std": rep.noise_std}
            log.info("round %d: differential privacy (epsilon %s, delta %g)", round_,
                     record["privacy"]["epsilon"], self.cfg.privacy.delta)
        return record

    def evaluate_round(self, grid: Grid, master: ArkModel, round_: int) -> None:
        """Ask every site for validation AUC of the master student and its teacher; log it."""
        ins = Instruction.for_round(self.cfg, round_, self.run.lr(round_))
        lines: list[dict] = []

        def handle(msg: Message, node: int) -> None:
            try:
                r = self.exchange.read(msg, node)
            except ValueError as e:
                log.warning("round %d: evaluation failed: %s", round_, e)
                return
            for task in r.tasks:
                s, t = r.metrics.get(f"student.auc.{task}"), r.metrics.get(f"teacher.auc.{task}")
                log.info("round %d  site %-12s task %-16s AUC student %s  teacher %s",
                         round_, r.site, task, _fmt(s), _fmt(t))
            lines.append({"round": round_, "kind": "evaluate", "site": r.site,
                          "node_id": r.node_id, **r.metrics})

        self.exchange.send(grid, MessageType.EVALUATE, ins, round_, handle,
                       state=float_state(master))
        self.run.append_metrics(lines)

    def query_teachers(self, grid: Grid, master: ArkModel) -> tuple[ArkModel | None, list[str]]:
        """Collect each site's teacher once and average those received (heads by task)."""
        ins = Instruction.for_round(self.cfg, 0)
        state = float_state(master)
        agg = StreamingAggregator(state)
        sha = tensors_sha256(state)  # the master the teachers' norms are measured against
        lines: list[dict] = []

        def handle(msg: Message, node: int) -> None:
            arrived, r, w = time.time(), None, None
            try:
                r = self.exchange.read(msg, node)
                if r.arrays is None:
                    raise ValueError(f"node {r.node_id}: teacher reply without '{ARRAYS}'")
                # Teachers travel once, as plain fp32 weights, whatever the run's transfer.
                w = self.capped_weights(r)
                agg.add(r.site, r.update(state, "fp32"), w.num_examples, w.task_examples)
            except (ValueError, UpdateRejected) as e:
                log.warning("teacher not used: %s", e)
                self.audit.update(self.cfg.rounds, "query",
                                  site=r.site if r else self.exchange.site_of(node),
                                  node_id=node, arrived=arrived,
                                  nbytes=r.nbytes if r else 0, norm=None, accepted=False,
                                  reason=str(e), master_sha256=sha)
                return
            self.audit.update(self.cfg.rounds, "query", site=r.site, node_id=r.node_id,
                              arrived=arrived, nbytes=r.nbytes,
                              norm=update_norm(r.arrays, state), accepted=True,
                              master_sha256=sha, clipped=w.clipped or None)
            lines.append({"round": self.cfg.rounds, "kind": "query", "site": r.site,
                          "node_id": r.node_id, **r.metrics})

        self.exchange.send(grid, MessageType.QUERY, ins, self.cfg.rounds, handle)
        self.run.append_metrics(lines)
        if agg.num_accepted == 0:
            log.error("no site sent its teacher: no master teacher is written")
            return None, []
        teacher = make_teacher(master)
        agg.apply(teacher)
        return teacher, agg.report.sites

    # -- the run -------------------------------------------------------------------
    def _initial_master(self) -> ArkModel:
        if self.run.last_round >= 0:
            log.info("resuming %s after round %d", self.run.path, self.run.last_round)
            self.aggregator.load_state_dict(self.run.load_server_state())
            return self.run.load_master()
        seed_everything(self.cfg.train.seed)
        master = create_model(self.cfg.model, self.cfg.task_specs())
        self.run.commit_round(0, master, {"initial": True})
        return master

    def start(self, grid: Grid, *, max_rounds: int | None = None) -> RunDir:
        """Run (or continue) the federation to the end, or for ``max_rounds`` rounds more.

        Every SuperLink call is retried on passing failures (:class:`RetryingGrid`); the
        round's record counts those retries (``superlink_retries``).

        Raises:
            FederationStopped: A round failed ``1 + retries`` times.
        """
        dep = self.cfg.deployment
        if not isinstance(grid, RetryingGrid):
            grid = RetryingGrid(grid, give_up_s=dep.superlink_retry_s if dep else 600.0,
                                pulse=Pulse(self.run.path / PULSE) if dep else None)
        master = self._initial_master()
        first = self.run.last_round + 1
        last = self.cfg.rounds if max_rounds is None else min(self.cfg.rounds, first + max_rounds - 1)
        for r in range(first, last + 1):
            t0, retries = time.monotonic(), grid.retries
            for attempt in range(self.cfg.retries + 1):
                if attempt:
                    log.warning("round %d: retry %d of %d", r, attempt, self.cfg.retries)
                record = self.train_round(grid, master, r)
                if record is not None:
                    break
            else:
                raise FederationStopped(
                    f"round {r} did not get {self.cfg.min_sites} valid update(s) in "
                    f"{self.cfg.retries + 1} attempt(s); the run stops here. The master after "
                    f"round {r - 1} is in {self.run.round_path(r - 1)}; restarting with the same "
                    f"run directory continues at round {r}."
                )
            record["seconds"] = round(time.monotonic() - t0, 3)
            record["superlink_retries"] = grid.retries - retries
            if self.caps is not None:
                self.run.state["example_caps"] = self.caps.pinned
            self.run.commit_round(r, master, record, self.aggregator.state_dict())
            self.run.append_metrics([{"round": r, "kind": "round", "seconds": record["seconds"],
                                      "sites": len(record["sites"])}])
            log.info("round %d/%d done in %.1f s: sites %s", r, self.cfg.rounds, record["seconds"],
                     ", ".join(record["sites"]))
            every = self.cfg.evaluate_every
            if every and (r % every == 0 or r == self.cfg.rounds):
                self.evaluate_round(grid, master, r)
        if self.run.last_round == self.cfg.rounds and not self.run.finished:
            self._finish(grid, master)
        return self.run

    def _finish(self, grid: Grid, master: ArkModel) -> None:
        if self.cfg.privacy is None:
            teacher, teacher_sites = self.query_teachers(grid, master)
        else:  # teachers are not privatised: the noised master student is the delivered model
            teacher, teacher_sites = None, []
            write_privacy(self.run.path, {**privacy_report(self.cfg.privacy, self.cfg.rounds),
                                          "teachers_collected": False})
        hist = self.run.history()
        sites = sorted({s for rec in hist.values() for s in rec.get("sites", [])})
        tasks: dict[str, list[str]] = {}
        for rec in hist.values():
            for group, who in rec.get("contributors", {}).items():
                if group != "shared":
                    tasks.setdefault(group, [])
                    tasks[group] += [s for s in who if s not in tasks[group]]
        provenance = {"rounds": self.cfg.rounds, "sites": sites, "tasks": tasks,
                      "fingerprint": self.run.fingerprint, "teacher_sites": teacher_sites}
        self.run.finish(master, teacher, provenance)
        log.info("federation finished: %s (teachers of %s)", self.run.path,
                 ", ".join(teacher_sites) or "no site")


class _TrainFold:
    """One training round's replies: read, checked, weighed, folded in, and logged.

    Each reply is checked against what its site was sent, weighed by its (capped) example
    counts, folded into the aggregator, and written to the audit log and metrics lines.
    """

    def __init__(self, fed: ArkFederation, round_: int, state: Mapping[str, torch.Tensor],
                 agg: Aggregator) -> None:
        self.fed, self.round, self.state, self.agg = fed, round_, state, agg
        self.expected = fed.cfg.transfer.encoding
        self.lines: list[dict] = []
        self.clipped: dict[str, dict] = {}

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
            exchange.node_sites[r.node_id] = (r.site, r.tasks)  # next round sends those heads
            raise UpdateRejected(f"declares tasks {r.tasks}, but was sent the heads of "
                                 f"{sent_tasks}")
        missing = [t for t in r.tasks if f"num-examples.{t}" not in r.metrics]
        if missing:
            raise UpdateRejected(f"no example counts for tasks {missing}")
        w = self.fed.capped_weights(r)
        self.agg.add(r.site, update, w.num_examples, w.task_examples)
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
                           "encoding": encoding, **r.metrics})


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _losses(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss."))

