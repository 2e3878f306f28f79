"""A static HTML gallery of a dataset run: ``OUT/index.html`` over JPEG thumbnails in ``OUT/thumbs/``.

The page opens straight from the file system, with no server and no network: its CSS and JS are inline,
the run's records are embedded as JSON in a ``<script type="application/json">`` element, and a small
vanilla script renders them as cards, a page of :data:`PAGE_SIZE` at a time, with lazily loaded images,
so that runs of many thousands of images stay responsive. Cards can be sorted (probability, image name,
class) and filtered (class, probability range, path text, surprising cases: the explained target is not
the model's top-1).

Every path in the page is relative to ``OUT`` and URL-encoded segment by segment; every text from the
run (file names, class names, settings, errors) is HTML-escaped or set as text by the script, and the
embedded JSON has ``<``, ``>`` and ``&`` as ``\\u`` escapes, so nothing in a name can end the script.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote

from PIL import Image

from gradcam.batch.manifest import ERRORS_FILE, MANIFEST_FILE, RUN_FILE
from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes

INDEX_FILE = "index.html"
THUMBS_DIR = "thumbs"
#: Cards rendered at a time; more are added as the reader scrolls down.
PAGE_SIZE = 200
JPEG_QUALITY = 85


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, skipping blank, garbled or partial lines (read only: a
    report never changes the run's files)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


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
                "class": str(record.get("class", "")),
                "probability": _number(record.get("probability")),
                "rank": _integer(record.get("rank")),
                "of": _integer(record.get("of")),
                "top5": _top5(record.get("top5")),
                "overlay": _url(overlay) if overlay is not None else None,
                "thumb": thumbs[overlay] if overlay is not None else None,
            }
        )
    return records


def _script_json(value: object) -> str:
    """JSON safe inside a ``<script>`` element: no ``<`` (hence no ``</script`` nor ``<!--``), ``>`` or
    ``&``; all of them, and every non-ASCII character, as ``\\u`` escapes that JSON.parse reads back."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _setting(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ", ".join(str(v) for v in value) if value else "-"
    return json.dumps(value, ensure_ascii=False)


def _summary(run_dir: Path, settings: dict | None, records: list[dict], errors: list[dict]) -> str:
    """The header: model, method and settings from run.json; numbers of images, targets and errors."""
    e = html.escape
    images = len({r["key"] for r in records})
    parts = [f"<h1>Grad-CAM gallery: {e(run_dir.resolve().name or str(run_dir))}</h1>"]
    if settings is None:
        parts.append(f'<p class="warn">{e(RUN_FILE)} is missing or unreadable: settings unknown.</p>')
    else:
        model, method = _setting(settings.get("model")), _setting(settings.get("method"))
        parts.append(f'<p class="lead">model <b>{e(model)}</b>, method <b>{e(method)}</b></p>')
        rows = "".join(
            f"<div><dt>{e(str(name))}</dt><dd>{e(_setting(value))}</dd></div>"
            for name, value in sorted(settings.items())
            if name not in ("model", "method")
        )
        if rows:
            parts.append(f'<dl class="settings">{rows}</dl>')
    parts.append(
        '<p class="counts">'
        f'<span id="n-images">{images}</span> images, '
        f'<span id="n-targets">{len(records)}</span> targets, '
        f'<a href="#errors"><span id="n-errors">{len(errors)}</span> errors</a></p>'
    )
    return "\n".join(parts)


def _errors_section(errors: list[dict]) -> str:
    """The inputs that could not be explained (errors.jsonl), one line each."""
    e = html.escape
    if not errors:
        return '<section id="errors"><h2>Errors</h2><p>None.</p></section>'
    items = "".join(
        f'<li><code class="error-key">{e(str(error.get("key", "")))}</code>: '
        f'<span class="error-message">{e(str(error.get("error", "")))}</span></li>'
        for error in errors
    )
    return (
        f'<section id="errors"><h2>Errors ({len(errors)})</h2>'
        f"<details{' open' if len(errors) <= 20 else ''}><summary>inputs that could not be explained"
        f'</summary><ul class="errors">{items}</ul></details></section>'
    )


_CSS = """
:root { --cell: %(cell)dpx; color-scheme: light dark; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; padding: 1rem 1.5rem; background: Canvas;
  color: CanvasText; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; }
h2 { font-size: 1.1rem; }
.lead { margin: .2rem 0; }
.settings { display: flex; flex-wrap: wrap; gap: .2rem 1.2rem; margin: .4rem 0; color: GrayText; }
.settings div { display: flex; gap: .3rem; }
.settings dd { margin: 0; color: CanvasText; }
.warn { color: #c0392b; }
.controls { position: sticky; top: 0; z-index: 1; background: Canvas; padding: .6rem 0;
  display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: end; border-bottom: 1px solid #8884; }
.controls label { display: flex; flex-direction: column; font-size: 12px; color: GrayText; }
.controls input[type=number] { width: 6em; }
.controls label.check { flex-direction: row; align-items: center; gap: .3rem; color: CanvasText; }
#count { font-weight: 600; margin-left: auto; }
#grid { display: grid; gap: .8rem; margin: 1rem 0;
  grid-template-columns: repeat(auto-fill, minmax(var(--cell), 1fr)); }
.card { border: 1px solid #8885; border-radius: 6px; overflow: hidden; display: flex;
  flex-direction: column; }
.card.surprising { border-color: #e67e22; box-shadow: 0 0 0 1px #e67e22; }
.thumb { display: block; background: #8882; }
.thumb img, .thumb span { display: block; width: 100%%; aspect-ratio: 4 / 3; object-fit: contain; }
.thumb span { display: flex; align-items: center; justify-content: center; color: GrayText; }
.meta { padding: .4rem .5rem .5rem; display: flex; flex-direction: column; gap: .15rem; }
.key { font-family: ui-monospace, monospace; font-size: 12px; overflow-wrap: anywhere; }
.cls { font-weight: 600; }
.idx, .rank { color: GrayText; }
.prob { font-variant-numeric: tabular-nums; }
details.top5 summary { cursor: pointer; color: GrayText; font-size: 12px; }
details.top5 ol { margin: .2rem 0 0; padding-left: 1.4rem; font-size: 12px; }
details.top5 li.target { font-weight: 600; }
#more { display: block; margin: 1rem auto; padding: .4rem 1.2rem; }
ul.errors { font-size: 13px; }
.error-key { overflow-wrap: anywhere; }
"""

# Builds the cards with createElement and textContent only: nothing from the run is parsed as HTML.
# It must not contain "</" (that would end the script element early); the tests check it.
_JS = """
"use strict";
(() => {
  const PAGE = %(page)d;
  const records = JSON.parse(document.getElementById("records").textContent);
  const $ = (id) => document.getElementById(id);
  const grid = $("grid"), more = $("more"), count = $("count");
  const controls = {sort: $("sort"), cls: $("class"), min: $("pmin"), max: $("pmax"), path: $("path"),
                    surprising: $("surprising")};
  let shown = [], rendered = 0;

  const classes = new Map();
  for (const r of records) if (!classes.has(r.class)) classes.set(r.class, r.target);
  const list = $("classes");
  for (const name of [...classes.keys()].sort((a, b) => a.localeCompare(b))) {
    const option = document.createElement("option");
    option.value = name;
    option.label = "#" + classes.get(name);
    list.appendChild(option);
  }
  const lowerClasses = new Set([...classes.keys()].map((c) => c.toLowerCase()));

  const percent = (p) => p === null ? "?" : (100 * p).toFixed(p < 0.001 ? 3 : p < 0.1 ? 2 : 1) + "%%";
  const describe = (p) => p.class + " (#" + p.index + ") " + percent(p.probability);
  const byKey = (a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0) || (a.target ?? -1) - (b.target ?? -1);
  const prob = (r, missing) => r.probability === null ? missing : r.probability;
  const orders = {
    "probability-asc": (a, b) => prob(a, 2) - prob(b, 2) || byKey(a, b),
    "probability-desc": (a, b) => prob(b, -1) - prob(a, -1) || byKey(a, b),
    "name": byKey,
    "class": (a, b) => a.class.localeCompare(b.class) || prob(b, -1) - prob(a, -1) || byKey(a, b),
  };

  function filters() {
    const bound = (input, scale) => input.value.trim() === "" || isNaN(input.valueAsNumber)
      ? null : input.valueAsNumber / scale;
    const cls = controls.cls.value.trim().toLowerCase();
    return {
      cls, exact: lowerClasses.has(cls), index: cls.replace(/^#/, ""),
      min: bound(controls.min, 100), max: bound(controls.max, 100),
      path: controls.path.value.trim().toLowerCase(), surprising: controls.surprising.checked,
    };
  }

  function matches(r, f) {
    if (f.cls) {
      const name = r.class.toLowerCase();
      const hit = f.exact ? name === f.cls : name.includes(f.cls) || String(r.target) === f.index;
      if (!hit) return false;
    }
    if (f.min !== null && !(r.probability !== null && r.probability >= f.min)) return false;
    if (f.max !== null && !(r.probability !== null && r.probability <= f.max)) return false;
    if (f.path && !r.key.toLowerCase().includes(f.path)) return false;
    if (f.surprising && r.rank === 0) return false;
    return true;
  }

  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  function card(r) {
    const node = el("article", r.rank === 0 ? "card" : "card surprising");
    const lines = r.top5.map((p, i) => (i + 1) + ". " + describe(p));
    const link = el(r.overlay ? "a" : "div", "thumb");
    if (r.overlay) link.href = r.overlay;
    link.title = r.key + "\\n" + lines.join("\\n");
    if (r.thumb) {
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = r.key + ": " + r.class;
      img.src = r.thumb;
      link.appendChild(img);
    } else {
      link.appendChild(el("span", "", r.overlay ? "no preview: open the overlay" : "overlay missing"));
    }
    node.appendChild(link);
    const meta = el("div", "meta");
    const key = el("div", "key", r.key);
    key.title = r.key;
    meta.appendChild(key);
    const what = el("div");
    what.append(el("span", "cls", r.class), " ", el("span", "idx", "#" + r.target));
    meta.appendChild(what);
    const score = el("div");
    const rank = r.rank === null ? "not in the top-5" : "rank " + (r.rank + 1) + " of the top-5";
    score.append(el("span", "prob", percent(r.probability)), " ", el("span", "rank", rank));
    meta.appendChild(score);
    if (r.top5.length) {
      const details = el("details", "top5");
      details.appendChild(el("summary", "", "top-5 predictions"));
      const ol = el("ol");
      for (const p of r.top5) {
        ol.appendChild(el("li", p.index === r.target ? "target" : "", describe(p)));
      }
      details.appendChild(ol);
      meta.appendChild(details);
    }
    node.appendChild(meta);
    return node;
  }

  function renderMore() {
    const end = Math.min(shown.length, rendered + PAGE);
    const fragment = document.createDocumentFragment();
    for (let i = rendered; i < end; i++) fragment.appendChild(card(shown[i]));
    grid.appendChild(fragment);
    rendered = end;
    const left = shown.length - rendered;
    more.hidden = left <= 0;
    more.textContent = "Show " + Math.min(PAGE, left).toLocaleString() + " more (" + left.toLocaleString()
      + " left)";
    count.textContent = shown.length.toLocaleString() + " of " + records.length.toLocaleString()
      + " cards match" + (left > 0 ? " (" + rendered.toLocaleString() + " shown)" : "");
  }

  function update() {
    const f = filters();
    const order = orders[controls.sort.value] || orders["probability-asc"];
    shown = records.filter((r) => matches(r, f)).sort(order);
    grid.replaceChildren();
    rendered = 0;
    renderMore();
  }

  let timer = 0;
  const later = () => { clearTimeout(timer); timer = setTimeout(update, 150); };
  for (const input of [controls.cls, controls.min, controls.max, controls.path]) {
    input.addEventListener("input", later);
  }
  controls.sort.addEventListener("change", update);
  controls.surprising.addEventListener("change", update);
  $("reset").addEventListener("click", () => {
    for (const input of [controls.cls, controls.min, controls.max, controls.path]) input.value = "";
    controls.surprising.checked = false;
    controls.sort.value = "probability-asc";
    update();
  });
  more.addEventListener("click", renderMore);
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting) && !more.hidden) renderMore();
    }, {rootMargin: "800px"}).observe(more);
  }
  update();
})();
"""

_CONTROLS = """<form class="controls" id="controls" onsubmit="return false">
<label>sort <select id="sort">
<option value="probability-asc" selected>probability, lowest first</option>
<option value="probability-desc">probability, highest first</option>
<option value="name">image name</option>
<option value="class">class</option>
</select></label>
<label>class <input id="class" type="search" list="classes" placeholder="name or index"
 autocomplete="off"></label>
<datalist id="classes"></datalist>
<label>min % <input id="pmin" type="number" min="0" max="100" step="any"></label>
<label>max % <input id="pmax" type="number" min="0" max="100" step="any"></label>
<label>path contains <input id="path" type="search" placeholder="sub/folder or name"></label>
<label class="check"><input id="surprising" type="checkbox"> only where top-1 is not the target</label>
<button id="reset" type="button">reset</button>
<span id="count" aria-live="polite"></span>
</form>"""


def render_page(
    run_dir: Path, settings: dict | None, records: list[dict], errors: list[dict], thumbnail_size: int = 256
) -> str:
    """The whole HTML document for the page ``records`` (as :func:`write_gallery` embeds them)."""
    cell = max(140, min(thumbnail_size, 360))
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Grad-CAM gallery: {html.escape(run_dir.resolve().name or str(run_dir))}</title>",
            f"<style>{_CSS % {'cell': cell}}</style>",
            "</head>",
            "<body>",
            f"<header>{_summary(run_dir, settings, records, errors)}</header>",
            _CONTROLS,
            "<main>",
            '<div id="grid"></div>',
            '<button id="more" type="button" hidden>show more</button>',
            "<noscript><p>The gallery is drawn by JavaScript; enable it to see the cards.</p></noscript>",
            "</main>",
            _errors_section(errors),
            f'<script type="application/json" id="records">{_script_json(records)}</script>',
            f"<script>{_JS % {'page': PAGE_SIZE}}</script>",
            "</body>",
            "</html>",
            "",
        ]
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
    manifest = [r for r in _read_jsonl(run_dir / MANIFEST_FILE) if "key" in r]
    errors = _read_jsonl(run_dir / ERRORS_FILE)
    try:
        settings = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        settings = None
    records = _page_records(run_dir, manifest, thumbnail_size)
    page = render_page(run_dir, settings, records, errors, thumbnail_size)
    return atomic_write_bytes(run_dir / INDEX_FILE, page.encode("utf-8", errors="replace"))
