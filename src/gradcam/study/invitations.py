"""Rater credentials: single-person invitations, and what the store keeps of them.

An invitation is a rater id (opaque, what results and the CSV name the rater by) and a secret token. The
token travels only in the URL fragment of the rater's link (``/studies/<study>#<token>``: browsers never
send a fragment, so no server or proxy logs it) and then in ``Authorization: Bearer`` headers; the store
keeps its SHA-256 alone (:func:`token_hash`), so a copy of the database lets nobody rate as someone else.
Self-service raters of an open study get the same kind of credential (:meth:`StudyStore.join
<gradcam.study.store.StudyStore.join>`).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from gradcam.study.rows import new_id

#: Most invitations one call issues.
MAX_INVITATIONS = 10_000
#: Random bytes of a token (URL-safe base64: 32 characters).
TOKEN_BYTES = 24


@dataclass(frozen=True)
class Invitation:
    """A rater made for one person: the ``rater`` id results name them by, and the secret ``token`` they
    rate with (shown once: only its hash is stored)."""

    rater: str
    token: str

    def link(self, study_id: str) -> str:
        """The rater page with the token in the URL fragment; the page sends it as
        ``Authorization: Bearer`` and takes it off the address bar."""
        return f"/studies/{study_id}#{self.token}"


def new_invitation() -> Invitation:
    """A fresh rater id and token."""
    return Invitation(new_id(), secrets.token_urlsafe(TOKEN_BYTES))


def token_hash(token: str) -> str:
    """What the store keeps of a token: its SHA-256 (tokens are random, so no salt or slow hash is
    needed: there is nothing to guess from)."""
    return hashlib.sha256(token.encode()).hexdigest()
