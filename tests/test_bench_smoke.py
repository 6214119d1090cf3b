"""Each benchmark's quick mode runs on CPU and prints its ratios (bench/README.md)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run_all  # noqa: E402

RATIO = re.compile(r"^RATIO (\S.*?) = (-?[0-9.]+|nan|inf) \(goal .*\)$", re.M)

# script -> ratio names its quick mode must print
EXPECTED = {
    "bench_trainer.py": ["trainer_over_plain_images_per_s[round, cpu, tiny]",
                         "trainer_over_plain_images_per_s[step, cpu, tiny]"],
    "bench_aggregation.py": ["peak_rss_ours_over_flower[2 sites]",
                             "peak_rss_above_start_ours_over_flower[2 sites]",
                             "time_ours_over_inplace_adds[2 sites]",
                             "serverapp_round_peak_rss_above_start_over_model[2 sites]"],
    "bench_gpu_step.py": ["bf16_over_fp32_images_per_s[cpu smoke, tiny]",
                          "ddp_world1_over_plain_images_per_s[cpu smoke, tiny]"],
    "bench_data.py": [f"ours_over_fair_pil_images_per_s_per_core[{f}]"
                      for f in ("png", "jpeg", "dicom")],
    "bench_transfer.py": [f"{what}_over_fp32[{enc}]"
                          for enc in ("bf16", "int8-delta+ef", "bf16-both", "int8-both")
                          for what in ("bytes_per_site_round", "wire_bytes_uplink",
                                       "wire_bytes_both_ways", "wire_bytes_whole_run")],
    "bench_data_check.py": ["data_check_sniff_over_stat_walk", "data_check_check_over_stat_walk"],
    "bench_labels.py": [f"{arm}_{what}_over_pandas[generated]" for what in ("memory", "time")
                        for arm in ("label_read", "chestxray14_adapter")],
    "bench_clientapp.py": ["clientapp_peak_rss_above_plain_loop_over_model[tiny]"],
}


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    """All quick runs at once (they mostly wait on imports and child processes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen([sys.executable, str(ROOT / "bench" / name), "--quick"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env)
        for name in EXPECTED
    }
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_mode_prints_its_ratios(outputs, script):
    run = outputs[script]
    assert run.returncode == 0, run.stderr[-3000:]
    ratios = {name: float(v) for name, v in RATIO.findall(run.stdout)}
    for name in EXPECTED[script]:
        assert name in ratios, f"{script} did not print {name}:\n{run.stdout}"
        assert math.isfinite(ratios[name]) and ratios[name] > 0, (name, ratios[name])
    assert run.stdout.startswith("machine: ")


@pytest.mark.slow
def test_streaming_aggregation_peaks_below_flower(outputs):
    ratios = {n: float(v) for n, v in RATIO.findall(outputs["bench_aggregation.py"].stdout)}
    # Flower holds every reply (2 here) at once; ours one reply beside its running sums.
    assert ratios["peak_rss_above_start_ours_over_flower[2 sites]"] < 1.0


@pytest.mark.slow
def test_compact_transfer_meets_its_byte_goals(outputs):
    ratios = {n: float(v) for n, v in RATIO.findall(outputs["bench_transfer.py"].stdout)}
    assert ratios["bytes_per_site_round_over_fp32[bf16]"] <= 0.5
    assert ratios["bytes_per_site_round_over_fp32[int8-delta+ef]"] <= 0.27
    # With the compact downlink, both ways from round 2 on (round 1 sends fp32: no reference).
    assert ratios["wire_bytes_both_ways_over_fp32[int8-both]"] <= 0.3
    assert ratios["wire_bytes_both_ways_over_fp32[bf16-both]"] <= 0.51
    assert ratios["wire_bytes_both_ways_over_fp32[int8-delta+ef]"] > 0.6  # fp32 down


@pytest.mark.slow
def test_the_table_holds_every_figure_with_its_spread(outputs):
    stdout = {name: run.stdout for name, run in outputs.items()}
    table = run_all.table(stdout, quick=True, when=run_all.datetime.datetime(2026, 1, 2))
    assert "2026-01-02" in table and "machine: " in table and "CPU cores" in table
    for name, out in stdout.items():
        for figure, value in RATIO.findall(out):
            row = next(r for r in table.splitlines() if f"| `{figure}` |" in r)
            assert f"| {value} |" in row and name in row
    data = run_all.parse("bench_data.py", stdout["bench_data.py"])
    assert data and all(r.n is not None and float(r.lo) <= float(r.value) <= float(r.hi)
                        for r in data)
