"""A loopback federation under load and injected faults, against the same federation idle.

ark-server and three ark-client sites (TLS, site keys, the tiny model, 3 rounds) run twice:

- **idle**: nothing else on the machine;
- **loaded**: busy workers take every core, and a proxy in front of the sites' port answers
  ``--fault`` (default 10%) of the sites' Fleet requests with 503, which is what the gate
  makes of a SuperLink 500 ("database is locked"); the SuperNodes must retry them.

The ServerApp's own calls to the SuperLink are faulted in-process by tests/test_retry.py
(a run with 30% failing calls ends bit-identical to a clean one): the ServerApp reaches the
SuperLink on loopback, where no proxy can stand without changing ark-server.

Each arm reports rounds finished, faults injected, retries the sites logged, SuperNodes
ark-client replaced, train replies per (round, site) (each must be 1) and whether the two
audit logs agree on every master a site received; then ``RATIO wall_loaded_over_idle``.

    python bench/bench_load.py            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import uvicorn
from starlette.responses import PlainTextResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy_helpers import (  # noqa: E402 - the tests' deployment helpers
    make_keys,
    processes,
    wait_for,
    write_federation,
    write_site,
)

from ops.procs import free_port  # noqa: E402
from server.gate import Gate  # noqa: E402

SITES = ["site-a", "site-b", "site-c"]


class FaultyGate(Gate):
    """The gate, in front of the real one, answering a share of Fleet requests with 503."""

    def __init__(self, upstream: str, verify: ssl.SSLContext, fault: float, seed: int) -> None:
        super().__init__(upstream, verify)
        self.fault, self.rng, self.injected = fault, random.Random(seed), 0

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1/fleet/")
                and self.rng.random() < self.fault):
            self.injected += 1
            await PlainTextResponse("injected\n", status_code=503)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _busy() -> None:
    while True:
        pass


def run_arm(tmp: Path, keys: Path, fault: float, load: bool) -> dict:
    tmp.mkdir(parents=True)
    port = free_port()
    fed = write_federation(tmp, keys, port, SITES, rounds=3, evaluate_every=0,
                           round_timeout_s=900, deployment={"site_wait_s": 120})
    site_port, proxy, workers = port, None, []
    if fault > 0:  # the sites connect to the faulty proxy, which forwards to the gate
        site_port = free_port()
        app = FaultyGate(f"https://localhost:{port}",
                         ssl.create_default_context(cafile=str(keys / "ca.crt")), fault, seed=0)
        proxy = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=site_port, ssl_certfile=str(keys / "server.crt"),
            ssl_keyfile=str(keys / "server.key"), log_level="error", lifespan="on"))
        threading.Thread(target=proxy.run, daemon=True).start()
    if load:
        workers = [mp.Process(target=_busy, daemon=True) for _ in range(mp.cpu_count())]
        for w in workers:
            w.start()
    t0 = time.monotonic()
    try:
        with processes(tmp) as procs:
            server = procs.start("server", "ark-server", str(fed))
            sites = {s: procs.start(s, "ark-client", str(write_site(
                tmp, s, keys, site_port, startup_retries=300, retry_wait_s=1))) for s in SITES}
            wait_for(lambda: server.poll() is not None, 3600, "the run")
            wall = time.monotonic() - t0
            logs = {s: procs.log(p) for s, p in sites.items()}
            code = server.returncode
    finally:
        for w in workers:
            w.kill()
        if proxy is not None:
            proxy.should_exit = True
    run = tmp / "run"
    state = json.loads((run / "state.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trains = Counter((m["round"], m["site"]) for m in lines if m.get("kind") == "train")
    audit = [json.loads(x) for x in (run / "audit.jsonl").read_text().splitlines()]
    sent = {(a["round"], s, a["sha256"]) for a in audit if a["event"] == "master"
            for s in a["sites"] if a["kind"] == "train"}
    received = set()
    for s in SITES:
        for x in (tmp / "sites" / s / "audit.jsonl").read_text().splitlines():
            r = json.loads(x)
            if r.get("event") == "reply" and r.get("kind") == "train":
                received.add((r["round"], s, r["master_sha256"]))
    return {
        "exit": code, "wall_s": round(wall, 1), "rounds": state["last_round"],
        "finished": state["finished"],
        "injected": proxy and app.injected or 0,
        "site_retries": sum(log.count("Connection attempt failed") for log in logs.values()),
        "supernodes_replaced": sum(log.count("starting a new one") for log in logs.values()),
        "superlink_retries": sum(r.get("superlink_retries", 0) for r in state["rounds"].values()),
        "max_replies_per_round_site": max(trains.values()) if trains else 0,
        "audits_agree": received <= sent and bool(received),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault", type=float, default=0.10, help="share of Fleet requests faulted")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_keys(root / "keys", SITES)
        idle = run_arm(root / "idle", root / "keys", 0.0, load=False)
        print("idle  ", json.dumps(idle), flush=True)
        loaded = run_arm(root / "loaded", root / "keys", args.fault, load=True)
        print("loaded", json.dumps(loaded), flush=True)
    for arm in (idle, loaded):
        assert arm["finished"] and arm["rounds"] == 3, arm
        assert arm["max_replies_per_round_site"] == 1 and arm["audits_agree"], arm
    print(f"RATIO wall_loaded_over_idle[fault {args.fault:.0%}, busy cores] = "
          f"{loaded['wall_s'] / idle['wall_s']:.2f} (goal: every round finishes)")


if __name__ == "__main__":
    main()
