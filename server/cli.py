"""``ark-server``: the coordinator of a federated Ark+ run.

From a federation YAML with a ``deployment:`` section it

1. starts ``flower-superlink`` on loopback with TLS, site authentication, a persistent
   database in the run directory and runtime dependency installation off;
2. registers the public key of every site the YAML lists (and unregisters keys that were
   replaced or whose site was removed);
3. opens the sites' port: a gate that passes only the Fleet API (see :mod:`server.gate`);
4. submits the Ark+ run with ``flwr run`` and streams its log until it ends, watching that
   the SuperLink and the ServerApp keep moving (:mod:`server.liveness`): one alive but stuck
   is stopped, and the SuperLink started again to resume the run.

Everything lands in the run directory; Ctrl-C stops every process it started; started again
on the same run directory, the SuperLink keeps its registrations and the ServerApp resumes
after the last completed round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ark_core.config import ConfigError, load_config, resolve_path
from ark_core.fed.federation import FederationConfig
from ark_core.fed.pki import verify_server_cert
from ops import procs
from server.coordinator import STOPPED, Coordinator, Tls, last_round, print_summary

RESTARTS = 3  # restarts of a stuck SuperLink in a row, without a round finished between


def serve(coord: Coordinator, no_submit: bool = False) -> int:
    """Start the SuperLink, keys and gate, and run; start again when the watch finds it stuck."""
    restarts, last = 0, last_round(coord.run_dir)
    while True:
        coord.start_superlink()
        coord.sync_keys()
        if not no_submit:
            coord.stop_stale_runs()
        coord.start_gate()
        if no_submit:
            print("[ark-server] serving; Ctrl-C stops", flush=True)
            assert coord.superlink
            return coord.superlink.wait()
        code = coord.submit_and_follow()
        if coord.stuck is None:
            return code
        if last_round(coord.run_dir) > last:
            restarts, last = 0, last_round(coord.run_dir)
        restarts += 1
        coord.stop()
        if restarts > RESTARTS:
            print(f"[ark-server] the run is stuck after {RESTARTS} restarts without a round "
                  f"finished; see {coord.logs}", file=sys.stderr)
            return 1
        print(f"[ark-server] restarting the SuperLink and resuming after round {last} "
              f"(restart {restarts} of {RESTARTS})", file=sys.stderr, flush=True)
        time.sleep(2.0 * restarts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ark-server", description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="federation YAML with a deployment: section")
    p.add_argument("--run-dir", type=Path, help="override the YAML's run_dir")
    p.add_argument("--sync-keys", action="store_true",
                   help="register/unregister site keys on the running ark-server, then exit")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that `flwr stop` stopped")
    p.add_argument("--no-submit", action="store_true",
                   help="start the SuperLink and the sites' port only (submit later with flwr run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs.terminate_on_sigterm()
    coord: Coordinator | None = None
    try:
        cfg_path = args.config.expanduser().resolve()
        cfg = load_config(cfg_path, FederationConfig)
        run_dir = resolve_path(args.run_dir or cfg.run_dir, cfg_path.parent).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        # No plain-HTTP mode: Flower 1.42 authenticates site keys only over TLS, and the
        # enrolment (node id -> site) rests on those keys.
        if cfg.deployment is None:
            raise ConfigError(f"{cfg_path}: no deployment: section")
        keys = resolve_path(cfg.deployment.keys_dir, cfg_path.parent).resolve()
        tls = Tls(keys / "ca.crt", keys / "server.crt", keys / "server.key")
        for f in (tls.ca, tls.cert, tls.key):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found; make it with `ark keys init {keys}`")
        verify_server_cert(keys)
        coord = Coordinator(cfg_path, cfg, run_dir, tls)
        if args.sync_keys:
            coord.attach()
            coord.sync_keys()
            return 0
        if coord.finished():
            print_summary(run_dir)
            return 0
        stopped = run_dir / STOPPED
        if stopped.exists() and not args.resume:
            print(f"[ark-server] this run was stopped with `flwr stop` ({stopped}); it does not "
                  "resume by itself: pass --resume to continue it", file=sys.stderr)
            return 0
        stopped.unlink(missing_ok=True)
        return serve(coord, args.no_submit)
    except KeyboardInterrupt:
        print("\n[ark-server] stopping; start again on the same run directory to resume",
              file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ark-server: error: {e}", file=sys.stderr)
        return 2
    finally:
        if coord is not None and not args.sync_keys:
            coord.stop()


if __name__ == "__main__":
    sys.exit(main())
