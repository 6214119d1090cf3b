"""Films shared by releases (RSNA inside ChestX-ray14, COVIDx's RSNA films) never sit on the
training side of another release's test line. The overlaps are built on purpose from the
real-format fixtures: RSNA's id map and COVIDx's source column name the twins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ark_core.config import TaskConfig
from ark_core.data import DatasetError, build_manifests, build_task_splits
from ark_core.data.twins import twin_keys

FX = Path(__file__).parent / "fixtures"


def _task(name, dataset, root, twins="drop", **kw) -> TaskConfig:
    split = {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0, "twins": twins}
    return TaskConfig(name=name, dataset=dataset, root=root, split=split, **kw)


def _by_split(parts: dict) -> dict[str, list[str]]:
    return {s: parts[s].paths for s in ("train", "val", "test")}


@pytest.fixture
def releases(tmp_path):
    """ChestX-ray14, RSNA and COVIDx copies whose films overlap across test lines."""
    for name in ("chestxray14", "rsna_pneumonia", "covidx"):
        shutil.copytree(FX / name, tmp_path / name)
    nih = _task("nih", "chestxray14", tmp_path / "chestxray14")
    rsna_plain = _task("rsna", "rsna_pneumonia", tmp_path / "rsna_pneumonia")
    n, r = build_manifests(nih, tmp_path), build_manifests(rsna_plain, tmp_path)
    rsna_id = lambda p: Path(p).stem  # noqa: E731
    rsna_train = [rsna_id(p) for p in r["train"].paths]
    rsna_test = [rsna_id(p) for p in r["test"].paths]
    assert len(rsna_train) >= 2 and len(rsna_test) >= 2
    # An RSNA training film that is a ChestX-ray14 test film, and an RSNA test film that is
    # a ChestX-ray14 training film of a patient with other training films.
    nih_test = Path(n["test"].paths[0]).name
    counts: dict[str, int] = {}
    for pid in n["train"].patient_ids:
        counts[pid] = counts.get(pid, 0) + 1
    patient = next(p for p, c in counts.items() if c > 1)
    nih_train = Path(n["train"].paths[n["train"].patient_ids.index(patient)]).name
    mapping = [{"subset_img_id": rsna_train[0], "img_id": nih_test.removesuffix(".png")},
               {"subset_img_id": rsna_test[0], "img_id": nih_train}]
    (tmp_path / "rsna_pneumonia" / "map.json").write_text(json.dumps(mapping))
    rsna = _task("rsna", "rsna_pneumonia", tmp_path / "rsna_pneumonia",
                 options={"nih_mapping": "map.json"})
    # COVIDx: its first RSNA-sourced test film is an RSNA training film; its first RSNA
    # training film is an RSNA test film.
    cov = tmp_path / "covidx"
    for lst, new in (("test_COVIDx9A.txt", rsna_train[1]), ("train_COVIDx9A.txt", rsna_test[1])):
        lines = (cov / lst).read_text().splitlines()
        k = next(i for i, x in enumerate(lines) if x.endswith(" rsna"))
        old = lines[k].split()[0]
        lines[k] = lines[k].replace(old, new)
        (cov / lst).write_text("\n".join(lines) + "\n")
    covidx = TaskConfig(name="covidx", dataset="covidx", root=cov, split={"twins": "drop"})
    return {"nih": nih, "rsna": rsna, "covidx": covidx, "patient": patient,
            "rsna_train": rsna_train, "rsna_test": rsna_test, "nih_test": nih_test,
            "nih_train": nih_train, "tmp": tmp_path}


def test_no_training_film_is_a_test_film_of_a_release_read_beside_it(releases):
    r = releases
    cfgs = [r["nih"], r["rsna"], r["covidx"]]
    alone = [build_manifests(c, r["tmp"]) for c in cfgs]
    together = build_task_splits(cfgs, r["tmp"])
    tested = {k for parts in together for keys in twin_keys(parts["test"]) for k in keys}
    for parts in together:
        for split in ("train", "val"):
            assert not any(tested & set(keys) for keys in twin_keys(parts[split]))
    for a, t in zip(alone, together, strict=True):  # test and every-row manifests unchanged
        assert a["test"].paths == t["test"].paths and a["all"].paths == t["all"].paths
    nih_a, rsna_a, cov_a = (_by_split(p) for p in alone)
    nih_t, rsna_t, cov_t = (_by_split(p) for p in together)
    # ChestX-ray14 loses every training film of the patient whose film is an RSNA test film.
    gone = [p for p, pid in zip(alone[0]["train"].paths, alone[0]["train"].patient_ids,
                                strict=True) if pid == r["patient"]]
    assert gone and set(nih_a["train"]) - set(nih_t["train"]) == set(gone)
    # RSNA loses its film that is a ChestX-ray14 test film, and the one COVIDx tests on.
    lost = {f"stage_2_train_images/{i}.dcm" for i in r["rsna_train"][:2]}
    assert set(rsna_a["train"]) - set(rsna_t["train"]) == lost
    # COVIDx loses its training film that RSNA tests on.
    assert len(cov_a["train"]) - len(cov_t["train"]) == 1
    assert not any(r["rsna_test"][1] in p for p in cov_t["train"])


def test_without_the_id_map_the_chestxray14_twins_are_not_seen(releases):
    r = releases
    plain = r["rsna"].model_copy(update={"options": {}})
    nih_alone = build_manifests(r["nih"], r["tmp"])
    nih_t, _ = build_task_splits([r["nih"], plain], r["tmp"])
    assert nih_t["train"].paths == nih_alone["train"].paths


def test_a_simulation_site_keeps_apart_from_the_other_sites_releases(releases):
    """Site A holds ChestX-ray14, site B RSNA: A's ClientApp sees B's test films."""
    from client.site import Site

    r, tmp = releases, releases["tmp"]
    sim = yaml.safe_load((Path(__file__).parents[1] / "simulations" / "demo.yaml").read_text())
    sim["catalogue"] = [{"name": "nih", "labels": ["Pneumonia"], "task_type": "multilabel"},
                        {"name": "rsna", "labels": ["Lung Opacity"], "task_type": "binary"}]
    nih = {**r["nih"].model_dump(mode="json"), "labels": ["Pneumonia"]}
    rsna = {**r["rsna"].model_dump(mode="json"), "labels": ["Lung Opacity"],
            "task_type": "binary"}
    sim["sites"] = [{"name": "a", "tasks": [nih]}, {"name": "b", "tasks": [rsna]}]
    sim["run_dir"] = str(tmp / "run")
    (tmp / "sim.yaml").write_text(yaml.safe_dump(sim))
    site = Site.from_simulation(str(tmp / "sim.yaml"), "", "", 0)
    assert [t.name for t in site.cfg.twin_tasks] == ["rsna"]
    from ark_core.data.loaders import load_task_data

    (kept,) = load_task_data(site.cfg.tasks, site.data_root, twin_tasks=site.cfg.twin_tasks)
    assert r["patient"] not in kept.train.patient_ids
    assert r["patient"] in build_manifests(r["nih"], tmp)["train"].patient_ids


def test_a_broken_id_map_names_its_entry(releases):
    r = releases
    path = r["tmp"] / "rsna_pneumonia" / "map.json"
    path.write_text(json.dumps([{"subset_img_id": "x", "img_id": "00000001_000.png"},
                                {"subset_img_id": "y"}]))
    with pytest.raises(DatasetError, match=r"map\.json: entry 2: needs subset_img_id and img_id"):
        build_manifests(r["rsna"], r["tmp"])


def test_by_default_a_twin_across_the_test_line_is_refused_by_name(releases):
    r = releases
    strict = [c.model_copy(update={"split": c.split.model_copy(update={"twins": "error"})})
              for c in (r["nih"], r["rsna"])]
    with pytest.raises(DatasetError, match=rf"task 'nih': \d+ train film\(s\) are, or share a "
                                           rf"patient with, test films .*images/{r['nih_train']} "
                                           rf"is rsna:stage_2_train_images/{r['rsna_test'][0]}"
                                           rf"\.dcm.*split\.twins: drop"):
        build_task_splits(strict, r["tmp"])


def test_the_id_map_may_be_a_csv(releases):
    r = releases
    entries = json.loads((r["tmp"] / "rsna_pneumonia" / "map.json").read_text())
    lines = ["subset_img_id,img_id"] + [f"{e['subset_img_id']},{e['img_id']}" for e in entries]
    (r["tmp"] / "rsna_pneumonia" / "map.csv").write_text("\n".join(lines) + "\n")
    as_csv = r["rsna"].model_copy(update={"options": {"nih_mapping": "map.csv"}})
    json_keys = twin_keys(build_manifests(r["rsna"], r["tmp"])["all"])
    assert twin_keys(build_manifests(as_csv, r["tmp"])["all"]) == json_keys
    assert sum(len(k) == 3 for k in json_keys) == 2  # both mapped films carry NIH keys
