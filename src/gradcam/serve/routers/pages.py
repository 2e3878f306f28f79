"""The web app's pages (static files, no build step): the explorer at ``/``, a study's rater page and
its results page. Their scripts and styles are served under ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/studies/{study_id}")
async def study_page(study_id: str) -> FileResponse:
    return FileResponse(STATIC / "study.html")


@router.get("/studies/{study_id}/results")
async def results_page(study_id: str) -> FileResponse:
    return FileResponse(STATIC / "results.html")
