"""``ark report RUN_DIR``: report.png and report.md from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    p.add_argument(
        "--compare", type=Path, nargs="*", default=[],
        help="other run directories drawn in the same axes (e.g. the centralized baseline)",
    )
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    from ..eval.report import write_report

    png, md = write_report(args.run_dir, compare=args.compare, out_dir=args.out)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {png} and {md}")
    return 0
