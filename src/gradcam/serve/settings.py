"""What ``gradcam serve`` was started with: one object, hung on ``app.state`` by the app factory."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gradcam import models
from gradcam.serve.limits import MEGABYTE
from gradcam.study.jobs import CAPACITY


@dataclass
class ServeSettings:
    """What ``gradcam serve`` was started with."""

    models: list[str] = field(default_factory=lambda: [models.DEFAULT])
    device: str = "cpu"
    max_upload: int = 20 * MEGABYTE
    max_pixels: int = 50_000_000
    db_url: str | None = None  # None: the study's default SQLite file
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    study_images: Path | None = None
    workers: int = 2
    max_batch: int = 16
    slow_methods: bool = False  # offer Score-CAM and Ablation-CAM (minutes per image on a CPU)
    loader: Callable[..., models.LoadedModel] | None = None  # a models.load stand-in (tests)
    study_queue: int = CAPACITY  # studies that may wait for the rendering worker (more: 503)
