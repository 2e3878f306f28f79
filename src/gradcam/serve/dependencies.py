"""FastAPI dependencies: the shared resources the app factory hangs on ``app.state`` (settings, model
pool, batcher, study store and study jobs), and the admin-token check.

Routes declare what they use (``pool: Pool``, ``store: Store`` ...) and never reach for globals, so a
test can build an app with resources of its own.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gradcam.models.pool import ModelPool
from gradcam.serve.batcher import Batcher
from gradcam.serve.limits import DecodingBudget
from gradcam.serve.settings import ServeSettings
from gradcam.study.jobs import StudyJobs
from gradcam.study.store import StudyStore


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_decoding(request: Request) -> DecodingBudget:
    """Bounds the pixels of the uploads decoded at once (each holds a full-size picture)."""
    return request.app.state.decoding


def get_store(request: Request) -> StudyStore:
    return request.app.state.study_store


def get_jobs(request: Request) -> StudyJobs:
    return request.app.state.study_jobs


Settings = Annotated[ServeSettings, Depends(get_settings)]
Pool = Annotated[ModelPool, Depends(get_pool)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
Decoding = Annotated[DecodingBudget, Depends(get_decoding)]
Store = Annotated[StudyStore, Depends(get_store)]
Jobs = Annotated[StudyJobs, Depends(get_jobs)]

Credentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The admin token the server was started with.")),
]


def require_admin(settings: Settings, credentials: Credentials) -> None:
    """401 without ``Authorization: Bearer <token>``, 403 with a wrong one (compared in constant time)
    or when the server has no token (admin calls are then off)."""
    if credentials is None:
        raise HTTPException(
            401,
            "this call needs the admin token: send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = settings.admin_token.encode()
    if not expected or not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(403, "the admin token is wrong")
