"""The service's study creation, off the request: one worker thread renders queued studies one at a
time, from a small bounded queue.

:meth:`StudyJobs.submit` stores the study as ``queued`` and returns at once; the worker then marks it
``rendering``, records its progress (images done of total) after each chunk, and stores its pairs and
``ready``, or ``failed`` with a one-line error (:mod:`gradcam.study.creation`). With the queue full a
submission is refused with :class:`Busy` (the service answers 503 with Retry-After) and nothing is
stored. Closing fails the studies still waiting and stops the running one after its current chunk; a
service starting again fails the studies a previous run left unfinished
(:meth:`gradcam.study.store.StudyStore.fail_unfinished`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading

from gradcam.errors import GradCAMError
from gradcam.models.pool import ModelPool
from gradcam.study.creation import StudyPlan, render
from gradcam.study.store import StudyError, StudyRow, StudyStore

#: Studies that may wait for the worker (the one being rendered not counted).
CAPACITY = 4
#: Seconds a refused client is told to wait (a study renders in seconds to minutes).
RETRY_AFTER_S = 30
STOPPED = "the server stopped before the study was rendered"

_log = logging.getLogger(__name__)


class Busy(StudyError):
    """Too many studies are waiting to be rendered; try again after :attr:`retry_after` seconds."""

    retry_after = RETRY_AFTER_S


class _Stopped(StudyError):
    pass


class StudyJobs:
    """Renders submitted studies in one background thread (started on the first submission)."""

    def __init__(self, store: StudyStore, pool: ModelPool, *, capacity: int = CAPACITY) -> None:
        self.store, self.pool, self.capacity = store, pool, capacity
        self._queue: queue.Queue[tuple[str, StudyPlan] | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def submit(self, plan: StudyPlan) -> StudyRow:
        """Store the planned study as queued and queue it; Busy when ``capacity`` studies wait already."""
        with self._lock:  # only submissions add: the queue cannot fill between the check and the put
            if self._closed.is_set():
                raise StudyError("the server is shutting down; create the study after it restarts")
            if self._queue.full():
                raise Busy(
                    f"{self.capacity} studies are waiting to be rendered; try again in {RETRY_AFTER_S} s"
                )
            study = self.store.add_study(dataclasses.replace(plan.study, state="queued", done=0))
            self._queue.put_nowait((study.id, plan))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="gradcam-study", daemon=True)
                self._thread.start()
        return study

    def close(self, timeout: float = 10.0) -> None:
        """Stop: waiting studies fail now, the running one after its current chunk of images."""
        self._closed.set()
        with self._lock:
            while True:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is not None:
                    self._fail(waiting[0], STOPPED)
            if self._thread is not None:
                self._queue.put_nowait(None)
                self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._render(*job)

    def _render(self, study_id: str, plan: StudyPlan) -> None:
        def progress(done: int, total: int) -> None:
            if self._closed.is_set():
                raise _Stopped(STOPPED)
            self.store.record_progress(study_id, done, total)

        try:
            self.store.start_rendering(study_id, plan.study.total)
            chosen = render(plan, self.pool, progress=progress)
            self.store.finish(study_id, chosen.pairs, kept=len(chosen.kept), skipped=chosen.skipped)
        except GradCAMError as error:
            self._fail(study_id, str(error))
        except Exception as error:  # noqa: BLE001 - a model or database failure: the study says so
            _log.exception("rendering study %s failed", study_id)
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            self._fail(study_id, f"rendering failed ({type(error).__name__}{': ' + first if first else ''})")

    def _fail(self, study_id: str, error: str) -> None:
        try:
            self.store.fail(study_id, error)
        except Exception:  # noqa: BLE001 - the database itself is gone: nothing more to record
            _log.exception("could not mark study %s as failed", study_id)
