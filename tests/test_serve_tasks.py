"""The HTTP API of ``gradcam serve`` for segmenters and detectors, against references computed here.

A torchvision detector (Faster R-CNN, MobileNetV3 320 FPN) and segmenter (LR-ASPP MobileNetV3), random
weights, made small for speed: the detector's own resize to 128 pixels, the segmenter's input to 96 (and
its classifier biases zeroed, so that random weights predict several classes, not one everywhere). The
service serves these very objects (a stand-in loader), so the references below run the same weights:
boxes against the detector's own forward, maps against ``GradCAM(model)(images, targets=Box(...))`` and
``Segmentation(...)``, masks against the argmax of the segmenter's output.
"""

from __future__ import annotations

import base64
import copy
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from gradcam import models, viz
from gradcam.methods import GradCAM
from gradcam.models import LoadedModel
from gradcam.models.torchvision_tasks import set_score_threshold
from gradcam.serve.app import ServeSettings, create_app
from gradcam.targets import Box, Segmentation

DETECTOR, SEGMENTER, CLIPS = "fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large", "clips"


def scene(width: int = 64, height: int = 48) -> Image.Image:
    """Gradients and a yellow square: a picture with structure, a few dozen pixels a side."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
    array[..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
    array[height // 4 : 3 * height // 4, width // 4 : 5 * width // 8] = (250, 250, 30)
    return Image.fromarray(array)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture)


IMAGE = scene()
UPLOAD = png_bytes(IMAGE)


def task_models() -> dict[str, LoadedModel]:
    """The served models by name: the small detector and segmenter, and a stand-in video model."""
    torch.manual_seed(0)
    detector = models.load(DETECTOR, pretrained=False)
    detector.module.transform.min_size, detector.module.transform.max_size = (128,), 256
    segmenter = models.load(SEGMENTER, pretrained=False)
    with torch.no_grad():
        segmenter.module.classifier.low_classifier.bias.zero_()
        segmenter.module.classifier.high_classifier.bias.zero_()
    segmenter = replace(segmenter, preprocess=replace(segmenter.preprocess, resize=96))
    clips = LoadedModel(CLIPS, nn.Conv3d(3, 2, 1).eval(), segmenter.preprocess, ["a", "b"], task="video")
    return {DETECTOR: detector, SEGMENTER: segmenter, CLIPS: clips}


@pytest.fixture(scope="module")
def served() -> dict[str, LoadedModel]:
    return task_models()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "study.db"
    settings = ServeSettings(
        models=list(served), loader=lambda name, device=None: served[name], db_url=f"sqlite:///{db}"
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post(client: TestClient, data: dict, image: bytes = UPLOAD, status: int = 200) -> dict:
    response = client.post("/v1/explain", files={"image": ("scene.png", image, "image/png")}, data=data)
    assert response.status_code == status, response.text
    return response.json()


def assert_raw(sent: list, expected: torch.Tensor) -> None:
    """A raw map as sent equals the reference, relative to the reference's peak (a random detector's
    maps are tiny, about 1e-13)."""
    peak = float(expected.abs().max())
    assert peak > 0 and float(expected.std()) > 0.01 * peak, "the reference map should not be flat"
    np.testing.assert_allclose(np.array(sent), expected.numpy(), rtol=1e-4, atol=1e-5 * peak)


def reference_detector(served) -> nn.Module:
    """A copy of the served detector with its own score threshold at 0 (every detection comes out)."""
    module = copy.deepcopy(served[DETECTOR].module)
    set_score_threshold(module, 0.0)
    return module


# ------------------------------------------------------------------ detection


def test_detections_are_the_detectors_own_and_their_maps_are_gradcam_of_their_box(client, served):
    detector = served[DETECTOR]
    threshold = detector.module.roi_heads.score_thresh
    body = post(client, {"model": DETECTOR, "min_score": "0", "topk": "3", "raw": "true"})
    assert detector.module.roi_heads.score_thresh == threshold  # lowered for the call only
    assert body["task"] == "detection" and body["none"] is None and body["predictions"] == []
    assert body["size"] == [64, 48] and decode(body["picture"]).shape[:2] == (48, 64)
    targets = body["targets"]
    assert len(targets) == 3

    reference = reference_detector(served)
    x = detector.preprocess(IMAGE)
    with torch.no_grad():
        [found] = reference([x])
    best = found["scores"].sort(descending=True).values[:3]
    assert [t["detection"]["index"] for t in targets] == [0, 1, 2]
    assert [t["score"] for t in targets] == pytest.approx(best.tolist(), rel=1e-5)
    for target in targets:
        detection = target["detection"]
        box = torch.tensor(detection["box"])
        # The detector's own detection: same label, same box (to the 0.1 pixel sent), same score.
        same = (found["labels"] == target["index"]) & (
            (found["boxes"] - box).abs().max(dim=1).values <= 0.051
        )
        assert same.any(), (detection, found["boxes"][:5])
        j = int(same.nonzero()[0, 0])
        assert detection["score"] == pytest.approx(float(found["scores"][j]), rel=1e-4)  # 6 digits sent
        assert target["score"] == pytest.approx(float(found["scores"][j]), rel=1e-5)
        assert target["probability"] is None and target["mask"] is None
        assert target["class"] == detector.labels[target["index"]]

        # The heatmap: Grad-CAM of Box(label, box) (the box sent) on the same weights, at the response's
        # picture size.
        cam = GradCAM(reference, body["layer"])
        explanation = cam([x], targets=Box(target["index"], detection["box"])).rows()
        assert_raw(target["raw_map"], explanation.raw[0, 0])
        expected = np.asarray(viz.heatmap(explanation.map_at(0, 0, (48, 64))), dtype=float)
        sent = decode(target["heatmap"]).astype(float)
        assert sent.shape == expected.shape and expected.std() > 10  # a map, not one colour
        assert np.abs(sent - expected).mean() < 1.0 and np.abs(sent - expected).max() <= 8


def test_a_named_class_keeps_only_its_detections(client, served):
    reference = reference_detector(served)
    with torch.no_grad():
        [found] = reference([served[DETECTOR].preprocess(IMAGE)])
    label = int(found["labels"][found["scores"].argmin()])  # a class that is not the best one
    name = served[DETECTOR].labels[label]
    body = post(client, {"model": DETECTOR, "min_score": "0", "topk": "2", "target": name})
    assert [t["index"] for t in body["targets"]] == [label] * len(body["targets"]) and body["targets"]
    kept = found["scores"][found["labels"] == label].sort(descending=True).values[:2]
    assert [t["score"] for t in body["targets"]] == pytest.approx(kept.tolist(), rel=1e-5)


def test_an_image_without_detections_is_an_empty_answer_with_its_reason(client):
    # Random weights score every detection about 1/91: none reaches the default min_score 0.5.
    body = post(client, {"model": DETECTOR})
    assert body["targets"] == [] and body["none"] == "no detection scored at least 0.5"
    assert body["task"] == "detection" and body["picture"]


# ------------------------------------------------------------------ segmentation


def segmenter_output(served) -> tuple[torch.Tensor, torch.Tensor]:
    segmenter = served[SEGMENTER]
    x = segmenter.preprocess(IMAGE)[None]
    with torch.no_grad():
        logits = segmenter.module(x)["out"]
    return x, logits.argmax(dim=1)[0]


def test_segmented_classes_send_the_segmenters_own_masks(client, served):
    x, predicted = segmenter_output(served)
    areas = torch.bincount(predicted.flatten(), minlength=21)
    areas[0] = 0  # the background is never a default target
    largest = areas.argsort(descending=True)[:2].tolist()
    assert areas[largest[1]] > 0, "the segmenter should predict at least two classes besides the background"

    body = post(client, {"model": SEGMENTER, "topk": "2", "raw": "true"})
    assert body["task"] == "segmentation" and body["predictions"] == [] and body["none"] is None
    assert [t["index"] for t in body["targets"]] == largest
    for target in body["targets"]:
        mask = target["mask"]
        expected = (predicted == target["index"]).numpy()
        sent = decode(mask["png"])
        assert sent.shape == expected.shape and mask["size"] == [expected.shape[1], expected.shape[0]]
        assert set(np.unique(sent)) <= {0, 255}
        np.testing.assert_array_equal(sent == 255, expected)
        assert mask["fraction"] == pytest.approx(expected.mean(), abs=1e-6)
        assert mask["area"] == round(expected.mean() * 64 * 48)
        assert target["probability"] is None and target["detection"] is None
        cam = GradCAM(served[SEGMENTER].module, body["layer"])
        assert_raw(target["raw_map"], cam(x, targets=Segmentation(target["index"])).raw[0])
        assert decode(target["heatmap"]).shape == (48, 64, 3)

    # A named class is explained whether predicted or not: its mask is where it is predicted.
    absent = next(c for c in range(1, 21) if not (predicted == c).any())
    name = served[SEGMENTER].labels[absent]
    [target] = post(client, {"model": SEGMENTER, "target": name.upper()})["targets"]
    assert target["index"] == absent and target["mask"]["fraction"] == 0 and target["mask"]["area"] == 0
    assert not decode(target["mask"]["png"]).any()


# ------------------------------------------------------------------ batching, errors, schema


def test_concurrent_requests_of_other_settings_or_sizes_are_not_merged(client, served):
    wide = png_bytes(scene(80, 40))
    requests = [
        ({"model": DETECTOR, "min_score": "0", "topk": "1"}, UPLOAD),
        ({"model": DETECTOR}, UPLOAD),
        ({"model": SEGMENTER}, wide),
        ({"model": SEGMENTER}, UPLOAD),
    ]
    with ThreadPoolExecutor(max_workers=4) as threads:
        bodies = list(threads.map(lambda r: post(client, *r), requests))
    assert len(bodies[0]["targets"]) == 1 and bodies[1]["targets"] == []
    assert bodies[2]["size"] == [80, 40] and bodies[3]["size"] == [64, 48]
    assert decode(bodies[2]["targets"][0]["heatmap"]).shape == (40, 80, 3)
    _, predicted = segmenter_output(served)
    np.testing.assert_array_equal(
        decode(bodies[3]["targets"][0]["mask"]["png"]) == 255,
        (predicted == bodies[3]["targets"][0]["index"]).numpy(),
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"model": DETECTOR, "min_score": "1.5"},
            "field 'min_score': Input should be less than or equal to 1",
        ),
        (
            {"model": DETECTOR, "min_score": "-0.1"},
            "field 'min_score': Input should be greater than or equal",
        ),
        ({"model": DETECTOR, "min_score": "nan"}, "field 'min_score': Input should be a finite number"),
        ({"model": DETECTOR, "min_score": "lots"}, "field 'min_score'"),
        ({"model": DETECTOR, "topk": "11"}, "field 'topk'"),
        ({"model": DETECTOR, "target": "unicorn"}, "target class 'unicorn' is not a class name"),
        ({"model": SEGMENTER, "target": "21"}, "target class 21 is out of range; expected 0..20"),
        ({"model": DETECTOR, "method": "guided-gradcam"}, "a detector's list of images"),
        ({"model": CLIPS}, "model 'clips' is a video model; the service explains images"),
    ],
)
def test_bad_task_fields_are_one_line_422s(client, fields, words):
    body = post(client, fields, status=422)
    assert set(body) == {"detail"} and "\n" not in body["detail"]
    assert words in body["detail"], body["detail"]


def test_openapi_documents_the_task_fields(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path in ("/v1/explain", "/v1/compare"):
        operation = schema["paths"][path]["post"]
        body_ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        field = components[body_ref.rsplit("/", 1)[1]]["properties"]["min_score"]
        assert field["description"] and (field["minimum"], field["maximum"], field["default"]) == (0, 1, 0.5)
    target = components["TargetResult"]["properties"]
    assert {"detection", "mask"} <= set(target) and all(
        target[k].get("description") for k in ("detection", "mask")
    )
    assert {"null", "number"} == {option["type"] for option in target["probability"]["anyOf"]}
    for name, fields in (
        ("Detection", {"index", "box", "score"}),
        ("Mask", {"png", "size", "area", "fraction"}),
    ):
        properties = components[name]["properties"]
        assert set(properties) == fields and all(p.get("description") for p in properties.values())
    explained = components["Explained"]["properties"]
    assert explained["task"]["description"] and explained["none"]["description"]
    assert components["ModelInfo"]["properties"]["task"]["description"]
    listed = {m["name"]: m["task"] for m in client.get("/v1/models").json()["models"]}
    assert listed == {DETECTOR: "detection", SEGMENTER: "segmentation", CLIPS: "video"}
