"""``gradcam report``: the static HTML gallery of a dataset run (gradcam.batch.gallery, gradcam.cli.report).

One real streamed run of the bundled model on the two sample images (one under a folder and name with
spaces, '#' and '%') plus a broken file, and hand-written runs with hostile names and paths.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import html5lib
import pytest
from PIL import Image
from typer.testing import CliRunner

import gradcam.cli  # noqa: F401  (registers explain on the app)
import gradcam.cli.report  # noqa: F401  (registers report on the app)
from conftest import require
from gradcam.batch.gallery import PAGE_SIZE, thumbnail_path, write_gallery
from gradcam.cli.common import app
from gradcam.errors import GradCAMError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HOSTILE_CLASS = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"  # Debian's, as for tests/test_web_e2e.py; .ci/install-chromium installs it
ODD_NAME = "my cat #1 100% ?.png"


def parse(page: Path) -> ET.Element:
    """The page as an element tree; html5lib in strict mode raises on any HTML5 parse error."""
    parser = html5lib.HTMLParser(
        strict=True, tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False
    )
    return parser.parse(page.read_bytes())


def embedded(root: ET.Element) -> list[dict]:
    """The records embedded in the page's JSON script element."""
    (script,) = [s for s in root.iter("script") if s.get("type") == "application/json"]
    return json.loads(script.text)


def manifest(run: Path) -> list[dict]:
    lines = (run / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def resolve(run: Path, url: str) -> Path:
    """The file a relative URL of the page points to; fails on absolute URLs or ones that leave ``run``."""
    parts = urlsplit(url)
    assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
    assert not parts.query and not parts.fragment, url  # a raw '?' or '#' in a name would end the path
    path = (run / unquote(parts.path)).resolve()
    assert path.is_relative_to(run.resolve()), url
    return path


def links(root: ET.Element) -> list[str]:
    """Every src and href of the page (fragment-only links within the page left out), and every
    thumbnail and overlay URL of the embedded records."""
    found = [
        value
        for element in root.iter()
        for name in ("src", "href")
        if (value := element.get(name)) is not None and not value.startswith("#")
    ]
    for record in embedded(root):
        found += [record[name] for name in ("thumb", "overlay") if record[name] is not None]
    return found


def overlay_png(path: Path, size: tuple[int, int] = (300, 200), colour: str = "orange") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def record(key: str, target: int, name: str, probability: float, rank: int | None, overlay: str) -> dict:
    top5 = [{"index": target, "class": name, "probability": probability}] + [
        {"index": 900 + i, "class": f"other {i}", "probability": 0.01} for i in range(4)
    ]
    return {
        "key": key,
        "image": f"/data/{key}",
        "target": target,
        "class": name,
        "probability": probability,
        "score": 1.0,
        "rank": rank,
        "of": 1,
        "top5": top5,
        "peak": {"x": 1.0, "y": 2.0},
        "box": [0, 0, 10, 10],
        "size": [300, 200],
        "files": {"overlay": overlay, "map": overlay.replace("_overlay.png", "_map.npy")},
    }


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A streamed ``gradcam explain`` run (bundled pretrained model) and its gallery. In process: a
    subprocess would import torch a second time, which costs more than the run itself."""
    root = tmp_path_factory.mktemp("real")
    inputs, out = root / "in", root / "out"
    (inputs / "sub dir").mkdir(parents=True)
    shutil.copy(EXAMPLES / "cat.png", inputs / "sub dir" / ODD_NAME)
    shutil.copy(EXAMPLES / "coffee.png", inputs / "coffee.png")
    (inputs / "broken.jpg").write_bytes(b"not a picture")
    result = CliRunner().invoke(
        app, ["explain", str(inputs), "--out", str(out), "--topk", "2", "--workers", "0"]
    )
    assert (out / "manifest.jsonl").is_file() and (out / "errors.jsonl").is_file(), result.output
    assert write_gallery(out) == out / "index.html"
    return out


@pytest.fixture
def hand_run(tmp_path) -> Path:
    """A run written by hand: a hostile class name, odd file names, a missing overlay, a manifest path
    that climbs out of the folder, a hostile run.json value and error message, a partial last line."""
    run = tmp_path / "run"
    overlay_png(run / "a b" / f"{ODD_NAME}_1-x_overlay.png")
    overlay_png(run / "plain.png_2-y_overlay.png", (80, 400), "blue")
    overlay_png(tmp_path / "outside.png")  # exists, but outside the run: must be neither linked nor read
    records = [
        record(f"a b/{ODD_NAME}", 1, HOSTILE_CLASS, 0.25, 1, f"a b/{ODD_NAME}_1-x_overlay.png"),
        record("plain.png", 2, 'Tom & "Jerry" <em>', 0.9, 0, "plain.png_2-y_overlay.png"),
        record("gone.png", 3, "gone", 0.5, None, "gone.png_3-gone_overlay.png"),
        record("evil.png", 4, "evil", 0.5, 0, "../outside.png"),
    ]
    (run / "run.json").write_text(
        json.dumps({"model": "<img src=x onerror=alert(2)>", "method": "gradcam", "topk": 1})
    )
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "manifest.jsonl").write_text(lines + '{"key": "partial', encoding="utf-8")
    errors = [
        {"key": "bad</script>.jpg", "image": "/data/bad.jpg", "error": "bad.jpg: <not> an image & more"},
        {"key": "empty.png", "image": "/data/empty.png", "error": "empty.png: empty file"},
    ]
    (run / "errors.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors))
    return run


@pytest.mark.parametrize(("which", "expected"), [("real_run", 8), ("hand_run", 4)])
def test_page_is_valid_html5_and_every_link_resolves(which: str, expected: int, request) -> None:
    run = request.getfixturevalue(which)
    if which == "hand_run":
        write_gallery(run)
    root = parse(run / "index.html")  # strict: raises on any parse error
    found = links(root)
    assert len(found) == expected  # overlay and thumbnail per card whose overlay is in the folder
    for url in found:
        assert resolve(run, url).is_file(), url


def test_embedded_records_are_the_manifest(real_run: Path) -> None:
    records, lines = embedded(parse(real_run / "index.html")), manifest(real_run)
    assert len(lines) == 4  # two images, top-2 each
    fields = ("key", "target", "class", "probability", "rank", "top5")
    assert [{f: r[f] for f in fields} for r in records] == [{f: r[f] for f in fields} for r in lines]
    for page_record, line in zip(records, lines, strict=True):
        assert resolve(real_run, page_record["overlay"]) == (real_run / line["files"]["overlay"]).resolve()
    odd = [r for r in records if r["key"] == f"sub dir/{ODD_NAME}"]
    assert len(odd) == 2 and all("%23" in r["overlay"] and "%20" in r["thumb"] for r in odd)


def test_summary_and_errors(real_run: Path) -> None:
    root = parse(real_run / "index.html")
    header = "".join(root.find(".//header").itertext())
    assert "efficientnet-lite0" in header and "gradcam" in header
    counts = {e.get("id"): e.text for e in root.iter("span") if e.get("id", "").startswith("n-")}
    assert counts == {"n-images": "2", "n-targets": "4", "n-errors": "1"}
    (error,) = [json.loads(line) for line in (real_run / "errors.jsonl").read_text().splitlines()]
    section = "".join(root.find(".//section[@id='errors']").itertext())
    assert error["key"] == "broken.jpg" and error["key"] in section and error["error"] in section


def test_thumbnails_mirror_the_overlays_at_the_asked_size(real_run: Path, tmp_path: Path) -> None:
    for line in manifest(real_run):
        overlay = real_run / line["files"]["overlay"]
        thumb = real_run / thumbnail_path(PurePosixPath(line["files"]["overlay"]))
        assert thumb.parent == real_run / "thumbs" / Path(line["files"]["overlay"]).parent
        with Image.open(overlay) as big, Image.open(thumb) as small:
            assert small.format == "JPEG" and max(small.size) == 256
            assert abs(small.width / small.height - big.width / big.height) < 0.02
    copy = tmp_path / "copy"
    shutil.copytree(real_run, copy, ignore=shutil.ignore_patterns("thumbs", "index.html"))
    write_gallery(copy, thumbnail_size=64)
    sizes = [Image.open(p).size for p in (copy / "thumbs").rglob("*.jpg")]
    assert len(sizes) == 4 and all(max(size) == 64 for size in sizes)


def test_hostile_names_are_escaped_and_encoded(hand_run: Path) -> None:
    index = write_gallery(hand_run)
    text = index.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text and "bad</script>" not in text
    root = parse(index)
    assert [s.get("type") for s in root.iter("script")] == ["application/json", None]
    assert not list(root.iter("img")) and not list(root.iter("em"))  # none made from the run's text
    assert "<img src=x onerror=alert(2)>" in "".join(root.find(".//header").itertext())
    section = "".join(root.find(".//section[@id='errors']").itertext())
    assert "bad</script>.jpg" in section and "bad.jpg: <not> an image & more" in section
    records = {r["key"]: r for r in embedded(root)}
    assert set(records) == {f"a b/{ODD_NAME}", "plain.png", "gone.png", "evil.png"}  # partial line left out
    odd = records[f"a b/{ODD_NAME}"]
    assert odd["class"] == HOSTILE_CLASS and records["plain.png"]["class"] == 'Tom & "Jerry" <em>'
    assert odd["overlay"] == "a%20b/my%20cat%20%231%20100%25%20%3F.png_1-x_overlay.png"
    assert resolve(hand_run, odd["overlay"]) == (hand_run / "a b" / f"{ODD_NAME}_1-x_overlay.png").resolve()
    assert resolve(hand_run, odd["thumb"]).is_file()
    # The missing overlay and the one outside the folder get no links; nothing is written outside.
    assert records["gone.png"]["overlay"] is None and records["gone.png"]["thumb"] is None
    assert records["evil.png"]["overlay"] is None and records["evil.png"]["thumb"] is None
    assert sorted(p.name for p in hand_run.parent.iterdir()) == ["outside.png", "run"]


def test_the_run_files_are_only_read(hand_run: Path) -> None:
    before = {p: p.read_bytes() for p in hand_run.rglob("*") if p.is_file()}
    write_gallery(hand_run)
    assert {p: p.read_bytes() for p in before} == before  # the partial manifest line is not cut off
    made = {p.relative_to(hand_run).as_posix() for p in hand_run.rglob("*") if p.is_file()} - {
        p.relative_to(hand_run).as_posix() for p in before
    }
    assert made == {
        "index.html",
        f"thumbs/a b/{ODD_NAME}_1-x_overlay.jpg",
        "thumbs/plain.png_2-y_overlay.jpg",
    }


def test_rerun_keeps_fresh_thumbnails_and_remakes_stale_ones(hand_run: Path) -> None:
    write_gallery(hand_run)
    thumbs = sorted((hand_run / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 2
    before = {t: t.stat().st_mtime_ns for t in thumbs}
    write_gallery(hand_run)
    assert {t: t.stat().st_mtime_ns for t in thumbs} == before
    overlay = hand_run / "plain.png_2-y_overlay.png"
    overlay_png(overlay, (400, 80), "red")  # replaced after its thumbnail was made
    later = before[hand_run / "thumbs" / "plain.png_2-y_overlay.jpg"] + 5_000_000_000
    os.utime(overlay, ns=(later, later))
    write_gallery(hand_run)
    after = {t: t.stat().st_mtime_ns for t in thumbs}
    stale = hand_run / "thumbs" / "plain.png_2-y_overlay.jpg"
    assert after[stale] != before[stale] and Image.open(stale).size == (256, 51)
    assert all(after[t] == before[t] for t in thumbs if t != stale)


def many_run(run: Path, count: int = PAGE_SIZE + 50) -> list[dict]:
    """A run of ``count`` images sharing one overlay, more than a page of cards; returns its records."""
    overlay_png(run / "shared_overlay.png", (40, 30))
    records = [
        record(f"img{i:04d}.png", i % 7, f"class {i % 7}", i / count, i % 3, "shared_overlay.png")
        for i in range(count)
    ]
    (run / "run.json").write_text("{}")
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_many_records_are_embedded_for_paged_rendering(tmp_path: Path) -> None:
    run = tmp_path / "many"
    records = many_run(run)
    root = parse(write_gallery(run))
    page = embedded(root)
    assert [r["key"] for r in page] == [r["key"] for r in records]
    assert {r["thumb"] for r in page} == {"thumbs/shared_overlay.jpg"}
    assert not list(root.iter("article"))  # cards are drawn by the script, a page at a time
    (selected,) = [o.get("value") for o in root.iter("option") if o.get("selected") is not None]
    assert selected == "probability-asc"


def test_inline_style_and_script_are_the_packaged_files_and_cannot_end_early(hand_run: Path) -> None:
    templates = resources.files("gradcam.batch") / "templates"
    css, js = ((templates / name).read_text(encoding="utf-8") for name in ("gallery.css", "gallery.js"))
    assert "</" not in js and "</" not in css
    root = parse(write_gallery(hand_run))
    (script,) = [s for s in root.iter("script") if s.get("type") is None]
    (style,) = root.iter("style")
    assert script.text.strip() == js.strip() and style.text.strip().endswith(css.strip())


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Chromium driven by Playwright, as in tests/test_web_e2e.py (Node.js is not part of the set-up, so
    the gallery's script is checked where it runs: in the browser)."""
    sync_api = require("playwright.sync_api", "the gallery's script is run in Chromium through Playwright")
    executable = require(CHROMIUM, "the gallery's script is run in Debian's chromium", tool=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


def open_gallery(browser, index: Path) -> tuple[object, list[str]]:
    """The page ``index`` in a new tab, and the list that collects its script errors, console errors
    and dialogs (an ``alert`` from a name in the run would be one)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(index.as_uri())
    assert problems == []
    return page, problems


def test_script_draws_sorts_and_filters_the_cards_in_a_browser(browser, hand_run: Path) -> None:
    from playwright.sync_api import expect

    page, problems = open_gallery(browser, write_gallery(hand_run))
    cards = page.locator("#grid article")
    expect(cards).to_have_count(4)
    # Probability, lowest first; ties by name. Names and classes are text, never markup.
    assert page.locator("#grid .key").all_text_contents() == [
        f"a b/{ODD_NAME}",
        "evil.png",
        "gone.png",
        "plain.png",
    ]
    assert page.locator("#grid .cls").all_text_contents()[0] == HOSTILE_CLASS
    assert page.locator("#grid script, #grid em").count() == 0
    # The two thumbnails in the folder load through their encoded URLs.
    images = page.locator("#grid img")
    expect(images).to_have_count(2)
    for image in images.all():
        image.scroll_into_view_if_needed()
        expect(image).to_have_js_property("complete", True)
        assert image.evaluate("img => img.naturalWidth") > 0
    page.locator("#surprising").check()
    expect(cards).to_have_count(2)  # rank 1 and not in the top-5
    expect(page.locator("#grid article.surprising")).to_have_count(2)
    page.locator("#reset").click()
    page.locator("#class").fill("tom")
    expect(cards).to_have_count(1)
    expect(page.locator("#grid .key")).to_have_text("plain.png")
    page.locator("#reset").click()
    page.locator("#sort").select_option("probability-desc")
    expect(page.locator("#grid .key").first).to_have_text("plain.png")
    page.close()
    assert problems == []


def test_script_draws_a_page_of_cards_at_a_time_in_a_browser(browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    run = tmp_path / "many"
    count = len(many_run(run, 2 * PAGE_SIZE + 50))
    page, problems = open_gallery(browser, write_gallery(run))
    cards, more = page.locator("#grid article"), page.locator("#more")
    expect(cards).to_have_count(PAGE_SIZE)
    expect(more).to_have_text(f"Show {PAGE_SIZE} more ({PAGE_SIZE + 50} left)")
    more.scroll_into_view_if_needed()  # scrolling down to the button draws the next page
    expect(cards).to_have_count(2 * PAGE_SIZE)
    expect(more).to_have_text("Show 50 more (50 left)")
    more.dispatch_event("click")  # as does the button (a real click would scroll, and race the scrolling)
    expect(cards).to_have_count(count)
    expect(more).to_be_hidden()
    page.close()
    assert problems == []


def test_library_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(GradCAMError, match="no manifest.jsonl"):
        write_gallery(tmp_path)
    with pytest.raises(GradCAMError, match="no such folder"):
        write_gallery(tmp_path / "missing")
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(GradCAMError, match="thumbnail size"):
        write_gallery(tmp_path, thumbnail_size=0)


def test_cli_prints_the_path(hand_run: Path) -> None:
    write_gallery(hand_run)  # thumbnails of 256 pixels, remade at the size asked for below
    result = CliRunner().invoke(app, ["report", str(hand_run), "--thumbnail-size", "100"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{hand_run / 'index.html'}\n" and result.stderr == ""
    assert max(Image.open(hand_run / "thumbs" / "plain.png_2-y_overlay.jpg").size) == 100


@pytest.mark.parametrize("what", ["no manifest", "missing", "file"])
def test_cli_one_line_error_exit_2(what: str, tmp_path: Path) -> None:
    target = {"no manifest": tmp_path, "missing": tmp_path / "nope", "file": tmp_path / "f.txt"}[what]
    if what == "file":
        target.write_text("x")
    result = CliRunner().invoke(app, ["report", str(target)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "index.html").exists()
