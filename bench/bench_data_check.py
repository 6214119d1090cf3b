"""Speed of ``ark data check`` over ChestX-ray14's full label file, vs a plain ``stat`` walk.

The label file is ChestX-ray14's real ``Data_Entry_2017_v2020.csv.gz`` (112,120 films of
30,805 patients; from the TorchXRayVision 1.5.7 wheel, pinned by SHA-256), beside one
stand-in PNG per film laid out as the release is (``images/NAME.png``). Arms, alternated,
each over the same files with the same number of threads:

- ``stat``: a plain parallel walk that calls ``os.stat`` on every file (the baseline: the
  least any check that each file exists must do).
- ``sniff``: ``ark_core.data.filecheck.check_paths``, the per-file header check.
- ``check``: ``ark_core.data.check.check_sites`` on a task over that root: the label file
  read, splits, overlap and twin proofs, tables and the sniff: ``ark data check`` without
  its timed training step and its PNG.

Wall seconds (the work is I/O and threads); each ratio pairs repetition i of an arm with
repetition i of ``stat``, reported as median [min, max].

Usage: ``python bench/bench_data_check.py [--quick] [--reps N] [--workers N] [--wheel PATH |
--wheel-dir DIR]``; ``--quick`` generates a 3,000-film label file instead (no download).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _util import machine, ratio_spread_line
from bench_labels import ADAPTER_FILE, fetch_wheel, generate

GOAL = "<= 2"
# A valid 1x1 greyscale PNG: signature, IHDR, IDAT, IEND.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015d0b2a1e0000000049454e44ae426082")


def lay_out(labels: Path, root: Path) -> list[str]:
    """The release's layout: the label file and one stand-in PNG per film; the paths."""
    import csv
    import gzip

    (root / "images").mkdir(parents=True)
    shutil.copy(labels, root / "Data_Entry_2017_v2020.csv.gz")
    with gzip.open(labels, "rt", newline="") as f:
        names = [row["Image Index"] for row in csv.DictReader(f)]
    paths = [str(root / "images" / n) for n in names]
    for p in paths:
        with open(p, "wb") as out:
            out.write(PNG)
    return paths


def stat_walk(paths: list[str], workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(os.stat, paths):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(32, (os.cpu_count() or 1) * 4))
    p.add_argument("--wheel", type=Path)
    p.add_argument("--wheel-dir", type=Path)
    args = p.parse_args()
    logging.disable(logging.WARNING)

    from ark_core.config import TaskConfig
    from ark_core.data.check import SiteData, check_sites
    from ark_core.data.filecheck import check_paths

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        if args.quick:
            labels = generate(tmp, 3000)
        else:
            with zipfile.ZipFile(fetch_wheel(args, tmp)) as whl:
                labels = tmp / ADAPTER_FILE
                labels.write_bytes(whl.read(f"torchxrayvision/data/{ADAPTER_FILE}"))
        root = tmp / "nih"
        t0 = time.perf_counter()
        paths = lay_out(labels, root)
        print(f"{len(paths):,} stand-in files laid out in {time.perf_counter() - t0:.1f} s; "
              f"{args.workers} threads; {args.reps} alternating repetitions after a warm-up")
        task = TaskConfig(name="nih", dataset="chestxray14", root=root)
        arms = {
            "stat": lambda: stat_walk(paths, args.workers),
            "sniff": lambda: check_paths(paths, workers=args.workers, progress=False),
            "check": lambda: check_sites([SiteData("site", tmp, [task])],
                                         workers=args.workers, progress=False),
        }
        report = check_sites([SiteData("site", tmp, [task])], progress=False)  # warm-up
        assert not report.problems, report.problems[:3]
        for fn in arms.values():
            fn()
        times: dict[str, list[float]] = {a: [] for a in arms}
        for _ in range(args.reps):
            for name, fn in arms.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            print(f"{name:>5}: median {statistics.median(ts):.3f} s [{min(ts):.3f}, {max(ts):.3f}]")
        for name in ("sniff", "check"):
            r = [a / b for a, b in zip(times[name], times["stat"], strict=True)]
            print(f"{name} / stat: median {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]")
            print(ratio_spread_line(f"data_check_{name}_over_stat_walk", r, GOAL))


if __name__ == "__main__":
    main()
