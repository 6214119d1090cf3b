"""The performance table the README quotes, from one command.

Runs the CPU benchmarks one after the other, each in a fresh process (so that none times
another's work), and prints a Markdown table of every ``RATIO`` line they print: the figure,
its spread (median [min, max] of the alternating repetitions, where the benchmark repeats),
the goal, the machine and the date. ``--quick`` runs their CI smoke modes (a check that the
table builds, not figures to quote); without it, their full modes (about an hour on 2 cores:
the round-overhead benchmark alone trains 5 x 2 federations of 3 rounds of about 60 s).
``--gpu`` adds the GPU benchmarks.

Usage: ``python bench/run_all.py [--quick] [--gpu] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU = ["bench_data.py", "bench_trainer.py", "bench_aggregation.py", "bench_transfer.py",
       "bench_labels.py", "bench_data_check.py", "bench_clientapp.py", "bench_round_overhead.py"]
GPU = [("bench_gpu_step.py", ["--gpu"])]
LINE = re.compile(r"^RATIO (?P<name>\S.*?) = (?P<value>\S+) \(goal (?P<goal>.*?)"
                  r"(?:; median of (?P<n>\d+), min (?P<lo>\S+), max (?P<hi>\S+))?\)$", re.M)


@dataclass
class Row:
    """One figure of one benchmark."""

    script: str
    name: str
    value: str
    goal: str
    n: int | None = None
    lo: str | None = None
    hi: str | None = None

    def spread(self) -> str:
        if self.n is None:
            return "one measurement"
        return f"[{self.lo}, {self.hi}], median of {self.n}"


def parse(script: str, stdout: str) -> list[Row]:
    """The ``RATIO`` lines of one benchmark's output."""
    return [Row(script, m["name"], m["value"], m["goal"], int(m["n"]) if m["n"] else None,
                m["lo"], m["hi"]) for m in LINE.finditer(stdout)]


def machine_line(stdout: str) -> str:
    return next((line.removeprefix("machine: ") for line in stdout.splitlines()
                 if line.startswith("machine: ")), "unknown")


def table(outputs: dict[str, str], quick: bool, when: datetime.datetime) -> str:
    """The Markdown table of every figure, headed by the machine and the date."""
    first = next(iter(outputs.values()), "")
    lines = [f"Performance, {'quick (CI smoke) modes' if quick else 'full modes'}, "
             f"{when:%Y-%m-%d %H:%M} UTC; machine: {machine_line(first)}", "",
             "| Benchmark | Figure | Value | Spread | Goal |", "|---|---|---|---|---|"]
    for script, out in outputs.items():
        rows = parse(script, out)
        if not rows:
            lines.append(f"| `{script}` | (no figures: see its output) | | | |")
        lines += [f"| `{r.script}` | `{r.name}` | {r.value} | {r.spread()} | {r.goal} |"
                  for r in rows]
    return "\n".join(lines)


def run(script: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                          text=True, cwd=HERE.parent, env=env, check=False)
    print(f"{script} {' '.join(args)}: exit {proc.returncode}, {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the benchmarks' CI smoke modes")
    p.add_argument("--gpu", action="store_true", help="add the GPU benchmarks (needs CUDA)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these scripts")
    args = p.parse_args(argv)
    jobs = [(s, []) for s in CPU] + (GPU if args.gpu else [])
    if args.only:
        jobs = [(s, a) for s, a in jobs if s in args.only or s.removesuffix(".py") in args.only]
    when = datetime.datetime.now(datetime.UTC)
    outputs = {s: run(s, [*a, *(["--quick"] if args.quick else [])]) for s, a in jobs}
    print(table(outputs, args.quick, when))
    return 0


if __name__ == "__main__":
    sys.exit(main())
