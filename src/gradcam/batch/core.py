"""What every dataset engine shares: the job, the images still to do, explain-and-write, the records.

The local engine (:mod:`gradcam.batch.local`) and the Ray engine (:mod:`gradcam.batch.ray_engine`) only
schedule: they decode images, call :func:`explain_and_write` on a batch and hand its manifest lines and
failures to a :class:`Tally`, which keeps the run's :class:`~gradcam.batch.manifest.RunLog` and its
:class:`Summary`. So both engines write the same files, lines and errors for the same inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradcam.batch.dataset import OVERLAY_SIZE, Sample
from gradcam.batch.manifest import RunLog
from gradcam.batch.writer import ShardWriter, write_target
from gradcam.methods.base import Inputs
from gradcam.models import LoadedModel
from gradcam.pipeline import Explainer, Result, Targets
from gradcam.targets import Detections, SegmentedClasses


@dataclass
class Job:
    """What to explain and how to write it.

    ``targets`` are classes named for every image and ``topk`` each image's best classes (see
    :mod:`gradcam.pipeline`); ``panels`` adds the original | heatmap | overlay panel per target, and an
    explainer with ``guided=True`` adds the Guided Backprop and Guided Grad-CAM pictures. By the model's
    task (:func:`task_targets`): a segmenter's classes are the named ones or its ``topk`` (default 1)
    largest predicted classes; a detector's targets are its detections scoring at least ``min_score``
    (of the named labels only, when given), at most ``topk`` per image.
    """

    loaded: LoadedModel
    explainer: Explainer
    out: Path
    targets: Sequence[int] = ()
    topk: int = 0
    maps: str = "npy"
    batch_size: int = 32
    workers: int = 2
    overlay_size: int = OVERLAY_SIZE
    panels: bool = True
    min_score: float = 0.5


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


def pending(keys: Sequence[str], log: RunLog) -> list[int]:
    """Positions of the images not yet done in ``log``."""
    return [i for i, key in enumerate(keys) if key not in log.done]


def task_targets(job: Job, batch: int) -> tuple[Targets, int]:
    """(targets, topk) of a batch of ``batch`` images for the job's task (see :class:`Job`)."""
    task = job.loaded.task
    if task == "detection":
        labels = list(job.targets) or None
        return Detections(min_score=job.min_score, topk=job.topk or None, labels=labels), 0
    if task == "segmentation":
        return SegmentedClasses(classes=tuple(job.targets), topk=job.topk or 1), 0
    return [list(job.targets)] * batch, job.topk


def explain(job: Job, batch: Inputs) -> Result:
    """One batch through the job's explainer: every wanted target of every image, one forward."""
    targets, topk = task_targets(job, len(batch))
    return job.explainer.explain(batch, targets, topk=topk)


def model_inputs(
    job: Job, tensors: Sequence[torch.Tensor], device: torch.device
) -> list[tuple[list[int], Inputs]]:
    """A batch's prepared tensors as the model's inputs, with the rows each holds: a detector's list of
    images of their own sizes; else (B,C,H,W) or (B,C,T,H,W) stacks, one per size (a segmenter's
    images keep their aspect ratio, so a batch may hold several sizes)."""
    if job.loaded.task == "detection":
        return [(list(range(len(tensors))), [t.to(device) for t in tensors])]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for row, tensor in enumerate(tensors):
        by_shape.setdefault(tuple(tensor.shape), []).append(row)
    return [(rows, torch.stack([tensors[r] for r in rows]).to(device)) for rows in by_shape.values()]


def failure_reason(error: BaseException) -> str:
    """The first line of an error a model's own forward raised (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def image_records(
    job: Job, sample: Sample, key: str, path: Path, result: Result, row: int, shards: ShardWriter | None
) -> list[dict]:
    """Write the files of image ``row`` of a batch and return its manifest lines, target by target."""
    labels = job.loaded.labels
    best = result.top(5)[row]
    top5 = [{"index": i, "class": labels[i], "probability": round(p, 6)} for i, p in best]
    ranks = {index: rank for rank, (index, _) in enumerate(best)}
    wanted = result.wanted[row]
    if not wanted:  # a detector found nothing to explain: one line says so, and the image is done
        reason = f"no detection scored at least {job.min_score}"
        return [
            {
                "key": key,
                "image": str(path),
                "target": None,
                "class": None,
                "of": 1,
                "top5": top5,
                "layer": result.layer,
                "task": job.loaded.task,
                "none": reason,
                "files": {},
            }
        ]
    records = []
    for n, target in enumerate(wanted):
        written = write_target(job, sample, key, result, n, row, shards)
        records.append(
            {
                "key": key,
                "image": str(path),
                "target": target,
                "class": label_name(labels, target),
                "probability": _number(result.probs[n, row]),
                "score": _number(result.scores[n, row]),
                "rank": ranks.get(target),
                "of": len(wanted),
                "top5": top5,
                "layer": result.layer,
                "task": job.loaded.task,
                **task_fields(result, n, row, sample.frame_size),
                **written,
            }
        )
    return records


def label_name(labels: Sequence[str], target: int) -> str | None:
    """The name of class (label) ``target``; None for a target naming none (-1) or beyond the list."""
    return labels[target] if 0 <= target < len(labels) else None


def _number(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if math.isnan(number) else round(number, 6)


def task_fields(result: Result, n: int, row: int, frame_size: tuple[int, int] | None) -> dict:
    """The manifest fields of a detection (its box in the frame's pixels, its score and index) or of a
    segmented class (its predicted mask's area in the frame's pixels and as a fraction of the image)."""
    if result.boxes is not None:
        box = [round(float(v), 1) for v in result.boxes[n, row]]
        return {"detection": {"index": n, "box": box, "score": _number(result.scores[n, row])}}
    if result.masks is not None:
        mask = result.masks[n, row]
        fraction = float(mask.float().mean())
        width, height = frame_size or (mask.shape[1], mask.shape[0])
        return {"mask": {"area": round(fraction * width * height), "fraction": round(fraction, 6)}}
    return {}


def records_for(
    job: Job,
    samples: Sequence[Sample],
    keys: Sequence[str],
    paths: Sequence[Path],
    result: Result,
    shards: ShardWriter | None,
) -> list[dict]:
    """Write the files of a batch and return its manifest lines (image by image, target by target)."""
    return [
        record
        for row, sample in enumerate(samples)
        for record in image_records(job, sample, keys[row], paths[row], result, row, shards)
    ]


class Tally:
    """The run's bookkeeping, the same for every engine: manifest lines, errors, summary, progress.

    Args:
        log: the run's records.
        keys: every input's key (those already done count as ``already_done``).
        progress: called with the number of inputs handled (explained or failed).
        on_error: called with the message of each input that could not be explained.
    """

    def __init__(
        self,
        log: RunLog,
        keys: Sequence[str],
        progress: Callable[[int], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.log, self.progress, self.on_error = log, progress, on_error
        self.summary = Summary(already_done=sum(1 for k in keys if k in log.done))
        self.started = time.perf_counter()

    def failed(self, key: str, image: str | Path, message: str) -> None:
        """An input that could not be explained: recorded in errors.jsonl and reported."""
        self.summary.errors += 1
        self.summary.failed.append(str(image))
        self.log.error(key, str(image), message)
        if self.on_error is not None:
            self.on_error(message)

    def written(self, records: list[dict], layer: str | None = None) -> None:
        """Manifest lines whose files are in place: appended (one write, fsync) and counted."""
        self.log.append(records)
        self.summary.images += len({r["key"] for r in records})
        self.summary.targets += len(records)
        if layer is not None:
            self.summary.layer = layer

    def handled(self, count: int) -> None:
        """``count`` more inputs are finished (explained or failed)."""
        if self.progress is not None:
            self.progress(count)

    def finish(self) -> Summary:
        """Close the run's records and return its summary."""
        self.log.finish()
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary
