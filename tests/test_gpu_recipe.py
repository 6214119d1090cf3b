"""The GPU recipe's CPU smoke run: one real round of the six-dataset simulation, shortened."""

import json

import pytest

from simulations.gpu_recipe import FILMS, main


def test_the_smoke_round_trains_every_task_and_projects_the_run(tmp_path):
    result = main(["--smoke", "--steps", "1", "--out", str(tmp_path)])
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["images_trained"] == 6 * 4 and result["device"] == "cpu"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = {k.split(".", 1)[1] for x in lines if x["kind"] == "train" for k in x
               if k.startswith("steps.")}
    assert trained == set(FILMS)  # all six tasks took their step
    assert (tmp_path / "run" / "master_student.safetensors").is_file()
    # The projection scales the measured rate to the releases' published training films.
    films = sum(f[3] for f in FILMS.values())
    assert result["projected_run_h_one_gpu"] == pytest.approx(
        films * result["rounds"] / result["images_per_s"] / 3600, rel=0.01)
