"""End to end in a real browser: the web app at "/" and a rater's study, against `gradcam serve`.

Debian's chromium (/usr/bin/chromium) driven by Playwright; Playwright's own browsers are never used. One
server (a `gradcam serve` subprocess serving EfficientNet-Lite0 and -Lite1 on a free loopback port) and one
browser for the module. A failing test leaves a screenshot (and the server's log) in its tmp dir.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import require

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKEN = secrets.token_urlsafe(24)
ANSWER = 60_000  # ms to wait for an answer: generous for slow CI machines (here: well under a second)
PNG = b"\x89PNG\r\n\x1a\n"

# CI (.ci/run sets GRADCAM_REQUIRE_BROWSER=1) must run these tests: there a missing browser is a failure.
if not CHROMIUM.exists() and os.environ.get("GRADCAM_REQUIRE_BROWSER") == "1":
    raise RuntimeError("GRADCAM_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing: run .ci/install-chromium")
require(str(CHROMIUM), "the browser tests need Debian's chromium at /usr/bin/chromium", tool=True)


@dataclass
class Server:
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    folder = root / "images" / "pets-and-drinks"
    folder.mkdir(parents=True)
    for name in ("cat.png", "coffee.png"):
        shutil.copy(EXAMPLES / name, folder / name)
    disagree = root / "images" / "disagree"  # the two models classify its one image apart
    disagree.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(disagree / "red.png")
    port = _free_port()
    log = root / "server.log"
    command = [
        sys.executable, "-m", "gradcam", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--model", "efficientnet-lite0", "--model", "efficientnet-lite1",
        "--db", f"sqlite:///{root / 'study.db'}", "--admin-token", TOKEN,
        "--study-images", str(root / "images"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"gradcam serve exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"gradcam serve did not answer /healthz within 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(url, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: Server, tmp_path: Path) -> Iterator[Page]:
    """A fresh page at 1280x800 (answers may take up to ANSWER ms); an uncaught JavaScript error fails the
    test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    context.set_default_timeout(ANSWER)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@contextlib.contextmanager
def evidence(page: Page, server: Server, tmp_path: Path, name: str) -> Iterator[None]:
    """On any failure inside: a full-page screenshot and a copy of the server's log in tmp_path."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        with contextlib.suppress(Exception):
            shutil.copy(server.log, tmp_path / "server.log")
        print(f"screenshot and server log in {tmp_path}")
        raise


def idle(page: Page) -> None:
    """Wait until no request is running (the busy indicator is hidden)."""
    expect(page.get_by_test_id("busy")).to_be_hidden(timeout=ANSWER)


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG), data[:16]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def data_url_bytes(url: str | None) -> bytes:
    assert url and url.startswith("data:image/png;base64,"), (url or "")[:40]
    return base64.b64decode(url.split(",", 1)[1])


def test_explore_an_image(page: Page, server: Server, tmp_path: Path) -> None:
    with evidence(page, server, tmp_path, "explore"):
        page.goto("/")
        tid = page.get_by_test_id
        expect(tid("model-select")).to_be_enabled()
        models = tid("model-select").locator("option").evaluate_all("options => options.map(o => o.value)")
        assert models == ["efficientnet-lite0", "efficientnet-lite1"]
        methods = tid("method-select").locator("option").evaluate_all("options => options.map(o => o.value)")
        assert {"gradcam", "gradcam++", "guided-backprop", "guided-gradcam"} <= set(methods)
        expect(tid("class-datalist").locator("option")).to_have_count(1000)

        # Upload: the overlay appears, with the top-5 and the cat on top.
        tid("file-input").set_input_files(EXAMPLES / "cat.png")
        left = tid("left-panel")
        expect(left).to_be_visible(timeout=ANSWER)
        idle(page)
        expect(tid("error-box")).to_be_hidden()
        expect(tid("right-panel")).to_be_hidden()
        expect(tid("file-name")).to_have_text("cat.png")
        expect(left.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · gradcam")
        predictions = left.get_by_test_id("prediction")
        expect(predictions).to_have_count(5)
        expect(predictions.first).to_contain_text("cat")
        expect(predictions.first).to_have_attribute("aria-current", "true")
        picture = left.get_by_test_id("overlay-picture")
        heatmap = left.get_by_test_id("heatmap-picture")
        expect(heatmap).to_be_visible()
        width, height = png_size(data_url_bytes(picture.get_attribute("src")))
        assert png_size(data_url_bytes(heatmap.get_attribute("src"))) == (width, height)
        expect(left.get_by_test_id("guided")).to_be_hidden()

        # The opacity slider sets the heatmap's opacity, by mouse or keyboard.
        assert heatmap.evaluate("img => getComputedStyle(img).opacity") == "0.5"
        tid("opacity-slider").fill("80")
        expect(tid("opacity-value")).to_have_text("80 %")
        assert heatmap.evaluate("img => getComputedStyle(img).opacity") == "0.8"
        tid("opacity-slider").press("ArrowLeft")
        expect(tid("opacity-value")).to_have_text("79 %")
        assert heatmap.evaluate("img => getComputedStyle(img).opacity") == "0.79"

        # The overlay download is the picture and heatmap at the slider's opacity, as a PNG.
        with page.expect_download() as download:
            left.get_by_test_id("download-overlay").click()
        assert download.value.suggested_filename == "cat-efficientnet-lite0-gradcam-Egyptian_cat-overlay.png"
        saved = tmp_path / "overlay.png"
        download.value.save_as(saved)
        assert png_size(saved.read_bytes()) == (width, height)
        assert (
            left.get_by_test_id("download-heatmap")
            .get_attribute("download", timeout=1000)
            .endswith("-heatmap.png")
        )

        # Another method: a new answer, a different map.
        before = heatmap.get_attribute("src")
        tid("method-select").select_option("gradcam++")
        expect(left.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · gradcam++")
        idle(page)
        assert heatmap.get_attribute("src") != before

        # Guided Grad-CAM, by the toggle: the guided picture and its download; off again: back to gradcam++.
        tid("guided-toggle").check()
        expect(tid("method-select")).to_have_value("guided-gradcam")
        guided = left.get_by_test_id("guided-picture")
        expect(guided).to_be_visible(timeout=ANSWER)
        idle(page)
        data_url_bytes(guided.get_attribute("src"))
        expect(left.get_by_test_id("download-guided")).to_have_attribute(
            "download", "cat-efficientnet-lite0-guided-gradcam-Egyptian_cat-guided.png"
        )
        tid("guided-toggle").uncheck()
        expect(tid("method-select")).to_have_value("gradcam++")
        expect(guided).to_be_hidden(timeout=ANSWER)

        # Guided Backpropagation has no class map: only the guided picture.
        tid("method-select").select_option("guided-backprop")
        expect(left.get_by_test_id("guided")).to_be_visible(timeout=ANSWER)
        expect(left.get_by_test_id("overlay")).to_be_hidden()
        expect(left.get_by_test_id("download-overlay")).to_be_hidden()

        # Quick changes: older requests are cancelled and only the last answer is shown.
        aborted: list[str] = []
        page.on("requestfailed", lambda request: aborted.append(request.url))
        for method in ("gradcam", "layercam", "xgradcam"):
            tid("method-select").select_option(method)
        expect(left.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · xgradcam")
        idle(page)
        page.wait_for_timeout(300)  # an older answer arriving late would show up now
        expect(left.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · xgradcam")

        # A class by name (the searchable list), and by clicking a prediction.
        tid("class-input").fill("tabby")
        tid("class-input").press("Enter")
        expect(left.get_by_test_id("explained-class")).to_contain_text("tabby")
        idle(page)
        expect(left.locator("[data-testid=prediction][aria-current=true]")).to_have_attribute(
            "data-class", "tabby"
        )
        second = predictions.nth(1).get_attribute("data-class")
        predictions.nth(1).get_by_role("button").click()
        expect(tid("class-input")).to_have_value(second or "")
        expect(left.get_by_test_id("explained-class")).to_contain_text(second or "")
        idle(page)

        # A class the model does not have: the API's detail in the alert box; the top prediction mends it.
        tid("class-input").fill("no such class")
        tid("class-input").press("Enter")
        error = page.get_by_role("alert")
        expect(error).to_be_visible(timeout=ANSWER)
        expect(error).to_have_attribute("data-testid", "error-box")
        expect(error).to_contain_text("no such class")
        tid("class-clear").click()
        expect(error).to_be_hidden(timeout=ANSWER)
        expect(predictions.first).to_have_attribute("aria-current", "true")

        # Side by side: two methods, then two models.
        tid("method-select").select_option("gradcam")
        idle(page)
        tid("compare-toggle").check()
        right = tid("right-panel")
        expect(right).to_be_visible(timeout=ANSWER)
        expect(tid("compare-method-select")).to_have_value("gradcam++")
        expect(right.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · gradcam++")
        expect(left.get_by_test_id("panel-title")).to_have_text("efficientnet-lite0 · gradcam")
        idle(page)
        tid("compare-by-model").check()
        expect(tid("compare-model-select")).to_have_value("efficientnet-lite1")
        expect(right.get_by_test_id("panel-title")).to_have_text(
            "efficientnet-lite1 · gradcam", timeout=ANSWER
        )
        idle(page)
        expect(right.get_by_test_id("prediction").first).to_contain_text("cat")
        lite1 = data_url_bytes(right.get_by_test_id("overlay-picture").get_attribute("src"))
        assert png_size(lite1) == (width, height)
        assert right.get_by_test_id("heatmap-picture").get_attribute("src") != heatmap.get_attribute("src")
        tid("compare-toggle").uncheck()
        expect(right).to_be_hidden(timeout=ANSWER)
        idle(page)

        # Another image, from the same input: the class starts again at its top prediction.
        tid("file-input").set_input_files(EXAMPLES / "coffee.png")
        expect(tid("file-name")).to_have_text("coffee.png")
        expect(predictions.first).to_contain_text("espresso", timeout=ANSWER)
        idle(page)

        # Narrow screens: nothing wider than the viewport.
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        expect(left.get_by_test_id("heatmap-picture")).to_be_visible()


def test_rate_a_study(page: Page, server: Server, tmp_path: Path) -> None:
    methods = ["guided-backprop", "guided-gradcam"]
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=admin, timeout=180) as client:
        folders = client.get("/v1/admin/folders").json()["folders"]
        assert {"name": "pets-and-drinks", "images": 2} in [
            {"name": f["name"], "images": f["images"]} for f in folders
        ]
        created = client.post(
            "/v1/studies",
            json={
                "name": "Pets and drinks",
                "stronger_model": "efficientnet-lite1",
                "weaker_model": "efficientnet-lite0",
                "methods": methods,
                "folder": "pets-and-drinks",
                "seed": 0,
            },
        )
        assert created.status_code == 202, created.text  # rendered in the background
        deadline = time.monotonic() + ANSWER / 1000
        while (study := client.get(created.json()["status_path"]).json())["state"] not in ("ready", "failed"):
            assert time.monotonic() < deadline, study
            time.sleep(0.1)
        scale = [step["answer"] for step in client.get(f"/v1/studies/{study['id']}").json()["scale"]]
        invited = client.post(f"/v1/admin/studies/{study['id']}/invitations", json={"count": 1})
        assert invited.status_code == 201, invited.text
        [invitation] = invited.json()["invitations"]
    assert study["state"] == "ready", study
    link = invitation["link"]
    token = link.split("#", 1)[1]
    pairs = study["pairs"]
    assert pairs == len(methods) * study["kept"] and pairs >= len(methods), study

    with evidence(page, server, tmp_path, "study"):
        tid = page.get_by_test_id
        page.goto(study["rater_path"])  # no invitation: the page says how to get in
        expect(tid("error")).to_contain_text("by invitation")
        expect(tid("pair")).to_be_hidden()

        # The rater's token never travels in a URL: only in the Authorization header of rater calls.
        sent: list[tuple[str, str | None]] = []
        page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
        page.goto(link)
        expect(tid("study-name")).to_have_text("Pets and drinks")
        expect(tid("pair")).to_be_visible()
        assert "#" not in page.url and token not in page.url  # taken off the address bar
        expect(tid("progress-total")).to_have_text(str(pairs))
        for number in range(1, pairs + 1):
            expect(tid("progress-current")).to_have_text(str(number))
            expect(tid("class-name")).not_to_be_empty()
            for robot in ("robot-a", "robot-b"):
                data_url_bytes(tid(robot).get_attribute("src"))
            # Answers cycle through the scale; the keyboard is enough to give one.
            button = tid(f"answer-{scale[number % len(scale)]}")
            expect(button).to_be_enabled()
            button.focus()
            page.keyboard.press("Enter")
        expect(tid("done")).to_be_visible()
        expect(tid("pair")).to_be_hidden()
        expect(tid("done-total")).to_have_text(str(pairs))
        expect(tid("error")).to_be_hidden()
        assert all(token not in url for url, _ in sent)
        rater_calls = [auth for url, auth in sent if url.endswith(("/next", "/ratings"))]
        assert len(rater_calls) >= 2 * pairs and set(rater_calls) == {f"Bearer {token}"}
        page.reload()  # the token was kept: the rater continues (here: done)
        expect(tid("done")).to_be_visible()

        page.goto(study["results_path"])
        expect(tid("token-form")).to_be_visible()
        tid("token-input").fill(TOKEN)
        tid("token-submit").click()
        expect(tid("results-table")).to_be_visible()
        expect(tid("state")).to_be_hidden()  # the study is ready
        expect(tid("scale-top")).to_have_text(f"+{scale[0]}")
        expect(tid("error")).to_be_hidden()
        expect(tid("models")).to_contain_text("efficientnet-lite1 (stronger) vs efficientnet-lite0")
        rows = tid("result-row")
        expect(rows).to_have_count(len(methods))
        rated = 0
        for method in methods:
            row = page.locator(f'[data-testid="result-row"][data-method="{method}"]')
            expect(row.get_by_test_id("method")).to_have_text(method)
            expect(row.get_by_test_id("raters")).to_have_text("1")
            method_pairs = int(row.get_by_test_id("pairs").inner_text())
            expect(row.get_by_test_id("ratings")).to_have_text(str(method_pairs))
            rated += method_pairs
        assert rated == pairs
        expect(tid("summary")).to_contain_text(f"{pairs} ratings by 1 rater")


def test_the_results_page_shows_a_failed_study(page: Page, server: Server, tmp_path: Path) -> None:
    body = {
        "name": "Disagreement",
        "stronger_model": "efficientnet-lite1",
        "weaker_model": "efficientnet-lite0",
        "methods": ["gradcam"],
        "folder": "disagree",
    }
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        created = client.post("/v1/studies", json=body)
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + ANSWER / 1000
        while (study := client.get(created.json()["status_path"]).json())["state"] != "failed":
            assert time.monotonic() < deadline and study["state"] != "ready", study
            time.sleep(0.1)
    with evidence(page, server, tmp_path, "failed-study"):
        tid = page.get_by_test_id
        page.goto(study["results_path"])
        tid("token-input").fill(TOKEN)
        tid("token-submit").click()
        expect(tid("state")).to_be_visible()
        expect(tid("state")).to_have_attribute("data-state", "failed")
        expect(tid("state")).to_contain_text("no image is classified alike by both models")
        expect(tid("results-table")).to_be_hidden()
        page.goto(study["rater_path"])  # raters are told, in one line, that the study cannot be rated
        expect(tid("error")).to_contain_text("failed")
        expect(tid("pair")).to_be_hidden()
