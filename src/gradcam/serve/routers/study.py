"""What raters call (protocol in :mod:`gradcam.study`): a study's public info, a rater id, the next
pair, an answer.

Rater calls need only the study id and the rater id the server issued, both random tokens that are
looked up, never used as paths. A study that is still rendering (or failed) answers 409.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from gradcam.serve.dependencies import Store
from gradcam.serve.schemas import Problem
from gradcam.serve.study_schemas import NextPair, RaterIssued, RatingIn, RatingStored, StudyPublic

StudyId = Annotated[str, PathParam(min_length=1, max_length=64, description="The study's id.")]


def problem(description: str) -> dict:
    """An error response for the OpenAPI schema."""
    return {"model": Problem, "description": description}


NO_STUDY = {404: problem("Unknown study.")}
NOT_READY = {409: problem("The study is still being rendered, or its rendering failed.")}

# Validation errors come back as one line (the app's handler), not FastAPI's list: say so everywhere.
router = APIRouter(tags=["study"], responses={422: problem("A bad field.")})


@router.get(
    "/v1/studies/{study_id}",
    response_model=StudyPublic,
    responses={**NO_STUDY, **NOT_READY},
    summary="What a rater sees of a study (no model names)",
)
def study_info(study_id: StudyId, store: Store) -> StudyPublic:  # type: ignore[valid-type]
    return StudyPublic.model_validate(store.ready_study(study_id))


@router.post(
    "/v1/studies/{study_id}/raters",
    response_model=RaterIssued,
    status_code=201,
    responses={**NO_STUDY, **NOT_READY},
    summary="A new rater id",
)
def new_rater(study_id: StudyId, store: Store) -> RaterIssued:
    return RaterIssued(rater=store.issue_rater(study_id))


@router.get(
    "/v1/studies/{study_id}/next",
    response_model=NextPair,
    responses={404: problem("Unknown study, or a rater id this study did not issue."), **NOT_READY},
    summary="The rater's next pair (the same until it is rated)",
)
def next_pair(
    study_id: StudyId,
    store: Store,
    rater: Annotated[str, Query(min_length=1, max_length=64, description="The rater's id.")],
) -> NextPair:
    pair = store.next_pair(study_id, rater)
    progress = store.progress(study_id, rater)
    counts = {"total": progress.total, "rated": progress.rated, "remaining": progress.remaining}
    if pair is None:
        return NextPair(done=True, **counts)
    return NextPair(
        done=False,
        **counts,
        pair=pair.id,
        class_index=pair.class_index,
        class_name=pair.class_name,
        robot_a=base64.b64encode(pair.robot_a).decode("ascii"),
        robot_b=base64.b64encode(pair.robot_b).decode("ascii"),
    )


@router.post(
    "/v1/studies/{study_id}/ratings",
    response_model=RatingStored,
    status_code=201,
    responses={
        404: problem("Unknown study, rater or pair (or one of another study)."),
        409: problem(
            "This rater has already rated this pair (the first answer stands), or the study is not ready."
        ),
        422: problem("A bad field: answer must be one of the answers of the study's `scale`."),
    },
    summary="Store one answer",
)
def rate(study_id: StudyId, body: RatingIn, store: Store) -> RatingStored:
    progress = store.record_rating(study_id, body.rater, body.pair, body.answer)
    return RatingStored(
        pair=body.pair,
        answer=body.answer,
        total=progress.total,
        rated=progress.rated,
        remaining=progress.remaining,
    )
