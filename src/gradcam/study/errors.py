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


class NotARater(StudyError):
    """No rater credential, or one this study did not issue (an invitation link of another study, a
    mistyped or revoked one)."""


class InviteOnly(StudyError):
    """The study takes raters by invitation only: self-service raters are refused."""


class TooManyRaters(StudyError):
    """A client asked an open study for more new raters than it allows in a while."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotServed(StudyError):
    """A rating of a pair that ``/next`` did not serve to this rater (or no longer does)."""


class DatabaseUnavailable(StudyError):
    """The database cannot be reached or written, or its file is gone: nothing can be stored now. The
    message is for anyone; ``detail`` (the driver's first line, which may name hosts and paths) is for
    the server's log and the command line."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail
