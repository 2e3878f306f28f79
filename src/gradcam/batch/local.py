"""The local engine: a DataLoader decodes in worker processes, the model explains batch after batch,
a writer thread writes the files of one batch while the next is explained, and the manifest records a
batch only once its files are in place."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradcam.batch.dataset import OVERLAY_SIZE, ImageDataset, Sample, loader
from gradcam.batch.explain import BatchResult, Explainer, explain_batch
from gradcam.batch.manifest import RunLog
from gradcam.batch.writer import ShardWriter, output_stem, write_map, write_overlay
from gradcam.metrics.localization import boxes_from_map
from gradcam.models import LoadedModel, model_device


@dataclass
class Job:
    """What to explain and how to write it."""

    loaded: LoadedModel
    explainer: Explainer
    out: Path
    targets: Sequence[int] = ()
    topk: int = 0
    maps: str = "npy"
    batch_size: int = 32
    workers: int = 2
    overlay_size: int = OVERLAY_SIZE


@dataclass
class Summary:
    """What a run did: images explained now, targets written now, errors, images already done."""

    images: int = 0
    targets: int = 0
    errors: int = 0
    already_done: int = 0
    seconds: float = 0.0
    layer: str | None = None
    failed: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def image_records(
    job: Job, sample: Sample, key: str, path: Path, result: BatchResult, row: int, shards: ShardWriter | None
) -> list[dict]:
    """Write the files of image ``row`` of a batch and return its manifest lines, target by target."""
    labels, method = job.loaded.labels, job.explainer.cam.method
    explanation = result.explanation
    input_h, input_w = explanation.maps.shape[-2:]
    width, height = sample.frame_size
    sx, sy = width / input_w, height / input_h
    top5 = [{"index": i, "class": labels[i], "probability": round(p, 6)} for i, p in result.top5[row]]
    records = []
    for n, target in enumerate(result.targets[row]):
        at = result.at(n, row)
        saliency = explanation.maps[at]
        stem = output_stem(key, target, labels[target], method)
        files = {"overlay": write_overlay(job.out, stem, sample.picture, saliency)}
        if shards is None:
            files["map"] = write_map(job.out, stem, explanation.raw[at])
        else:
            files["map"] = shards.add(f"{key}#{target}", explanation.raw[at])
        peak = int(saliency.flatten().argmax())
        x0, y0, x1, y1 = boxes_from_map(saliency).tolist()
        records.append(
            {
                "key": key,
                "image": str(path),
                "target": target,
                "class": labels[target],
                "probability": round(float(explanation.probs[at]), 6),
                "score": round(float(explanation.scores[at]), 6),
                "rank": next((k for k, (i, _) in enumerate(result.top5[row]) if i == target), None),
                "of": len(result.targets[row]),
                "top5": top5,
                "peak": {
                    "x": round((peak % input_w + 0.5) * sx, 1),
                    "y": round((peak // input_w + 0.5) * sy, 1),
                },
                "box": [round(x0 * sx, 1), round(y0 * sy, 1), round(x1 * sx, 1), round(y1 * sy, 1)],
                "size": [width, height],
                "files": files,
            }
        )
    return records


def records_for(
    job: Job,
    samples: list[Sample],
    keys: list[str],
    paths: list[Path],
    result: BatchResult,
    shards: ShardWriter | None,
) -> list[dict]:
    """Write the files of a batch and return its manifest lines (image by image, target by target)."""
    return [
        record
        for row, sample in enumerate(samples)
        for record in image_records(job, sample, keys[row], paths[row], result, row, shards)
    ]


def run_local(
    job: Job,
    paths: Sequence[Path],
    keys: Sequence[str],
    log: RunLog,
    *,
    progress: Callable[[int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Summary:
    """Explain every image not yet done in ``log``, writing files and manifest lines as it goes."""
    started = time.perf_counter()
    summary = Summary(already_done=sum(1 for k in keys if k in log.done))
    todo = [i for i, key in enumerate(keys) if key not in log.done]
    todo_paths, todo_keys = [paths[i] for i in todo], [keys[i] for i in todo]
    device = model_device(job.loaded.module)
    shards = ShardWriter(job.out, _next_shard(job.out)) if job.maps == "npz" else None
    held: list[dict] = []  # lines whose maps wait in an unwritten shard

    def commit(records: list[dict], final: bool = False) -> None:
        nonlocal held
        if shards is None:
            log.append(records)
            return
        held += records
        if shards.full() or final:
            shards.flush()
            log.append(held)
            held = []

    def fail(key: str, path: Path, message: str) -> None:
        summary.errors += 1
        summary.failed.append(str(path))
        log.error(key, str(path), message)
        if on_error is not None:
            on_error(message)

    in_flight: tuple[list[Future], int] | None = None
    # Pillow's encoders release the GIL: several writer threads use several cores.
    with ThreadPoolExecutor(max_workers=max(2, job.workers)) as writer:
        for samples in loader(
            ImageDataset(todo_paths, job.loaded.preprocess, job.overlay_size), job.batch_size, job.workers
        ):
            good = []
            for sample in samples:
                if sample.error is None:
                    good.append(sample)
                else:
                    fail(todo_keys[sample.index], todo_paths[sample.index], sample.error)
            future = None
            if good:
                batch = torch.stack([s.tensor for s in good]).to(device)
                try:
                    result = explain_batch(job.explainer, batch, job.targets, job.topk)
                except RuntimeError as error:  # the model's own forward failed on these inputs
                    reason = (
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    )
                    for s in good:
                        fail(
                            todo_keys[s.index],
                            todo_paths[s.index],
                            f"{todo_paths[s.index]}: model failed ({reason})",
                        )
                    result = None
                if result is not None:
                    summary.layer = result.explanation.layer
                    batch_keys = [todo_keys[s.index] for s in good]
                    batch_paths = [todo_paths[s.index] for s in good]
                    future = [
                        writer.submit(
                            image_records, job, s, batch_keys[row], batch_paths[row], result, row, shards
                        )
                        for row, s in enumerate(good)
                    ]
            if in_flight is not None:
                _finish(in_flight, commit, summary, progress)
            in_flight = (future, len(samples)) if future is not None else None
            if future is None and progress is not None:
                progress(len(samples))
        if in_flight is not None:
            _finish(in_flight, commit, summary, progress)
    commit([], final=True)
    log.finish()
    summary.seconds = time.perf_counter() - started
    return summary


def _finish(
    in_flight: tuple[list[Future], int], commit: Callable[[list[dict]], None], summary: Summary, progress
) -> None:
    futures, count = in_flight
    records = [record for future in futures for record in future.result()]
    commit(records)
    summary.images += len({r["key"] for r in records})
    summary.targets += len(records)
    if progress is not None:
        progress(count)


def _next_shard(out: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in (out / "maps").glob("shard-*.npz")]
    return max(numbers, default=-1) + 1
