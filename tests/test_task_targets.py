"""Target functions on segmenters, detectors, embedding models, video and small heads, checked against
references written here: a forward hook on the layer keeps its output A, the score is computed by hand
from the model's own output, G = d score / dA by ``torch.autograd.grad``, and

    Grad-CAM = ReLU( sum_k mean_{positions}(G_k) A_k )

never built with gradcam code. pytorch-grad-cam is a second oracle wherever it applies: its returned
cams are min-max normalised and resized to the input (cv2, one step), so we compare at the layer's
resolution instead, recomputing its cam from the activations and gradients it captured with its own
``get_cam_image`` (GradCAM: weights = mean of its gradients over the spatial axes; EigenCAM: its centred
SVD projection), then ``np.maximum(cam, 0)`` as its ``compute_cam_per_layer`` does. pytorch-grad-cam
runs on a deep copy of each model: it calls ``model.eval()``, ``zero_grad()`` and ``loss.backward()``,
which would write parameter gradients into the shared fixtures.

Random-weight mobilenets (the segmenter, the detector's backbone) have vanishing activations in eval
mode (about 1e-8 at the last stage, so every detection scores the same); their BatchNorm statistics are
set once from a batch (:func:`calibrate`) so that activations and scores are O(1) and distinct.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import box_iou

import gradcam
from conftest import require
from gradcam.errors import GradCAMError
from gradcam.targets import Box, Detections, Regression, Segmentation, Sigmoid, Similarity

pgc = require("pytorch_grad_cam", "pytorch-grad-cam is the second oracle (the test extra installs grad-cam)")
from pytorch_grad_cam import EigenCAM as PEigen  # noqa: E402
from pytorch_grad_cam import GradCAM as PGC  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    SemanticSegmentationTarget,
)
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

#: what a call may spend at most (the machine is shared: the file runs in well under a minute)
torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------------
# references


def close(ours: torch.Tensor, expected: torch.Tensor, what: str = "") -> float:
    """1e-4 relative to the expected map's scale; returns the max abs error relative to that scale."""
    expected = torch.as_tensor(expected).float()
    ours = torch.as_tensor(ours).float()
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the reference is all zero, the comparison would prove nothing"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")
    return float((ours - expected).abs().max()) / scale


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k mean(G_k) A_k) for A, G (B, K, *positions): the map (B, *positions)."""
    positions = tuple(range(2, activations.dim()))
    weights = gradients.mean(dim=positions)
    weights = weights.reshape(*weights.shape, *([1] * len(positions)))
    return torch.relu((weights * activations).sum(dim=1)).detach()


@contextmanager
def hooked(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The module's outputs of the forwards inside the block (its graph kept), hook removed on exit."""
    kept: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: kept.append(out))
    try:
        yield kept
    finally:
        handle.remove()


def by_hand(model: nn.Module, layer: nn.Module, inputs, score: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G) of ``layer`` for the scalar ``score(output)`` (sum over images of each image's score)."""
    with hooked(layer) as kept:
        output = model(inputs)
    (activation,) = kept
    (gradient,) = torch.autograd.grad(score(output), activation)
    return activation.detach(), gradient


def first_component(activations: torch.Tensor, center: bool) -> torch.Tensor:
    """Eigen-CAM as gradcam's eigen.py documents it, written out: per image O (h*w, K) (centred when
    asked), O v_1 with v_1 the first right singular vector, its sign chosen so the map correlates
    positively with the (centred) channel sum; then ReLU."""
    maps = []
    for a in activations.double():
        k, h, w = a.shape
        o = a.reshape(k, h * w).T
        if center:
            o = o - o.mean(dim=0, keepdim=True)
        v = torch.linalg.svd(o, full_matrices=False).Vh[0]
        projection = o @ v
        channel_sum = a.sum(dim=0).flatten()
        if (projection * (channel_sum - channel_sum.mean())).sum() < 0:
            projection = -projection
        maps.append(torch.relu(projection).reshape(h, w))
    return torch.stack(maps).float()


def calibrate(model: nn.Module, part: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics of ``part`` set from one batch (exact averages), the model left in eval."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    part.train()
    with torch.no_grad():
        part(x)
    model.eval()


def pgc_raw(cam, inputs: torch.Tensor, targets: list) -> np.ndarray:
    """pytorch-grad-cam's cam at the layer's resolution: its call, then its own ``get_cam_image`` on
    the activations and gradients it captured, ``np.maximum(cam, 0)`` as in ``compute_cam_per_layer``."""
    cam(input_tensor=inputs, targets=targets)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
    return np.maximum(cam.get_cam_image(inputs, cam.target_layers[0], targets, acts, grads, False), 0)


# ---------------------------------------------------------------------------------------------------
# the model as found


def snapshot(model: nn.Module) -> dict:
    params = {
        n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    }
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    modules = {n: (m.training, *(dict(getattr(m, h)) for h in hooks)) for n, m in model.named_modules()}
    return {"params": params, "buffers": {n: b.clone() for n, b in model.named_buffers()}, "modules": modules}


def assert_same(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "a training flag or a hook dict changed"
    assert after["params"].keys() == before["params"].keys()
    for name, (value, requires, grad) in before["params"].items():
        now, now_requires, now_grad = after["params"][name]
        assert torch.equal(now, value), f"parameter {name} changed"
        assert now_requires == requires, f"requires_grad of {name} changed"
        assert (now_grad is None) == (grad is None), f".grad of {name} appeared or vanished"
        assert grad is None or torch.equal(now_grad, grad), f".grad of {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), f"buffer {name} changed"


@contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    before = snapshot(model)
    try:
        yield
    finally:
        assert_same(model, before)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message, f"not one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------
# models, built once


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def embedder() -> nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10)
    model.fc = nn.Identity()  # a 512-D embedding
    return model.eval()


@pytest.fixture(scope="module")
def segmenter() -> nn.Module:
    torch.manual_seed(2)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4
    )
    calibrate(model, model, torch.rand(2, 3, 64, 64))
    return model


@pytest.fixture(scope="module")
def detector() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(3)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0, min_size=160, max_size=160
    ).eval()
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 90)]
    calibrate(model, model.backbone.body, model.transform(images)[0].tensors)
    return model, images


@pytest.fixture(scope="module")
def video() -> nn.Module:
    torch.manual_seed(4)
    return torchvision.models.video.r3d_18(num_classes=5).eval()


class SmallHead(nn.Module):
    """conv -> ReLU -> conv (the explained layer) -> ReLU -> pool -> linear: a (B, 3) head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Scalar(nn.Module):
    """The head's value 2 alone: a (B,) regression output."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)[:, 2]


class SegOut(nn.Module):
    """pytorch-grad-cam's segmentation wrapper: the ``"out"`` tensor of torchvision's segmenters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@pytest.fixture(scope="module")
def head() -> nn.Module:
    torch.manual_seed(5)
    return SmallHead().eval()


# ---------------------------------------------------------------------------------------------------
# 1. a callable on a classifier


def test_contrast_of_two_logits(classifier) -> None:
    torch.manual_seed(10)
    x = torch.rand(2, 3, 64, 64)
    layer = classifier.layer4

    def contrast(out):
        return out[:, 3] - out[:, 5]

    a, g = by_hand(classifier, layer, x, lambda out: contrast(out).sum())
    with torch.no_grad():
        expected_scores = contrast(classifier(x))
    with unchanged(classifier):
        ours = gradcam.GradCAM(classifier, "layer4")(x, targets=contrast)
        against = gradcam.GradCAM(classifier, "layer4", counterfactual=True)(x, targets=contrast)
        both = gradcam.GradCAM(classifier, "layer4")(x, targets=[contrast, lambda out: out[:, 7]])
    assert ours.raw.shape == (2, 2, 2) and ours.targets.tolist() == [-1, -1] and ours.layer == "layer4"
    close(ours.raw, grad_cam(a, g), "contrast")
    close(ours.scores, expected_scores, "contrast scores")
    assert torch.isnan(ours.probs).all()
    # a linear head on pooled features: the map from -G is minus the map before its ReLU, here <= 0
    # everywhere, so the counterfactual of 3 - 5 is zero and that of 5 - 3 is the map of 3 - 5
    torch.testing.assert_close(against.raw, grad_cam(a, -g), rtol=0, atol=1e-6)
    a53, g53 = by_hand(classifier, layer, x, lambda out: (out[:, 5] - out[:, 3]).sum())
    with unchanged(classifier):
        reverse = gradcam.GradCAM(classifier, "layer4", counterfactual=True)
        reverse = reverse(x, targets=lambda o: o[:, 5] - o[:, 3])
    close(reverse.raw, grad_cam(a53, -g53), "counterfactual of 5 - 3")
    # a list of callables: rows (N, B), row 1 its own target
    a7, g7 = by_hand(classifier, layer, x, lambda out: out[:, 7].sum())
    assert both.raw.shape == (2, 2, 2, 2) and both.targets.shape == (2, 2)
    close(both.raw[0], grad_cam(a, g), "row 0")
    close(both.raw[1], grad_cam(a7, g7), "row 1")

    # pytorch-grad-cam takes the same callable per image (its outputs are (classes,) each)
    with _pgc(PGC, classifier, "layer4") as cam:
        theirs = pgc_raw(cam, x, [lambda o: o[3] - o[5]] * 2)
    close(ours.raw, torch.from_numpy(theirs), "contrast vs pytorch-grad-cam")


@contextmanager
def _pgc(kind, model: nn.Module, layer: str, wrap: Callable[[nn.Module], nn.Module] | None = None):
    """A pytorch-grad-cam CAM of ``kind`` on a deep copy of ``model`` (wrapped), hooks released on exit."""
    twin = copy.deepcopy(model)
    module = twin.get_submodule(layer)
    cam = kind(model=wrap(twin) if wrap else twin, target_layers=[module])
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()


# ---------------------------------------------------------------------------------------------------
# 2. segmentation


def test_segmentation_given_and_predicted_mask(segmenter) -> None:
    torch.manual_seed(11)
    x = torch.rand(2, 3, 64, 64)
    layer = segmenter.backbone.get_submodule("16")  # torchvision: the mobilenet's last stage, features[16]
    with torch.no_grad():
        logits = segmenter(x)["out"]
    assert logits.shape == (2, 4, 64, 64)
    category = int(logits.argmax(dim=1).flatten().bincount(minlength=4).argmax())
    mask = torch.zeros(64, 64)
    mask[10:40, 20:60] = 1
    predicted = (logits.argmax(dim=1) == category).float()
    assert predicted.sum(dim=(1, 2)).min() > 0

    for given, region in ((mask, mask.expand(2, 64, 64)), (None, predicted)):

        def score(output, region=region):
            return (output["out"][:, category] * region).sum(dim=(1, 2))

        a, g = by_hand(segmenter, layer, x, lambda out, score=score: score(out).sum())
        with unchanged(segmenter):
            ours = gradcam.GradCAM(segmenter)(x, targets=Segmentation(category, mask=given))
        what = "given mask" if given is not None else "predicted mask"
        assert ours.layer == "backbone.16", "the default layer is the backbone's last stage"
        assert ours.raw.shape == (2, 4, 4) and ours.targets.tolist() == [category] * 2  # stride 16
        assert ours.logits is None and torch.isnan(ours.probs).all()
        close(ours.raw, grad_cam(a, g), what)
        with torch.no_grad():
            close(ours.scores, score(segmenter(x)), f"{what} scores")

        masks = [region[b].numpy() for b in range(2)]
        with _pgc(PGC, segmenter, "backbone.16", wrap=SegOut) as cam:
            theirs = pgc_raw(cam, x, [SemanticSegmentationTarget(category, m) for m in masks])
        error = close(ours.raw, torch.from_numpy(theirs), f"{what} vs pytorch-grad-cam")
        assert error < 1e-4

    # a mask per image
    per_image = torch.stack([mask, 1 - mask])
    a, g = by_hand(segmenter, layer, x, lambda out: (out["out"][:, category] * per_image).sum())
    ours = gradcam.GradCAM(segmenter)(x, targets=Segmentation(category, mask=per_image.bool()))
    close(ours.raw, grad_cam(a, g), "a mask per image")


# ---------------------------------------------------------------------------------------------------
# 3. detections


def _detections(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
    with torch.no_grad():
        return model(images)


def test_box_on_two_images_of_their_own_sizes(detector) -> None:
    model, images = detector
    layer = model.backbone.body.get_submodule("16")
    found = _detections(model, images)
    picks = [3, 1]  # detection 3 of image 0, detection 1 of image 1
    labels = [int(found[b]["labels"][j]) for b, j in enumerate(picks)]
    boxes = torch.stack([found[b]["boxes"][j] for b, j in enumerate(picks)])

    def score(output):
        return torch.stack([output[b]["scores"][j] for b, j in enumerate(picks)])

    a, g = by_hand(model, layer, images, lambda out: score(out).sum())
    with unchanged(model):
        ours = gradcam.GradCAM(model)(images, targets=Box(labels, boxes))
    assert ours.layer == "backbone.body.16"
    assert ours.raw.shape == a[:, 0].shape == (2, 5, 5)
    assert ours.targets.tolist() == labels
    close(ours.scores, torch.stack([found[b]["scores"][j] for b, j in enumerate(picks)]), "box scores")
    close(ours.raw, grad_cam(a, g), "box")

    # each image's map on its own pixels: the detector's resize undone, from the transform's own record
    expected_raw = grad_cam(a, g)
    placed, _ = model.transform(images)
    canvas = tuple(placed.tensors.shape[-2:])
    assert ours.placement.canvas == canvas and list(ours.placement.placed) == placed.image_sizes
    assert ours.placement.sizes == ((120, 150), (100, 90)) and ours.logits is None
    for b, image in enumerate(images):
        (h, w), size = placed.image_sizes[b], tuple(image.shape[-2:])
        on_canvas = F.interpolate(expected_raw[b][None, None], canvas, mode="bilinear", align_corners=False)
        back = F.interpolate(on_canvas[..., :h, :w], size, mode="bilinear", align_corners=False)[0, 0]
        mine = ours.image_maps(b)
        assert mine.shape == size
        close(mine, back / back.max(), f"image_maps({b})")


def test_detections_rows_are_each_images_best(detector) -> None:
    model, images = detector
    layer = model.backbone.body.get_submodule("16")
    found = _detections(model, images)
    order = [d["scores"].argsort(descending=True)[:2].tolist() for d in found]
    for d, o in zip(found, order, strict=True):
        assert d["scores"][o[0]] > d["scores"][o[1]], "ties would make the rows ambiguous"
    with unchanged(model):
        ours = gradcam.GradCAM(model)(images, targets=Detections(min_score=0, topk=2))
    assert ours.raw.shape == (2, 2, 5, 5) and ours.targets.shape == (2, 2)
    for n in range(2):
        expected = torch.stack([found[b]["scores"][order[b][n]] for b in range(2)])
        close(ours.scores[n], expected, f"row {n} scores")
        assert ours.targets[n].tolist() == [int(found[b]["labels"][order[b][n]]) for b in range(2)]

        def score(output, n=n):
            return sum(output[b]["scores"][order[b][n]] for b in range(2))

        a, g = by_hand(model, layer, images, score)
        close(ours.raw[n], grad_cam(a, g), f"detections row {n}")


def test_box_plus_iou_is_pytorch_grad_cams_box_score(detector) -> None:
    model, images = detector
    image = images[0]
    layer = model.backbone.body.get_submodule("16")
    found = _detections(model, [image])[0]
    j = 2
    label, box = int(found["labels"][j]), found["boxes"][j]

    def score(output):  # FasterRCNNBoxScoreTarget's formula: best overlap of any label, score + IoU
        iou = box_iou(box[None], output[0]["boxes"])[0]
        best = int(iou.argmax())
        assert best == j and int(output[0]["labels"][best]) == label
        return output[0]["scores"][best] + iou[best]

    a, g = by_hand(model, layer, [image], score)
    with unchanged(model):
        ours = gradcam.GradCAM(model)([image], targets=Box(label, box, plus_iou=True))
    assert ours.raw.shape == (1, 4, 5)  # one image alone: a 128x160 canvas, no padding
    close(ours.scores, (found["scores"][j] + 1.0)[None], "score + IoU")
    close(ours.raw, grad_cam(a, g), "plus_iou by hand")
    # pytorch-grad-cam on a (1, C, H, W) tensor (the detector takes both): its documented recipe with
    # a plain 4-D layer (no fasterrcnn_reshape_transform: backbone.body.16 is not the FPN's dict)
    with _pgc(PGC, model, "backbone.body.16") as cam:
        theirs = pgc_raw(cam, image[None], [FasterRCNNBoxScoreTarget([label], box[None].numpy())])
    error = close(ours.raw, torch.from_numpy(theirs), "plus_iou vs pytorch-grad-cam")
    assert error < 1e-4


# ---------------------------------------------------------------------------------------------------
# 4. Eigen-CAM on the detector


def test_eigencam_on_the_detector(detector) -> None:
    model, images = detector
    layer = model.backbone.body.get_submodule("16")
    with torch.no_grad(), hooked(layer) as kept:
        model(images)
    activations = kept[0]
    eigen = gradcam.methods.get("eigencam")
    with unchanged(model):
        ours = eigen(model)(images, targets=Detections(min_score=0, topk=2))
    assert ours.raw.shape == (2, 2, 5, 5) and ours.method == "eigencam"
    expected = first_component(activations, center=False)  # the paper's SVD of O itself
    close(ours.raw[0], expected, "eigencam")
    close(ours.raw[1], expected, "eigencam is class-agnostic")

    # pytorch-grad-cam centres O (a PCA): our eigen_smooth=True; its sign is LAPACK's, ours the rule
    image = images[0]
    with torch.no_grad(), hooked(layer) as kept:
        model([image])
    with unchanged(model):
        smooth = eigen(model)([image], targets=Detections(min_score=0, topk=1), eigen_smooth=True)
    found = _detections(model, [image])[0]
    target = FasterRCNNBoxScoreTarget([int(found["labels"][0])], found["boxes"][:1].numpy())  # unused
    with _pgc(PEigen, model, "backbone.body.16") as cam:
        projection = cam.get_cam_image(None, None, None, _captured(cam, image[None], [target]), None, False)
    assert np.allclose(projection, get_2d_projection(kept[0].numpy()), rtol=1e-4, atol=1e-6)
    channel_sum = kept[0][0].sum(dim=0).flatten().double()
    flat = torch.from_numpy(projection[0]).flatten().double()
    sign = 1.0 if (flat * (channel_sum - channel_sum.mean())).sum() >= 0 else -1.0
    theirs = np.maximum(sign * projection, 0)
    assert smooth.raw.shape == (1, 1, 4, 5)
    close(smooth.raw[0], torch.from_numpy(theirs), "eigen_smooth vs pytorch-grad-cam's EigenCAM")
    close(smooth.raw[0], first_component(kept[0], center=True), "eigen_smooth by hand")


def _captured(cam, inputs: torch.Tensor, targets: list) -> np.ndarray:
    cam(input_tensor=inputs, targets=targets)
    return cam.activations_and_grads.activations[0].numpy()


# ---------------------------------------------------------------------------------------------------
# 5. embedding similarity


def test_similarity_to_a_reference_and_to_an_image(embedder) -> None:
    torch.manual_seed(12)
    x = torch.rand(2, 3, 64, 64)
    reference_image = torch.rand(3, 64, 64)
    layer = embedder.layer4
    with torch.no_grad():
        embedded = embedder(reference_image[None])[0]
    assert embedded.shape == (512,)
    # of_image embeds in eval mode, and leaves a model in training mode as it was (BatchNorm statistics too)
    embedder.train()
    try:
        with unchanged(embedder):
            in_training = Similarity.of_image(embedder, reference_image)
        assert embedder.training and embedder.layer4.training
    finally:
        embedder.eval()
    close(in_training.reference, embedded, "of_image of a model in training mode")
    cases = {
        "reference": (torch.randn(512), None),
        "per image": (torch.randn(2, 512), None),
        "of_image": (embedded, reference_image),
    }
    for what, (reference, image) in cases.items():

        def score(out, reference=reference):
            return F.cosine_similarity(out, reference.expand_as(out), dim=1)

        a, g = by_hand(embedder, layer, x, lambda out, score=score: score(out).sum())
        with unchanged(embedder):
            target = Similarity.of_image(embedder, image) if image is not None else Similarity(reference)
            ours = gradcam.GradCAM(embedder, "layer4")(x, targets=target)
        if image is not None:
            close(target.reference, embedded, "of_image's embedding")
        assert ours.logits is None and ours.targets.tolist() == [-1, -1]
        with torch.no_grad():
            close(ours.scores, score(embedder(x)), f"{what} cosines")
        close(ours.raw, grad_cam(a, g), what)
        if reference.dim() == 1:
            with _pgc(PGC, embedder, "layer4") as cam:
                theirs = pgc_raw(cam, x, [lambda o, r=reference: F.cosine_similarity(o, r, dim=0)] * 2)
            close(ours.raw, torch.from_numpy(theirs), f"{what} vs pytorch-grad-cam")


# ---------------------------------------------------------------------------------------------------
# 6. video


def test_r3d_clips(video) -> None:
    # 16 frames so that the layer keeps t = 2 time steps (r3d_18 halves time three times); 32x32 keeps
    # the cost of the brief's 8x64x64 clip
    torch.manual_seed(13)
    clips = torch.rand(2, 3, 16, 32, 32)
    a, g = by_hand(video, video.layer4, clips, lambda out: out[:, 2].sum())
    assert a.shape == (2, 512, 2, 2, 2)
    with unchanged(video):
        ours = gradcam.GradCAM(video)(clips, targets=2)
    assert ours.layer == "layer4", "the last CNN layer"
    assert ours.raw.shape == (2, 2, 2, 2) and ours.input_size == (16, 32, 32)
    expected = grad_cam(a, g)  # weights: mean of G over (t, h, w)
    close(ours.raw, expected, "r3d raw")
    assert ours.logits is not None and ours.logits.shape == (2, 5)
    big = F.interpolate(expected[:, None], size=(16, 32, 32), mode="trilinear", align_corners=False)[:, 0]
    peak = big.flatten(1).amax(dim=1)
    assert ours.maps.shape == (2, 16, 32, 32)
    close(ours.maps, big / peak[:, None, None, None], "r3d maps, normalised per clip")
    with _pgc(PGC, video, "layer4") as cam:
        theirs = pgc_raw(cam, clips, [ClassifierOutputTarget(2)] * 2)
    close(ours.raw, torch.from_numpy(theirs), "r3d vs pytorch-grad-cam (3-D grads: mean over t, h, w)")


# ---------------------------------------------------------------------------------------------------
# 7. heads


def test_sigmoid_and_regression_heads(head) -> None:
    torch.manual_seed(14)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        out = head(x)
    for target, column in ((Sigmoid(1), 1), (Regression(index=2), 2)):
        a, g = by_hand(head, head.conv2, x, lambda o, c=column: o[:, c].sum())
        with unchanged(head):
            ours = gradcam.GradCAM(head, "conv2")(x, targets=target)
        assert ours.logits is None and ours.raw.shape == (3, 8, 8)
        close(ours.scores, out[:, column], f"{type(target).__name__} score")
        close(ours.raw, grad_cam(a, g), type(target).__name__)
        if isinstance(target, Sigmoid):
            assert ours.targets.tolist() == [1] * 3
            close(ours.probs, torch.sigmoid(out[:, 1]), "sigmoid probability")
        else:
            assert torch.isnan(ours.probs).all()
    # a (B,) output
    scalar = Scalar(head).eval()
    a, g = by_hand(scalar, head.conv2, x, lambda o: o.sum())
    with unchanged(scalar):
        ours = gradcam.GradCAM(scalar, "head.conv2")(x, targets=Regression())
        lower = gradcam.GradCAM(scalar, "head.conv2", counterfactual=True)(x, targets=Regression())
    close(ours.scores, out[:, 2], "(B,) regression score")
    close(ours.raw, grad_cam(a, g), "(B,) regression")
    close(lower.raw, grad_cam(a, -g), "(B,) regression, what lowers it")


class TinySegmenter(nn.Module):
    """conv -> ReLU -> conv (the explained layer, stride 2) -> ReLU -> 1x1 conv -> upsampled; a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.classify = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        out = F.interpolate(self.classify(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out}


def ablation_by_hand(model, layer, x, score) -> torch.Tensor:
    """Ablation-CAM written out: alpha_k = (y - y_k) / max(|y|, eps), y_k with channel k set to zero."""
    with torch.no_grad(), hooked(layer) as kept:
        y = score(model(x), None)
    a = kept[0]
    weights = torch.zeros(a.shape[:2])
    for b in range(len(x)):
        for k in range(a.shape[1]):
            ablated = a[b : b + 1].clone()
            ablated[:, k] = 0
            handle = layer.register_forward_hook(lambda m, args, out, ablated=ablated: ablated)
            with torch.no_grad():
                y_k = score(model(x[b : b + 1]), b)
            handle.remove()
            weights[b, k] = (y[b] - y_k[0]) / y[b].abs().clamp_min(torch.finfo(y.dtype).eps)
    return torch.relu((weights[..., None, None] * a).sum(dim=1))


def score_cam_by_hand(model, layer, x, score) -> torch.Tensor:
    """Score-CAM written out: alpha_k = f(X o H^k) - f(0), H^k the min-max of Up(A^k), 0 if constant."""
    with torch.no_grad(), hooked(layer) as kept:
        model(x)
    a = kept[0]
    weights = torch.zeros(a.shape[:2])
    with torch.no_grad():
        for b in range(len(x)):
            base = score(model(torch.zeros_like(x[:1])), b)[0]
            for k in range(a.shape[1]):
                up = F.interpolate(a[b, k][None, None], x.shape[-2:], mode="bilinear", align_corners=False)
                if up.max() == up.min():
                    continue
                mask = (up - up.min()) / (up.max() - up.min())
                weights[b, k] = score(model(x[b : b + 1] * mask), b)[0] - base
    return torch.relu((weights[..., None, None] * a).sum(dim=1))


@pytest.mark.parametrize("method", ["ablationcam", "scorecam"])
def test_gradient_free_methods_score_each_images_own_target(method) -> None:
    # per-image targets (a mask, a reference per image) scored on one image's perturbed copies: each
    # copy of image b is scored with image b's mask / reference
    torch.manual_seed(15)
    segmenter, embedder = TinySegmenter().eval(), SmallHead().eval()
    x = torch.rand(2, 3, 12, 12)
    masks = torch.zeros(2, 12, 12)
    masks[0, 2:7, 3:10] = 1
    masks[1, 6:12, 0:5] = 1
    references = torch.randn(2, 3)
    by_hand_of = ablation_by_hand if method == "ablationcam" else score_cam_by_hand

    def segment(out, b):  # b None: the batch; else image b's own mask on copies of image b
        region = masks if b is None else masks[b]
        return (out["out"][:, 1] * region).sum(dim=(1, 2))

    def similar(out, b):
        reference = references if b is None else references[b].expand_as(out)
        return F.cosine_similarity(out, reference, dim=1)

    cases = (
        (segmenter, segmenter.conv2, Segmentation(1, mask=masks), segment),
        (embedder, embedder.conv2, Similarity(references), similar),
    )
    for model, layer, target, score in cases:
        expected = by_hand_of(model, layer, x, score)
        with unchanged(model):
            ours = gradcam.methods.get(method)(model, "conv2")(x, targets=target)
        close(ours.raw, expected, f"{method} {type(target).__name__}")
        close(ours.scores, score(model(x), None).detach(), f"{method} {type(target).__name__} scores")


def test_detections_with_fewer_than_topk(detector) -> None:
    # an image with fewer detections than asked repeats its last; one with none scores 0, map 0
    model, images = detector
    layer = model.backbone.body.get_submodule("16")
    found = _detections(model, images)
    ranked = [d["scores"].sort(descending=True).values for d in found]
    order = [d["scores"].argsort(descending=True).tolist() for d in found]
    richer = 0 if ranked[0][2] > ranked[1][2] else 1
    poorer = 1 - richer
    # the richer image keeps 3 and the other none; then the other keeps its best and the richer more
    thresholds = [float(ranked[richer][2]), float(ranked[poorer][0])]
    if ranked[poorer][0] >= ranked[richer][2]:  # the other keeps 1 or 2 of its own at the first
        thresholds = thresholds[:1]
    for threshold in thresholds:
        counts = [int((r >= threshold).sum()) for r in ranked]
        rows = min(4, max(counts))
        assert rows >= 3 and min(counts) < rows
        with unchanged(model):
            ours = gradcam.GradCAM(model)(images, targets=Detections(min_score=threshold, topk=4))
        assert ours.raw.shape[:2] == (rows, 2)
        for n in range(rows):
            picked = [order[b][min(n, counts[b] - 1)] if counts[b] else None for b in range(2)]
            zero = torch.tensor(0.0)
            expected = torch.stack(
                [found[b]["scores"][j] if j is not None else zero for b, j in enumerate(picked)]
            )
            close(ours.scores[n], expected, f"row {n} scores at {threshold:.4f}")

            def score(output, picked=picked):
                return sum(output[b]["scores"][j] for b, j in enumerate(picked) if j is not None)

            a, g = by_hand(model, layer, images, score)
            close(ours.raw[n], grad_cam(a, g), f"row {n} at {threshold:.4f}, repeats and empties")
            for b in range(2):
                if picked[b] is None:
                    assert ours.raw[n, b].abs().max() == 0 and ours.targets[n, b] == -1


# ---------------------------------------------------------------------------------------------------
# 8. the model as found, also after a refusal


def test_detector_left_as_found_also_after_a_refusal(detector) -> None:
    model, images = detector
    layer = model.backbone.body.get_submodule("16")
    # a model in a mixed state: one part training, a frozen parameter, a stale .grad, a user's hook
    frozen = model.backbone.body.get_submodule("0").get_submodule("0").weight
    stale = model.roi_heads.box_predictor.cls_score.weight
    found = _detections(model, images)
    handle = layer.register_forward_hook(lambda m, args, out: None)
    model.rpn.train()
    frozen.requires_grad_(False)
    stale.grad = torch.full_like(stale, 0.5)
    try:
        before = snapshot(model)
        with pytest.raises(GradCAMError) as error:
            gradcam.GradCAM(model)(images, targets=Box(1, [1000.0, 1000.0, 1010.0, 1010.0]))
        message = one_line(error)
        assert "image 0" in message and "label 1" in message
        assert_same(model, before)
        picks = [0, 0]
        target = Box([int(found[b]["labels"][0]) for b in picks], torch.stack([d["boxes"][0] for d in found]))
        gradcam.GradCAM(model)(images, targets=target)
        gradcam.methods.get("gradcam++")(model)(images, targets=target)
        assert_same(model, before)
        assert model.rpn.training and not model.roi_heads.training
    finally:
        handle.remove()
        model.eval()
        frozen.requires_grad_(True)
        stale.grad = None


# ---------------------------------------------------------------------------------------------------
# 9. one-line refusals


def test_one_line_refusals(segmenter, classifier) -> None:
    x = torch.rand(2, 3, 64, 64)
    with unchanged(segmenter), pytest.raises(GradCAMError) as error:
        gradcam.GradCAM(segmenter)(x)
    message = one_line(error)
    assert "expected logits" in message and ("target function" in message or "key=" in message)

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 40)]
    for layer in ("layer4", None):
        with unchanged(classifier), pytest.raises(GradCAMError) as error:
            gradcam.GradCAM(classifier, layer)(images, targets=lambda out: out[:, 0])
        message = one_line(error)
        assert "detection transform" in message or "detector" in message, message

    with unchanged(segmenter), pytest.raises(GradCAMError) as error:
        gradcam.GradCAM(segmenter)(x, targets=Segmentation(1, mask=torch.ones(32, 32)))
    assert "(32, 32)" in one_line(error)
    with pytest.raises(GradCAMError) as error:
        gradcam.GradCAM(segmenter)(x, targets=Segmentation(1, mask=torch.ones(3, 64, 64)))
    assert "(3, 64, 64)" in one_line(error)
    with pytest.raises(GradCAMError) as error:
        Segmentation(1, mask=torch.ones(64))
    one_line(error)
    with pytest.raises(GradCAMError) as error:
        gradcam.GradCAM(segmenter)(x, targets=Segmentation(4))
    assert "out of range" in one_line(error)
