"""What ``gradcam serve`` was started with: one object, hung on ``app.state`` by the app factory."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gradcam import models
from gradcam.errors import GradCAMError
from gradcam.serve.limits import MEGABYTE
from gradcam.study.jobs import CAPACITY


@dataclass
class ServeSettings:
    """What ``gradcam serve`` was started with; :meth:`__post_init__` refuses limits that contradict each
    other, naming the options."""

    models: list[str] = field(default_factory=lambda: [models.DEFAULT])
    device: str = "cpu"
    max_upload: int = 20 * MEGABYTE
    max_pixels: int = 50_000_000
    max_decoding_pixels: int | None = None  # pixels decoded at once, all uploads (more: 503); None: 2x max
    read_timeout: float = 15.0  # seconds a request body may stall between two chunks (then 408)
    body_timeout: float = 120.0  # seconds a whole request body may take (then 408)
    db_url: str | None = None  # None: the study's default SQLite file
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    study_images: Path | None = None
    workers: int = 2
    max_batch: int = 16
    slow_methods: bool = False  # offer Score-CAM and Ablation-CAM (minutes per image on a CPU)
    loader: Callable[..., models.LoadedModel] | None = None  # a models.load stand-in (tests)
    study_queue: int = CAPACITY  # studies that may wait for the rendering worker (more: 503)
    raters_per_client: int = 5  # an open study's new raters per client address in rater_window_s
    rater_window_s: int = 3600

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise GradCAMError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        if self.decoding_budget < self.max_pixels:
            raise GradCAMError(
                f"--max-decoding-pixels {self.decoding_budget} is below --max-pixels {self.max_pixels}: "
                "an image within the pixel limit could never be decoded"
            )
        for option, seconds in (("--read-timeout", self.read_timeout), ("--body-timeout", self.body_timeout)):
            if not seconds > 0:
                raise GradCAMError(f"{option} must be a positive number of seconds, not {seconds}")

    @property
    def decoding_budget(self) -> int:
        """The pixels decoded at once, all uploads together (default: twice ``max_pixels``)."""
        return self.max_decoding_pixels if self.max_decoding_pixels is not None else 2 * self.max_pixels
