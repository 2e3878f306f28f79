"""In a real browser: the web app draws a detector's boxes and a segmenter's mask outline over the picture,
from the API's numbers (the server sends the heatmap, never an overlay).

The small random-weight detector and segmenter of test_serve_tasks.py, served by ``create_app`` under
uvicorn in a thread of this process (one server and one browser for the module), Debian's chromium
driven by Playwright as in test_web_e2e.py. A failing test leaves a screenshot in its tmp dir.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect

from conftest import require
from gradcam.serve.app import ServeSettings, create_app
from test_serve_tasks import DETECTOR, SEGMENTER, decode, scene, task_models
from test_web_e2e import ANSWER, browser  # noqa: F401 (the module's Chromium, as a fixture)

uvicorn = require("uvicorn", "the browser tests need uvicorn (the serve extra)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    served = task_models()
    settings = ServeSettings(
        models=[DETECTOR, SEGMENTER],
        loader=lambda name, device=None: served[name],
        db_url=f"sqlite:///{tmp_path_factory.mktemp('db') / 'study.db'}",
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not running.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=15)


@pytest.fixture
def page(browser: Browser, server: str, tmp_path: Path) -> Iterator[Page]:  # noqa: F811 (the fixture)
    """A fresh page at 1280x800; an uncaught JavaScript error fails the test, any failure leaves a
    screenshot in tmp_path."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server)
    context.set_default_timeout(ANSWER)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def explained(page: Page, start) -> dict:  # type: ignore[no-untyped-def]
    """Run ``start`` (an action that makes the page ask for an explanation) and return the answer's JSON
    once the page has shown it."""
    with page.expect_response(lambda r: r.url.endswith("/v1/explain") and r.request.method == "POST") as info:
        start()
    assert info.value.status == 200, info.value.text()
    expect(page.get_by_test_id("busy")).to_be_hidden(timeout=ANSWER)
    return info.value.json()


def outline_of(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (or at the border): the outline the page draws
    (one pixel thick for a mask under 600 pixels a side)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def test_boxes_and_mask_outlines_are_drawn_from_the_answer(page: Page, tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    scene().save(image)
    tid = page.get_by_test_id
    page.goto("/")
    expect(tid("model-select")).to_be_enabled()
    expect(tid("task-options")).to_be_visible()  # the default model is the detector
    expect(tid("min-score-field")).to_be_visible()
    tid("min-score-input").fill("0")
    tid("topk-input").fill("2")
    body = explained(page, lambda: tid("file-input").set_input_files(image))
    left = tid("left-panel")
    targets = body["targets"]
    assert len(targets) == 2 and all(t["detection"] for t in targets)

    # One box per detection, at its box scaled from the image's pixels to the picture on screen.
    boxes = left.get_by_test_id("box")
    expect(boxes).to_have_count(2)
    picture = left.get_by_test_id("overlay-picture").bounding_box()
    assert picture is not None
    scale = picture["width"] / body["size"][0]
    assert picture["height"] / body["size"][1] == pytest.approx(scale, rel=0.03)
    for n, target in enumerate(targets):
        x0, y0, x1, y1 = target["detection"]["box"]
        box = left.locator(f'[data-testid="box"][data-n="{n}"]')  # the shown box is drawn last
        rect = box.get_by_test_id("box-rect")
        # In the image's pixels, as sent; on screen (the rect's geometry, without its stroke, through
        # the SVG's transform to the viewport), over those pixels of the picture.
        attributes = [float(rect.get_attribute(k) or "nan") for k in ("x", "y", "width", "height")]
        assert attributes == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-6)
        corners = rect.evaluate(
            """r => { const m = r.getScreenCTM(), b = r.getBBox();
                      return [b.x * m.a + m.e, b.y * m.d + m.f,
                              (b.x + b.width) * m.a + m.e, (b.y + b.height) * m.d + m.f]; }"""
        )
        expected = [
            picture["x"] + x0 * scale,
            picture["y"] + y0 * scale,
            picture["x"] + x1 * scale,
            picture["y"] + y1 * scale,
        ]
        assert corners == pytest.approx(expected, abs=1.0), (corners, expected)
        score = f"{target['detection']['score']:.2f}"
        expect(box.get_by_test_id("box-label")).to_have_text(f"{target['class']} {score}")
    expect(left.locator('[data-testid="box"][data-n="0"]')).to_have_class("mark-box is-shown")
    expect(left.get_by_test_id("heatmap-picture")).to_have_attribute(
        "src", f"data:image/png;base64,{targets[0]['heatmap']}"
    )
    expect(left.get_by_test_id("topk-list")).to_be_hidden()  # a detector has no top-5

    # Showing the second detection: its heatmap (no new request) and its box in front.
    listed = left.get_by_test_id("target")
    expect(listed).to_have_count(2)
    listed.nth(1).get_by_role("button").click()
    expect(left.get_by_test_id("heatmap-picture")).to_have_attribute(
        "src", f"data:image/png;base64,{targets[1]['heatmap']}"
    )
    expect(left.locator('[data-testid="box"][data-n="1"]')).to_have_class("mark-box is-shown")
    expect(listed.nth(1)).to_have_attribute("aria-current", "true")
    expect(left.get_by_test_id("explained-class")).to_contain_text("detection 2")

    # Nothing at the default min score: the picture alone, with the reason.
    tid("min-score-input").fill("0.5")
    empty = explained(page, lambda: tid("min-score-input").press("Tab"))
    assert empty["targets"] == []
    expect(left.get_by_test_id("explained-class")).to_have_text(f"Nothing to explain: {empty['none']}")
    expect(boxes).to_have_count(0)
    expect(left.get_by_test_id("overlay-picture")).to_be_visible()
    expect(left.get_by_test_id("heatmap-picture")).to_be_hidden()

    # A segmenter: the outline of the shown class's predicted mask, stretched over the picture.
    segmented = explained(page, lambda: tid("model-select").select_option(SEGMENTER))
    expect(tid("min-score-field")).to_be_hidden()
    expect(left.get_by_test_id("target")).to_have_count(2)  # topk 2: the two largest classes
    outline = left.get_by_test_id("mask-outline")
    expect(outline).to_be_visible()
    expect(boxes).to_have_count(0)
    mask = decode(segmented["targets"][0]["mask"]["png"]) == 255
    assert 0 < mask.mean() < 1
    alpha = outline.evaluate(
        """canvas => Array.from(canvas.getContext("2d")
                 .getImageData(0, 0, canvas.width, canvas.height).data.filter((_, i) => i % 4 === 3))"""
    )
    drawn = np.array(alpha).reshape(mask.shape) > 0
    np.testing.assert_array_equal(drawn, outline_of(mask))
    placed, shown = outline.bounding_box(), left.get_by_test_id("overlay-picture").bounding_box()
    assert placed is not None and shown is not None
    assert all(placed[k] == pytest.approx(shown[k], abs=1) for k in ("x", "y", "width", "height"))
    expect(left.get_by_test_id("explained-class")).to_contain_text("predicted on")
