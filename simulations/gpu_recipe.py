"""One shortened round of the six-dataset simulation at full size, for a borrowed GPU.

``python -m simulations.gpu_recipe [--steps N] [--out DIR]`` runs one federated round of
``simulations/paper/six_datasets.yaml`` (Swin-L at 768 px, three sites, all six tasks) on
synthetic films of each release's typical size and format (PNG, JPEG, 16-bit DICOM), with
each task capped at ``--steps`` optimiser steps. It drives the real ServerApp loop and
ClientApp through the experiment harness's in-process grid (no Ray, no SuperLink), so a
machine needs only this project's wheels. It prints, and writes as JSON, images per
second, peak GPU memory and the projected wall time of the configured run at the
releases' published sizes. ``--smoke`` does the same on CPU with the tiny model and small
films, for CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ark_core.fed.federation import load_simulation

CONFIG = Path(__file__).parent / "paper" / "six_datasets.yaml"
# Typical film of each release (format, height, width) and its published training films.
FILMS = {
    "mimic_cxr": ("jpg", 3056, 2544, 368_960),
    "chexpert": ("jpg", 2828, 2320, 223_414),
    "chestxray14": ("png", 1024, 1024, 86_524),
    "rsna_pneumonia": ("dcm", 1024, 1024, 26_684),
    "vindr_cxr": ("dcm", 2788, 2748, 15_000),
    "shenzhen": ("png", 2985, 2939, 662),
}


def synthetic_film(path: Path, fmt: str, height: int, width: int, seed: int) -> None:
    """A smooth random radiograph-like film (compresses like one, decodes at full cost)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 64 + 2, width // 64 + 2))
    img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((width, height),
                                                                             Image.BILINEAR))
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255)
    if fmt == "dcm":
        from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415 - DICOM films only
        from pydicom.uid import (  # noqa: PLC0415
            ExplicitVRLittleEndian,
            SecondaryCaptureImageStorage,
            generate_uid,
        )

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
        ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = height, width, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (img.astype(np.uint16) * 16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    else:
        Image.fromarray(img.astype(np.uint8)).save(path, quality=90)


def synthetic_tree(sim, out: Path, images: dict[str, int], size: int | None) -> dict:
    """One CSV task per release over synthetic films; the simulation's sites as a dict."""
    sites = []
    for site in sim.sites:
        tasks = []
        for task in site.tasks:
            spec = next(c for c in sim.catalogue if c.name == task.name)
            fmt, h, w, _ = FILMS[task.dataset]
            h, w = (size, size) if size else (h, w)
            root = out / task.name
            (root / "films").mkdir(parents=True, exist_ok=True)
            first = root / "films" / f"0.{fmt}"
            synthetic_film(first, fmt, h, w, seed=len(tasks))
            rng = np.random.default_rng(0)
            with open(root / "labels.csv", "w", newline="") as f:
                rows = csv.writer(f)
                rows.writerow(["path", "patient", *spec.labels])
                for i in range(images[task.name]):
                    film = root / "films" / f"{i}.{fmt}"
                    if i:
                        os.link(first, film)  # same bytes, decoded again every time
                    if spec.task_type.value == "multiclass":
                        y = np.eye(len(spec.labels), dtype=int)[rng.integers(len(spec.labels))]
                    else:
                        y = (rng.random(len(spec.labels)) < 0.3).astype(int)
                    rows.writerow([f"films/{i}.{fmt}", f"p{i}", *y])
            tasks.append({"name": task.name, "dataset": "csv", "root": str(root),
                          "task_type": spec.task_type.value, "labels": list(spec.labels),
                          "options": {"label_columns": list(spec.labels), "patient_column":
                                      "patient"},
                          "split": {"val_fraction": 0.0, "test_fraction": 0.0}})
        sites.append({"name": site.name, "tasks": tasks})
    return {"sites": sites}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimiser steps per task (cap)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-recipe"))
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, 64 px films")
    args = p.parse_args(argv)

    # The apps load Flower: imported once the arguments are known to be right.
    from client.app import app as client_app  # noqa: PLC0415
    from server.app import federation_from_run_config  # noqa: PLC0415
    from server.loop import ArkFederation  # noqa: PLC0415
    from simulations.inprocess import InProcessGrid  # noqa: PLC0415

    sim, _, _ = load_simulation(CONFIG)
    data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    batch = 4 if args.smoke else sim.train.batch_size
    images = {t.name: args.steps * batch for s in sim.sites for t in s.tasks}
    out = args.out.resolve()
    t0 = time.perf_counter()
    data.update(synthetic_tree(sim, out / "data", images, 64 if args.smoke else None))
    print(f"synthetic films written in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in images.items()))
    data.update(rounds=1, local_epochs=1, evaluate_every=0, min_sites=len(sim.sites),
                run_dir=str(out / "run"))
    data["train"].update(batch_size=batch, warmup_epochs=0)
    if args.smoke:
        data["model"] = {"preset": "tiny", "img_size": 64, "work_size": 64}
        data["train"].update(workers=0, threads=2, amp="off", channels_last=False)
    sim_path = out / "recipe.yaml"
    sim_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    rc = {"sim-config": str(sim_path), "data-root": str(out), "run-dir": str(out / "run"),
          "fed-config": ""}
    cfg, run_out = federation_from_run_config(rc)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ArkFederation(cfg, run_out, poll_interval=0.0).start(
        InProcessGrid(client_app, len(sim.sites), rc))
    wall = time.perf_counter() - start
    trained = sum(images.values())
    rate = trained / wall
    full = {t.name: FILMS[t.dataset][3] for s in sim.sites for t in s.tasks}
    per_site = [sum(full[t.name] for t in s.tasks) * sim.local_epochs for s in sim.sites]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": data["model"], "batch_size": batch, "steps_per_task": args.steps,
        "images_trained": trained, "round_s": round(wall, 1),
        "images_per_s": round(rate, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if cuda else None,
        # One GPU serves the sites in turn; in deployment each site trains on its own.
        "projected_run_h_one_gpu": round(sum(per_site) * sim.rounds / rate / 3600, 1),
        "projected_run_h_sites_in_parallel": round(max(per_site) * sim.rounds / rate / 3600, 1),
        "rounds": sim.rounds,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"one round of {sim.rounds} at {rate:.1f} images/s over {trained} films, start-up "
          f"included (so the projection is an upper bound): the full run takes at most about "
          f"{result['projected_run_h_one_gpu']} h on this device alone, "
          f"{result['projected_run_h_sites_in_parallel']} h with each site on its own device "
          f"({math.fsum(per_site):,.0f} films per round)")
    return result


if __name__ == "__main__":
    main()
