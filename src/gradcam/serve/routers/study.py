"""What raters call (protocol in :mod:`gradcam.study`): a study's public info, joining an open study,
the next pair, an answer.

A rater is known by the secret token of their invitation link (``/studies/<study>#<token>``: the token
sits in the URL fragment, which browsers never send, so no access log or proxy sees it). Every rater call
sends it as ``Authorization: Bearer <token>``; a rater credential in a query string is refused (400),
never read. Study, pair and rater ids are random tokens that are looked up, never used as paths. A study
that is still rendering (or failed) answers 409.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from gradcam.serve.dependencies import Settings, Store
from gradcam.serve.schemas import Problem
from gradcam.serve.study_schemas import NextPair, RaterJoined, RatingIn, RatingStored, StudyPublic

#: The store's ids are URL-safe random tokens: anything else is refused before a database sees it.
ID_PATTERN = r"^[A-Za-z0-9_-]+$"
StudyId = Annotated[
    str, PathParam(min_length=1, max_length=64, pattern=ID_PATTERN, description="The study's id.")
]
#: Query parameters that would carry a rater's credential into access logs: refused, never read.
CREDENTIAL_PARAMETERS = ("rater", "token", "access_token")


def problem(description: str) -> dict:
    """An error response for the OpenAPI schema."""
    return {"model": Problem, "description": description}


NO_STUDY = {404: problem("Unknown study.")}
NOT_READY = {409: problem("The study is still being rendered, or its rendering failed.")}
UNAVAILABLE = {503: problem("The study database cannot be reached or written; retry after Retry-After.")}
AS_RATER = {
    400: problem("A rater credential in the query string (send it as Authorization: Bearer)."),
    401: problem("No `Authorization: Bearer <token>`, or a token this study did not issue."),
}

# Validation errors come back as one line (the app's handler), not FastAPI's list: say so everywhere.
router = APIRouter(tags=["study"], responses={422: problem("A bad field."), **UNAVAILABLE})

_bearer = HTTPBearer(auto_error=False, description="The rater's token, from their invitation link.")


async def current_rater(
    request: Request,
    study_id: StudyId,  # type: ignore[valid-type]
    store: Store,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The rater id of the bearer token: 400 for a credential in the query string, 401 without a token
    or with one this study did not issue."""
    sent = [name for name in CREDENTIAL_PARAMETERS if name in request.query_params]
    if sent:
        raise HTTPException(
            400,
            f"query parameter '{sent[0]}': a rater's token goes in Authorization: Bearer <token>, "
            "never in a URL",
        )
    if credentials is None:
        raise HTTPException(
            401,
            "this call needs the rater's token: send Authorization: Bearer <token> (from the rater link)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return await run_in_threadpool(store.rater_of, study_id, credentials.credentials)


Rater = Annotated[str, Depends(current_rater)]


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
    response_model=RaterJoined,
    status_code=201,
    responses={
        **NO_STUDY,
        **NOT_READY,
        403: problem("The study takes raters by invitation only."),
        429: problem("This client has joined the study as many raters as it may lately; see Retry-After."),
    },
    summary="Join an open study as a new rater (invite-only studies refuse)",
)
def join(study_id: StudyId, request: Request, store: Store, settings: Settings) -> RaterJoined:  # type: ignore[valid-type]
    client = request.client.host if request.client else "unknown"
    made = store.join(study_id, client, limit=settings.raters_per_client, window_s=settings.rater_window_s)
    return RaterJoined(token=made.token, link=made.link(study_id))


@router.get(
    "/v1/studies/{study_id}/next",
    response_model=NextPair,
    responses={**NO_STUDY, **NOT_READY, **AS_RATER},
    summary="The rater's next pair (the same until it is rated)",
)
def next_pair(study_id: StudyId, store: Store, rater: Rater) -> NextPair:  # type: ignore[valid-type]
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
        **NO_STUDY,
        **AS_RATER,
        409: problem(
            "This rater has already rated this pair (the first answer stands), the pair is not the one "
            "/next served this rater, or the study is not ready."
        ),
        422: problem("A bad field: answer must be one of the answers of the study's `scale`."),
    },
    summary="Store one answer to the pair /next served (acknowledged once committed)",
)
def rate(study_id: StudyId, body: RatingIn, store: Store, rater: Rater) -> RatingStored:  # type: ignore[valid-type]
    progress = store.record_rating(study_id, rater, body.pair, body.answer)
    return RatingStored(
        pair=body.pair,
        answer=body.answer,
        total=progress.total,
        rated=progress.rated,
        remaining=progress.remaining,
    )
