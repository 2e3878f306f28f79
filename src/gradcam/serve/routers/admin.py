"""Study administration, behind the admin token: the folders a study may use, creating a study (a
background job), the studies and their state, results and the raw ratings.

Every call needs ``Authorization: Bearer <admin token>``: 401 without it, 403 with a wrong one
(:func:`gradcam.serve.dependencies.require_admin`). A study's folder is chosen by name from the listing
of the server's image root (:mod:`gradcam.study.folders`); no client string becomes a path.

``POST /v1/studies`` checks the request (models, methods, folder, annotations), stores the study as
``queued`` and answers 202 at once; one background worker renders it (:mod:`gradcam.study.jobs`), and
``GET /v1/admin/studies/{id}`` shows its state: queued, rendering (images done of total), ready, or
failed with its one-line error. With the queue full the answer is 503 with Retry-After.

A study takes raters by invitation only unless it was created ``open``:
``POST /v1/admin/studies/{id}/invitations`` issues single-person links ``/studies/<id>#<token>``.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Response

from gradcam.serve.dependencies import Jobs, Pool, Settings, Store, require_admin
from gradcam.serve.routers.study import NO_STUDY, UNAVAILABLE, StudyId, problem
from gradcam.serve.study_schemas import (
    Folder,
    Folders,
    InvitationOut,
    Invitations,
    InvitationsIn,
    Results,
    StudyAdmin,
    StudyCreate,
    StudyList,
)
from gradcam.study import creation, folders
from gradcam.study.pairs import list_images
from gradcam.study.results import ratings_csv, results_dict, summarise
from gradcam.study.store import StudyRow

ADMIN_ERRORS = {
    401: problem("No `Authorization: Bearer <admin token>` header."),
    403: problem("Wrong admin token (or the server has none: admin calls are off)."),
    422: problem("A bad field."),
    **UNAVAILABLE,
}

router = APIRouter(tags=["study admin"], dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)


@router.get(
    "/v1/admin/folders",
    response_model=Folders,
    responses={404: problem("The server has no --study-images folder.")},
    summary="Folders a study can use",
)
def list_folders(settings: Settings) -> Folders:
    return Folders(
        folders=[
            Folder(name=name, images=len(list_images(path)), annotations=list(folders.annotation_files(path)))
            for name, path in folders.folders(settings.study_images).items()
        ]
    )


@router.post(
    "/v1/studies",
    response_model=StudyAdmin,
    status_code=202,
    responses={
        404: problem("Unknown folder or annotations file (or no --study-images folder)."),
        422: problem(
            "A bad field: unknown or unserved model, one model twice, unknown method, unreadable "
            "annotations, or a folder without images."
        ),
        503: problem("Too many studies are waiting to be rendered; retry after the Retry-After seconds."),
    },
    summary="Create a study: checked now, its pairs rendered in the background",
)
def create_study(  # type: ignore[valid-type]
    body: StudyCreate, response: Response, settings: Settings, pool: Pool, jobs: Jobs
) -> StudyAdmin:
    folder = folders.folder(settings.study_images, body.folder)
    annotations = None
    if body.annotations is not None:
        annotations = folders.annotation_file(folder, body.annotations, body.folder)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    record = StudyRow(**body.model_dump(exclude={"max_images", "seed"}), seed=seed)
    plan = creation.plan(
        pool, record, list_images(folder), annotations=annotations, max_images=body.max_images
    )
    view = StudyAdmin.model_validate(jobs.submit(plan))
    response.headers["Location"] = view.status_path
    return view


@router.get("/v1/studies", response_model=StudyList, summary="Every study, newest first")
def list_studies(store: Store) -> StudyList:
    return StudyList(studies=[StudyAdmin.model_validate(s) for s in store.list_studies()])


@router.get(
    "/v1/admin/studies/{study_id}",
    response_model=StudyAdmin,
    responses=NO_STUDY,
    summary="A study's state (queued, rendering n of total, ready, failed) and record",
)
def study_state(study_id: StudyId, store: Store) -> StudyAdmin:  # type: ignore[valid-type]
    return StudyAdmin.model_validate(store.get_study(study_id))


@router.post(
    "/v1/admin/studies/{study_id}/invitations",
    response_model=Invitations,
    status_code=201,
    responses={**NO_STUDY, 409: problem("The study failed to render: nobody can rate it.")},
    summary="Issue single-person rater links (the token in the URL fragment)",
)
def invite(study_id: StudyId, body: InvitationsIn, store: Store) -> Invitations:  # type: ignore[valid-type]
    made = store.invite(study_id, body.count)
    return Invitations(
        study=study_id, invitations=[InvitationOut(rater=i.rater, link=i.link(study_id)) for i in made]
    )


@router.get(
    "/v1/studies/{study_id}/results",
    response_model=Results,
    responses=NO_STUDY,
    summary="Mean score per method with bootstrap 95% CI",
)
def study_results(study_id: StudyId, store: Store) -> Results:
    study = store.get_study(study_id)
    summary = summarise(study, store.ratings(study_id), store.pair_methods(study_id))
    return Results.model_validate(results_dict(summary))


@router.get(
    "/v1/studies/{study_id}/ratings.csv",
    response_class=Response,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": "One row per rating: study, pair, image, class_index, class, method, "
            "stronger_model, weaker_model, stronger_side, rater, answer, score (from the stronger "
            "model's side), time (ISO 8601, UTC).",
        },
        **NO_STUDY,
    },
    summary="The raw ratings as CSV",
)
def study_csv(study_id: StudyId, store: Store) -> Response:
    study = store.get_study(study_id)
    return Response(
        ratings_csv(study, store.ratings(study_id)),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="study-{study.id}-ratings.csv"'},
    )
