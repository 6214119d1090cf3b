"""The server's run directory: one place that says where a federated run stands.

Layout::

    config.yaml                  the resolved federation config (written once)
    state.json                   fingerprint, rounds, schedule, last completed round,
                                 per round the sites whose update was folded in (and which
                                 were rejected, with the reason), finished flag
    metrics.jsonl                append-only; one line per site per round and kind
                                 ("train", "evaluate", "query")
    rounds/round_000.safetensors the initial master student (model file)
    rounds/round_NNN.safetensors the master student after round NNN (the last
                                 ``keep_rounds`` are kept, and round 0)
    rounds/server_NNN.safetensors what the aggregator carries into round NNN + 1 (its
                                 ``state_dict``; only for a strategy that keeps state)
    master_student.safetensors   at the end: the master student  } provenance: rounds,
    master_teacher.safetensors   at the end: the sites' teachers } sites, tasks, fingerprint
                                 averaged

Every file is written atomically. A round counts once its checkpoint and then state.json are
written; on a restart the run continues after ``last_round`` and metric lines of a round that
never completed are dropped, so no round is counted twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ark_core.eval.model_card import write_model_card
from ark_core.eval.report import write_report
from ark_core.eval.tblog import write_scalars
from ark_core.fed.federation import FederationConfig, round_lr, run_fingerprint
from ark_core.io import append_jsonl, atomic_write_text
from ark_core.model.checkpoint import load_tensors, save_model, save_tensors
from ark_core.model.factory import load_model
from ark_core.model.network import ArkModel

log = logging.getLogger("flwr.ark.server")

_ROUND = "round_{:03d}.safetensors"
_SERVER = "server_{:03d}.safetensors"


class RunDirError(RuntimeError):
    """The run directory belongs to another run or is damaged; the message says why."""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(top level)"]


class RunDir:
    """Open (create or resume) a run directory for ``cfg``.

    Args:
        path: The run directory.
        cfg: The federation config; a directory made for a different config (another
            fingerprint) is refused with :class:`RunDirError` naming the changed fields.
    """

    def __init__(self, path: str | Path, cfg: FederationConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.fingerprint = run_fingerprint(cfg)
        self.rounds_dir = self.path / "rounds"
        self.metrics_path = self.path / "metrics.jsonl"
        self.state_path = self.path / "state.json"
        if self.state_path.exists():
            self.state = self._read_state()
            self._check_same_run()
            self._drop_incomplete_metrics()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.rounds_dir.mkdir(exist_ok=True)
            atomic_write_text(
                self.path / "config.yaml",
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
            )
            self.state = {
                "fingerprint": self.fingerprint,
                "num_rounds": cfg.rounds,
                "schedule": {
                    "lr": [round_lr(cfg.train, r, cfg.rounds) for r in range(1, cfg.rounds + 1)],
                    "local_epochs": cfg.local_epochs,
                },
                "last_round": -1,
                "rounds": {},
                "finished": False,
            }
            self._write_state()

    # -- state ---------------------------------------------------------------------
    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.state_path}: unreadable ({e})") from None

    def _write_state(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1))

    def _check_same_run(self) -> None:
        if self.state.get("fingerprint") == self.fingerprint:
            return
        try:
            old = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
            changed = _diff(old, self.cfg.model_dump(mode="json"))
        except (OSError, yaml.YAMLError):
            changed = ["(config.yaml unreadable)"]
        raise RunDirError(
            f"{self.path} holds run {self.state.get('fingerprint')} made with another config "
            f"(changed: {', '.join(changed) or 'unknown'}); use a new run directory, or restore "
            "the config to continue that run"
        )

    def _drop_incomplete_metrics(self) -> None:
        """Forget metric lines of rounds after the last completed one (a crashed round)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("round", 0) <= self.last_round]
        if len(keep) != len(lines):
            atomic_write_text(self.metrics_path, "".join(f"{ln}\n" for ln in keep))

    @property
    def last_round(self) -> int:
        """The last completed round (0: only the initial master; -1: nothing yet)."""
        return int(self.state["last_round"])

    @property
    def finished(self) -> bool:
        return bool(self.state.get("finished"))

    def lr(self, round_: int) -> float:
        return float(self.state["schedule"]["lr"][round_ - 1])

    def history(self) -> dict[str, dict]:
        return self.state["rounds"]

    # -- rounds --------------------------------------------------------------------
    def round_path(self, round_: int) -> Path:
        return self.rounds_dir / _ROUND.format(round_)

    def load_master(self) -> ArkModel:
        """The master student after the last completed round."""
        if self.last_round < 0:
            raise RunDirError(f"{self.path}: no round has been completed yet")
        return load_model(self.round_path(self.last_round), role="student")

    def load_server_state(self) -> dict[str, torch.Tensor]:
        """The aggregator's state after the last completed round (empty if it keeps none)."""
        path = self.rounds_dir / _SERVER.format(self.last_round)
        return load_tensors(path) if path.exists() else {}

    def commit_round(self, round_: int, master: ArkModel, record: dict | None = None,
                     server_state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Save the master and the aggregator's state, then mark ``round_`` complete, then prune."""
        if round_ != self.last_round + 1:
            raise RunDirError(f"round {round_} follows round {self.last_round}: out of order")
        self.rounds_dir.mkdir(exist_ok=True)
        save_model(
            master, self.round_path(round_), role="student",
            provenance={"round": round_, "fingerprint": self.fingerprint, **(record or {})},
        )
        if server_state:
            save_tensors(server_state, self.rounds_dir / _SERVER.format(round_),
                         {"round": str(round_), "fingerprint": self.fingerprint})
        self.state["last_round"] = round_
        if round_ > 0:
            self.state["rounds"][str(round_)] = record or {}
        self._write_state()
        self._prune()

    def _prune(self) -> None:
        done = [r for r in range(1, self.last_round + 1) if self.round_path(r).exists()]
        for r in done[: -self.cfg.keep_rounds]:
            self.round_path(r).unlink(missing_ok=True)
            (self.rounds_dir / _SERVER.format(r)).unlink(missing_ok=True)

    def append_metrics(self, records: list[dict]) -> None:
        """Append lines to metrics.jsonl (flushed and synced)."""
        if not records:
            return
        append_jsonl(self.metrics_path, records)
        write_scalars(self.path, records)

    def finish(self, student: ArkModel, teacher: ArkModel | None, provenance: dict) -> None:
        """Write the final model files and mark the run finished."""
        save_model(student, self.path / "master_student.safetensors", role="student",
                   provenance=provenance)
        if teacher is not None:
            save_model(teacher, self.path / "master_teacher.safetensors", role="teacher",
                       provenance=provenance)
        self.state["finished"] = True
        self.state["teacher_sites"] = provenance.get("teacher_sites", [])
        self._write_state()
        self.write_documents()

    def site_examples(self) -> dict[str, dict[str, int]]:
        """Site -> {task: training images} from the last train line of each site."""
        out: dict[str, dict[str, int]] = {}
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("site"):
                out[rec["site"]] = {
                    k.split(".", 1)[1]: int(v) for k, v in rec.items()
                    if k.startswith("num-examples.") and isinstance(v, (int, float))
                }
        return out

    def write_documents(self) -> None:
        """Model cards beside the master files and the run's report; never fails the run."""
        sites = self.site_examples()
        for name in ("master_student.safetensors", "master_teacher.safetensors"):
            if (self.path / name).exists():
                try:
                    write_model_card(self.path / name, sites=sites, rounds=self.last_round)
                except Exception as e:  # a card is documentation: log, keep the models
                    log.warning("model card for %s not written: %s", name, e)
        try:
            write_report(self.path)
        except Exception as e:
            log.warning("report of %s not written: %s", self.path, e)
