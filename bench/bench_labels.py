"""Memory and time of reading real label files: ark_core's columnar ``read_csv`` vs pandas.

The files are the public label files TorchXRayVision 1.5.7 ships in its wheel (pinned by
SHA-256): ChestX-ray14's ``Data_Entry_2017_v2020.csv.gz``, CheXpert's train list, VinDr-CXR's
Kaggle ``train.csv``, RSNA Pneumonia's ``stage_2_train_labels.csv`` (taken out of its zip)
and the RSNA DICOM header dump. Arms, each measurement in a fresh interpreter:

- ``ours``: :func:`ark_core.data.adapters.base.read_csv` (Arrow string columns, line numbers).
- ``pandas``: plain ``pandas.read_csv(path)`` (types inferred, so numeric columns are not
  even kept as text).
- ``adapter`` (ChestX-ray14 only): the ``chestxray14`` adapter over a root holding just the
  label file: ``read_csv`` and the adapter's loop over every row (labels, paths, meta), the
  end-to-end figure.
- ``dicts`` (``--dicts``): the dict-per-row reader ``read_csv`` replaced; for ChestX-ray14
  also ``adapter_dicts``, the adapter over that reader (the end-to-end figure before).

Every child first imports pandas, pyarrow and the project and reads a two-row file with
both readers, so that all arms start from the same libraries; it then resets its peak RSS
(Linux ``/proc/self/clear_refs``) and reports the peak above that start and the wall and CPU
seconds of one read, keeping the result. Arms alternate; each ratio pairs repetition i of
an arm with repetition i of pandas, reported as median [min, max].

Usage: ``python bench/bench_labels.py [--quick] [--reps N] [--wheel PATH | --wheel-dir DIR]
[--dicts]``; ``--quick`` reads a generated ChestX-ray14-like file instead (no download).
"""

from __future__ import annotations

import argparse
import csv
import gc
import gzip
import hashlib
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from _util import MIB, current_rss_bytes, machine, peak_rss_bytes, ratio_spread_line, run_child

WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"
WHEEL_SHA256 = "95f6c3475661f3515d4258deb0855bd5d1b1a56e0b65384251d3dd3fa61fac41"
FILES = [  # in the wheel's torchxrayvision/data/
    "Data_Entry_2017_v2020.csv.gz",
    "chexpert_train.csv.gz",
    "vinbigdata-train.csv.gz",
    "kaggle_stage_2_train_labels.csv.zip",
    "kaggle_stage_2_train_images_dicom_headers.csv.gz",
]
ADAPTER_FILE = "Data_Entry_2017_v2020.csv.gz"
GOALS = {"memory": "<= 1.2", "time": "<= 1.5"}


def fetch_wheel(args: argparse.Namespace, tmp: Path) -> Path:
    """The pinned wheel: --wheel, else from --wheel-dir, else downloaded by pip; hash-checked."""
    wheel = args.wheel or (args.wheel_dir or tmp) / WHEEL
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "torchxrayvision==1.5.7", "-d", str(wheel.parent)], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def extract(wheel: Path, out: Path) -> list[Path]:
    """The label files, a zipped one unzipped."""
    paths = []
    with zipfile.ZipFile(wheel) as whl:
        for name in FILES:
            path = out / name
            path.write_bytes(whl.read(f"torchxrayvision/data/{name}"))
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as z:
                    (member,) = z.namelist()
                    path = Path(z.extract(member, out))
            paths.append(path)
    return paths


def generate(out: Path, rows: int) -> Path:
    """A ChestX-ray14-like label file (the quick mode's stand-in)."""
    path = out / "generated_data_entry.csv.gz"
    findings = ["No Finding", "Effusion", "Infiltration|Mass", "Atelectasis|Effusion|Nodule"]
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position", "OriginalImage[Width", "Height]"])
        for i in range(rows):
            w.writerow([f"{i // 3:08d}_{i % 3:03d}.png", findings[i % 4], i % 3, i // 3 + 1,
                        20 + i % 60, "MF"[i % 2], "PA", 2500 + i % 500, 2048 + i % 300])
    return path


def _peak_since_reset() -> tuple[bool, int]:
    """Reset the peak RSS where Linux allows it; returns whether it did, and RSS now."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True, current_rss_bytes()
    except OSError:
        return False, current_rss_bytes()


def _peak(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    return peak_rss_bytes()


def child(arm: str, path: Path) -> dict:
    import pandas

    for module in ("pyarrow.csv", "pyarrow.compute"):  # loaded before the start in every arm
        importlib.import_module(module)
    import ark_core.data.adapters.chestxray14 as chestxray14
    from ark_core.data.adapters.base import read_csv
    from ark_core.data.adapters.chestxray14 import ChestXray14

    def dicts(p: Path, required: object = ()) -> tuple[list[str], list]:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader)]
            return header, [(reader.line_num, dict(zip(header, map(str.strip, r), strict=False)))
                            for r in reader if r]

    if arm == "adapter_dicts":
        chestxray14.read_csv = dicts

    read = {
        "ours": lambda: read_csv(path)[1],
        "pandas": lambda: pandas.read_csv(path),
        "adapter": lambda: ChestXray14(path.parent, {"label_file": path.name}),
        "adapter_dicts": lambda: ChestXray14(path.parent, {"label_file": path.name}),
        "dicts": lambda: dicts(path)[1],
    }[arm]
    with tempfile.TemporaryDirectory() as d:  # warm both readers' first-call costs
        tiny = Path(d) / "tiny.csv"
        tiny.write_text("a,b\n1,x\n2,y\n")
        read_csv(tiny), pandas.read_csv(tiny)
    reset, start = _peak_since_reset()
    wall, cpu = time.perf_counter(), time.process_time()
    kept = read()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"peak": _peak(reset) - start, "wall": wall, "cpu": cpu, "rows": len(kept)}


def _mid(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a generated file, 2 repetitions (CI)")
    p.add_argument("--reps", type=int, help="repetitions per arm (default 5; --quick: 2)")
    p.add_argument("--wheel", type=Path, help=f"the downloaded {WHEEL}")
    p.add_argument("--wheel-dir", type=Path, help=f"a folder holding (or to receive) {WHEEL}")
    p.add_argument("--dicts", action="store_true", help="also the dict-per-row reader it replaced")
    p.add_argument("--child", nargs=2, metavar=("ARM", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    reps = args.reps or (2 if args.quick else 5)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = [generate(tmp, 20_000)] if args.quick else extract(fetch_wheel(args, tmp), tmp)
        print(f"{'file':<50} {'rows':>7} {'arm':>13} {'peak MiB above start':>26} "
              f"{'wall ms':>24} {'cpu ms':>8}")
        for path in files:
            adapter = args.quick or path.name == ADAPTER_FILE
            arms = ["ours", "pandas"] + ["adapter"] * adapter + ["dicts"] * args.dicts \
                + ["adapter_dicts"] * (adapter and args.dicts)
            runs: dict[str, list[dict]] = {a: [] for a in arms}
            for rep in range(reps):
                for arm in arms if rep % 2 == 0 else arms[::-1]:
                    runs[arm].append(run_child(Path(__file__), [arm, str(path)]))
            key = "generated" if args.quick else path.name
            for arm in arms:
                rs = runs[arm]
                print(f"{key:<50} {rs[0]['rows']:>7} {arm:>13} "
                      f"{_mid([r['peak'] / MIB for r in rs]):>26} "
                      f"{_mid([r['wall'] * 1e3 for r in rs]):>24} "
                      f"{statistics.median(r['cpu'] * 1e3 for r in rs):>8.0f}")
            for arm in arms[:1] + arms[2:]:
                name = {"ours": "label_read", "adapter": "chestxray14_adapter",
                        "dicts": "dict_rows", "adapter_dicts": "chestxray14_adapter_dict_rows"}[arm]
                for what, field in (("memory", "peak"), ("time", "wall")):
                    pairs = zip(runs[arm], runs["pandas"], strict=True)
                    ratios = [a[field] / b[field] for a, b in pairs]
                    print(f"  {arm} over pandas, {what}: {_mid(ratios)}")
                    goal = GOALS[what] if arm == "ours" else "none: for the record"
                    print(ratio_spread_line(f"{name}_{what}_over_pandas[{key}]", ratios, goal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
