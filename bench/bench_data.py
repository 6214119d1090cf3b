"""Images/s per CPU core of the data pipeline, ours against a straightforward PIL pipeline.

Inputs: 1024x1024 PNG (8-bit grey), JPEG (grey, quality 90) and DICOM (16-bit MONOCHROME2,
12 bits stored, a VOI window, uncompressed) made from REAL radiographs of /work/shared/data
(NIH ChestX-ray14, 256 px) upscaled bicubically, with Gaussian noise (sigma 2 grey levels)
so that they compress like film grain rather than like a smooth upscale. Each image goes
to the student's 768 crop plus the teacher's whole-image 768 view, through a 896 working
size, on one thread (torch and OpenCV pinned to one), timed by that thread's CPU time
(``time.thread_time``) so that other processes on the machine do not distort the rate:

- ``ours``: :func:`~ark_core.data.readers.read_image_resized` to 896 and
  :class:`~ark_core.data.transforms.TwoViewTransform` (768, work 896).
- ``ours+cache``: the same transform on the ``ark cache`` copy (.npy at 896).
- ``pil``: PIL open/convert/resize to 896, then torchvision's classic PIL transforms
  (RandomResizedCrop, RandomAffine, ColorJitter p=0.3, ToTensor, Normalize) for the
  student and Resize/ToTensor/Normalize for the teacher. DICOM is decoded by the same
  pydicom display pipeline in both (a PIL pipeline has no DICOM reader of its own).

Runs alternate, best of ``--reps``; ratios are ours / pil (goal >= 2).

Usage: ``python bench/bench_data.py [--quick] [--images N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from _util import ROOT, machine, ratio_line
from PIL import Image

from ark_core.data.cache import ImageCache, build_cache, cache_dir_for
from ark_core.data.manifest import Manifest
from ark_core.data.readers import read_image, read_image_resized
from ark_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TwoViewTransform
from ark_core.tasks import TaskSpec, TaskType

# The 256 px originals where this workplace has them, else the embedded 96 px demo images.
SOURCE = next(
    p for p in (Path("/work/shared/data/nih-cxr14-mini/images"),
                ROOT / "simulations" / "demo_data" / "nih" / "images") if p.is_dir()
)
SIDE, WORK, IMG = 1024, 896, 768


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


def pil_pipeline() -> Callable[[Path], tuple[torch.Tensor, torch.Tensor]]:
    """What one writes without thinking about speed: PIL + torchvision's classic transforms."""
    import torchvision.transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    student = T.Compose([
        T.RandomResizedCrop(IMG, scale=(0.5, 1.0), ratio=(0.9, 1.1)),
        T.RandomAffine(10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        T.RandomApply([T.ColorJitter(brightness=0.2, contrast=0.2)], p=0.3),
        T.Grayscale(num_output_channels=3), T.ToTensor(), norm,
    ])
    teacher = T.Compose([T.Resize((IMG, IMG)), T.Grayscale(num_output_channels=3), T.ToTensor(),
                         norm])

    def run(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        if path.suffix == ".dcm":
            im = Image.fromarray(read_image(path))
        else:
            im = Image.open(path).convert("L")
        im = im.resize((WORK, WORK), Image.Resampling.BILINEAR)
        return student(im), teacher(im)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 image per format, 1 repetition")
    p.add_argument("--images", type=int, default=None, help="images per format (default 8)")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 3)")
    args = p.parse_args(argv)
    n = args.images or (1 if args.quick else 8)
    reps = args.reps or (1 if args.quick else 3)
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
            "ours": lambda f: two_view(read_image_resized(f, WORK), gen),
            "ours+cache": lambda f: two_view(cache.read(f.name, f), gen),
            "pil": pil_pipeline(),
        }
        for fn in pipelines.values():  # warm-up: imports, allocator
            fn(files["png"][0])
        rows: dict[tuple[str, str], float] = {}
        for fmt, paths in files.items():
            rates: dict[str, list[float]] = {k: [] for k in pipelines}
            for _ in range(reps):
                for name, fn in pipelines.items():
                    t = time.thread_time()
                    for f in paths:
                        fn(f)
                    rates[name].append(len(paths) / (time.thread_time() - t))
            for name in pipelines:
                rows[fmt, name] = max(rates[name])
        print(f"{'format':>6} " + " ".join(f"{k:>11}" for k in pipelines) + "   (images/s per core)")
        for fmt in files:
            print(f"{fmt:>6} " + " ".join(f"{rows[fmt, k]:>11.1f}" for k in pipelines))
        for fmt in files:
            print(ratio_line(f"ours_over_pil_images_per_s_per_core[{fmt}]",
                             rows[fmt, "ours"] / rows[fmt, "pil"], ">= 2"))
            print(ratio_line(f"ours_cached_over_pil_images_per_s_per_core[{fmt}]",
                             rows[fmt, "ours+cache"] / rows[fmt, "pil"], ">= 2"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
