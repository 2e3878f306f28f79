"""Throughput of a dataset run against plain batched inference through the same loader.

What is measured: images per second over a folder of generated JPEGs (default 96 images, 640x480), for

* the baseline: the same DataLoader (:class:`gradcam.batch.dataset.ImageDataset`, same workers and batch
  size) feeding ``model(batch)`` under ``torch.inference_mode()``, nothing written;
* ``gradcam explain DIR``'s engine, :func:`gradcam.batch.local.run_local`: Grad-CAM maps, overlay PNGs,
  raw maps and manifest lines written for every image, into a fresh output folder each round.

Both use the bundled EfficientNet-Lite0 loaded once (model loading and process start-up, the same for
any run, are left out). Rounds alternate the two, first one then the other, after one warm-up round of
each; reported: the median images/s of each and the ratio of medians (target >= 0.85).

Run: ``.venv/bin/python benchmarks/throughput.py [--images 96] [--rounds 5] [--batch 32] [--workers 2]``.
A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradcam import models
from gradcam.batch.core import Job
from gradcam.batch.dataset import OVERLAY_SIZE, ImageDataset, loader
from gradcam.batch.inputs import collect_images, output_keys
from gradcam.batch.local import run_local
from gradcam.batch.manifest import RunLog
from gradcam.pipeline import Explainer

TARGET_RATIO = 0.85


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    with Image.open(Path(__file__).resolve().parents[1] / "examples" / "cat.png") as cat:
        base = cat.convert("RGB").resize((640, 480))
    for index in range(count):
        noisy = np.clip(np.asarray(base, float) + rng.normal(0, 3, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{index:04d}.jpg", quality=90)


def plain(
    loaded: models.LoadedModel, paths: list[Path], batch: int, workers: int, overlay_size: int
) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for samples in loader(ImageDataset(paths, loaded.preprocess, overlay_size), batch, workers):
            loaded.module(torch.stack([s.tensor for s in samples]))
    return len(paths) / (time.perf_counter() - started)


def explained(job: Job, paths: list[Path], keys: list[str], scratch: Path) -> float:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    job.out = out
    started = time.perf_counter()
    with RunLog(out, {"benchmark": True}) as log:
        run_local(job, paths, keys, log)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overlay-size", type=int, default=OVERLAY_SIZE, help="0: full-size overlays")
    args = parser.parse_args()
    loaded = models.load()
    job = Job(
        loaded,
        Explainer(loaded.module, "gradcam"),
        Path("."),
        batch_size=args.batch,
        workers=args.workers,
    )
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "images").mkdir()
        make_images(scratch / "images", args.images)
        paths = collect_images([str(scratch / "images")])
        keys = output_keys(paths)
        (
            plain(loaded, paths, args.batch, args.workers, args.overlay_size),
            explained(job, paths, keys, scratch),
        )  # warm-up
        baseline, ours = [], []
        for _ in range(args.rounds):
            baseline.append(plain(loaded, paths, args.batch, args.workers, args.overlay_size))
            ours.append(explained(job, paths, keys, scratch))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} JPEGs 640x480, "
        f"batch {args.batch}, {args.workers} workers, {args.rounds} rounds"
    )
    print(
        f"plain inference through the loader: median {statistics.median(baseline):.1f} images/s "
        f"(all: {', '.join(f'{v:.1f}' for v in baseline)})"
    )
    print(
        f"gradcam explain (maps, overlays, manifest): median {statistics.median(ours):.1f} images/s "
        f"(all: {', '.join(f'{v:.1f}' for v in ours)})"
    )
    ratio = statistics.median(ours) / statistics.median(baseline)
    print(f"ratio of medians: {ratio:.3f} (target >= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
