"""The study HTTP API (protocol in :mod:`gradcam.serve.study`).

Admin calls (creating and listing studies, folders, results, the CSV) need ``Authorization: Bearer
<admin token>``: 401 without it, 403 with a wrong one (compared in constant time). Rater calls need only
the study id and the rater id the server issued, both random tokens that are looked up, never used as
paths; a study's folder is chosen by name from the listing of the server's image root.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gradcam.errors import GradCAMError
from gradcam.io import image_extensions
from gradcam.serve.models import ModelPool
from gradcam.serve.study import pairs as selection
from gradcam.serve.study.results import ratings_csv, results_dict, summarise
from gradcam.serve.study.schemas import (
    QUESTION,
    SCALE,
    Folder,
    Folders,
    NextPair,
    Problem,
    RaterIssued,
    RatingIn,
    RatingStored,
    Results,
    ScaleStep,
    SkippedImage,
    StudyAdmin,
    StudyCreate,
    StudyCreated,
    StudyList,
    StudyPublic,
)
from gradcam.serve.study.store import DuplicateRating, NotFound, Study, StudyError, StudyStore

# Module-level: FastAPI resolves the handlers' (string) annotations in this module's globals.
Credentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The admin token the server was started with.")),
]
StudyId = Annotated[str, PathParam(min_length=1, max_length=64, description="The study's id.")]


def _problem(description: str) -> dict:
    return {"model": Problem, "description": description}


ADMIN_ERRORS = {
    401: _problem("No `Authorization: Bearer <admin token>` header."),
    403: _problem("Wrong admin token (or the server has none: admin calls are off)."),
}
NO_STUDY = {404: _problem("Unknown study.")}


def admin_view(study: Study) -> StudyAdmin:
    """The admin's view of a stored study."""
    return StudyAdmin(
        **dataclasses.asdict(study),
        rater_path=f"/studies/{study.id}",
        results_path=f"/studies/{study.id}/results",
    )


def _folders(root: Path | None) -> dict[str, Path]:
    """The folders a study may use, by name: the root's subfolders (and "." for the root when it holds
    images itself)."""
    if root is None:
        raise HTTPException(404, "this server has no study image folder; start it with --study-images DIR")
    found: dict[str, Path] = {}
    children = sorted(root.iterdir()) if root.is_dir() else []
    if any(p.is_file() and p.suffix.lower() in image_extensions() for p in children):
        found["."] = root
    for child in children:
        if child.is_dir() and not child.name.startswith("."):
            found[child.name] = child
    return found


def _annotation_files(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() == ".json" and not p.name.startswith(".")
    }


def study_router(store: StudyStore, pool: ModelPool, admin_token: str, images_root: Path | None) -> APIRouter:
    """The study API over ``store``, rendering with ``pool``'s models; studies use folders under
    ``images_root`` (None: no study can be created over HTTP; ``gradcam study create`` still works)."""
    # Validation errors come back as one line (the app's handler), not FastAPI's list: say so everywhere.
    router = APIRouter(tags=["study"], responses={422: {"model": Problem, "description": "A bad field."}})
    expected = admin_token.encode()

    def require_admin(credentials: Credentials) -> None:
        if credentials is None:
            raise HTTPException(
                401,
                "this call needs the admin token: send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not expected or not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(403, "the admin token is wrong")

    admin = [Depends(require_admin)]

    def get_study(study_id: str) -> Study:
        found = store.study(study_id)
        if found is None:
            raise HTTPException(404, f"study '{study_id}' not found")
        return found

    # ------------------------------------------------------------------------------------ admin

    @router.get(
        "/v1/admin/folders",
        response_model=Folders,
        dependencies=admin,
        responses={**ADMIN_ERRORS, 404: _problem("The server has no --study-images folder.")},
        summary="Folders a study can use",
    )
    def list_folders() -> Folders:
        return Folders(
            folders=[
                Folder(
                    name=name,
                    images=len(selection.list_images(path)),
                    annotations=list(_annotation_files(path)),
                )
                for name, path in _folders(images_root).items()
            ]
        )

    @router.post(
        "/v1/studies",
        response_model=StudyCreated,
        status_code=201,
        dependencies=admin,
        responses={
            **ADMIN_ERRORS,
            404: _problem("Unknown folder or annotations file (or no --study-images folder)."),
            422: _problem(
                "A bad field: unknown or unserved model, one model twice, unknown method, unreadable "
                "annotations, or no image that both models classify alike."
            ),
        },
        summary="Create a study and pre-render its pairs",
    )
    def create_study(body: StudyCreate) -> StudyCreated:
        folders = _folders(images_root)
        folder = folders.get(body.folder)
        if folder is None:
            choices = ", ".join(folders) or "none"
            raise HTTPException(404, f"folder '{body.folder}' not found; choose from {choices}")
        try:
            strong, _ = selection.check_models(pool, body.stronger_model, body.weaker_model)
            methods = selection.check_methods(body.methods)
        except GradCAMError as error:
            raise HTTPException(422, str(error)) from None
        annotations = None
        if body.annotations is not None:
            files = _annotation_files(folder)
            if body.annotations not in files:
                choices = ", ".join(files) or "none"
                raise HTTPException(
                    404,
                    f"annotations '{body.annotations}' not found in folder '{body.folder}'; "
                    f"choose from {choices}",
                )
            try:
                annotations = selection.read_annotations(files[body.annotations], strong.labels)
            except GradCAMError as error:
                raise HTTPException(422, str(error)) from None
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        try:
            chosen = selection.build_pairs(
                pool,
                body.stronger_model,
                body.weaker_model,
                methods,
                selection.list_images(folder),
                seed=seed,
                annotations=annotations,
                max_images=body.max_images,
            )
        except GradCAMError as error:
            raise HTTPException(422, str(error)) from None
        if not chosen.pairs:
            raise HTTPException(422, f"folder '{body.folder}': {selection.nothing_kept(chosen)}")
        study = store.create_study(
            name=body.name,
            stronger_model=body.stronger_model,
            weaker_model=body.weaker_model,
            methods=methods,
            folder=body.folder,
            annotations=body.annotations,
            seed=seed,
            pairs=chosen.pairs,
        )
        return StudyCreated(
            **admin_view(study).model_dump(),
            kept=len(chosen.kept),
            skipped=[SkippedImage(image=s.image, reason=s.reason) for s in chosen.skipped],
        )

    @router.get(
        "/v1/studies",
        response_model=StudyList,
        dependencies=admin,
        responses=ADMIN_ERRORS,
        summary="Every study, newest first",
    )
    def list_studies() -> StudyList:
        return StudyList(studies=[admin_view(s) for s in store.list_studies()])

    @router.get(
        "/v1/studies/{study_id}/results",
        response_model=Results,
        dependencies=admin,
        responses={**ADMIN_ERRORS, **NO_STUDY},
        summary="Mean score per method with bootstrap 95% CI",
    )
    def study_results(study_id: StudyId) -> Results:
        study = get_study(study_id)
        summary = summarise(study, store.ratings(study_id), store.pair_methods(study_id))
        return Results.model_validate(results_dict(summary))

    @router.get(
        "/v1/studies/{study_id}/ratings.csv",
        dependencies=admin,
        response_class=Response,
        responses={
            200: {
                "content": {"text/csv": {}},
                "description": "One row per rating: study, pair, image, class_index, class, method, "
                "stronger_model, weaker_model, stronger_side, rater, answer, score (from the stronger "
                "model's side), time (ISO 8601, UTC).",
            },
            **ADMIN_ERRORS,
            **NO_STUDY,
        },
        summary="The raw ratings as CSV",
    )
    def study_csv(study_id: StudyId) -> Response:
        study = get_study(study_id)
        return Response(
            ratings_csv(study, store.ratings(study_id)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="study-{study.id}-ratings.csv"'},
        )

    # ------------------------------------------------------------------------------------ raters

    @router.get(
        "/v1/studies/{study_id}",
        response_model=StudyPublic,
        responses=NO_STUDY,
        summary="What a rater sees of a study (no model names)",
    )
    def study_info(study_id: StudyId) -> StudyPublic:
        study = get_study(study_id)
        return StudyPublic(
            id=study.id,
            name=study.name,
            pairs=study.pairs,
            question=QUESTION,
            scale=[ScaleStep(answer=a, text=t) for a, t in SCALE],
        )

    @router.post(
        "/v1/studies/{study_id}/raters",
        response_model=RaterIssued,
        status_code=201,
        responses=NO_STUDY,
        summary="A new rater id",
    )
    def new_rater(study_id: StudyId) -> RaterIssued:
        try:
            return RaterIssued(rater=store.issue_rater(study_id))
        except NotFound as error:
            raise HTTPException(404, str(error)) from None

    @router.get(
        "/v1/studies/{study_id}/next",
        response_model=NextPair,
        responses={404: _problem("Unknown study, or a rater id this study did not issue.")},
        summary="The rater's next pair (the same until it is rated)",
    )
    def next_pair(
        study_id: StudyId,
        rater: Annotated[str, Query(min_length=1, max_length=64, description="The rater's id.")],
    ) -> NextPair:
        try:
            pair = store.next_pair(study_id, rater)
            progress = store.progress(study_id, rater)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
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
            404: _problem("Unknown study, rater or pair (or one of another study)."),
            409: _problem("This rater has already rated this pair; the first answer stands."),
            422: _problem("A bad field: answer must be an integer from -2 to 2."),
        },
        summary="Store one answer",
    )
    def rate(study_id: StudyId, body: RatingIn) -> RatingStored:
        try:
            progress = store.record_rating(study_id, body.rater, body.pair, body.answer)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except DuplicateRating as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        except StudyError as error:
            raise HTTPException(422, str(error)) from None
        return RatingStored(
            pair=body.pair,
            answer=body.answer,
            total=progress.total,
            rated=progress.rated,
            remaining=progress.remaining,
        )

    return router
