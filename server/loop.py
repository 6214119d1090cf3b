"""The federated Ark+ round loop on a Flower ``Grid`` (push/pull, not ``Strategy.start``).

Each round the server sends the master student to every connected site in a ``train``
message: its shared tensors and the heads of that site's own tasks (the site says which in
its answer to a ``query.tasks`` message, sent once per node before its first master). The
``config`` record carries (see :mod:`ark_core.protocol`):

- ``round``: the round (1-based); ``num-rounds``: rounds of the run;
- ``lr``: the round's learning rate (warm-up rounds, then cosine); the site's optimiser
  starts fresh every round at this rate;
- ``local-epochs``: passes over the site's tasks; each site derives its EMA momentum from
  its own rounds x local epochs x tasks;
- ``run-fingerprint``: keys the site's teacher store; ``model-config``, ``train-config``,
  ``catalogue``: JSON of the architecture, training settings and task catalogue;
- ``transfer-config``: how the site encodes its reply (``transfer``: fp16/bf16 weights, the
  difference from the master, int8 with error feedback; :mod:`ark_core.transfer`). The
  master goes out in fp32; replies are decoded tensor by tensor and summed in fp32.

In a deployment (a ``deployment:`` section) only the sites enrolled in the run directory
(:mod:`server.enrolment`) get messages, and a reply's site is the one its node id is
enrolled as: a connected node that is not enrolled is logged and gets no work, and a reply
that names another site is rejected as an impersonation attempt. The example counts that
weigh each update are clipped to the site's cap (:mod:`ark_core.caps`).

Replies are validated and folded into running sums as they arrive
(:class:`ark_core.aggregate.StreamingAggregator`; ``aggregation`` selects a robust rule of
:mod:`ark_core.robust`, ``privacy`` the clipped, noised mean of :mod:`ark_core.privacy`),
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ark_core.aggregate import (
    Aggregator,
    StreamingAggregator,
    UpdateRejected,
    float_state,
    head_task,
)
from ark_core.audit import tensors_sha256
from ark_core.caps import Bounded, ExampleCaps
from ark_core.factory import create_model
from ark_core.federation import FederationConfig
from ark_core.model import ArkModel, make_teacher
from ark_core.privacy import DPAggregator, privacy_report
from ark_core.protocol import (
    ARRAYS,
    CONFIG,
    ENCODING,
    METRICS,
    SCALES,
    SITE,
    TASKS_QUERY,
    Instruction,
)
from ark_core.robust import make_aggregator, update_norm
from ark_core.train import seed_everything
from ark_core.transfer import as_update, declared_encoding, payload_nbytes

from .audit import ServerAudit, write_privacy
from .enrolment import FILE as ENROLMENT_FILE
from .enrolment import enrolled_nodes
from .liveness import PULSE, Pulse
from .retry import RetryingGrid
from .rundir import RunDir

log = logging.getLogger("flwr.ark.server")


class FederationStopped(RuntimeError):
    """A round could not gather enough valid replies; the run directory keeps the last master."""


@dataclass
class Reply:
    """What the loop reads from one site's reply (its tensors stay in ``arrays``)."""

    node_id: int
    site: str
    tasks: list[str]
    metrics: dict[str, float]
    arrays: ArrayRecord | None
    manifest: dict | None = None  # of an encoded reply (ark_core.transfer)
    scales: ArrayRecord | None = None
    nbytes: int = 0

    def update(self, master: Mapping[str, torch.Tensor], expected: str) -> Mapping[str, Any]:
        """The tensors to fold in: the arrays, or a decoding view of an encoded reply."""
        return as_update(self.arrays, self.manifest, self.scales, master, expected)


class Impersonation(ValueError):
    """A reply names a site other than the one its node is enrolled as."""


def _read_reply(msg: Message, node: int, enrolled: Mapping[int, str] | None = None) -> Reply:
    """Parse the reply of ``node``; raises ``ValueError`` naming what is malformed.

    The node comes from the message id the reply answers: an error reply the SuperLink
    makes (a lost or expired message) names the SuperLink as its sender, not the site.
    With ``enrolled`` (a deployment), the site is the one ``node`` is enrolled as, and a
    reply that says otherwise raises :class:`Impersonation`.
    """
    if msg.has_error():
        raise ValueError(f"node {node} replied with an error: {msg.error.reason}")
    c = msg.content
    if METRICS not in c.metric_records or SITE not in c.config_records:
        raise ValueError(f"node {node}: reply lacks the '{METRICS}' or '{SITE}' record")
    site = c.config_records[SITE]
    name = str(site.get("name", f"node-{node}"))
    if enrolled is not None:
        if node not in enrolled:
            raise ValueError(f"node {node} is not enrolled (anymore)")
        if name != enrolled[node]:
            raise Impersonation(f"node {node} is enrolled as site {enrolled[node]}, but its reply "
                                f"says it is site {name!r}: impersonation attempt, reply rejected")
        name = enrolled[node]
    arrays, scales = c.array_records.get(ARRAYS), c.array_records.get(SCALES)
    manifest = dict(c.config_records[ENCODING]) if ENCODING in c.config_records else None
    return Reply(
        node_id=node,
        site=name,
        tasks=[str(t) for t in site.get("tasks", [])],
        metrics={k: float(v) for k, v in c.metric_records[METRICS].items()
                 if isinstance(v, int | float)},
        arrays=arrays, manifest=manifest, scales=scales,
        nbytes=payload_nbytes(arrays, scales, manifest),
    )


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
        # node id -> (site, tasks) as the site said (query.tasks or a reply); sent heads follow
        self.node_sites: dict[int, tuple[str, list[str]]] = {}
        # node id -> (sorted tasks whose heads it was sent, SHA-256 of that master part)
        self.sent: dict[int, tuple[list[str], str]] = {}
        # A deployment: node id -> enrolled site (re-read every exchange), and count caps.
        dep = cfg.deployment
        self.enrolled: dict[int, str] | None = {} if dep else None
        self.caps = ExampleCaps({s.name: s.max_examples for s in dep.sites},
                                self.run.state.get("example_caps")) if dep else None
        self._told: set[tuple[int, int]] = set()  # (round, node) of strangers already logged

    # -- messaging -----------------------------------------------------------------
    def _admitted(self, grid: Grid, round_: int) -> list[int]:
        """Connected nodes that may get work: all (simulation) or the enrolled ones.

        A connected node that is not enrolled is logged, once a round, in this log and in
        the audit log (``{"event": "stranger"}``), and gets nothing.
        """
        nodes = sorted(grid.get_node_ids())
        if self.enrolled is None:
            return nodes
        self.enrolled = enrolled_nodes(self.run.path)
        for n in nodes:
            if n not in self.enrolled and (round_, n) not in self._told:
                self._told.add((round_, n))
                log.warning("round %d: node %d is connected but not enrolled in %s: it gets no "
                            "work (unregister it on the coordinator: flwr supernode unregister "
                            "%d)", round_, n, self.run.path / ENROLMENT_FILE, n)
                self.audit.stranger(round_, n)
        return [n for n in nodes if n in self.enrolled]

    def _nodes(self, grid: Grid, round_: int) -> list[int]:
        """Connected sites: at least ``min_sites``, then any other listed site within a grace.

        In a deployment, once ``min_sites`` are connected the round waits up to
        ``deployment.site_wait_s`` more for every listed site: after a server restart sites
        come back one by one, with back-off, and a site that misses the push sits the round out.
        """
        dep = self.cfg.deployment
        listed = max(self.cfg.min_sites, len(dep.sites) if dep else 0)
        now = time.monotonic()
        deadline, grace_end = now + self.node_wait_s, None
        while True:
            nodes = self._admitted(grid, round_)
            now = time.monotonic()
            if len(nodes) >= listed or now >= deadline:
                self._report_absent(nodes, round_)
                return nodes
            if len(nodes) >= self.cfg.min_sites:
                grace_end = grace_end or now + (dep.site_wait_s if dep else 0.0)
                if now >= grace_end:
                    self._report_absent(nodes, round_)
                    return nodes
            time.sleep(self.poll_interval)

    def _report_absent(self, nodes: list[int], round_: int) -> None:
        """Warn about enrolled sites that are not connected (a deployment only)."""
        if self.enrolled is None:
            return
        if not self.enrolled:
            log.error("round %d: no site is enrolled: %s lists none (ark-server writes it when "
                      "it registers the sites' keys)", round_, self.run.path / ENROLMENT_FILE)
            return
        absent = sorted(s for n, s in self.enrolled.items() if n not in nodes)
        if absent and (round_, 0) not in self._told:
            self._told.add((round_, 0))
            log.warning("round %d: enrolled site(s) not connected: %s", round_, ", ".join(absent))

    def _weights(self, r: Reply) -> Bounded:
        """The reply's example counts, clipped to the site's caps in a deployment."""
        tasks = {t: r.metrics.get(f"num-examples.{t}", 0.0) for t in r.tasks}
        num = r.metrics.get("num-examples", 0.0)
        return Bounded(num, tasks) if self.caps is None else self.caps.bound(r.site, num, tasks)

    def _exchange(
        self,
        grid: Grid,
        kind: str,
        ins: Instruction,
        round_: int,
        handle: Callable[[Message, int], None],
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        nodes: list[int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send the instruction (and ``state``) to every site; ``handle(reply, node)`` each reply.

        With ``state``, each site gets the shared tensors and its own tasks' heads only (the
        method's rule); a site whose tasks are not known yet is asked first
        (:meth:`_site_tasks`). Memory stays flat in the number of sites: every tensor is
        serialised once and shared by all messages, released once pushed, and replies are
        pulled one message id at a time, so at most one is held while ``handle`` folds it in.

        Returns:
            The number of sites the message went to.
        """
        nodes = self._nodes(grid, round_) if nodes is None else nodes
        ttl = self.cfg.round_timeout_s
        if state is not None:
            known = self._site_tasks(grid, nodes, round_)
            nodes = [n for n in nodes if n in known]
        msgs = self._messages(kind, ins, round_, nodes, state)
        ids = list(grid.push_messages(msgs))  # in order; None (or nothing) where refused
        del msgs
        if len(ids) != len(nodes) or None in ids:
            log.error("%s round %d: the SuperLink took %d of %d messages (see its log)", kind,
                      round_, len([m for m in ids if m]), len(nodes))
        # message id -> node: error replies made by the SuperLink do not name the node
        pending = {m: n for m, n in zip(ids, nodes, strict=False) if m}
        deadline = time.monotonic() + (ttl if timeout is None else timeout)
        while pending:
            for mid in list(pending):
                for reply in grid.pull_messages([mid]):
                    node = pending.pop(reply.metadata.reply_to_message_id,
                                       reply.metadata.src_node_id)
                    if reply.has_error():  # its tasks are asked again before its next master
                        self.node_sites.pop(node, None)
                    handle(reply, node)
                    del reply
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if pending:
            log.warning("%s round %d: %d site(s) did not reply in time", kind, round_,
                        len(pending))
        return len(nodes)

    def _messages(self, kind: str, ins: Instruction, round_: int, nodes: list[int],
                  state: Mapping[str, torch.Tensor] | None) -> list[Message]:
        """One message per node; with ``state``, its shared tensors and the node's heads."""
        config = ins.to_config()
        arrays = {k: Array(v) for k, v in state.items()} if state is not None else None
        by_tasks: dict[tuple[str, ...], RecordDict] = {}
        shas: dict[tuple[str, ...], str] = {}
        msgs = []
        for n in nodes:
            tasks = tuple(sorted(self.node_sites[n][1])) if arrays is not None else ()
            if tasks not in by_tasks:
                records: dict[str, Any] = {CONFIG: ConfigRecord(config)}
                if arrays is not None:
                    records[ARRAYS] = ArrayRecord(
                        {k: a for k, a in arrays.items() if head_task(k) in (None, *tasks)})
                    shas[tasks] = self.audit.master(
                        round_, kind.split(".")[0], records[ARRAYS], tasks=list(tasks),
                        sites=sorted(self.node_sites[m][0] for m in nodes
                                     if tuple(sorted(self.node_sites[m][1])) == tasks))
                by_tasks[tasks] = RecordDict(records)
            if arrays is not None:
                self.sent[n] = (list(tasks), shas[tasks])
            msgs.append(Message(by_tasks[tasks], dst_node_id=n, message_type=kind,
                                ttl=self.cfg.round_timeout_s, group_id=str(round_)))
        return msgs

    def _site_tasks(self, grid: Grid, nodes: list[int], round_: int) -> dict[int, list[str]]:
        """Each node's tasks; nodes not heard from yet are asked once (``query.tasks``).

        A node that does not answer within ``min(round_timeout_s, 300)`` s sits out.
        """
        unknown = [n for n in nodes if n not in self.node_sites]
        if unknown:
            def handle(msg: Message, node: int) -> None:
                try:
                    r = _read_reply(msg, node, self.enrolled)
                except ValueError as e:
                    log.warning("round %d: a site did not say its tasks: %s", round_, e)
                    if isinstance(e, Impersonation):
                        self.audit.update(round_, TASKS_QUERY, site=self._site_of(node),
                                          node_id=node, arrived=time.time(), arrays=None,
                                          norm=None, accepted=False, reason=str(e))
                    return
                self.node_sites[r.node_id] = (r.site, r.tasks)
                log.info("site %s (node %d) trains %s", r.site, r.node_id, ", ".join(r.tasks))

            self._exchange(grid, TASKS_QUERY, Instruction.for_round(self.cfg, round_), round_,
                           handle, nodes=unknown, timeout=min(self.cfg.round_timeout_s, 300.0))
        silent = [n for n in nodes if n not in self.node_sites]
        if silent:
            log.warning("round %d: node(s) %s did not say their tasks: they sit this one out",
                        round_, silent)
        return {n: self.node_sites[n][1] for n in nodes if n in self.node_sites}

    # -- one training round ----------------------------------------------------------
    def train_round(self, grid: Grid, master: ArkModel, round_: int) -> dict | None:
        """Send, fold in, and (with enough valid replies) load the average into ``master``.

        Returns:
            The round's record for state.json, or None if the round failed.
        """
        state = float_state(master)
        ins = Instruction.for_round(self.cfg, round_, self.run.lr(round_))
        agg: Aggregator = (DPAggregator(state, self.cfg.privacy) if self.cfg.privacy
                           else make_aggregator(state, self.cfg.aggregation))
        lines: list[dict] = []
        clipped: dict[str, dict] = {}
        expected = self.cfg.transfer.encoding

        def handle(msg: Message, node: int) -> None:
            arrived = time.time()
            try:
                r = _read_reply(msg, node, self.enrolled)
                if r.arrays is None:
                    raise ValueError(f"node {r.node_id}: train reply without '{ARRAYS}'")
            except ValueError as e:
                log.warning("round %d: reply rejected: %s", round_, e)
                self.audit.update(round_, "train", site=self._site_of(node), node_id=node,
                                  arrived=arrived, arrays=None, norm=None, accepted=False,
                                  reason=str(e))
                return
            update = r.update(state, expected)
            sent_tasks, sent_sha = self.sent.get(r.node_id, ([], ""))
            try:
                if sorted(r.tasks) != sent_tasks:
                    self.node_sites[r.node_id] = (r.site, r.tasks)  # next round sends those heads
                    raise UpdateRejected(f"declares tasks {r.tasks}, but was sent the heads of "
                                         f"{sent_tasks}")
                missing = [t for t in r.tasks if f"num-examples.{t}" not in r.metrics]
                if missing:
                    raise UpdateRejected(f"no example counts for tasks {missing}")
                w = self._weights(r)
                agg.add(r.site, update, w.num_examples, w.task_examples)
                if self.caps is not None:
                    self.caps.accept(r.site, w)
                if w.clipped:
                    clipped[r.site] = w.clipped
                    log.warning("round %d: site %s claims more examples than its cap; clipped "
                                "({key: [claimed, used]}): %s", round_, r.site, w.clipped)
                accepted, reason = True, ""
                log.info("round %d: update of site %s (node %d) folded in: %s", round_, r.site,
                         r.node_id, _losses(r.metrics))
            except UpdateRejected as e:
                accepted, reason = False, str(e)
                agg.report.rejected.setdefault(r.site, reason)
                log.warning("round %d: update of site %s (node %d) REJECTED, master unchanged "
                            "by it: %s", round_, r.site, r.node_id, e)
            norm = agg.norms.get(r.site)
            if accepted and norm is None:
                norm = update_norm(update, state)
            encoding = declared_encoding(r.manifest)
            self.audit.update(round_, "train", site=r.site, node_id=r.node_id, arrived=arrived,
                              arrays=r.arrays, norm=norm, accepted=accepted, reason=reason,
                              master_sha256=sent_sha, nbytes=r.nbytes, encoding=encoding,
                              clipped=clipped.get(r.site))
            lines.append({"round": round_, "kind": "train", "site": r.site, "node_id": r.node_id,
                          "accepted": accepted, **({"reason": reason} if reason else {}),
                          "bytes": r.nbytes, "encoding": encoding, **r.metrics})

        sent = self._exchange(grid, MessageType.TRAIN, ins, round_, handle, state=state)
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
                                 "noise_std": agg.noise_std}
            log.info("round %d: differential privacy (epsilon %s, delta %g)", round_,
                     record["privacy"]["epsilon"], self.cfg.privacy.delta)
        return record

    def evaluate_round(self, grid: Grid, master: ArkModel, round_: int) -> None:
        """Ask every site for validation AUC of the master student and its teacher; log it."""
        ins = Instruction.for_round(self.cfg, round_, self.run.lr(round_))
        lines: list[dict] = []

        def handle(msg: Message, node: int) -> None:
            try:
                r = _read_reply(msg, node, self.enrolled)
            except ValueError as e:
                log.warning("round %d: evaluation failed: %s", round_, e)
                return
            for task in r.tasks:
                s, t = r.metrics.get(f"student.auc.{task}"), r.metrics.get(f"teacher.auc.{task}")
                log.info("round %d  site %-12s task %-16s AUC student %s  teacher %s",
                         round_, r.site, task, _fmt(s), _fmt(t))
            lines.append({"round": round_, "kind": "evaluate", "site": r.site,
                          "node_id": r.node_id, **r.metrics})

        self._exchange(grid, MessageType.EVALUATE, ins, round_, handle,
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
                r = _read_reply(msg, node, self.enrolled)
                if r.arrays is None:
                    raise ValueError(f"node {r.node_id}: teacher reply without '{ARRAYS}'")
                # Teachers travel once, as plain fp32 weights, whatever the run's transfer.
                w = self._weights(r)
                agg.add(r.site, r.update(state, "fp32"), w.num_examples, w.task_examples)
            except (ValueError, UpdateRejected) as e:
                log.warning("teacher not used: %s", e)
                self.audit.update(self.cfg.rounds, "query",
                                  site=r.site if r else self._site_of(node),
                                  node_id=node, arrived=arrived,
                                  arrays=r.arrays if r else None, norm=None, accepted=False,
                                  reason=str(e), master_sha256=sha)
                return
            self.audit.update(self.cfg.rounds, "query", site=r.site, node_id=r.node_id,
                              arrived=arrived, arrays=r.arrays,
                              norm=update_norm(r.arrays, state), accepted=True,
                              master_sha256=sha, clipped=w.clipped or None)
            lines.append({"round": self.cfg.rounds, "kind": "query", "site": r.site,
                          "node_id": r.node_id, **r.metrics})

        self._exchange(grid, MessageType.QUERY, ins, self.cfg.rounds, handle)
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
            self.run.commit_round(r, master, record)
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


    def _site_of(self, node: int) -> str | None:
        """The site ``node`` is enrolled as (a deployment), else None."""
        return (self.enrolled or {}).get(node)


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _losses(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss."))

