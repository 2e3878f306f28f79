"""The local engine: a DataLoader decodes in worker processes, the model explains batch after batch,
a writer thread writes the files of one batch while the next is explained, and the manifest records a
batch only once its files are in place. The explain-and-write step and the records are
:mod:`gradcam.batch.core`'s; this module only schedules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gradcam.batch import core
from gradcam.batch.core import Job, Summary, Tally
from gradcam.batch.dataset import ImageDataset, Sample, loader
from gradcam.batch.manifest import RunLog
from gradcam.batch.writer import ShardWriter
from gradcam.models import model_device

__all__ = ["Job", "Summary", "run_local"]


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
    tally = Tally(log, keys, progress, on_error)
    todo = core.pending(keys, log)
    run = _Run(job, [paths[i] for i in todo], [keys[i] for i in todo], tally)
    # Pillow's encoders release the GIL: several writer threads use several cores.
    with ThreadPoolExecutor(max_workers=max(2, job.workers)) as writer:
        dataset = ImageDataset(run.paths, job.loaded.preprocess, job.overlay_size, job.loaded.clip_length)
        for samples in loader(dataset, job.batch_size, job.workers):
            run.batch(samples, writer)
        run.drain()
    run.commit([], final=True)
    return tally.finish()


class _Run:
    """One local run's state: the batch being written while the next is explained, the npz shards."""

    def __init__(self, job: Job, paths: list[Path], keys: list[str], tally: Tally) -> None:
        self.job, self.paths, self.keys, self.tally = job, paths, keys, tally
        self.device = model_device(job.loaded.module)
        self.shards = ShardWriter(job.out, _next_shard(job.out)) if job.maps == "npz" else None
        self.held: list[dict] = []  # lines whose maps wait in an unwritten shard
        self.in_flight: tuple[list[Future], int, str | None] | None = None

    def batch(self, samples: list[Sample], writer: ThreadPoolExecutor) -> None:
        """Explain the readable samples of one batch and submit their files; finish the previous one."""
        good = []
        for sample in samples:
            if sample.error is None:
                good.append(sample)
            else:
                self.tally.failed(self.keys[sample.index], self.paths[sample.index], sample.error)
        futures, layer = self._explain(good, writer) if good else (None, None)
        self.drain()
        if futures is None:
            self.tally.handled(len(samples))
        else:
            self.in_flight = (futures, len(samples), layer)

    def _explain(
        self, good: list[Sample], writer: ThreadPoolExecutor
    ) -> tuple[list[Future] | None, str | None]:
        futures, layer = [], None
        for rows, inputs in core.model_inputs(self.job, [s.tensor for s in good], self.device):
            samples = [good[r] for r in rows]
            try:
                result = core.explain(self.job, inputs)
            except RuntimeError as error:  # the model's own forward failed on these inputs
                reason = core.failure_reason(error)
                for s in samples:
                    path = self.paths[s.index]
                    self.tally.failed(self.keys[s.index], path, f"{path}: model failed ({reason})")
                continue
            layer = result.layer
            futures += [
                writer.submit(
                    core.image_records,
                    self.job,
                    s,
                    self.keys[s.index],
                    self.paths[s.index],
                    result,
                    row,
                    self.shards,
                )
                for row, s in enumerate(samples)
            ]
        return (futures or None), layer

    def drain(self) -> None:
        """Wait for the batch in flight, then record its lines."""
        if self.in_flight is None:
            return
        futures, count, layer = self.in_flight
        self.in_flight = None
        self.commit([record for future in futures for record in future.result()], layer=layer)
        self.tally.handled(count)

    def commit(self, records: list[dict], final: bool = False, layer: str | None = None) -> None:
        """Lines go to the manifest once their files are written: at once for .npy maps, with their shard
        for .npz maps."""
        if self.shards is None:
            self.tally.written(records, layer)
            return
        self.held += records
        if layer is not None:
            self.tally.summary.layer = layer
        if self.shards.full() or final:
            self.shards.flush()
            self.tally.written(self.held)
            self.held = []


def _next_shard(out: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in (out / "maps").glob("shard-*.npz")]
    return max(numbers, default=-1) + 1
