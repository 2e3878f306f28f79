"""The trust study's errors: each says in one line why a call cannot be done (the service maps them to
HTTP statuses once, in :mod:`gradcam.serve.errors`)."""

from __future__ import annotations

from gradcam.errors import GradCAMError


class StudyError(GradCAMError):
    """A study call that cannot be done (the message says why, in one line)."""


class NotFound(StudyError):
    """An unknown study, rater, pair or folder (or one of another study)."""


class DuplicateRating(StudyError):
    """The rater has already rated this pair."""


class NotReady(StudyError):
    """The study is still being rendered, or its rendering failed: raters cannot use it."""
