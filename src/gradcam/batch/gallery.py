"""A static HTML gallery of a dataset run: ``OUT/index.html`` over JPEG thumbnails in ``OUT/thumbs/``.

The page opens straight from the file system, with no server and no network: its CSS and JS are inline,
the run's records are embedded as JSON in a ``<script type="application/json">`` element, and a small
vanilla script renders them as cards, a page of :data:`PAGE_SIZE` at a time, with lazily loaded images,
so that runs of many thousands of images stay responsive. Cards can be sorted (probability, image name,
class) and filtered (class, probability range, path text, surprising cases: the explained target is not
the model's top-1).

The page is rendered by Jinja2 from the package's ``templates/``: ``gallery.html`` (autoescaped) with
``gallery.css`` and ``gallery.js`` included verbatim. Every path in the page is relative to ``OUT`` and
URL-encoded segment by segment; every text from the run (file names, class names, settings, errors) is
HTML-escaped by the template or set as text by the script, and the embedded JSON comes from Jinja2's
``tojson`` filter, which writes ``<``, ``>``, ``&`` and ``'`` as ``\\u`` escapes, so nothing in a name
can end the script.
"""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image

from gradcam.batch.manifest import ERRORS_FILE, MANIFEST_FILE, RUN_FILE, read_jsonl
from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes

INDEX_FILE = "index.html"
THUMBS_DIR = "thumbs"
#: Cards rendered at a time; more are added as the reader scrolls down.
PAGE_SIZE = 200
JPEG_QUALITY = 85
#: The list of errors starts unfolded up to this many.
_ERRORS_OPEN = 20


def _relative(text: object) -> PurePosixPath | None:
    """A manifest path as a plain relative path inside the run folder; None for anything else (absolute,
    empty, or climbing out with ``..``), so that a hostile manifest can make the page point, and the
    thumbnails be written, only inside the folder."""
    if not isinstance(text, str) or not text or "\x00" in text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute() or any(part in ("", ".", "..") for part in text.split("/")):
        return None
    if os.name == "nt":
        windows = PureWindowsPath(text)
        if windows.anchor or ".." in windows.parts:
            return None
    return path


def _url(path: PurePosixPath) -> str:
    """A relative URL for ``path``: each segment percent-encoded (spaces, ``#``, ``%``, ``?``, ``:``)."""
    return "/".join(quote(part, safe="") for part in path.parts)


def thumbnail_path(overlay: PurePosixPath) -> PurePosixPath:
    """Where the thumbnail of an overlay goes, relative to the run folder: ``sub/a.png_1-x_overlay.png``
    -> ``thumbs/sub/a.png_1-x_overlay.jpg``."""
    return PurePosixPath(THUMBS_DIR, *overlay.parts).with_suffix(".jpg")


def _up_to_date(source: Path, target: Path, size: int) -> bool:
    """True when the thumbnail ``target`` is at least as new as ``source`` and was made at ``size``
    (its longer side is ``size``, or it has the size of a smaller ``source``)."""
    try:
        if target.stat().st_mtime_ns < source.stat().st_mtime_ns:
            return False
        with Image.open(target) as thumb:  # reads the header only
            if max(thumb.size) == size:
                return True
            with Image.open(source) as picture:
                return max(picture.size) < size and thumb.size == picture.size
    except (OSError, SyntaxError, ValueError):
        return False


def _write_thumbnail(source: Path, target: Path, size: int) -> bool:
    """Write a JPEG of ``source`` with its longer side ``size`` (never enlarged) to ``target``, atomically,
    unless ``target`` is up to date. True when written."""
    if _up_to_date(source, target, size):
        return False
    with Image.open(source) as image:
        image.draft("RGB", (size, size))  # JPEG sources decode at a reduced scale
        picture = image.convert("RGB")
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    atomic_write_bytes(target, buffer.getvalue())
    return True


def _thumbnail_url(run_dir: Path, overlay: PurePosixPath, size: int) -> str | None:
    """The thumbnail's URL once it is in place; None when the overlay cannot be read as an image."""
    relative = thumbnail_path(overlay)
    try:
        _write_thumbnail(run_dir / overlay, run_dir / relative, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # the card links to the overlay without a preview
    return _url(relative)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _top5(value: object) -> list[dict]:
    if not isinstance(value, list):
        return []
    return [
        {
            "index": _integer(p.get("index")),
            "class": str(p.get("class", "")),
            "probability": _number(p.get("probability")),
        }
        for p in value
        if isinstance(p, dict)
    ]


def _page_records(run_dir: Path, manifest: list[dict], size: int) -> list[dict]:
    """The records the page shows: the manifest's fields for the cards, with the URLs of the overlay
    (None when it is missing) and of its thumbnail (None when it cannot be made)."""
    overlays: list[PurePosixPath | None] = []
    for record in manifest:
        files = record.get("files")
        overlay = _relative(files.get("overlay")) if isinstance(files, dict) else None
        overlays.append(overlay if overlay is not None and (run_dir / overlay).is_file() else None)
    wanted = sorted({o for o in overlays if o is not None})
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        thumbs = dict(zip(wanted, pool.map(lambda o: _thumbnail_url(run_dir, o, size), wanted), strict=True))
    records = []
    for record, overlay in zip(manifest, overlays, strict=True):
        records.append(
            {
                "key": str(record.get("key", "")),
                "target": _integer(record.get("target")),
                "class": str(record.get("class") or ""),
                "probability": _number(record.get("probability")),
                "rank": _integer(record.get("rank")),
                "of": _integer(record.get("of")),
                "top5": _top5(record.get("top5")),
                "overlay": _url(overlay) if overlay is not None else None,
                "thumb": thumbs[overlay] if overlay is not None else None,
            }
        )
    return records


def _setting(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ", ".join(str(v) for v in value) if value else "-"
    return json.dumps(value, ensure_ascii=False)


def _environment() -> Environment:
    """The Jinja2 environment over the package's templates: HTML autoescaped, a missing variable an
    error, compact JSON that refuses NaN for the ``tojson`` filter, and the ``setting`` filter."""
    environment = Environment(
        loader=PackageLoader("gradcam.batch", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.policies["json.dumps_kwargs"] = {"separators": (",", ":"), "allow_nan": False}
    environment.filters["setting"] = _setting
    return environment


_TEMPLATES = _environment()


def render_page(
    run_dir: Path, settings: dict | None, records: list[dict], errors: list[dict], thumbnail_size: int = 256
) -> str:
    """The whole HTML document for the page ``records`` (as :func:`write_gallery` embeds them): a header
    with the model, method and settings from run.json (``settings``, None when unreadable) and the
    numbers of images, targets and errors; the controls; the cards' records; the ``errors``."""
    return (
        _TEMPLATES.get_template("gallery.html").render(
            title=run_dir.resolve().name or str(run_dir),
            cell=max(140, min(thumbnail_size, 360)),
            settings=settings,
            run_file=RUN_FILE,
            images=len({r["key"] for r in records}),
            records=records,
            errors=errors,
            open_errors=_ERRORS_OPEN,
            page_size=PAGE_SIZE,
        )
        + "\n"
    )


def write_gallery(run_dir: Path, *, thumbnail_size: int = 256) -> Path:
    """Write ``run_dir/index.html``, a self-contained gallery of a dataset run, and its thumbnails.

    ``run_dir`` is the output folder of a streamed ``gradcam explain`` run (see :mod:`gradcam.batch`):
    its ``manifest.jsonl`` gives one card per image and target, ``run.json`` the settings in the header
    and ``errors.jsonl`` the list of inputs that failed. A JPEG thumbnail (longer side
    ``thumbnail_size``) of each overlay is written to ``run_dir/thumbs/``, mirroring the overlay's path,
    unless one of that size and at least as new as the overlay is already there. The run's own files are
    only read.

    Returns the path of ``index.html``. Raises GradCAMError when ``run_dir`` is not a run's folder or
    ``thumbnail_size`` is not a positive number of pixels; OSError when the files cannot be written.
    """
    run_dir = Path(run_dir)
    if isinstance(thumbnail_size, bool) or not isinstance(thumbnail_size, int) or thumbnail_size < 1:
        raise GradCAMError(f"thumbnail size {thumbnail_size!r}: expected a positive number of pixels")
    if not run_dir.exists():
        raise GradCAMError(f"{run_dir}: no such folder; expected the --out folder of a dataset run")
    if not run_dir.is_dir():
        raise GradCAMError(f"{run_dir} is a file; expected the --out folder of a dataset run")
    if not (run_dir / MANIFEST_FILE).is_file():
        raise GradCAMError(
            f"{run_dir} has no {MANIFEST_FILE}; expected the --out folder of a `gradcam explain` run on a "
            "folder, glob or list"
        )
    # Read only, whatever state the run left them in: a report never changes the run's files.
    manifest = [r for r in read_jsonl(run_dir / MANIFEST_FILE) if "key" in r]
    errors = read_jsonl(run_dir / ERRORS_FILE)
    try:
        settings = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        settings = None
    records = _page_records(run_dir, manifest, thumbnail_size)
    page = render_page(run_dir, settings, records, errors, thumbnail_size)
    return atomic_write_bytes(run_dir / INDEX_FILE, page.encode("utf-8", errors="replace"))
