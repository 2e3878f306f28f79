"""Uploads to ``gradcam serve`` (hostile input): the formats read, the pixel limit told from an image's
header before any pixel is decoded or allocated, the pixels decoded at once, and slow bodies.

The app serves a tiny classifier (a stand-in loader) with a pixel limit of 10 000 and a decoding budget
of 15 000, so every image here is a few kB. Spies on Pillow's allocation points (``ImageFile.load_prepare``
makes a frame's pixels, ``Image.core.fill`` a GIF's disposal canvas, ``WebPAnimDecoder`` WebP's canvas)
show what was decoded, not only what was answered.
"""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image, ImageFile, features

from conftest import TinyHead, require, run_gradcam
from gradcam import io as gradcam_io
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.models import LoadedModel
from gradcam.models.base import Preprocess
from gradcam.serve.app import ServeSettings, create_app
from gradcam.serve.routers import explain as explain_router

uvicorn = require("uvicorn", "the slow-client test needs uvicorn (the serve extra)")

LIMIT, BUDGET = 10_000, 15_000  # --max-pixels, --max-decoding-pixels
ACCEPTED = "not an image in a format read here (JPEG, PNG, WebP, GIF, BMP or TIFF)"


def tiny(name: str, device: str | None = None) -> LoadedModel:
    torch.manual_seed(0)
    preprocess = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return LoadedModel(name, TinyHead().eval(), preprocess, ["a", "b", "c"])


def settings(db: Path, **overrides: object) -> ServeSettings:
    chosen: dict = {"max_pixels": LIMIT, "max_decoding_pixels": BUDGET, **overrides}
    return ServeSettings(loader=tiny, db_url=f"sqlite:///{db}", **chosen)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[TestClient, object]]:
    app = create_app(settings(tmp_path_factory.mktemp("db") / "study.db"))
    with TestClient(app) as client:
        yield client, app


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8)).convert(mode)


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def post(client: TestClient, data: bytes, name: str = "upload.bin") -> httpx.Response:
    return client.post("/v1/explain", files={"image": (name, data, "application/octet-stream")})


@pytest.fixture
def allocations(monkeypatch) -> list[tuple[str, tuple[int, int]]]:
    """Where Pillow made pixels while the test ran: (what, size) of each frame, GIF disposal canvas and
    WebP decoder canvas."""
    made: list[tuple[str, tuple[int, int]]] = []
    Image.init()  # importing the plugins makes a prototype image or two: not an upload's pixels
    load_prepare, fill = ImageFile.ImageFile.load_prepare, Image.core.fill

    def spied_load_prepare(self: ImageFile.ImageFile) -> None:
        made.append(("frame", self.size))
        load_prepare(self)

    def spied_fill(mode: str, size: tuple[int, int], *args: object) -> object:
        made.append(("fill", tuple(size)))
        return fill(mode, size, *args)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", spied_load_prepare)
    monkeypatch.setattr(Image.core, "fill", spied_fill)
    if features.check("webp"):
        from PIL import WebPImagePlugin

        decoder = WebPImagePlugin._webp.WebPAnimDecoder

        def spied_decoder(data: bytes) -> object:
            made.append(("webp-canvas", (0, 0)))
            return decoder(data)

        monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", spied_decoder)
    return made


def peak_rss_growth(action: Callable[[], object]) -> int | None:
    """Bytes the process's peak resident memory grew by while ``action`` ran (None where Linux's
    /proc/self/clear_refs cannot reset the peak)."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
        before = status("VmRSS")
    except (OSError, LookupError):
        return None
    action()
    return status("VmHWM") - before


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file whose one entry is ``png`` (an ICO entry may hold a whole PNG of any size)."""
    directory = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 (icon), one image
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0 x 0: "256" or larger
    return directory + entry + png


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    data = encoded(Image.new("1", (8000, 8000)), "PNG")  # 64 million pixels in a few kB
    assert len(data) < 20_000
    return data


# ------------------------------------------------------------------ formats


def test_an_ico_wrapping_a_huge_png_is_refused_415_at_once(served, huge_png, allocations):
    client, _ = served
    upload = ico_wrapping(huge_png)
    responses = []
    started = time.perf_counter()
    growth = peak_rss_growth(lambda: responses.append(post(client, upload, "icon.ico")))
    elapsed = time.perf_counter() - started
    assert responses[0].status_code == 415, responses[0].text
    assert responses[0].json() == {"detail": f"image 'icon.ico': {ACCEPTED}"}
    assert allocations == [] and elapsed < 1.0
    assert growth is None or growth < 30 * 1024 * 1024, growth  # decoding it would take 64 MB and more


def test_an_ico_wrapping_a_huge_png_is_refused_before_decoding_by_load_image_too(
    tmp_path, huge_png, allocations
):
    path = tmp_path / "icon.ico"  # every format is tried for a file: Pillow's check inside the ICO stops it
    path.write_bytes(ico_wrapping(huge_png))
    with pytest.raises(ImageLoadError) as caught:
        gradcam_io.load_image(path, max_pixels=LIMIT)
    assert caught.value.reason == "too-large" and "8000x8000 pixels exceeds the limit of 10000" in str(
        caught.value
    )
    assert allocations == []


def test_an_eps_upload_is_415_and_never_reaches_ghostscript(served, monkeypatch):
    client, _ = served
    calls = []

    def ghostscript(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\nshowpage\n%%EOF\n"
    with Image.open(io.BytesIO(eps)) as opened:  # Pillow itself reads it as EPS
        assert opened.format == "EPS" and opened.size == (64, 48)
    response = post(client, eps, "figure.eps")
    assert response.status_code == 415 and response.json()["detail"] == f"image 'figure.eps': {ACCEPTED}"
    assert calls == []


@pytest.mark.parametrize("format", ["ICO", "PPM", "TGA", "PCX", "SGI", "DDS"])
def test_other_formats_pillow_reads_are_415(served, format, allocations):
    client, _ = served
    upload = encoded(picture(40, 30, "RGBA" if format == "DDS" else "RGB"), format)
    with Image.open(io.BytesIO(upload)) as opened:  # a valid file Pillow would decode
        assert opened.format == format
    allocations.clear()
    response = post(client, upload, f"picture.{format.lower()}")
    assert response.status_code == 415 and ACCEPTED in response.json()["detail"]
    assert allocations == []


ALLOWED = [
    ("JPEG", {}),
    ("PNG", {}),
    pytest.param("WEBP", {}, marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP")),
    ("GIF", {"disposal": 2}),
    ("BMP", {}),
    ("TIFF", {}),
]


@pytest.mark.parametrize(("format", "options"), ALLOWED)
def test_the_allowed_formats_are_read(served, format, options):
    client, app = served
    response = post(client, encoded(picture(64, 48), format, **options), f"picture.{format.lower()}")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == [64, 48]
    assert app.state.decoding.in_use == 0


# ------------------------------------------------------------------ the pixel limit, before decoding


@pytest.mark.parametrize(("format", "options"), ALLOWED)
def test_every_allowed_format_over_the_limit_is_413_before_any_pixel_is_made(
    served, format, options, allocations
):
    client, app = served
    upload = encoded(picture(200, 150), format, **options)  # 30 000 pixels, over the 10 000
    allocations.clear()
    response = post(client, upload, f"big.{format.lower()}")
    assert response.status_code == 413, response.text
    assert "200x150 pixels exceeds the limit of 10000" in response.json()["detail"]
    assert allocations == []  # no frame, no GIF disposal canvas, no WebP canvas
    assert app.state.decoding.in_use == 0


def test_an_animated_gif_over_the_limit_is_413_before_any_frame(served, allocations):
    client, _ = served
    frames = [picture(200, 150), picture(200, 150).rotate(180)]
    upload = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=2, duration=50)
    allocations.clear()
    response = post(client, upload, "big.gif")
    assert response.status_code == 413 and allocations == []


@pytest.mark.parametrize("format", ["GIF", "TIFF"])
def test_of_a_multi_frame_file_only_the_first_frame_is_decoded_and_counted(served, format, allocations):
    client, _ = served
    first = picture(60, 60)  # 3 600 pixels, a third of the limit; three frames would be 10 800
    if format == "TIFF":  # a multi-page TIFF's pages have sizes of their own: the next is over the limit
        upload = encoded(first, "TIFF", save_all=True, append_images=[picture(400, 300)])
    else:
        upload = encoded(first, "GIF", save_all=True, append_images=[first.rotate(90)] * 2, duration=50)
    with Image.open(io.BytesIO(upload)) as opened:
        assert opened.n_frames >= 2
    allocations.clear()
    response = post(client, upload, f"frames.{format.lower()}")
    assert response.status_code == 200 and response.json()["size"] == [60, 60]
    assert [size for what, size in allocations if what == "frame"] == [(60, 60)]


# ------------------------------------------------------------------ the pixels decoded at once


def test_uploads_beyond_the_pixel_budget_get_503_with_retry_after(served, monkeypatch, allocations):
    client, app = served
    entered, release = threading.Event(), threading.Event()
    prepare = explain_router.prepare

    def held(loaded: LoadedModel, image: Image.Image) -> object:
        if image.size == (100, 100):  # the first upload keeps its share until released
            entered.set()
            assert release.wait(20)
        return prepare(loaded, image)

    monkeypatch.setattr(explain_router, "prepare", held)
    with ThreadPoolExecutor(max_workers=1) as threads:
        first = threads.submit(post, client, encoded(picture(100, 100), "PNG"))  # the whole 10 000
        try:
            assert entered.wait(20)
            assert app.state.decoding.in_use == 10_000
            second = encoded(picture(80, 80), "PNG")  # 6 400 pixels: 16 400 in all, over the 15 000
            allocations.clear()
            refused = post(client, second, "second.png")
            refused_allocations = list(allocations)
            fits = post(client, encoded(picture(50, 50), "PNG"))  # 12 500: fits beside the first
        finally:
            release.set()
        assert first.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    detail = refused.json()["detail"]
    assert detail.startswith("too many pixels being decoded: 10000 of the 15000") and "needs 6400" in detail
    assert "--max-decoding-pixels" in detail and refused_allocations == []  # refused from its header
    assert fits.status_code == 200, fits.text
    assert app.state.decoding.in_use == 0


def test_the_budget_is_given_back_after_every_refusal(served):
    client, app = served
    whole = encoded(picture(50, 50), "PNG")
    for upload, status in [(whole[: len(whole) // 2], 422), (encoded(picture(200, 150), "PNG"), 413)]:
        assert post(client, upload).status_code == status
        assert app.state.decoding.in_use == 0


def test_limits_that_contradict_each_other_are_refused_naming_the_options(tmp_path):
    with pytest.raises(GradCAMError, match=r"--max-decoding-pixels 5000 is below --max-pixels 10000"):
        settings(tmp_path / "db", max_decoding_pixels=5000)
    with pytest.raises(GradCAMError, match=r"--read-timeout must be a positive number of seconds"):
        settings(tmp_path / "db", read_timeout=0)
    assert ServeSettings(max_pixels=7).decoding_budget == 14  # default: twice the limit


def test_the_serve_command_refuses_a_budget_below_the_pixel_limit():
    result = run_gradcam("serve", "--max-pixels", "100", "--max-decoding-pixels", "50")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-decoding-pixels 50 is below --max-pixels 100" in result.stderr


# ------------------------------------------------------------------ slow clients


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    app = create_app(settings(tmp_path_factory.mktemp("db") / "study.db", read_timeout=0.3, body_timeout=1.0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield port
    running.should_exit = True
    thread.join(timeout=15)


PART = b'--gradcam\r\nContent-Disposition: form-data; name="image"; filename="slow.png"\r\n\r\n'


def _head(length: int) -> bytes:
    return (
        "POST /v1/explain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=gradcam\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _answer(connection: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response, read until the server closes the connection."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:  # the server closed first; what it sent before is kept
        pass
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_that_stalls_gets_408(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as connection:
        connection.sendall(_head(10_000) + PART)  # then nothing
        started = time.perf_counter()
        status, body = _answer(connection)
    assert status == 408 and 0.25 < time.perf_counter() - started < 3
    assert body == {"detail": "the request body stalled: nothing arrived for 0.3 s (--read-timeout)"}


def test_a_body_that_trickles_gets_408_at_the_body_timeout(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as connection:
        connection.sendall(_head(10_000) + PART)
        started = time.perf_counter()
        while time.perf_counter() - started < 4:  # a byte every 0.1 s: never a stall, never done
            if select.select([connection], [], [], 0.1)[0]:
                break  # the answer
            connection.sendall(b"x")  # the file's bytes
        status, body = _answer(connection)
    assert status == 408 and 0.9 < time.perf_counter() - started < 3
    assert body == {"detail": "the request body took longer than 1 s (--body-timeout)"}


def test_a_prompt_client_of_the_same_server_is_answered(server):
    upload = encoded(picture(64, 48), "PNG")
    response = httpx.post(
        f"http://127.0.0.1:{server}/v1/explain", files={"image": ("cat.png", upload)}, timeout=30
    )
    assert response.status_code == 200 and response.json()["size"] == [64, 48]
