"""What every dataset engine shares: the job, the images still to do, explain-and-write, the records.

The local engine (:mod:`gradcam.batch.local`) and the Ray engine (:mod:`gradcam.batch.ray_engine`) only
schedule: they decode images, call :func:`explain_and_write` on a batch and hand its manifest lines and
failures to a :class:`Tally`, which keeps the run's :class:`~gradcam.batch.manifest.RunLog` and its
:class:`Summary`. So both engines write the same files, lines and errors for the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradcam.batch.dataset import OVERLAY_SIZE, Sample
from gradcam.batch.manifest import RunLog
from gradcam.batch.writer import ShardWriter, write_target
from gradcam.models import LoadedModel
from gradcam.pipeline import Explainer, Result


@dataclass
class Job:
    """What to explain and how to write it.

    ``targets`` are classes named for every image and ``topk`` each image's best classes (see
    :mod:`gradcam.pipeline`); ``panels`` adds the original | heatmap | overlay panel per target, and an
    explainer with ``guided=True`` adds the Guided Backprop and Guided Grad-CAM pictures.
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


def explain(job: Job, batch: torch.Tensor) -> Result:
    """One batch through the job's explainer: every wanted class of every image, one forward."""
    return job.explainer.explain(batch, [list(job.targets)] * len(batch), topk=job.topk)


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
    records = []
    for n, target in enumerate(wanted):
        written = write_target(job, sample, key, result, n, row, shards)
        records.append(
            {
                "key": key,
                "image": str(path),
                "target": target,
                "class": labels[target],
                "probability": round(float(result.probs[n, row]), 6),
                "score": round(float(result.scores[n, row]), 6),
                "rank": ranks.get(target),
                "of": len(wanted),
                "top5": top5,
                "layer": result.layer,
                **written,
            }
        )
    return records


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
