"""Flower ServerApp of federated Ark+: reads the run config and runs :class:`ArkFederation`.

Run config keys (``[tool.flwr.app.config]``):

- ``sim-config``: simulation YAML (federation + sites); relative to ``data-root`` if set.
- ``fed-config``: federation YAML (deployment); when set, ``sim-config`` is not read.
- ``data-root``: directory relative data and output paths resolve against (default: the
  YAML's directory, never the engine's working directory).
- ``run-dir``: overrides the YAML's ``run_dir``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ark_core.config import load_config, resolve_path
from ark_core.fed.federation import FederationConfig, load_simulation
from ark_core.io import ExclusiveLock, LockHeld
from ops.memory import fix_mmap_threshold
from server.loop import ArkFederation

app = ServerApp()
LOCK_FILE = "serverapp.lock"  # in the run directory, locked while a ServerApp runs it


def federation_from_run_config(run_config: dict) -> tuple[FederationConfig, Path]:
    """The federation config and the absolute run directory a run config names."""
    fed = str(run_config.get("fed-config", "") or "")
    root = str(run_config.get("data-root", "") or "")
    run_dir = str(run_config.get("run-dir", "") or "")
    if fed:
        path = Path(fed).expanduser()
        if root and not path.is_absolute():
            path = Path(root).expanduser() / path
        path = path.resolve()
        cfg = load_config(path, FederationConfig)
        base = Path(root).expanduser().resolve() if root else path.parent
        return cfg, resolve_path(Path(run_dir) if run_dir else cfg.run_dir, base).resolve()
    sim = str(run_config.get("sim-config", "") or "")
    if not sim:
        raise ValueError("set the run config key 'sim-config' (simulation) or 'fed-config'")
    cfg, _, out = load_simulation(sim, root, run_dir)
    return cfg.federation(), out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run or resume the federation the run config describes."""
    cfg, run_dir = federation_from_run_config(dict(context.run_config))
    fix_mmap_threshold()  # each reply's tensors, freed one by one, leave no RSS behind
    # Two ServerApps on one run directory would both write its rounds: one left over from
    # an earlier start (ark-server stops such runs) gets a minute to go, then this one stops.
    try:
        with ExclusiveLock(run_dir / LOCK_FILE, wait_s=60):
            ArkFederation(cfg, run_dir).start(grid)
    except LockHeld as e:
        raise RuntimeError(f"{run_dir} is in use by another ServerApp (pid {e.holder}); "
                           "stop its run first (flwr stop)") from None
