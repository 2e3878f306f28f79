"""Atomic file writes: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import io
import os
import re
import secrets
import stat
from pathlib import Path

import numpy as np

_TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _temporary_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files that writes killed mid-way (kill -9, power loss) left under ``folder``.

    Only call this while no other process writes there. Returns how many were removed.
    """
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if _TEMPORARY_NAME.fullmatch(name):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Create a fresh temporary file next to ``target`` with the permissions a plain ``open`` would give.

    ``tempfile.mkstemp`` makes files readable by their owner only (0600), which would leak onto the
    target through the rename; here the file gets 0666 less the umask, or the mode of an existing target.
    """
    if target.is_file():
        mode = stat.S_IMODE(target.stat().st_mode)
    else:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = _temporary_path(target)
        try:
            descriptor = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            try:
                os.chmod(temporary, mode)
            except BaseException:
                os.close(descriptor)
                temporary.unlink(missing_ok=True)
                raise
        return descriptor, temporary
    raise FileExistsError(f"could not create a temporary file next to {target}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(target)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def save_npy(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an array as .npy atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return atomic_write_bytes(path, buffer.getvalue())
