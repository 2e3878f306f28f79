"""A study request, checked, then rendered and stored: the one path both ``gradcam study create`` (at
once, :func:`create`) and the service's background worker (:mod:`gradcam.study.jobs`) take.

:func:`plan` makes every check that needs no rendering (the models, the methods, the annotations, a
folder with images), so that a bad request is refused before anything is queued or stored; :func:`render`
selects the images and renders the pairs (:func:`gradcam.study.pairs.build_pairs`), and refuses a study
that keeps no image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradcam.models.pool import ModelPool
from gradcam.study.pairs import (
    Selection,
    build_pairs,
    check_methods,
    check_models,
    nothing_kept,
    read_annotations,
)
from gradcam.study.store import StudyError, StudyRow, StudyStore


class NothingKept(StudyError):
    """No pair can be made of a study's folder: it has no image, or no image both models agree on."""

    def __init__(self, folder: str, reason: str) -> None:
        super().__init__(f"folder '{folder}': {reason}")
        self.reason = reason


@dataclass(frozen=True)
class StudyPlan:
    """A checked study request: the record to store (the store gives its id) and what rendering needs:
    the images as (name in the folder, path), the annotated classes per image name, the most images to
    keep."""

    study: StudyRow
    images: Sequence[tuple[str, Path]]
    annotations: dict[str, frozenset[int]] | None = None
    max_images: int | None = None


def plan(
    pool: ModelPool,
    study: StudyRow,
    images: Sequence[tuple[str, Path]],
    *,
    annotations: Path | None = None,
    max_images: int | None = None,
) -> StudyPlan:
    """Check a study request; GradCAMError (one line) naming what is wrong.

    ``study`` holds the record's fields (its ``methods`` are checked and their repeats dropped);
    ``annotations`` is the file to read the annotated classes from.
    """
    strong, _ = check_models(pool, study.stronger_model, study.weaker_model)
    methods = check_methods(study.methods)
    marks = read_annotations(annotations, strong.labels) if annotations is not None else None
    if not images:
        raise NothingKept(study.folder, "no images found")
    checked = dataclasses.replace(study, methods=methods, total=len(images))
    return StudyPlan(checked, list(images), marks, max_images)


def render(
    plan: StudyPlan, pool: ModelPool, *, progress: Callable[[int, int], None] | None = None
) -> Selection:
    """The study's selection and pairs; NothingKept when no image is kept. ``progress(done, total)`` is
    called as images are looked at."""
    study = plan.study
    chosen = build_pairs(
        pool,
        study.stronger_model,
        study.weaker_model,
        study.methods,
        plan.images,
        seed=study.seed,
        annotations=plan.annotations,
        max_images=plan.max_images,
        progress=progress,
    )
    if not chosen.pairs:
        raise NothingKept(study.folder, nothing_kept(chosen))
    return chosen


def create(
    store: StudyStore,
    pool: ModelPool,
    plan: StudyPlan,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> StudyRow:
    """Render the study now and store it, ready (nothing is stored when rendering fails)."""
    chosen = render(plan, pool, progress=progress)
    done = dataclasses.replace(
        plan.study, state="ready", done=plan.study.total, kept=len(chosen.kept), skipped=chosen.skipped
    )
    return store.add_study(done, chosen.pairs)
