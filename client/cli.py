"""``ark-client``: a hospital site joining a federated Ark+ run.

From a site YAML with a ``deployment:`` section it checks, in this order, and stops with a
clear message and a non-zero exit at the first problem:

1. the YAML, the private key (an OpenSSH ECDSA key, 0600) and the CA certificate;
2. the data: each task's images and label counts, and unreadable files;
3. the server: a TLS handshake verified by the CA, a bounded number of tries.

Then it runs ``flower-supernode`` with the key, the CA and ``site-config`` in its node
config; the SuperNode keeps reconnecting when the server restarts, and ark-client starts a
new one when it ends after it had joined (:mod:`client.supernode`). One ark-client runs per
site (a lock in its state dir). After a killed session it first waits until the server has
given that session up (:func:`session_wait_s`). Nothing but model tensors and numbers
leaves the site (see client/site.py).

Exit codes: 2 configuration or credentials, 3 data, 4 server unreachable, 5 key refused,
6 TLS or Flower version mismatch, 7 another ark-client of this site is running.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from ark_core.config import ConfigError, TrainConfig, load_config, resolve_path
from ark_core.data.dataset import check_files
from ark_core.data.loaders import load_task_data
from ark_core.fed.deployment import SiteDeployment
from ark_core.fed.federation import SiteConfig
from client.site import Site
from client.supernode import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_DUPLICATE,
    EXIT_MISMATCH,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    STALL_GRACE_S,
    OutputTail,
    SiteError,
    SiteLock,
    explain,
)
from ops import procs

__all__ = ["EXIT_CONFIG", "EXIT_DATA", "EXIT_DUPLICATE", "EXIT_MISMATCH", "EXIT_REFUSED",
           "EXIT_UNREACHABLE", "SiteError", "main"]
SESSION_FILE = "ark-client.session"  # in the state dir while a SuperNode runs
TOUCH_S = 10.0  # how often the session file is touched
REJOIN_MAX_S = 60.0  # longest back-off between SuperNodes


def check_credentials(dep: SiteDeployment, base: Path) -> tuple[Path, Path]:
    """The private key's and CA certificate's absolute paths, after reading both."""
    key = resolve_path(dep.private_key, base).resolve()
    try:
        k = load_ssh_private_key(key.read_bytes(), None)
    except FileNotFoundError:
        raise SiteError(f"private key {key} not found (made by `ark keys`)") from None
    except (OSError, ValueError) as e:
        raise SiteError(f"private key {key}: unreadable or not an OpenSSH private key ({e})") from None
    if not isinstance(k, ec.EllipticCurvePrivateKey):
        raise SiteError(f"private key {key}: not an ECDSA key (Flower needs a NIST curve)")
    if stat.S_IMODE(key.stat().st_mode) & 0o077:
        print(f"[ark-client] WARNING: {key} is readable by others; chmod 600 it", file=sys.stderr)
    ca = resolve_path(dep.ca_cert, base).resolve()
    try:
        x509.load_pem_x509_certificate(ca.read_bytes())
    except FileNotFoundError:
        raise SiteError(f"CA certificate {ca} not found (the coordinator's ca.crt)") from None
    except (OSError, ValueError) as e:
        raise SiteError(f"CA certificate {ca}: unreadable or not a PEM certificate ({e})") from None
    return key, ca


def check_data(yaml_path: Path) -> str:
    """Build every task's manifests and check its files; return the report (raise on errors)."""
    site = Site.from_yaml(yaml_path)
    lines = [f"site {site.cfg.name}: data under {site.data_root}, state in {site.state_dir}"]
    try:
        tasks = load_task_data(site.cfg.tasks, site.data_root, twin_tasks=site.cfg.twin_tasks)
    except (ValueError, OSError) as e:
        raise SiteError(f"task data: {e}", EXIT_DATA) from None
    bad_fraction = TrainConfig().bad_file_fraction  # the trainer's own stop rule
    problems = []
    for t in tasks:
        lines.append(f"  task {t.spec.name} ({t.spec.task_type.value}): "
                     f"{len(t.train)} train, {len(t.val)} validation images")
        for label, c in t.train.label_counts().items():
            lines.append(f"    {label:<24} {c['positive']:>6} pos {c['negative']:>6} neg "
                         f"{c['ignored']:>6} ignored")
        for split, m in (("train", t.train), ("val", t.val)):
            if len(m) == 0:
                if split == "train":
                    problems.append(f"task {t.spec.name}: no training images")
                continue
            rep = check_files(m, progress=False)
            if rep.bad:
                lines.append("    " + rep.summary().replace("\n", "\n    "))
            if rep.bad_fraction > bad_fraction:
                problems.append(f"task {t.spec.name} ({split}): {len(rep.bad)} of {rep.total} "
                                f"files unreadable (more than {bad_fraction:.0%})")
    report = "\n".join(lines)
    if problems:
        raise SiteError(report + "\n" + "\n".join(problems), EXIT_DATA)
    return report


def wait_for_server(address: str, ca: Path, tries: int, wait_s: float) -> None:
    """Open a TLS connection (verified by ``ca``) to ``address``; bounded retries."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca))
    err: Exception | None = None
    for attempt in range(1, tries + 1):
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            return
        except ssl.SSLCertVerificationError as e:
            raise SiteError(f"server {address}: its certificate does not verify with the CA "
                            f"({e.verify_message}); check ca_cert and the server address",
                            EXIT_MISMATCH) from None
        except ssl.SSLError as e:
            raise SiteError(f"server {address}: the TLS handshake failed ({e.reason or e}); is "
                            "it the federation's site port?", EXIT_MISMATCH) from None
        except OSError as e:
            err = e
            print(f"[ark-client] server {address} not reachable (try {attempt}/{tries}): {e}",
                  file=sys.stderr)
            if attempt < tries:
                time.sleep(wait_s)
    raise SiteError(f"server {address} unreachable after {tries} tries: {err}", EXIT_UNREACHABLE)


def session_wait_s(state_dir: Path, now: float | None = None) -> float:
    """Seconds to wait before joining, after an unclean end of this site's previous session.

    A SuperNode killed while it held a round's message leaves that message unanswered. The
    SuperLink gives the message up, and the round goes on with the other sites, once the
    dead session has missed its heartbeats (Flower: ``HEARTBEAT_PATIENCE`` x
    ``HEARTBEAT_DEFAULT_INTERVAL`` after the last one). A new session with the same key
    before then revives the node, and the server waits for the lost reply until the round
    times out (hours for Swin-L). ark-client touches a session file while its SuperNode runs
    and removes it on a clean exit; a file left behind means the last session was killed.
    """
    try:
        last_alive = (state_dir / SESSION_FILE).stat().st_mtime
    except FileNotFoundError:
        return 0.0
    window = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + TOUCH_S + 5.0
    return max(0.0, last_alive + window - (time.time() if now is None else now))


def supernode_env(state_dir: Path, dep: SiteDeployment) -> dict[str, str]:
    """The SuperNode's environment: its app bundles in the site's own state dir.

    Never an inherited FLWR_HOME: Flower installs an app bundle without a lock and treats a
    half-copied one as installed, so two sites sharing a home (two sites on one host, one
    exported FLWR_HOME) could load an incomplete app. The site lock makes the state dir one
    SuperNode's alone.
    """
    env = procs.child_env()
    env["FLWR_HOME"] = str(state_dir / "flwr")
    if dep.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in dep.gpus)
    return env


def supernode_command(yaml_path: Path, dep: SiteDeployment, key: Path, ca: Path,
                      base: Path) -> list[str]:
    cmd = [procs.flwr_bin("flower-supernode"), "--superlink", dep.server,
           "--auth-supernode-private-key", str(key),
           "--node-config", f'site-config="{yaml_path}"',
           "--host", "127.0.0.1", "--port", str(dep.runtime_port),
           "--root-certificates", str(ca)]
    if dep.trusted_entities is not None:
        cmd += ["--trusted-entities", str(resolve_path(dep.trusted_entities, base).resolve())]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ark-client", description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="site YAML with a deployment: section")
    p.add_argument("--check-only", action="store_true", help="check credentials and data, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs.terminate_on_sigterm()
    session: Path | None = None
    try:
        path = args.config.expanduser().resolve()
        cfg = load_config(path, SiteConfig)
        if cfg.deployment is None:
            raise SiteError(f"{path}: no deployment: section (server, ca_cert, private_key)")
        dep, base = cfg.deployment, path.parent
        key, ca = check_credentials(dep, base)
        print(check_data(path), flush=True)
        if args.check_only:
            return 0

        state_dir = Site.from_yaml(path).state_dir
        with SiteLock(state_dir, cfg.name):
            wait_for_server(dep.server, ca, dep.startup_retries, dep.retry_wait_s)
            wait = session_wait_s(state_dir)
            if wait > 0:
                print(f"[ark-client] the last session of this site was killed; waiting {wait:.0f} "
                      "s until the server has given up the round message it may have held",
                      flush=True)
                time.sleep(wait)
            env = supernode_env(state_dir, dep)
            print(f"[ark-client] site {cfg.name} joining {dep.server}", flush=True)
            session = state_dir / SESSION_FILE
            return run_supernode(supernode_command(path, dep, key, ca, base), env, session,
                                 dep.rejoin_timeout_s)
    except KeyboardInterrupt:
        print("\n[ark-client] stopping", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"ark-client: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except SiteError as e:
        print(f"ark-client: error: {e}", file=sys.stderr)
        return e.code
    finally:
        if session is not None:
            session.unlink(missing_ok=True)


def run_supernode(cmd: list[str], env: dict[str, str], session: Path,
                  give_up_s: float = 3600.0) -> int:
    """Run SuperNodes until one ends for a reason the site must act on; its exit code.

    A SuperNode that ends after it had joined (the server answered 401 to its node) is
    replaced, with back-off: the next one joins again if the server merely started over
    with a new registry, and is refused if the site's key was removed or rotated. After
    ``give_up_s`` without a SuperNode that stayed up for ``REJOIN_MAX_S``, it gives up.
    """
    backoff, steady = 1.0, time.monotonic()
    while True:
        started = time.monotonic()
        node = procs.start(cmd, env, pipe=True)
        try:
            assert node.stdout is not None
            tail = OutputTail(node.stdout)
            while (code := node.poll()) is None:
                session.touch()
                if tail.stalled():
                    print("[ark-client] the SuperNode stopped working after a server error but "
                          "did not exit; replacing it", file=sys.stderr, flush=True)
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(timeout=min(TOUCH_S, STALL_GRACE_S / 2))
        finally:
            procs.stop(node)
        verdict = explain(tail.text())
        if verdict is not None:
            print(f"ark-client: error: {verdict.message}", file=sys.stderr, flush=True)
            return verdict.code
        if time.monotonic() - started > REJOIN_MAX_S:
            backoff, steady = 1.0, time.monotonic()
        elif time.monotonic() - steady > give_up_s:
            print(f"ark-client: error: no SuperNode stayed joined for {give_up_s:.0f} s (the last "
                  f"ended with exit {code}); see the SuperNode's output above",
                  file=sys.stderr, flush=True)
            return EXIT_UNREACHABLE
        print(f"[ark-client] the SuperNode ended (exit {code}) after it had joined: the server "
              "no longer knows its node (a new registry, or this site's key was removed); "
              f"starting a new one in {backoff:.0f} s", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(2 * backoff, REJOIN_MAX_S)


if __name__ == "__main__":
    sys.exit(main())
