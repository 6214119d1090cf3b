"""The federated Ark+ round loop on a Flower ``Grid`` (push/pull, not ``Strategy.start``).

Each round the server sends the master student to every connected site in a ``train``
message: its shared tensors and the heads of that site's own tasks (the site says which in
its answer to a ``query.tasks`` message, sent once per node before its first master), and
the round's :class:`ark_core.fed.protocol.Instruction` (the round, the learning rate of warm-up
rounds then cosine, local epochs, the run's fingerprint that keys the site's teacher store,
the architecture, training settings, task catalogue, and how the site encodes its reply:
:mod:`ark_core.fed.transfer`). Replies are decoded tensor by tensor and summed in fp32.
The master goes down in fp32 or, with ``transfer.downlink`` bf16 or int8, as its difference
from the reference the sites hold (:mod:`server.downlink`); the round then trains from, and
folds in against, that reference. :mod:`server.exchange` does the Flower side (push, pull,
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
teachers are not privatised) and writes ``privacy.json`` instead. With ``teacher: server``
the server keeps the teacher itself, an EMA of the masters
(:mod:`ark_core.fed.server_teacher`), sends it with every train message, checkpoints it with
the round, and delivers it as the master teacher.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from ark_core.fed.aggregate import (
    Aggregator,
    StreamingAggregator,
    float_state,
)
from ark_core.fed.caps import Bounded, ExampleCaps
from ark_core.fed.federation import FederationConfig
from ark_core.fed.privacy import DPAggregator, privacy_report
from ark_core.fed.protocol import (
    HEADS,
    Instruction,
)
from ark_core.fed.robust import make_aggregator
from ark_core.fed.server_opt import ServerOptimizer
from ark_core.fed.server_teacher import ServerTeacher, split_state
from ark_core.fed.step_norm import StepNormalised
from ark_core.fed.task_weights import shared_weight, task_totals
from ark_core.model.factory import create_model
from ark_core.model.network import ArkModel, make_teacher
from ark_core.train.cyclic import seed_everything
from server.audit import ServerAudit, write_privacy
from server.downlink import Downlink
from server.exchange import Exchange, Reply
from server.folds import Collect, TrainFold
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
        self.normaliser = StepNormalised(self.aggregator) if cfg.step_normalisation else None
        if self.normaliser is not None:
            self.aggregator = self.normaliser
        if cfg.server_optimizer is not None:
            self.aggregator = ServerOptimizer(self.aggregator, cfg.server_optimizer)
        self.teacher: ServerTeacher | None = None  # teacher: server, made with the master
        # transfer.downlink bf16/int8: the master as the sites hold it (1x the model, kept)
        self.downlink = Downlink(cfg.transfer.downlink) if cfg.transfer.downlink != "fp32" else None
        dep = cfg.deployment
        self.caps = ExampleCaps({s.name: s.max_examples for s in dep.sites},
                                self.run.state.get("example_caps")) if dep else None

    # -- round policy ------------------------------------------------------------
    def capped_weights(self, r: Reply) -> Bounded:
        """The reply's example counts, clipped to the site's caps in a deployment."""
        tasks = {t: r.metrics.get(f"num-examples.{t}", 0.0) for t in r.tasks}
        num = r.metrics.get("num-examples", 0.0)
        return Bounded(num, tasks) if self.caps is None else self.caps.bound(r.site, num, tasks)

    def head_weights(self, w: Bounded) -> dict[str, float]:
        """Task -> weight of the reply's head; none with ``heads: per_site`` (not sent)."""
        return {} if self.cfg.heads == "per_site" else w.task_examples

    def shared_weight(self, w: Bounded) -> float:
        """The weight of a reply's shared tensors: its examples, its per-task weight, or 1.

        Per-task weighting (:mod:`ark_core.fed.task_weights`) sums each task's training
        counts over the round's sites, as they stated them with their tasks (capped like
        the replies' counts in a deployment).
        """
        if self.cfg.shared_weighting == "examples":
            return w.num_examples
        if self.cfg.shared_weighting == "sites":
            return 1.0
        ex = self.exchange
        stated = []
        for node in ex.round_nodes:
            counts = ex.train_counts.get(node, {})
            if self.caps is not None and node in ex.node_sites:
                counts = self.caps.bound(ex.node_sites[node][0], sum(counts.values()),
                                         counts).task_examples
            stated.append(counts)
        return shared_weight(w.task_examples, task_totals(stated))

    # -- one training round ----------------------------------------------------------
    def train_round(self, grid: Grid, master: ArkModel, round_: int) -> dict | None:
        """Send, fold in, and (with enough valid replies) load the average into ``master``.

        Returns:
            The round's record for state.json, or None if the round failed.
        """
        state = float_state(master)
        if self.downlink is not None:  # the master as the sites rebuild it: what they train from
            state = self.downlink.advance(state)
        ins = Instruction.for_round(self.cfg, round_, self.run.lr(round_))
        agg = self.aggregator
        agg.begin_round(state)
        fold = TrainFold(self, round_, state, agg)
        sent = self.exchange.send(grid, MessageType.TRAIN, ins, round_, fold, state=state,
                                  teacher=self.teacher.tensors if self.teacher else None,
                                  downlink=self.downlink)
        lines, clipped = fold.lines, fold.clipped
        if agg.num_accepted < self.cfg.min_sites:
            log.warning("round %d: %d valid update(s) from %d site(s) asked, %d needed",
                        round_, agg.num_accepted, sent, self.cfg.min_sites)
            return None
        agg.apply(master)
        if self.teacher is not None:
            self.teacher.update(float_state(master), round_)
        self.run.append_metrics(lines)
        rep = agg.report
        record = {"sites": rep.sites, "contributors": rep.contributors, "weights": rep.weights,
                  "rejected": rep.rejected, "kept": len(rep.kept)}
        if clipped:
            record["clipped"] = clipped
        cosines = fold.sketch.cosines()
        if cosines:
            record["cosine"] = cosines
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
        state = float_state(master)
        agg = StreamingAggregator(state)
        collect = Collect(self, "query", "teacher", state, agg)
        self.exchange.send(grid, MessageType.QUERY, Instruction.for_round(self.cfg, 0),
                           self.cfg.rounds, collect)
        self.run.append_metrics(collect.lines)
        if agg.num_accepted == 0:
            log.error("no site sent its teacher: no master teacher is written")
            return None, []
        teacher = make_teacher(master)
        agg.apply(teacher)
        return teacher, agg.report.sites

    def calibrate_heads(self, grid: Grid, model: ArkModel, role: str) -> list[str]:
        """Have the sites re-fit their tasks' heads on ``model`` frozen; average them into it.

        Each head is averaged over the sites that own its task, weighted by the images each
        fit saw, with the run's aggregation rule; shared parts are not touched. A task no
        site calibrated keeps its head. Returns the sites whose heads were used.
        """
        state = float_state(model)
        agg = make_aggregator(None, self.cfg.aggregation)
        agg.begin_round(state, heads_only=True)
        collect = Collect(self, "calibrate", f"{role} heads", state, agg, role=role)
        self.exchange.send(grid, HEADS, Instruction.for_round(self.cfg, self.cfg.rounds),
                           self.cfg.rounds, collect, state=state)
        self.run.append_metrics(collect.lines)
        if agg.num_accepted == 0:
            log.error("no site calibrated the %s's heads: they stay as averaged", role)
            return []
        agg.apply(model)
        log.info("%s heads calibrated at %s", role, ", ".join(agg.report.sites))
        return agg.report.sites

    # -- the run -------------------------------------------------------------------
    def _initial_master(self) -> ArkModel:
        if self.run.last_round >= 0:
            log.info("resuming %s after round %d", self.run.path, self.run.last_round)
            agg_state, teacher = split_state(self.run.load_server_state())
            self.aggregator.load_state_dict(agg_state)
            master = self.run.load_master()
        else:
            seed_everything(self.cfg.train.seed)
            master = create_model(self.cfg.model, self.cfg.task_specs())
            self.run.commit_round(0, master, {"initial": True})
            teacher = {}
        if self.cfg.teacher == "server":  # it starts from the initial master (round 0)
            self.teacher = ServerTeacher(float_state(master), self.cfg.rounds,
                                         self.cfg.local_epochs, self.cfg.train.ema_m0)
            if self.run.last_round > 0:
                self.teacher.load(teacher)
        return master

    def _server_state(self) -> dict:
        """What the server carries to the next round: the aggregator's and the teacher's."""
        return {**self.aggregator.state_dict(),
                **(self.teacher.state_dict() if self.teacher is not None else {})}

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
            self.run.commit_round(r, master, record, self._server_state())
            cosines = {f"cosine.{k}": v for k, v in record.get("cosine", {}).items()}
            self.run.append_metrics([{"round": r, "kind": "round", "seconds": record["seconds"],
                                      "sites": len(record["sites"]), **cosines}])
            log.info("round %d/%d done in %.1f s: sites %s", r, self.cfg.rounds, record["seconds"],
                     ", ".join(record["sites"]))
            every = self.cfg.evaluate_every
            if every and (r % every == 0 or r == self.cfg.rounds):
                self.evaluate_round(grid, master, r)
        if self.run.last_round == self.cfg.rounds and not self.run.finished:
            self._finish(grid, master)
        return self.run

    def _finish(self, grid: Grid, master: ArkModel) -> None:
        teacher: ArkModel | None = None
        teacher_sites: list[str] = []
        if self.teacher is not None:  # an EMA of the (noised, where DP) masters: post-processing
            teacher = make_teacher(master)
            teacher.load_state_dict(self.teacher.tensors, strict=False)
        elif self.cfg.privacy is None:
            teacher, teacher_sites = self.query_teachers(grid, master)
        if self.cfg.privacy is not None:  # the sites' teachers are not privatised
            write_privacy(self.run.path, {**privacy_report(self.cfg.privacy, self.cfg.rounds),
                                          "teachers_collected": False})
        calibrated = {}
        if self.cfg.head_calibration == "final":
            for role, model in (("student", master), ("teacher", teacher)):
                if model is not None:
                    calibrated[role] = self.calibrate_heads(grid, model, role)
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
        if self.teacher is not None:
            provenance["teacher"] = "server EMA of the masters"
        if calibrated:
            provenance["heads_calibrated_at"] = calibrated
        self.run.finish(master, teacher, provenance)
        log.info("federation finished: %s (teacher: %s)", self.run.path,
                 "the server's EMA of the masters" if self.teacher is not None
                 else "average of the teachers of " + (", ".join(teacher_sites) or "no site"))


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"
