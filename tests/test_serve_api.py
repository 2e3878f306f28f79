"""The HTTP API of ``gradcam serve``: numbers against independent references, hostile input, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from gradcam import models
from gradcam.errors import GradCAMError
from gradcam.models import LoadedModel
from gradcam.serve.app import ServeSettings, create_app
from gradcam.serve.limits import DeclaredSizeLimit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CAT, COFFEE = (EXAMPLES / "cat.png").read_bytes(), (EXAMPLES / "coffee.png").read_bytes()
SERVED = ["efficientnet-lite0", "efficientnet-lite1"]


def decode(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    picture.load()
    assert picture.format == "PNG"
    return picture


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "study.db"
    settings = ServeSettings(
        models=SERVED, max_upload=3 * 1024 * 1024, max_pixels=4_000_000, db_url=f"sqlite:///{db}"
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    return models.load("efficientnet-lite0")


def post(
    client: TestClient,
    data: dict | None = None,
    image: bytes = CAT,
    name: str = "cat.png",
    path="/v1/explain",
):
    return client.post(path, files={"image": (name, image, "application/octet-stream")}, data=data or {})


# ------------------------------------------------------------------ listing


def test_health_models_labels_and_methods_describe_what_is_served(client, lite0):
    assert client.get("/healthz").json() == {"status": "ok", "models": SERVED, "database": "ok"}
    listed = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == SERVED and [m["default"] for m in listed] == [True, False]
    assert listed[0]["input_size"] == [224, 224] and listed[1]["input_size"] == [240, 240]
    assert client.get("/v1/models/efficientnet-lite0/labels").json()["labels"] == lite0.labels
    missing = client.get("/v1/models/resnet50/labels")
    assert missing.status_code == 404 and "'resnet50' is not served" in missing.json()["detail"]
    assert client.get("/v1/models/..%2F..%2Fetc/labels").status_code == 404
    methods = {m["name"]: m for m in client.get("/v1/methods").json()["methods"]}
    assert {"gradcam", "gradcam++", "layercam", "guided-backprop", "guided-gradcam"} <= set(methods)
    assert methods["guided-gradcam"]["guided"] and not methods["gradcam"]["guided"]
    assert (methods["guided-gradcam"]["kind"], methods["gradcam"]["kind"]) == ("pixel", "cam")
    assert not any(m["slow"] for m in methods.values()) and "sobel" not in methods  # needs no model
    assert "scorecam" not in methods and "ablationcam" not in methods  # minutes per image: opt-in
    refused = post(client, {"method": "scorecam"})
    assert refused.status_code == 422 and "--slow-methods" in refused.json()["detail"]


# ------------------------------------------------------------------ numbers


def test_explain_matches_captum_and_an_independent_forward(client, lite0):
    response = post(client, {"target": ["tabby", "285"], "raw": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    x = lite0.preprocess(Image.open(EXAMPLES / "cat.png").convert("RGB"))[None]
    with torch.no_grad():
        probabilities = lite0.module(x).softmax(dim=1)[0]
    top = probabilities.topk(5)
    assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert body["predictions"][0]["class"] == "Egyptian cat"
    assert [t["index"] for t in body["targets"]] == [281, 285]  # in the order asked, names resolved
    assert body["targets"][0]["class"] == "tabby"
    layer = dict(lite0.module.named_modules())[body["layer"]]
    expected = LayerGradCam(lite0.module, layer).attribute(
        x.repeat(2, 1, 1, 1), target=[281, 285], relu_attributions=True
    )
    for n, target in enumerate(body["targets"]):
        assert target["probability"] == pytest.approx(float(probabilities[target["index"]]), abs=1e-5)
        np.testing.assert_allclose(
            np.array(target["raw_map"]), expected[n, 0].detach().numpy(), rtol=1e-4, atol=1e-6
        )


def test_pictures_register_with_the_frame_and_no_overlay_is_sent(client):
    body = post(client, {"method": "gradcam++"}).json()
    picture = decode(body["picture"])
    assert picture.size == (451, 300) and body["size"] == [451, 300]  # the whole cat, its own size
    target = body["targets"][0]
    assert decode(target["heatmap"]).size == picture.size
    assert "overlay" not in target  # the browser draws the heatmap over the picture
    assert target["guided"] is None and target["raw_map"] is None  # raw only on request


def test_guided_views(client, lite0):
    guided_gradcam = post(client, {"method": "guided-gradcam"}).json()["targets"][0]
    guided_backprop = post(client, {"method": "guided-backprop"}).json()["targets"][0]
    assert decode(guided_gradcam["guided"]).size == (224, 224)  # the model's input view
    assert guided_gradcam["heatmap"] is not None
    assert guided_backprop["heatmap"] is None
    gg, gb = (
        np.asarray(decode(guided_gradcam["guided"]), float),
        np.asarray(decode(guided_backprop["guided"]), float),
    )
    assert np.abs(gg - gb).mean() > 1.0  # the Grad-CAM factor changes the picture


def test_compare_two_methods_and_two_models(client):
    methods = post(
        client,
        {"method": ["gradcam", "guided-gradcam"], "target": "espresso"},
        COFFEE,
        "c.png",
        "/v1/compare",
    )
    assert methods.status_code == 200, methods.text
    left, right = methods.json()["left"], methods.json()["right"]
    assert (left["method"], right["method"]) == ("gradcam", "guided-gradcam")
    assert left["targets"][0]["class"] == right["targets"][0]["class"] == "espresso"
    assert left["targets"][0]["raw_map"] is None and right["targets"][0]["guided"]
    two = post(client, {"model": SERVED}, path="/v1/compare").json()
    assert (two["left"]["model"], two["right"]["model"]) == tuple(SERVED)
    assert two["left"]["predictions"][0]["class"] == two["right"]["predictions"][0]["class"] == "Egyptian cat"
    for fields in ({}, {"model": SERVED, "method": ["gradcam", "gradcam++"]}, {"method": ["a", "b", "c"]}):
        refused = post(client, fields, path="/v1/compare")
        assert refused.status_code == 422 and "two" in refused.json()["detail"]


# ------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"model": "../../etc/passwd"}, 422, "not served"),
        ({"method": "evil"}, 422, "method 'evil' not found"),
        ({"target": ["1"] * 11}, 422, "at most 10 classes"),
        ({"target": "--1"}, 422, "not a class name or index"),
        ({"model": "m" * 90}, 422, "'" + "m" * 60 + "...' is not served"),
        ({"target": "zebraa"}, 422, "did you mean 'zebra'"),
        ({"target": "1000"}, 422, "out of range"),
        ({"topk": "0"}, 422, "field 'topk'"),
        ({"topk": "abc"}, 422, "field 'topk'"),
        ({"layer": "_blocks.99"}, 422, "layer '_blocks.99' not found"),
    ],
)
def test_bad_fields_are_one_line_422s(client, fields, status, words):
    response = post(client, fields)
    assert response.status_code == status
    assert words in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_missing_image_field(client):
    response = client.post("/v1/explain", data={"method": "gradcam"})
    assert response.status_code == 422 and response.json()["detail"] == "field 'image': Field required"


def test_non_images_corrupt_images_and_empty_files(client):
    text = post(client, image=b"just some text", name="notes.txt")
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    truncated = post(client, image=CAT[:3000])
    assert truncated.status_code == 422 and "corrupt or truncated" in truncated.json()["detail"]
    empty = post(client, image=b"")
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]


def test_pixel_bomb_is_refused_before_decoding(client):
    buffer = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buffer, format="PNG")  # 16 MP in a few kB
    assert len(buffer.getvalue()) < 10_000
    response = post(client, image=buffer.getvalue(), name="bomb.png")
    assert response.status_code == 413 and "4000x4000 pixels exceeds the limit" in response.json()["detail"]


def test_declared_oversize_upload_is_413(client):
    response = post(client, image=b"\0" * (3 * 1024 * 1024 + 1))
    assert response.status_code == 413 and "limit is 3 MB" in response.json()["detail"]


def test_streamed_oversize_upload_without_a_length_is_413(client):
    boundary = "gradcamboundary"

    def chunks():
        disposition = 'Content-Disposition: form-data; name="image"; filename="big.png"'
        yield f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
        for _ in range(64):
            yield b"\0" * 65536  # 4 MB in all, no Content-Length
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/explain", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413 and "limit is 3 MB" in response.json()["detail"]


def test_declared_size_limit_answers_without_reading_the_body():
    received, sent = [], []

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the application must not run")

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"999999")], "method": "POST", "path": "/"}
    asyncio.run(DeclaredSizeLimit(app, max_body_size=1000)(scope, receive, send))
    assert received == [] and sent[0]["status"] == 413


def test_client_file_names_never_become_paths(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    response = post(client, name="../../../tmp/evil.png")
    assert response.status_code == 200
    assert not list(tmp_path.rglob("*evil*")) and not Path("/tmp/evil.png").exists()
    bad = post(client, image=b"nope", name="../../x.png")
    assert bad.status_code == 415 and bad.json()["detail"].startswith("image '../../x.png'")


# ------------------------------------------------------------------ batching and the event loop


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client):
    jobs = [(CAT, "Egyptian cat"), (COFFEE, "espresso")] * 6
    with ThreadPoolExecutor(max_workers=12) as threads:
        responses = list(
            threads.map(lambda job: post(client, {"method": "xgradcam", "raw": "true"}, job[0]), jobs)
        )
    for (_, expected), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200
        assert response.json()["targets"][0]["class"] == expected
    cat_maps = [np.array(r.json()["targets"][0]["raw_map"]) for r in responses[::2]]
    for other in cat_maps[1:]:  # batch composition does not change an image's map
        np.testing.assert_allclose(other, cat_maps[0], rtol=1e-3, atol=1e-5)  # batch-size kernels differ


class GatedNet(nn.Module):
    """A tiny classifier whose forward waits for ``gate`` (so that requests queue behind it) and refuses a
    flat picture with a GradCAMError (to fail one request of a batch)."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(10)
        if (x.flatten(1).std(dim=1) < 1e-4).any():
            raise GradCAMError("this model cannot explain a flat picture")
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def gated(tmp_path):
    """An app serving a GatedNet, its gate closed after the first request (the layer search's forward)."""
    gate = threading.Event()
    base = models.load("efficientnet-lite0", pretrained=False)

    def loader(name: str, device: str | None = None) -> LoadedModel:
        return LoadedModel(name, GatedNet(gate).eval(), base.preprocess, ["a", "b", "c"])

    app = create_app(ServeSettings(loader=loader, db_url=f"sqlite:///{tmp_path / 'study.db'}"))
    with TestClient(app) as test_client, ThreadPoolExecutor(max_workers=6) as threads:
        gate.set()
        post(test_client)
        gate.clear()
        app.state.batcher.batches.clear()
        yield test_client, threads, gate, app.state.batcher


def test_batches_merge_waiting_requests(gated):
    test_client, threads, gate, batcher = gated
    futures = [threads.submit(post, test_client) for _ in range(6)]
    time.sleep(1.0)  # the first request holds the model; the other five queue behind it
    started = time.perf_counter()
    health = test_client.get("/healthz")  # the event loop is free while the model works
    assert health.status_code == 200 and time.perf_counter() - started < 5
    gate.set()
    assert all(f.result().status_code == 200 for f in futures)
    assert sum(batcher.batches) == 6 and max(batcher.batches) >= 2, batcher.batches


def test_a_request_that_breaks_the_model_fails_alone(gated):
    test_client, threads, gate, batcher = gated
    flat = io.BytesIO()
    Image.new("RGB", (64, 64)).save(flat, format="PNG")
    first = threads.submit(post, test_client)  # holds the model while the others queue
    time.sleep(0.5)
    others = [threads.submit(post, test_client, None, flat.getvalue() if i == 2 else CAT) for i in range(5)]
    time.sleep(0.5)
    gate.set()
    statuses = [f.result().status_code for f in [first, *others]]
    assert statuses == [200, 200, 200, 422, 200, 200]
    assert "flat picture" in others[2].result().json()["detail"]
    # The five queued together failed as a batch, then ran alone: the first request and four good ones
    # succeeded (a batch that had not included the bad image would show up here as a batch of four).
    assert list(batcher.batches) == [1, 1, 1, 1, 1]


def test_the_model_is_left_as_found_after_answers_and_errors(client):
    loaded = client.app.state.pool.get("efficientnet-lite0")
    module = loaded.module
    before = (module.training, [p.requires_grad for p in module.parameters()])
    post(client, {"method": "layercam"})
    post(client, {"layer": "_blocks.99"})
    post(client, {"method": "guided-gradcam"})
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )
    assert hooks == 0
    assert (module.training, [p.requires_grad for p in module.parameters()]) == before
    assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------ schema


def test_openapi_documents_every_field_and_error(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/explain", "/v1/compare"):
        operation = schema["paths"][path]["post"]
        assert {"200", "413", "415", "422", "503"} <= set(operation["responses"])
        body_ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        body = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
        fields = {"image", "model", "method", "target", "topk", "layer", "raw", "min_score"}
        assert set(body["properties"]) == fields
        for name, field in body["properties"].items():
            assert field.get("description"), f"{path}: field {name} has no description"
    # Every 422 is one line of JSON (the app's handler), never FastAPI's list of errors: documented so.
    assert "HTTPValidationError" not in str(schema["paths"])
    pair = schema["components"]["schemas"]["RatingIn"]["properties"]["pair"]
    assert (pair["type"], pair["maxLength"]) == ("string", 32)  # an opaque id, bounded
    explained = schema["components"]["schemas"]["Explained"]["properties"]
    assert all(f.get("description") or "$ref" in f or f.get("title") for f in explained.values())
