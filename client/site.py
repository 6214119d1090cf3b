"""One hospital site's side of federated Ark+, free of Flower: train, evaluate, hand over.

The Flower ClientApp (``client.app``) only turns messages into calls of :class:`Site` and
results back into messages. What leaves the site: float tensors of its student (or, once at
the end, of its teacher) restricted to the shared parts and its own heads, and numbers
(example counts, losses, AUCs). Never images, labels, file names or per-image values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ark_core.config import TrainConfig, load_config, resolve_path
from ark_core.data.loaders import TaskData, load_task_data
from ark_core.eval.evaluate import evaluate
from ark_core.fed.aggregate import float_state, head_task
from ark_core.fed.audit import tensors_sha256
from ark_core.fed.federation import (
    SiteConfig,
    check_site_tasks,
    ema_position,
    load_simulation,
    round_passes,
    site_train_config,
)
from ark_core.fed.protocol import Instruction
from ark_core.fed.transfer import MASTER_KEY, REFERENCE_KEY, Payload, encode_update, rebuild_master
from ark_core.model.factory import create_model
from ark_core.model.network import ArkModel, make_teacher
from ark_core.model.runtime import resolve_device
from ark_core.train.calibrate import fit_heads
from ark_core.train.cyclic import build_optimizer, seed_everything, train_cyclic
from ark_core.train.distributed import World
from ark_core.train.optim_state import load_optimizer_state, optimizer_state
from client.parallel import run_ranks
from client.state import HeadStore, OptimizerStore, ReferenceStore, ResidualStore, TeacherStore

log = logging.getLogger(__name__)


@dataclass
class Site:
    """A site: its config, where its data and its state live.

    Args:
        cfg: The site's config.
        data_root: Directory relative task roots resolve against.
        state_dir: The site's state directory (teachers per run).
        progress: Show progress bars while training.
    """

    cfg: SiteConfig
    data_root: Path
    state_dir: Path
    progress: bool = False

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> Site:
        """A deployed site from its YAML (relative paths resolve against its directory)."""
        path = Path(path).expanduser().resolve()
        cfg = load_config(path, SiteConfig)
        base = path.parent
        root = resolve_path(cfg.data_root, base) if cfg.data_root else base
        state = resolve_path(cfg.state_dir, base) if cfg.state_dir else base / "state"
        return cls(cfg, root, state)

    @classmethod
    def from_simulation(
        cls, sim_config: str, data_root: str, run_dir: str, partition_id: int
    ) -> Site:
        """Site number ``partition_id`` of a simulation YAML."""
        sim, base, out = load_simulation(sim_config, data_root, run_dir)
        if not 0 <= partition_id < len(sim.sites):
            raise ValueError(
                f"partition-id {partition_id}: the simulation config defines {len(sim.sites)} "
                "sites; run with as many supernodes (--federation-config num-supernodes=N)"
            )
        cfg = sim.sites[partition_id]
        cfg = cfg.model_copy(update={"twin_tasks": [*cfg.twin_tasks,
                                                    *sim.tasks_beside(partition_id, base)]})
        root = resolve_path(cfg.data_root, base) if cfg.data_root else base
        state = resolve_path(cfg.state_dir, base) if cfg.state_dir else out / "sites" / cfg.name
        return cls(cfg, root, state)

    @classmethod
    def from_flower_config(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Site:
        """Deployment: ``node_config['site-config']``; simulation: run config + partition-id."""
        if node_config.get("site-config"):
            return cls.from_yaml(str(node_config["site-config"]))
        if "partition-id" in node_config:
            return cls.from_simulation(
                str(run_config.get("sim-config", "")),
                str(run_config.get("data-root", "")),
                str(run_config.get("run-dir", "")),
                int(node_config["partition-id"]),
            )
        raise ValueError(
            "no site configuration: start the SuperNode with --node-config "
            "'site-config=\"/path/to/site.yaml\"'"
        )

    def to_json(self) -> str:
        """This site as JSON, for another process (:meth:`from_json`)."""
        return json.dumps({"cfg": self.cfg.model_dump(mode="json"), "progress": self.progress,
                           "data_root": str(self.data_root), "state_dir": str(self.state_dir)})

    @classmethod
    def from_json(cls, text: str) -> Site:
        d = json.loads(text)
        return cls(SiteConfig.model_validate(d["cfg"]), Path(d["data_root"]),
                   Path(d["state_dir"]), bool(d["progress"]))

    # -- helpers -------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.cfg.tasks]

    def _setup(self, ins: Instruction, splits: tuple[str, ...] = ("train", "val"),
               ) -> tuple[list[TaskData], TrainConfig, torch.device]:
        train = site_train_config(ins.train, self.cfg.train).with_paths_under(self.data_root)
        if train.threads:
            torch.set_num_threads(train.threads)
        tasks = load_task_data(self.cfg.tasks, self.data_root, splits=splits,
                               twin_tasks=self.cfg.twin_tasks)
        check_site_tasks(self.cfg.name, [t.spec for t in tasks], ins.tasks)
        empty = [t.spec.name for t in tasks if "train" in splits and not len(t.train)]
        if empty:
            raise ValueError(f"site {self.cfg.name!r}: no training images of task(s) {empty} "
                             f"under {self.data_root} after the split and partition: remove "
                             "the task from this site's config or check its data")
        return tasks, train, resolve_device(train.device)

    def _model(self, ins: Instruction, tasks: list[TaskData],
               tensors: Mapping[str, torch.Tensor]) -> ArkModel:
        """The site's model (its own heads only) holding ``tensors``."""
        model = create_model(ins.model.model_copy(update={"init": "random"}), [t.spec for t in tasks])
        wanted = float_state(model)
        missing = sorted(set(wanted) - set(tensors))
        if missing:
            raise ValueError(f"site {self.cfg.name!r}: the model sent lacks {missing[:5]}")
        state = {k: torch.as_tensor(tensors[k]) for k in wanted}
        model.load_state_dict(state, strict=False)
        return model

    def _optimizer(self, ins: Instruction, student: ArkModel, train: TrainConfig,
                   teacher_round: int | None) -> tuple[torch.optim.Optimizer | None, int]:
        """With ``keep_optimizer``, the optimiser and the round its state comes from (0: new).

        The state is the one saved with the teacher this round starts from, so a replayed
        round rolls both back together.
        """
        if not ins.keep_optimizer:
            return None, 0
        optimizer = build_optimizer(student, train, ins.lr)
        store = OptimizerStore(self.state_dir, ins.fingerprint)
        if teacher_round is None or teacher_round not in store.rounds():
            return optimizer, 0
        load_optimizer_state(optimizer, student, store.load(teacher_round))
        return optimizer, teacher_round

    def _own_heads(self, ins: Instruction, model: ArkModel, round_: int) -> ArkModel:
        """``model``, with ``heads: per_site`` holding this site's own heads.

        Those of the latest round before ``round_``; before the site's first round, the
        master's as initialised.
        """
        if ins.heads == "per_site":
            store = HeadStore(self.state_dir, ins.fingerprint)
            prev = store.latest_before(round_)
            if prev is not None:
                model.load_state_dict(store.load(prev), strict=False)
        return model

    def _store(self, ins: Instruction) -> TeacherStore:
        return TeacherStore(self.state_dir, ins.fingerprint)

    def _teacher(
        self, ins: Instruction, tasks: list[TaskData], round_: int
    ) -> tuple[ArkModel, int] | None:
        """The teacher saved after the latest round before ``round_``, with that round."""
        store = self._store(ins)
        prev = store.latest_before(round_)
        if prev is None:
            return None
        return make_teacher(self._model(ins, tasks, store.load(prev))), prev

    # -- the operations --------------------------------------------------------------
    def train_counts(self, ins: Instruction) -> dict[str, float]:
        """Training images per task (one epoch) and their total, as ``num-examples`` keys.

        What per-task weighting needs before the first reply of a round is folded in
        (:mod:`ark_core.fed.task_weights`); counts only, as every train reply sends.
        """
        tasks, _, _ = self._setup(ins, splits=("train",))
        counts = {f"num-examples.{t.spec.name}": float(len(t.train)) for t in tasks}
        return {"num-examples": sum(counts.values()), **counts}

    def train(
        self, ins: Instruction, master: MutableMapping[str, torch.Tensor],
        server_teacher: MutableMapping[str, torch.Tensor] | None = None,
        world: World | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One federated round: master student + the site's teacher -> cyclic training.

        ``master`` and ``server_teacher`` are handed over: emptied once the models hold their
        values, so that the copies a message brought are not kept through training.

        With ``teacher: server`` the teacher is ``server_teacher``, the round's fixed
        consistency target, and the site stores none. A site deployed with several
        processes (``deployment.data_parallel`` or ``gpus``, or a ``launcher``) trains on
        that many ranks (:mod:`client.parallel`); ``world`` is set in each, rank 0 saves.

        Returns:
            The student's float tensors (shared parts and this site's heads) and metrics.
        """
        dep = self.cfg.deployment
        if world is None and dep is not None and (dep.launcher or dep.processes > 1):
            tensors = {"master": master}
            if server_teacher is not None:
                tensors["server_teacher"] = server_teacher
            job = {"site": self.to_json(), "ins": ins.to_config()}
            return run_ranks(self.state_dir, self.cfg.name, dep.processes, dep.launcher, job,
                             tensors)
        saves = world is None or world.main
        on_site = ins.teacher == "sites"
        if not on_site and server_teacher is None:
            raise ValueError(f"site {self.cfg.name!r}: the run's teacher is the server's, but "
                             "the train message carries none")
        tasks, train, device = self._setup(ins)
        passes, parts = round_passes(ins.local_epochs)
        if parts > 1:  # a round trains this round's part of an epoch of each task
            for td in tasks:
                td.train = td.train.epoch_part(ins.round - 1, parts, train.seed)
        seed_everything(train.seed + ins.round)
        student = self._own_heads(ins, self._model(ins, tasks, master), ins.round).to(device)
        master.clear()
        if ins.head_refit:  # heads fitted to the master's features before joint training
            # Unstandardised: heads fitted on standardised features of an early master are
            # large enough to make the first steps' loss non-finite.
            heads, _ = fit_heads(student, tasks, batch_size=train.batch_size, device=device,
                                 standardise=False)
            student.load_state_dict(heads, strict=False)
        if on_site:
            found = self._teacher(ins, tasks, ins.round)
            # Round 1 (or a site without an earlier teacher of this run) starts from the master.
            teacher = found[0] if found else make_teacher(student)
        else:
            teacher, found = make_teacher(self._model(ins, tasks, server_teacher)), None
            server_teacher.clear()
        teacher = teacher.to(device)
        ema_step, ema_total = ema_position(ins.round, ins.num_rounds, ins.local_epochs, len(tasks))
        optimizer, opt_round = self._optimizer(ins, student, train, found[1] if found else None)
        result = train_cyclic(
            student, teacher, tasks, train,
            img_size=ins.model.img_size, work_size=ins.model.resolved_work_size, lr=ins.lr,
            local_epochs=passes, ema_step=ema_step, ema_total_steps=ema_total,
            device=device, optimizer=optimizer, progress=self.progress and saves,
            desc=f"{self.cfg.name} r{ins.round} ", prox_mu=ins.prox_mu, teacher_ema=on_site,
            world=world,
        )
        if not saves:
            return {}, {}
        if on_site:
            self._store(ins).save(ins.round, float_state(teacher))
        if optimizer is not None:
            OptimizerStore(self.state_dir, ins.fingerprint).save(
                ins.round, optimizer_state(optimizer, student))
        trained = float_state(student.cpu())
        if ins.heads == "per_site":  # the heads stay here; only the shared parts travel
            HeadStore(self.state_dir, ins.fingerprint).save(ins.round, _heads(trained))
            trained = _shared(trained)
        metrics = dict(result.metrics)
        metrics["ema-step"] = float(result.ema_step)
        teacher_round = (found[1] if found else 0) if on_site else ins.round - 1
        metrics["teacher-from-round"] = float(teacher_round)
        if optimizer is not None:
            metrics["optimizer-from-round"] = float(opt_round)
        return trained, metrics

    def receive(
        self, ins: Instruction, arrays: dict[str, torch.Tensor],
        manifest: Mapping[str, Any] | None, scales: Mapping[str, Any] | None,
    ) -> dict[str, torch.Tensor]:
        """The master this round trains from: as sent, or rebuilt (compact downlink).

        With ``transfer.downlink`` bf16 or int8 the server sends either the master in fp32 or
        its difference from a reference this site keeps (named by hash); the master received
        or rebuilt becomes the next reference.

        Raises:
            ValueError: A difference in a run without a compact downlink, from a reference
                this site does not hold, or one that rebuilds another master than the
                server's (hashes named).
        """
        dtype = ins.transfer.downlink
        if dtype == "fp32":
            if manifest is not None:
                raise ValueError(f"the master came encoded ({dict(manifest)}), but this run's "
                                 "downlink is fp32")
            return arrays
        store = ReferenceStore(self.state_dir, ins.fingerprint, keep=2)
        master = arrays
        if manifest is not None:
            reference = self._reference(store, str(manifest.get(REFERENCE_KEY)))
            master = rebuild_master(reference, arrays, manifest, scales, f"{dtype}-delta")
            del reference
            sha = tensors_sha256(master)
            if sha != manifest.get(MASTER_KEY):
                raise ValueError(
                    f"the master rebuilt from this site's reference has SHA-256 {sha[:16]}, the "
                    f"server's {str(manifest.get(MASTER_KEY))[:16]}: the two sides decode "
                    "differently (run the same version on both)")
        store.save(ins.round, master)
        return master

    def _reference(self, store: ReferenceStore, sha: str) -> dict[str, torch.Tensor]:
        """The kept reference whose hash is ``sha`` (the latest first)."""
        for round_ in reversed(store.rounds()):
            reference = store.load(round_)
            if tensors_sha256(reference) == sha:
                return reference
        raise ValueError(
            f"the master came as a difference from a reference (SHA-256 {sha[:16]}) that "
            f"{store.dir} does not hold (kept rounds: {store.rounds()}): the state directory "
            "was replaced or cleared. The server sends the full master to a site that fails "
            "a round, so the next round repairs this")

    def encode(
        self, ins: Instruction, master: Mapping[str, torch.Tensor] | None,
        student: Mapping[str, torch.Tensor]
    ) -> Payload:
        """The train reply's payload in the run's transfer encoding (``ins.transfer``).

        ``master`` (the one received) is read only with ``delta``; otherwise it may be None.

        With error feedback, the residual of the latest earlier round of this run is added
        and the new one saved for the next round (a replayed round reuses the same one).
        """
        cfg = ins.transfer
        # Two kept: a replay of the latest round needs the residual of the round before it.
        store = ResidualStore(self.state_dir, ins.fingerprint, keep=2) if cfg.error_feedback else None
        prev = store.latest_before(ins.round) if store is not None else None
        residual = store.load(prev) if prev is not None else None
        payload = encode_update(student, master if master is not None else {}, cfg, residual)
        if store is not None:
            store.save(ins.round, payload.residual)
        return payload

    def evaluate(self, ins: Instruction, master: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Validation AUC per task (mean and per label) of the master student and the teacher."""
        tasks, train, device = self._setup(ins)
        models = {"student": self._own_heads(ins, self._model(ins, tasks, master), ins.round + 1)}
        found = self._teacher(ins, tasks, ins.round + 1)
        if found:
            models["teacher"] = found[0]
        out: dict[str, float] = {}
        for role, model in models.items():
            res = evaluate(
                model.to(device), tasks, img_size=ins.model.img_size,
                work_size=ins.model.resolved_work_size, batch_size=train.batch_size,
                workers=train.workers, device=device,
            )
            for task, r in res.items():
                out[f"num-examples.{task}"] = float(r["num-examples"])
                if r["auc_mean"] is not None:
                    out[f"{role}.auc.{task}"] = float(r["auc_mean"])
                for label, auc in r["auc"].items():
                    if auc is not None:
                        out[f"{role}.auc.{task}.{label}"] = float(auc)
        if found:
            out["teacher-round"] = float(found[1])
        return out

    def calibrate(self, ins: Instruction, model: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """This site's heads re-fitted on ``model``'s frozen embeddings of its training split.

        Nothing else leaves: the heads of its own tasks and how many images each fit saw.
        """
        tasks, train, device = self._setup(ins, splits=("train",))
        frozen = self._model(ins, tasks, model).to(device)
        return fit_heads(frozen, tasks, batch_size=train.batch_size, device=device)

    def teacher(self, ins: Instruction) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The latest teacher of this run, with the site's training example counts."""
        store = self._store(ins)
        rounds = store.rounds()
        if not rounds:
            raise RuntimeError(f"site {self.cfg.name!r} holds no teacher of run {ins.fingerprint}")
        tasks = load_task_data(self.cfg.tasks, self.data_root, splits=("train",),
                               twin_tasks=self.cfg.twin_tasks)
        check_site_tasks(self.cfg.name, [t.spec for t in tasks], ins.tasks)
        metrics = {f"num-examples.{t.spec.name}": float(len(t.train)) for t in tasks}
        metrics["num-examples"] = float(sum(len(t.train) for t in tasks))
        metrics["teacher-round"] = float(rounds[-1])
        teacher = store.load(rounds[-1])
        return (_shared(teacher) if ins.heads == "per_site" else teacher), metrics


def _heads(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if head_task(k) is not None}


def _shared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if head_task(k) is None}
