"""The run's records on disk: ``run.json`` (the settings), ``manifest.jsonl`` and ``errors.jsonl``.

``manifest.jsonl`` holds one JSON object per image and target, appended a batch at a time with one
``write`` followed by ``fsync``, always after that batch's files are in place. A crash (Ctrl-C, kill -9,
power) can therefore leave at most a partial last line, which the next run cuts off, and files without a
line, which the next run writes again (atomically). Each line says how many targets its image has
(``of``), so an image is done when all its lines are there; a rerun skips it and finishes the rest
without writing any line twice. Writes killed mid-way leave only temporary files, which the next run
deletes; ``DIR/.lock`` keeps two runs from writing into one folder at the same time. Whoever reads
these files, the run or a report on it, reads them with :func:`read_jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per folder is then the user's to keep
    fcntl = None  # type: ignore[assignment]

RUN_FILE, MANIFEST_FILE, ERRORS_FILE, LOCK_FILE = "run.json", "manifest.jsonl", "errors.jsonl", ".lock"


def _lock(out: Path) -> IO[bytes]:
    """Hold an exclusive lock on ``out`` for as long as the returned file is open."""
    handle = open(out / LOCK_FILE, "ab")
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise GradCAMError(
                f"--out {out} is in use by another gradcam run; wait for it or use another --out"
            ) from None
    return handle


def read_jsonl(path: Path, *, truncate: bool = False) -> list[dict]:
    """The records of a JSON-lines file written by this module's crash-safe protocol: the JSON objects
    of its complete lines, in order.

    A line is complete when its ``\\n`` is there: a trailing partial line (a crash mid-write) is ignored,
    and with ``truncate=True`` also cut off the file, which only the run that holds the folder's lock
    may do (it appends after it). Blank, garbled or non-UTF-8 lines (a crash of an earlier run), and
    lines that are not JSON objects, are skipped. A missing file has no records. Without ``truncate``
    the file is only read, as a report on the run must.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if truncate and end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    records = []
    for line in data[:end].splitlines():
        try:
            value = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8; a run writes the line again
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def _append(path: Path, records: list[dict]) -> None:
    if not records:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


class RunLog:
    """The settings, manifest and errors of one output folder, opened for a run with ``settings``.

    Refuses a folder written with other settings unless ``overwrite`` (then the old records go; files
    are overwritten as the new run writes them) or the old run has at most ``replace_at_most`` images
    (cheap to redo: replaced the same way), and a folder another run holds. Holds the folder's lock
    until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(
        self, out: Path, settings: dict, *, overwrite: bool = False, replace_at_most: int = 0
    ) -> None:
        self.out = out
        self._lock = _lock(out)
        try:
            self._open(settings, overwrite, replace_at_most)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder for other runs."""
        self._lock.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _replaceable(self, overwrite: bool, at_most: int) -> bool:
        """True when the folder's old records may go: ``overwrite``, or an old run of at most ``at_most``
        images (the manifest is read only to decide that)."""
        if overwrite or not at_most:
            return overwrite
        return len({r.get("key") for r in read_jsonl(self.manifest_path)}) <= at_most

    def _open(self, settings: dict, overwrite: bool, replace_at_most: int) -> None:
        out = self.out
        self.settings = settings
        self.manifest_path, self.errors_path = out / MANIFEST_FILE, out / ERRORS_FILE
        run_path = out / RUN_FILE
        if run_path.exists():
            try:
                previous = json.loads(run_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous != settings:
                if not self._replaceable(overwrite, replace_at_most):
                    what = _differences(previous, settings) if isinstance(previous, dict) else "unreadable"
                    raise GradCAMError(
                        f"--out {out} holds a run with other settings ({what}); use --overwrite to replace "
                        "it, or another --out"
                    )
                self.manifest_path.unlink(missing_ok=True)
                self.errors_path.unlink(missing_ok=True)
        elif overwrite or self.manifest_path.exists():
            if not self._replaceable(overwrite, replace_at_most):
                raise GradCAMError(
                    f"--out {out} holds a manifest without {RUN_FILE}; use --overwrite or another --out"
                )
            self.manifest_path.unlink(missing_ok=True)
            self.errors_path.unlink(missing_ok=True)
        remove_stale_temporaries(out)
        atomic_write_bytes(run_path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        self.records = read_jsonl(self.manifest_path, truncate=True)
        self._written = {(r["key"], r["target"]) for r in self.records}
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r["key"]] = counts.get(r["key"], 0) + 1
        self.done = {r["key"] for r in self.records if counts[r["key"]] >= r["of"]}
        # Inputs that failed before are tried again; they are listed again if they fail again.
        previous = read_jsonl(self.errors_path, truncate=True)
        self.errors = {e["key"]: e for e in previous if e.get("key") not in self.done}

    def written(self, key: str, target: int) -> bool:
        """True when the manifest already has this image and target."""
        return (key, target) in self._written

    def append(self, records: list[dict]) -> None:
        """Append the records not yet in the manifest (one write, then fsync)."""
        new = [r for r in records if (r["key"], r["target"]) not in self._written]
        _append(self.manifest_path, new)
        self.records += new
        self._written.update((r["key"], r["target"]) for r in new)

    def error(self, key: str, image: str, message: str) -> None:
        """Record an input that could not be explained."""
        record = {"key": key, "image": image, "error": message}
        self.errors[key] = record
        _append(self.errors_path, [record])

    def finish(self) -> None:
        """Rewrite errors.jsonl with each failing input once (earlier runs' failures that now succeeded
        are gone)."""
        done = {r["key"] for r in self.records}
        current = [e for key, e in self.errors.items() if key not in done]
        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in current).encode()
        atomic_write_bytes(self.errors_path, data)
