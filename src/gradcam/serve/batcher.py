"""Micro-batching: concurrent requests for one model, method and layer run as one forward/backward.

A request joins the queue of its key (model, method, layer, topk, input size; for a segmenter or
detector also its classes and ``min_score``, which a batch of theirs shares). When nothing of that key
is running, a drain task takes everything queued (up to ``max_batch``) and computes it in the worker
pool while holding the model's lock; requests that arrive meanwhile wait and form the next batch. A
lone request therefore starts at once (no waiting window), and under load the batches fill by
themselves. The pictures of a batch are drawn by another task while the next batch computes. The event
loop only queues and awaits: all the work runs in the bounded thread pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

from gradcam.errors import GradCAMError
from gradcam.models.pool import ModelPool
from gradcam.pipeline import Result
from gradcam.serve.render import MIN_SCORE, ImageView, Prepared, compute, draw, empty_reason, stack


class Overloaded(GradCAMError):
    """More requests are waiting than the server accepts."""


@dataclass
class _Job:
    prepared: Prepared
    targets: list[int]
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class _Key:
    model: str
    method: str
    layer: str | None
    topk: int
    shape: tuple[int, ...]  # the input's: a batch stacks one size (a detector's too: batch-independent)
    named: tuple[int, ...] = ()  # a segmenter's or detector's classes (a classifier's are per request)
    min_score: float = MIN_SCORE  # a detector's


class Batcher:
    """Queues per key, drained in batches of at most ``max_batch`` images; at most ``max_waiting``
    images wait in all (more: :class:`Overloaded`, which the service answers with 503)."""

    def __init__(
        self, pool: ModelPool, executor: Executor, *, max_batch: int = 16, max_waiting: int = 256
    ) -> None:
        self.pool, self.executor = pool, executor
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._queues: dict[_Key, list[_Job]] = {}
        self._running: set[_Key] = set()
        self._waiting = 0
        self._drawing: set[asyncio.Future] = set()
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the latest batches run (for tests)

    async def explain(
        self,
        model: str,
        method: str,
        prepared: Prepared,
        targets: list[int],
        *,
        topk: int,
        layer: str | None,
        min_score: float = MIN_SCORE,
    ) -> ImageView:
        """Explain one prepared image (:func:`gradcam.serve.render.prepare` for ``model``); resolves when
        its batch has run."""
        if self._waiting >= self.max_waiting:
            raise Overloaded(f"the server is busy ({self._waiting} images waiting); try again shortly")
        shape = tuple(prepared.tensor.shape)
        if self.pool.get(model).task == "classification":
            key = _Key(model, method, layer, topk, shape)
        else:
            key = _Key(model, method, layer, topk, shape, tuple(targets), float(min_score))
        job = _Job(prepared, targets, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, []).append(job)
        self._waiting += 1
        if key not in self._running:
            self._running.add(key)
            asyncio.ensure_future(self._drain(key))
        return await job.future

    async def _drain(self, key: _Key) -> None:
        """Run the queued batches of ``key`` one after another. Only the model work is awaited here:
        each batch's pictures are drawn by a separate task while the next batch computes."""
        loop = asyncio.get_running_loop()
        try:
            while self._queues.get(key):
                queue = self._queues[key]
                jobs, self._queues[key] = queue[: self.max_batch], queue[self.max_batch :]
                self._waiting -= len(jobs)
                # After a failed batch each request runs alone: one bad request must not fail the others.
                for group in [jobs] if len(jobs) == 1 else [jobs, *([j] for j in jobs)]:
                    try:
                        computed = await loop.run_in_executor(self.executor, self._compute, key, group)
                    except Exception as error:  # noqa: BLE001 - handed to the request(s) of the group
                        if len(group) == 1:
                            _settle(group, [error])
                        continue
                    task = asyncio.ensure_future(self._draw(loop, key, group, computed))
                    self._drawing.add(task)  # a reference, or the loop may drop the task
                    task.add_done_callback(self._drawing.discard)
                    if group is jobs:
                        break
        finally:
            self._running.discard(key)
            if not self._queues.get(key):
                self._queues.pop(key, None)

    async def _draw(self, loop: asyncio.AbstractEventLoop, key: _Key, jobs: list[_Job], computed) -> None:  # type: ignore[no-untyped-def]
        try:
            views = await loop.run_in_executor(self.executor, self._pictures, key, jobs, computed)
        except Exception as error:  # noqa: BLE001
            views = [error] * len(jobs)
        _settle(jobs, views)

    def _compute(self, key: _Key, jobs: list[_Job]) -> Result:
        loaded = self.pool.get(key.model)
        batch = stack(loaded, [j.prepared for j in jobs])
        with self.pool.lock(key.model):  # only the model work holds the model
            computed = compute(
                loaded,
                key.method,
                batch,
                [j.targets for j in jobs],
                topk=key.topk,
                layer=key.layer,
                min_score=key.min_score,
            )
        self.batches.append(len(jobs))
        return computed

    def _pictures(self, key: _Key, jobs: list[_Job], computed: Result) -> list[ImageView]:
        loaded = self.pool.get(key.model)
        reason = empty_reason(loaded.task, key.min_score, key.named)
        return draw(loaded, [j.prepared for j in jobs], computed, reason=reason)


def _settle(jobs: list[_Job], outcomes: list) -> None:  # type: ignore[type-arg]
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue  # the client went away
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
