"""``ark simulate SIM_YAML``: a federated Ark+ simulation on this node, through `flwr run .`.

The simulation runs on Flower's own simulation engine (a local SuperLink with the Ray
backend), exactly as ``flwr run . --stream`` would, with three guarantees added: a private
FLWR_HOME and free ports (a stale SuperLink is never reused), runtime dependency
installation off, and the SuperLink stopped afterwards. Data and output paths are passed
as absolute paths, so the engine's working directory never matters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ark_core.fed.federation import load_simulation
from simulations.local import private_superlink

APP_DIR = Path(__file__).resolve().parent.parent


def run_simulation(
    sim_yaml: str | Path,
    *,
    run_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    cpus_per_site: int = 1,
    gpus_per_site: float = 0.0,
    timeout: float | None = None,
) -> Path:
    """Run (or resume) a simulation; returns its run directory.

    Args:
        sim_yaml: Simulation YAML (federation + sites).
        run_dir: Overrides the YAML's ``run_dir``.
        data_root: Directory the YAML's relative paths resolve against (default: its own).
        cpus_per_site: CPU cores Ray reserves per simulated site (sites run in parallel
            as long as cores are free).
        gpus_per_site: GPUs per site (1: one Swin-L site trains at a time on one GPU).
        timeout: Seconds before the run is abandoned (it stays resumable).

    Raises:
        RuntimeError: `flwr run` failed or the run stopped before its last round.
    """
    sim_yaml = Path(sim_yaml).expanduser().resolve()
    root = str(Path(data_root).resolve()) if data_root else ""
    cfg, _, out = load_simulation(sim_yaml, root, run_dir or "")
    if not (APP_DIR / "pyproject.toml").is_file():
        raise RuntimeError(f"{APP_DIR}: not a Flower app directory (no pyproject.toml)")
    out.mkdir(parents=True, exist_ok=True)
    flwr = Path(sys.executable).parent / "flwr"
    federation = (
        f"num-supernodes={len(cfg.sites)} client-resources-num-cpus={cpus_per_site} "
        f"client-resources-num-gpus={float(gpus_per_site)}"
    )
    cmd = [
        str(flwr), "run", str(APP_DIR), "--stream",
        "--run-config", f'sim-config="{sim_yaml}" run-dir="{out}" data-root="{root}"',
        "--federation-config", federation,
    ]  # fmt: skip
    with private_superlink(out / ".flwr") as env:
        proc = subprocess.run(cmd, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {proc.returncode}")
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if not state.get("finished"):
        raise RuntimeError(
            f"the simulation stopped before its last round (see the log above); "
            f"run the same command again to resume from {out}"
        )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="simulation YAML (federation + sites)")
    p.add_argument("--run-dir", type=Path, help="override run_dir")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPU cores per site")
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="GPUs per site")


def run(args: argparse.Namespace) -> int:
    out = run_simulation(
        args.config, run_dir=args.run_dir, cpus_per_site=args.cpus_per_site,
        gpus_per_site=args.gpus_per_site,
    )
    print(f"run directory: {out}")
    return 0
