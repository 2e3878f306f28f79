"""The service's numbers (``gradcam.serve.app.create_app``), decoded from its JSON and PNGs, against maps
and gradients derived in the test: raw maps against Grad-CAM by hook and autograd, the guided views
against Guided Backpropagation written here as a modified ReLU backward (and against
``gradcam.GuidedBackprop``), requests batched together each against its own image. The ``overlay`` field
is not tested (it is being removed). The model and helpers are those of test_frontend_numbers.py.
"""

from __future__ import annotations

import base64
import copy
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

import gradcam
from conftest import GuidedRule
from gradcam.models import LoadedModel
from gradcam.serve.app import ServeSettings, create_app
from test_frontend_numbers import (  # noqa: F401 (tiny is a fixture)
    LABELS,
    SIZE,
    assert_discriminating,
    assert_map,
    inputs_of,
    logits_of,
    oracle,
    picture,
    tiny,
)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as picture_:
        assert picture_.format == "PNG"
        return np.asarray(picture_.convert("RGB"))


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):  # noqa: F811
    db = tmp_path_factory.mktemp("db") / "study.db"
    with TestClient(create_app(ServeSettings(models=[tiny[0]], db_url=f"sqlite:///{db}"))) as test_client:
        yield test_client


def post(client: TestClient, seed: int, data: dict, path: str = "/v1/explain") -> dict:
    response = client.post(path, files={"image": ("p.png", png(seed), "image/png")}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


class GuidedReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GuidedRule.apply(x)


def guided_by_hand(
    module: nn.Module, x: torch.Tensor, targets: list[int], *, guided: bool = True
) -> torch.Tensor:
    """(B,3,H,W) float64 d y^c / d x with every nn.ReLU of a copy of the model swapped for GuidedReLU
    (``guided=False``: the plain gradient)."""
    model = copy.deepcopy(module).double().eval()
    relus = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert relus, "the model must have ReLU modules"
    if guided:
        for name in relus:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, GuidedReLU())
    inputs = x.double().clone().requires_grad_(True)
    logits = model(inputs).logits
    (grads,) = torch.autograd.grad(logits[torch.arange(len(targets)), torch.tensor(targets)].sum(), inputs)
    return grads


def display(gradient: torch.Tensor) -> np.ndarray:
    """(H,W,3) uint8: the usual display of an input gradient (Grad-CAM authors' code): clip(0.5 + 0.1
    (g - mean) / (std + 1e-5), 0, 1) * 255, rounded; mean and std over all of (3,H,W)."""
    g = gradient.double()
    scaled = 0.5 + 0.1 * (g - g.mean()) / (g.std(unbiased=False) + 1e-5)
    return (scaled.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def assert_picture(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Equal pixels, but for rounding: at most one level off, on at most 1% of the values."""
    assert actual.shape == expected.shape, what
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.01, (what, difference.max())


def upsampled(raw: np.ndarray) -> torch.Tensor:
    """(H,W) float64: an 8x8 map upsampled bilinearly (half-pixel centres) to the input, over its peak."""
    up = F.interpolate(
        torch.from_numpy(raw)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    peak = float(up.max())
    return up[0, 0] / (peak if peak > 0 else 1.0)


def test_raw_maps_probabilities_and_scores_of_every_class(client, tiny) -> None:  # noqa: F811
    """topk=3 of a 3-class model: each class's raw map, probability and score against the oracle, in
    rank order; the predictions are the image's ranking."""
    for seed in (0, 1):
        body = post(client, seed, {"topk": "3", "raw": "true", "layer": "resnet.encoder.stages.1"})
        x = inputs_of([seed])
        logits = logits_of(tiny[1], x)[0]
        ranking = logits.argsort(descending=True).tolist()
        assert [p["index"] for p in body["predictions"]] == ranking
        assert [p["class"] for p in body["predictions"]] == [LABELS[i] for i in ranking]
        probabilities = logits.softmax(dim=0)
        assert [p["probability"] for p in body["predictions"]] == pytest.approx(
            probabilities[ranking].tolist(), abs=2e-6
        )
        assert [t["index"] for t in body["targets"]] == ranking
        expected = oracle(tiny[1], x.repeat(3, 1, 1, 1), ranking)
        assert_discriminating(expected)
        for target, wanted in zip(body["targets"], expected, strict=True):
            assert target["probability"] == pytest.approx(float(probabilities[target["index"]]), abs=2e-6)
            assert target["score"] == pytest.approx(float(logits[target["index"]]), abs=2e-5)
            assert_map(np.array(target["raw_map"]), wanted, f"picture {seed} class {target['index']}")
            assert target["guided"] is None


def test_named_targets_in_the_order_asked_and_the_default_layer(client, tiny) -> None:  # noqa: F811
    body = post(client, 2, {"target": ["bird", "0"], "raw": "true"})
    assert body["layer"] == "resnet.encoder.stages.1"  # the automatic choice: the last stage
    assert [(t["index"], t["class"]) for t in body["targets"]] == [(2, "bird"), (0, "cat")]
    expected = oracle(tiny[1], inputs_of([2, 2]), [2, 0])
    for target, wanted in zip(body["targets"], expected, strict=True):
        assert_map(np.array(target["raw_map"]), wanted, f"class {target['index']}")


def test_hand_derived_guided_backprop_is_the_librarys_and_not_the_plain_gradient(tiny) -> None:  # noqa: F811
    """The reference of the guided views checked itself: the module-swap Guided Backprop equals
    gradcam.GuidedBackprop on this model, and differs from the plain gradient."""
    x = inputs_of([0, 1, 2])
    by_hand = guided_by_hand(tiny[1], x, [0, 1, 2])
    library = gradcam.GuidedBackprop(tiny[1])(x, [0, 1, 2]).double()
    scale = float(by_hand.abs().max())
    assert float((library - by_hand).abs().max()) <= 1e-5 * scale
    plain = guided_by_hand(tiny[1], x, [0, 1, 2], guided=False)
    assert float((plain - by_hand).abs().max()) > 0.1 * scale


def test_guided_backprop_picture_is_the_displayed_guided_gradient(client, tiny) -> None:  # noqa: F811
    for seed, target in ((0, None), (3, 1)):
        data = (
            {"method": "guided-backprop"}
            if target is None
            else {"method": "guided-backprop", "target": str(target)}
        )
        body = post(client, seed, data)
        x = inputs_of([seed])
        (shown,) = body["targets"]
        wanted = int(logits_of(tiny[1], x).argmax()) if target is None else target
        assert shown["index"] == wanted
        assert shown["heatmap"] is None and shown["raw_map"] is None
        gradient = guided_by_hand(tiny[1], x, [wanted])[0]
        expected = display(gradient)
        actual = decode(shown["guided"])
        assert_picture(actual, expected, f"guided-backprop picture {seed}")
        assert np.abs(actual.astype(int) - expected[:, ::-1].astype(int)).max() > 10  # a mirror would show


def test_guided_gradcam_picture_is_guided_backprop_times_the_upsampled_map(client, tiny) -> None:  # noqa: F811
    for seed, target in ((1, 0), (4, 2)):
        body = post(client, seed, {"method": "guided-gradcam", "target": str(target), "raw": "true"})
        x = inputs_of([seed])
        (shown,) = body["targets"]
        raw = oracle(tiny[1], x, [target])[0]
        assert_map(np.array(shown["raw_map"]), raw, "guided-gradcam's Grad-CAM map")
        product = guided_by_hand(tiny[1], x, [target])[0] * upsampled(raw)[None]
        assert_picture(decode(shown["guided"]), display(product), f"guided-gradcam picture {seed}")
        plain = display(guided_by_hand(tiny[1], x, [target])[0])
        assert np.abs(decode(shown["guided"]).astype(int) - plain.astype(int)).max() > 10


def test_compare_returns_each_sides_numbers(client, tiny) -> None:  # noqa: F811
    body = post(
        client, 2, {"method": ["gradcam", "guided-gradcam"], "target": "dog", "raw": "true"}, "/v1/compare"
    )
    x = inputs_of([2])
    raw = oracle(tiny[1], x, [1])[0]
    left, right = body["left"]["targets"][0], body["right"]["targets"][0]
    assert left["index"] == right["index"] == 1
    assert_map(np.array(left["raw_map"]), raw, "compare: gradcam")
    product = guided_by_hand(tiny[1], x, [1])[0] * upsampled(raw)[None]
    assert_picture(decode(right["guided"]), display(product), "compare: guided-gradcam")


class Gated(nn.Module):
    """The tiny model behind a gate: while ``gate`` is clear a forward waits, so requests queue up and
    the service merges them into one batch."""

    def __init__(self, inner: nn.Module, gate: threading.Event) -> None:
        super().__init__()
        self.inner, self.gate = inner, gate

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        self.gate.wait(20)
        return self.inner(x)


def test_requests_batched_together_each_get_their_own_pictures_maps(tiny, tmp_path) -> None:  # noqa: F811
    """Five requests queued behind a sixth (other pictures, other classes) are explained as one batch:
    each answer is its own picture's and class's map."""
    gate = threading.Event()
    base = gradcam.models.load(tiny[0])

    def loader(name: str, device: str | None = None) -> LoadedModel:
        return LoadedModel(name, Gated(base.module, gate).eval(), base.preprocess, base.labels)

    app = create_app(ServeSettings(models=["tiny"], loader=loader, db_url=f"sqlite:///{tmp_path / 's.db'}"))
    jobs = [(seed, (seed + 1) % 3) for seed in range(6)]
    layer = "inner.resnet.encoder.stages.1"
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=6) as threads:

        def ask(job: tuple[int, int]) -> dict:
            return post(client, job[0], {"target": str(job[1]), "raw": "true", "layer": layer})

        first = threads.submit(ask, jobs[0])  # holds the model while the others queue
        time.sleep(1.0)
        others = [threads.submit(ask, job) for job in jobs[1:]]
        time.sleep(1.0)
        gate.set()
        bodies = [first.result(), *(f.result() for f in others)]
        batches = list(app.state.batcher.batches)
    assert max(batches) >= 2, f"the requests were not batched together: {batches}"
    expected = oracle(tiny[1], inputs_of([s for s, _ in jobs]), [c for _, c in jobs])
    for (seed, target), body, wanted in zip(jobs, bodies, expected, strict=True):
        (shown,) = body["targets"]
        assert shown["index"] == target
        assert_map(np.array(shown["raw_map"]), wanted, f"picture {seed} class {target}")
