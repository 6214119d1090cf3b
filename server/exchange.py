"""The Flower side of a round: who gets a message, what it holds, and collecting replies.

:class:`Exchange` pushes one message per site (the shared tensors and that site's own
heads, the instruction), pulls the replies one message id at a time until every site has
answered or the time is up, and hands each reply to the round's handler. From a
SuperLink, a reply's tensors are pulled one at a time as the handler reads them
(:mod:`server.pull`). It knows the connected and enrolled nodes and what each was sent;
the round policy (what is folded, when a round has enough sites) is :mod:`server.loop`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ark_core.fed.aggregate import head_task
from ark_core.fed.federation import FederationConfig
from ark_core.fed.protocol import (
    ARRAYS,
    CONFIG,
    ENCODING,
    METRICS,
    SCALES,
    SITE,
    TASKS_QUERY,
    TEACHER,
    Instruction,
)
from ark_core.fed.transfer import as_update
from ops.arrays import Tensors, payload_nbytes, raw_array
from server.audit import ServerAudit
from server.downlink import Downlink
from server.enrolment import FILE as ENROLMENT_FILE
from server.enrolment import enrolled_nodes
from server.pull import ObjectPull
from server.retry import RetryingGrid

log = logging.getLogger("flwr.ark.server")


@dataclass
class Reply:
    """What the loop reads from one site's reply (its tensors stay in ``arrays``)."""

    node_id: int
    site: str
    tasks: list[str]
    metrics: dict[str, float]
    arrays: Tensors | None  # the reply's tensors, decoded when read
    manifest: dict | None = None  # of an encoded reply (ark_core.fed.transfer)
    scales: Tensors | None = None

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the tensor payload as received (:func:`ops.arrays.payload_nbytes`)."""
        return payload_nbytes(self.arrays.record if self.arrays is not None else None,
                              self.scales.record if self.scales is not None else None,
                              self.manifest)

    def update(self, master: Mapping[str, torch.Tensor], expected: str) -> Mapping[str, Any]:
        """The tensors to fold in: the arrays, or a decoding view of an encoded reply."""
        return as_update(self.arrays, self.manifest, self.scales, master, expected)


class Impersonation(ValueError):
    """A reply names a site other than the one its node is enrolled as."""


def read_reply(msg: Message, node: int, enrolled: Mapping[int, str] | None = None,
               records: Mapping[str, Mapping[str, Array]] | None = None) -> Reply:
    """Parse the reply of ``node``; raises ``ValueError`` naming what is malformed.

    ``records`` replaces the message's ArrayRecords (those of :mod:`server.pull`, whose
    tensors are pulled when read).

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
    records = c.array_records if records is None else records
    arrays, scales = records.get(ARRAYS), records.get(SCALES)
    manifest = dict(c.config_records[ENCODING]) if ENCODING in c.config_records else None
    return Reply(
        node_id=node,
        site=name,
        tasks=[str(t) for t in site.get("tasks", [])],
        metrics={k: float(v) for k, v in c.metric_records[METRICS].items()
                 if isinstance(v, int | float)},
        arrays=None if arrays is None else Tensors(arrays), manifest=manifest,
        scales=None if scales is None else Tensors(scales),
    )


class Exchange:
    """Messages to the sites of one run and their replies, over a Grid.

    Args:
        cfg: The federation config.
        run_path: The run directory (its enrolment file, in a deployment).
        audit: The server's audit log (every master sent, every rejected reply).
        poll_interval: Seconds between pulls of replies.
        node_wait_s: How long to wait for ``min_sites`` sites to connect before a round.
    """

    def __init__(self, cfg: FederationConfig, run_path: Path, audit: ServerAudit, *,
                 poll_interval: float, node_wait_s: float) -> None:
        self.cfg, self.run_path, self.audit = cfg, run_path, audit
        self.poll_interval, self.node_wait_s = poll_interval, node_wait_s
        # node id -> (site, tasks) as the site said (query.tasks or a reply); sent heads follow
        self.node_sites: dict[int, tuple[str, list[str]]] = {}
        # node id -> task -> training examples, as stated with its tasks (shared_weighting: tasks)
        self.train_counts: dict[int, dict[str, float]] = {}
        self.round_nodes: list[int] = []  # the nodes the last ``send`` went to
        # node id -> (sorted tasks whose heads it was sent, SHA-256 of that master part)
        self.sent: dict[int, tuple[list[str], str]] = {}
        # A deployment: node id -> enrolled site (re-read every exchange).
        self.enrolled: dict[int, str] | None = {} if cfg.deployment else None
        self._told: set[tuple[int, int]] = set()  # (round, node) of strangers already logged
        self._records: Mapping[str, Mapping[str, Array]] | None = None  # of the reply at hand

    def read(self, msg: Message, node: int) -> Reply:
        """The reply of ``node``, its site named by enrolment (see :func:`read_reply`)."""
        return read_reply(msg, node, self.enrolled, self._records)

    def admitted(self, grid: Grid, round_: int) -> list[int]:
        """Connected nodes that may get work: all (simulation) or the enrolled ones.

        A connected node that is not enrolled is logged, once a round, in this log and in
        the audit log (``{"event": "stranger"}``), and gets nothing.
        """
        nodes = sorted(grid.get_node_ids())
        if self.enrolled is None:
            return nodes
        self.enrolled = enrolled_nodes(self.run_path)
        for n in nodes:
            if n not in self.enrolled and (round_, n) not in self._told:
                self._told.add((round_, n))
                log.warning("round %d: node %d is connected but not enrolled in %s: it gets no "
                            "work (unregister it on the coordinator: flwr supernode unregister "
                            "%d)", round_, n, self.run_path / ENROLMENT_FILE, n)
                self.audit.stranger(round_, n)
        return [n for n in nodes if n in self.enrolled]

    def nodes(self, grid: Grid, round_: int) -> list[int]:
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
            nodes = self.admitted(grid, round_)
            now = time.monotonic()
            if len(nodes) >= listed or now >= deadline:
                self.report_absent(nodes, round_)
                return nodes
            if len(nodes) >= self.cfg.min_sites:
                grace_end = grace_end or now + (dep.site_wait_s if dep else 0.0)
                if now >= grace_end:
                    self.report_absent(nodes, round_)
                    return nodes
            time.sleep(self.poll_interval)

    def report_absent(self, nodes: list[int], round_: int) -> None:
        """Warn about enrolled sites that are not connected (a deployment only)."""
        if self.enrolled is None:
            return
        if not self.enrolled:
            log.error("round %d: no site is enrolled: %s lists none (ark-server writes it when "
                      "it registers the sites' keys)", round_, self.run_path / ENROLMENT_FILE)
            return
        absent = sorted(s for n, s in self.enrolled.items() if n not in nodes)
        if absent and (round_, 0) not in self._told:
            self._told.add((round_, 0))
            log.warning("round %d: enrolled site(s) not connected: %s", round_, ", ".join(absent))

    def send(
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
        teacher: Mapping[str, torch.Tensor] | None = None,
        downlink: Downlink | None = None,
    ) -> int:
        """Send the instruction (and ``state``) to every site; ``handle(reply, node)`` each reply.

        With ``state``, each site gets the shared tensors and its own tasks' heads only (the
        method's rule); a site whose tasks are not known yet is asked first
        (:meth:`site_tasks`). ``teacher`` (a server-side teacher) travels beside ``state``,
        cut the same way. With ``downlink`` (a compact downlink, ``state`` its reference) a
        site that holds the previous reference gets the difference instead. Memory stays
        flat in the number of sites: every tensor is serialised once and shared by all
        messages, released once pushed, and replies are pulled one message id at a time, so
        at most one is held while ``handle`` folds it in; from a SuperLink, not even that one:
        its tensors stay there, each pulled when read, and the reply is confirmed (its
        objects dropped) once ``handle`` returns.

        Returns:
            The number of sites the message went to.
        """
        nodes = self.nodes(grid, round_) if nodes is None else nodes
        ttl = self.cfg.round_timeout_s
        if state is not None:
            known = self.site_tasks(grid, nodes, round_)
            nodes = [n for n in nodes if n in known]
        self.round_nodes = list(nodes)
        msgs = self.messages(kind, ins, round_, nodes, state, teacher, downlink)
        ids = list(grid.push_messages(msgs))  # in order; None (or nothing) where refused
        del msgs
        if len(ids) != len(nodes) or None in ids:
            log.error("%s round %d: the SuperLink took %d of %d messages (see its log)", kind,
                      round_, len([m for m in ids if m]), len(nodes))
        # message id -> node: error replies made by the SuperLink do not name the node
        pending = {m: n for m, n in zip(ids, nodes, strict=False) if m}
        deadline = time.monotonic() + (ttl if timeout is None else timeout)
        puller = (ObjectPull(grid, grid._call if isinstance(grid, RetryingGrid) else None)
                  if ObjectPull.supports(grid) else None)
        while pending:
            for mid in list(pending):
                pulled = (puller.pull([mid]) if puller is not None
                          else [(m, None) for m in grid.pull_messages([mid])])
                for reply, self._records in pulled:
                    node = pending.pop(reply.metadata.reply_to_message_id,
                                       reply.metadata.src_node_id)
                    if reply.has_error():  # its tasks are asked again before its next master
                        self.node_sites.pop(node, None)
                    try:
                        handle(reply, node)
                    finally:
                        self._records = None
                        if puller is not None and reply.metadata.message_id:  # drop its objects
                            puller.confirm(reply.metadata.message_id)
                    del reply
                del pulled
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if pending:
            log.warning("%s round %d: %d site(s) did not reply in time", kind, round_,
                        len(pending))
        return len(nodes)

    def messages(self, kind: str, ins: Instruction, round_: int, nodes: list[int],
                 state: Mapping[str, torch.Tensor] | None,
                 teacher: Mapping[str, torch.Tensor] | None = None,
                 downlink: Downlink | None = None) -> list[Message]:
        """One message per node; with ``state``, its shared tensors and the node's heads.

        With ``downlink``, ``state`` is its reference: a node that holds the previous one
        gets the difference (raw wire dtype, ``encoding`` and ``scales`` records), the others
        ``state`` in fp32.
        """
        config = ins.to_config()
        arrays = {k: Array(v) for k, v in state.items()} if state is not None else None
        teacher_arrays = ({k: Array(v) for k, v in teacher.items()}
                          if teacher is not None and arrays is not None else None)
        by_tasks: dict[tuple[tuple[str, ...], bool], RecordDict] = {}
        shas: dict[tuple[str, ...], str] = {}
        msgs = []
        for n in nodes:
            tasks = tuple(sorted(self.node_sites[n][1])) if arrays is not None else ()
            diff = downlink.difference(n, tasks) if downlink is not None else None
            key = (tasks, diff is not None)
            if key not in by_tasks:
                records: dict[str, Any] = {CONFIG: ConfigRecord(config)}
                if arrays is not None:
                    sites = sorted(self.node_sites[m][0] for m in nodes
                                   if tuple(sorted(self.node_sites[m][1])) == tasks)
                    if diff is not None:
                        records[ARRAYS] = ArrayRecord({k: raw_array(v) for k, v in diff[0].items()})
                        records[ENCODING] = ConfigRecord(diff[1])
                        if diff[2]:
                            records[SCALES] = ArrayRecord(
                                {k: raw_array(v) for k, v in diff[2].items()})
                    else:
                        records[ARRAYS] = ArrayRecord(
                            {k: a for k, a in arrays.items() if head_task(k) in (None, *tasks)})
                    if tasks not in shas:  # of the master the site holds, however it came
                        part = (downlink.sha(tasks) if downlink is not None
                                else Tensors(records[ARRAYS]))
                        shas[tasks] = self.audit.master(round_, kind, part, tasks=list(tasks),
                                                        sites=sites)
                if teacher_arrays is not None:
                    records[TEACHER] = ArrayRecord(
                        {k: a for k, a in teacher_arrays.items() if head_task(k) in (None, *tasks)})
                    self.audit.master(round_, f"{kind}.{TEACHER}", Tensors(records[TEACHER]),
                                      tasks=list(tasks), sites=sites)
                by_tasks[key] = RecordDict(records)
            if arrays is not None:
                self.sent[n] = (list(tasks), shas[tasks])
            msgs.append(Message(by_tasks[key], dst_node_id=n, message_type=kind,
                                ttl=self.cfg.round_timeout_s, group_id=str(round_)))
        return msgs

    def site_tasks(self, grid: Grid, nodes: list[int], round_: int) -> dict[int, list[str]]:
        """Each node's tasks; nodes not heard from yet are asked once (``query.tasks``).

        A node that does not answer within ``min(round_timeout_s, 300)`` s sits out.
        """
        unknown = [n for n in nodes if n not in self.node_sites]
        if unknown:
            def handle(msg: Message, node: int) -> None:
                try:
                    r = self.read(msg, node)
                except ValueError as e:
                    log.warning("round %d: a site did not say its tasks: %s", round_, e)
                    if isinstance(e, Impersonation):
                        self.audit.update(round_, TASKS_QUERY, site=self.site_of(node),
                                          node_id=node, arrived=time.time(), nbytes=0,
                                          norm=None, accepted=False, reason=str(e))
                    return
                self.node_sites[r.node_id] = (r.site, r.tasks)
                self.train_counts[r.node_id] = {t: r.metrics[f"num-examples.{t}"] for t in r.tasks
                                                if f"num-examples.{t}" in r.metrics}
                log.info("site %s (node %d) trains %s", r.site, r.node_id, ", ".join(r.tasks))

            self.send(grid, TASKS_QUERY, Instruction.for_round(self.cfg, round_), round_,
                           handle, nodes=unknown, timeout=min(self.cfg.round_timeout_s, 300.0))
        silent = [n for n in nodes if n not in self.node_sites]
        if silent:
            log.warning("round %d: node(s) %s did not say their tasks: they sit this one out",
                        round_, silent)
        return {n: self.node_sites[n][1] for n in nodes if n in self.node_sites}

    def site_of(self, node: int) -> str | None:
        """The site ``node`` is enrolled as (a deployment), else None."""
        return (self.enrolled or {}).get(node)
