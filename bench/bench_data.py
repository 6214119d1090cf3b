"""Images/s per CPU core of the data pipeline, ours against a fair PIL pipeline.

Inputs: 1024x1024 PNG (8-bit grey), JPEG (grey, quality 90) and DICOM (16-bit MONOCHROME2,
12 bits stored, a VOI window, uncompressed) made from REAL radiographs of /work/shared/data
(NIH ChestX-ray14, 256 px) upscaled bicubically, with Gaussian noise (sigma 2 grey levels)
so that they compress like film grain rather than like a smooth upscale. Each image goes
to the student's 768 crop plus the teacher's whole-image 768 view (working size 896), on one
thread (torch and OpenCV pinned to one), timed by that thread's CPU time
(``time.thread_time``) so that other processes on the machine do not distort the rate:

- ``ours``: :func:`~ark_core.data.readers.read_image_near` and
  :class:`~ark_core.data.transforms.TwoViewTransform` (768, work 896), as the dataset does.
- ``ours+cache``: the same transform on the ``ark cache`` copy (.npy at 896).
- ``pil``: what a competent engineer writes for the same output with PIL: decode (PIL; DICOM
  through pydicom's own modality and VOI functions), resize to 896, crop-resize and a bilinear
  affine with PIL, the one grey plane converted to float once, the same intensity change in
  float, and ImageNet normalisation by broadcasting to 3 channels. It takes the same random
  draws (``TwoViewTransform.draw``), so both arms do the same work: tests/test_bench_data.py
  checks the draws, the float stage (equal to 1e-6 on the same grey view) and the geometry
  (equal up to interpolation: about half a grey level on average here).
- ``pil+cache``: the same on the cached 896 copy.

Arms alternate (rotating which goes first), ``--reps`` repetitions after one warm-up. Each
figure is the median of the per-repetition ratios ours / pil, with min and max (goal >= 2).

Usage: ``python bench/bench_data.py [--quick] [--images N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from _util import ROOT, alternate, machine, pair_ratios, ratio_spread_line, spread
from PIL import Image

from ark_core.data.cache import ImageCache, build_cache, cache_dir_for
from ark_core.data.manifest import Manifest
from ark_core.data.readers import read_image_near
from ark_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StudentDraw,
    TwoViewTransform,
    affine_matrix,
)
from ark_core.tasks import TaskSpec, TaskType

# The 256 px originals where this workplace has them, else the embedded 96 px demo images.
SOURCE = next(
    p for p in (Path("/work/shared/data/nih-cxr14-mini/images"),
                ROOT / "simulations" / "demo_data" / "nih" / "images") if p.is_dir()
)
SIDE, WORK, IMG = 1024, 896, 768
MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, np.float32)[:, None, None]
BILINEAR = Image.Resampling.BILINEAR


def make_inputs(out: Path, n: int) -> dict[str, list[Path]]:
    """n images per format at 1024x1024 from real radiographs (see the module docstring)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    sources = sorted(SOURCE.glob("*.png"))[:n]
    if len(sources) < n:
        raise SystemExit(f"need {n} images in {SOURCE}")
    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {"png": [], "jpeg": [], "dicom": []}
    for i, src in enumerate(sources):
        up = np.asarray(Image.open(src).convert("L").resize((SIDE, SIDE), Image.Resampling.BICUBIC))
        grain = rng.normal(0.0, 2.0, up.shape)
        img = np.clip(up + grain, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"{i}.png")
        Image.fromarray(img).save(out / f"{i}.jpeg", quality=90)
        files["png"].append(out / f"{i}.png")
        files["jpeg"].append(out / f"{i}.jpeg")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
        ds.Rows = ds.Columns = SIDE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = np.clip(up.astype(np.float64) * 16 + grain * 16, 0, 4095).astype(
            np.uint16).tobytes()
        path = out / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files["dicom"].append(path)
    return files


def pydicom_grey(path: Path) -> np.ndarray:
    """A DICOM file's grey levels through pydicom's own display functions."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    return np.rint(x * (255.0 / (2 ** int(ds.BitsStored) - 1))).astype(np.uint8)


def pil_decode(path: Path) -> Image.Image:
    if path.suffix == ".dcm":
        return Image.fromarray(pydicom_grey(path))
    return Image.open(path).convert("L")


def pil_geometry(
    im: Image.Image, draw: StudentDraw, img: int = IMG, work: int = WORK
) -> tuple[Image.Image, Image.Image]:
    """The student's and the teacher's grey views with PIL: work size, crop, affine."""
    if im.size != (work, work):
        im = im.resize((work, work), BILINEAR)
    top, left, h, w = draw.box
    student = im.resize((img, img), BILINEAR, box=(left, top, left + w, top + h))
    # PIL's transform takes the inverse map on pixel corners; ours is forward on pixel centres.
    inv = np.linalg.inv(affine_matrix(img, draw.angle, draw.translate, draw.scale))
    (a, b, c), (d, e, f) = inv[0], inv[1]
    student = student.transform((img, img), Image.Transform.AFFINE,
                                (a, b, c + 0.5 - (a + b) / 2, d, e, f + 0.5 - (d + e) / 2),
                                BILINEAR, fillcolor=0)
    return student, im.resize((img, img), BILINEAR)


def float_views(
    student: np.ndarray, teacher: np.ndarray, draw: StudentDraw
) -> tuple[torch.Tensor, torch.Tensor]:
    """The intensity change and normalisation in float: each grey plane converted once."""
    s = np.asarray(student, np.float32) / 255
    if draw.brightness is not None and draw.contrast is not None:
        s = np.clip(s * draw.brightness, 0, 1)
        s = np.clip(draw.contrast * s + (1 - draw.contrast) * s.mean(), 0, 1)
    elif draw.gamma is not None:
        s = s**draw.gamma
    t = np.asarray(teacher, np.float32) / 255
    return torch.from_numpy((s - MEAN) / STD), torch.from_numpy((t - MEAN) / STD)


def fair_pil(
    im: Image.Image, two_view: TwoViewTransform, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of a decoded image, the PIL way, from the same draws as ours."""
    draw = two_view.draw(gen)
    student, teacher = pil_geometry(im, draw, two_view.img_size, two_view.work_size)
    return float_views(np.asarray(student), np.asarray(teacher), draw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 images per format (CI smoke run)")
    p.add_argument("--images", type=int, default=None, help="images per format (default 8)")
    p.add_argument("--reps", type=int, default=None, help="repetitions after warm-up (default 7)")
    args = p.parse_args(argv)
    n = args.images or (2 if args.quick else 8)
    reps = args.reps or (5 if args.quick else 7)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    print(f"machine: {machine()}")
    print("one thread per pipeline (torch and OpenCV pinned to 1); images/s per CPU core = "
          "images / CPU seconds of that thread (other processes share the cores)")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_inputs(Path(tmp), n)
        spec = TaskSpec("bench", ("x",), TaskType.BINARY)
        every = [f for fs in files.values() for f in fs]
        manifest = Manifest(task=spec, root=Path(tmp), paths=[f.name for f in every],
                            targets=np.zeros((len(every), 1), np.float32),
                            patient_ids=[f.name for f in every])
        build_cache([manifest], Path(tmp) / "cache", WORK, fmt="npy")
        cache = ImageCache(cache_dir_for(Path(tmp) / "cache", "bench", WORK), WORK)
        two_view = TwoViewTransform(IMG, WORK)
        gen = torch.Generator().manual_seed(0)
        pipelines: dict[str, Callable[[Path], object]] = {
            "ours": lambda f: two_view(read_image_near(f, WORK), gen),
            "ours+cache": lambda f: two_view(cache.read(f.name, f), gen),
            "pil": lambda f: fair_pil(pil_decode(f), two_view, gen),
            "pil+cache": lambda f: fair_pil(Image.fromarray(cache.read(f.name, f)), two_view, gen),
        }

        def rate(fn: Callable[[Path], object], paths: list[Path]) -> Callable[[], float]:
            def run() -> float:
                t = time.thread_time()
                for f in paths:
                    fn(f)
                return len(paths) / (time.thread_time() - t)
            return run

        rates = {fmt: alternate({k: rate(fn, paths) for k, fn in pipelines.items()}, reps)
                 for fmt, paths in files.items()}
        print(f"images/s per core, median [min, max] of {reps} alternating repetitions:")
        for fmt, r in rates.items():
            print(f"{fmt:>6} " + "  ".join(f"{k} {spread(v, '.1f')}" for k, v in r.items()))
        for fmt, r in rates.items():
            print(ratio_spread_line(f"ours_over_fair_pil_images_per_s_per_core[{fmt}]",
                                    pair_ratios(r["ours"], r["pil"]), ">= 2"))
            print(ratio_spread_line(f"ours_cached_over_fair_pil_cached_images_per_s_per_core[{fmt}]",
                                    pair_ratios(r["ours+cache"], r["pil+cache"]), ">= 2"))
        med = {fmt: statistics.median(r["ours"]) for fmt, r in rates.items()}
        print("ours, images/s per core: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
