"""Deep Feature Factorization: against NMF written out here, against pytorch-grad-cam, its overlay and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.decomposition import NMF
from typer.testing import CliRunner

from gradcam.cli import app
from gradcam.errors import GradCAMError
from gradcam.methods import DeepFeatureFactorization, registry
from gradcam.methods.factorization import factorize
from gradcam.pipeline import Explainer
from gradcam.viz import concept_colors, concept_overlay

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _layer4(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.layer4.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _state(model: torch.nn.Module) -> tuple:
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()] + [p.grad is None for p in model.parameters()]
    return hooks, flags, grads, [p.detach().clone() for p in model.parameters()]


def _same_state(before: tuple, after: tuple) -> bool:
    return before[:3] == after[:3] and all(
        torch.equal(a, b) for a, b in zip(before[3], after[3], strict=True)
    )


def test_factorisation_is_nmf_of_the_relu_activations_written_out() -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 3, 3, generator=generator)  # negatives too: ReLU'd before NMF
    maps, embeddings, error = factorize(features, 3, seed=7)
    # V by hand: row k, column (b, i, j) in that order.
    v = np.zeros((4, 2 * 9), dtype=np.float32)
    for b in range(2):
        for k in range(4):
            for i in range(3):
                for j in range(3):
                    v[k, b * 9 + i * 3 + j] = max(float(features[b, k, i, j]), 0.0)
    nmf = NMF(n_components=3, init="random", random_state=7, max_iter=200)
    w = nmf.fit_transform(v)
    h = nmf.components_
    np.testing.assert_allclose(embeddings.numpy(), w.T, rtol=1e-6, atol=1e-7)
    for b in range(2):
        for c in range(3):
            for i in range(3):
                for j in range(3):
                    assert maps[b, c, i, j].item() == pytest.approx(float(h[c, b * 9 + i * 3 + j]), abs=1e-7)
    # W H reconstructs V to the error reported, relative to ||V||.
    assert error == pytest.approx(np.linalg.norm(v - w @ h) / np.linalg.norm(v), rel=1e-4)
    assert error < 0.5


def test_equal_to_pytorch_grad_cam_where_the_definitions_agree(resnet) -> None:
    from pytorch_grad_cam import DeepFeatureFactorization as Oracle
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff as oracle_dff

    torch.manual_seed(1)
    # The third image is blank: a random-weight ResNet (no conv bias, BN identity) gives 0 at every
    # channel for it, so pytorch-grad-cam's per-channel offset is 0 and its V is ReLU(A) like ours.
    x = torch.cat([torch.randn(2, 3, 64, 64), torch.zeros(1, 3, 64, 64)])
    activations = _layer4(resnet, x)
    assert float(activations.transpose(0, 1).flatten(1).amin(dim=1).abs().max()) == 0.0
    resnet.train()  # the call must put it back in train mode
    before = _state(resnet)
    ours = DeepFeatureFactorization(resnet, "layer4", concepts=4)(x)
    assert _same_state(before, _state(resnet))
    resnet.eval()
    w, h = oracle_dff(activations.numpy().copy(), n_components=4)
    np.testing.assert_allclose(ours.maps.numpy(), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.embeddings.numpy(), w.T, rtol=1e-5, atol=1e-6)
    oracle = Oracle(resnet, resnet.layer4, computation_on_concepts=resnet.fc)
    try:
        _, processed, outputs = oracle(x, n_components=4)
    finally:
        oracle.activations_and_grads.release()
    # The concepts' classifier scores: fc applied to each embedding, computed by the model's own head.
    np.testing.assert_allclose(ours.scores.numpy(), outputs, rtol=1e-4, atol=1e-4)
    # pytorch-grad-cam min-max scales each image's concept map before resizing it, we do not: an affine
    # change per map, so each pair correlates (the blank image's maps are 0 in both).
    assert float(ours.maps[2].abs().max()) == 0.0 and float(np.abs(processed[2]).max()) == 0.0
    for b in range(2):
        for c in range(4):
            if float(ours.maps[b, c].std()) > 0:
                r = np.corrcoef(ours.upsampled[b, c].flatten().numpy(), processed[b][c].flatten())[0, 1]
                assert r > 0.999, (b, c, r)


def test_correlates_with_pytorch_grad_cam_where_its_channel_offset_is_not_zero(resnet) -> None:
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff as oracle_dff
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    activations = _layer4(resnet, x)
    # Here many channels stay positive over the batch: pytorch-grad-cam factorises A - min_k(A), we
    # ReLU(A); the factorisations differ, and NMF's order of components is arbitrary, so each of our
    # concepts is paired with the oracle's one its map correlates with best (an assignment).
    assert int((activations.transpose(0, 1).flatten(1).amin(dim=1) > 0).sum()) > 50
    ours = DeepFeatureFactorization(resnet, "layer4", concepts=4)(x)
    _, h = oracle_dff(activations.numpy().copy(), n_components=4)
    mine = ours.maps.transpose(0, 1).flatten(1).numpy()
    theirs = h.transpose(1, 0, 2, 3).reshape(4, -1)
    correlation = np.corrcoef(mine, theirs)[:4, 4:]
    rows, columns = linear_sum_assignment(-correlation)
    assert correlation[rows, columns].min() >= 0.99


def test_top_classes_are_the_softmax_of_the_head_on_each_embedding(resnet) -> None:
    torch.manual_seed(2)
    found = DeepFeatureFactorization(resnet, "layer4", concepts=3)(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        probabilities = resnet.fc(found.embeddings).softmax(dim=-1)
    for concept, row in enumerate(found.top_classes(2)):
        best = probabilities[concept].topk(2)
        assert [index for index, _ in row] == best.indices.tolist()
        assert [p for _, p in row] == pytest.approx(best.values.tolist(), rel=1e-4)
    strengths = found.strengths()
    weighted = found.upsampled * found.embeddings.norm(dim=1)[None, :, None, None]
    assert torch.allclose(strengths[0], weighted[0] / weighted[0].max())


def test_overlay_colours_each_pixel_by_its_strongest_concept() -> None:
    image = Image.new("RGB", (4, 2), (100, 100, 100))
    strengths = np.zeros((2, 2, 4), dtype=np.float32)
    strengths[0, :, :2] = [1.0, 0.5]  # concept 0 on the left, fading
    strengths[1, :, 2:] = 0.25  # concept 1 on the right, weakly
    strengths[1, 0, 2] = 0.0
    pixels = np.asarray(concept_overlay(image, strengths, alpha=0.5)).astype(float)
    tab10 = [np.array(matplotlib.colormaps["tab10"].colors[i]) * 255 for i in range(2)]
    assert concept_colors(2) == [tuple(int(round(v)) for v in c) for c in tab10]
    for (row, column), concept, strength in [((0, 0), 0, 1.0), ((0, 1), 0, 0.5), ((1, 3), 1, 0.25)]:
        colour = np.array(concept_colors(2)[concept], dtype=float)
        expected = (1 - 0.5 * strength) * 100 + 0.5 * strength * colour
        np.testing.assert_allclose(pixels[row, column], np.round(expected), atol=0.51)
    np.testing.assert_array_equal(pixels[0, 2], [100, 100, 100])  # no concept: the picture itself
    with pytest.raises(GradCAMError, match="1 to 20 concepts"):
        concept_overlay(image, np.zeros((21, 2, 4)))


def test_bad_input_is_refused_in_one_line_and_the_model_left_as_found(resnet) -> None:
    before = _state(resnet)
    with pytest.raises(GradCAMError, match="from 1 to the layer's 512 channels"):
        DeepFeatureFactorization(resnet, "layer4", concepts=513)(torch.randn(1, 3, 64, 64))
    with pytest.raises(GradCAMError, match="concepts must be a positive integer"):
        DeepFeatureFactorization(resnet, concepts=0)
    with pytest.raises(GradCAMError, match=r"float \(B, C, H, W\) batch"):
        DeepFeatureFactorization(resnet, "layer4")(torch.randn(3, 64, 64))
    with pytest.raises(GradCAMError, match="nowhere positive"):
        DeepFeatureFactorization(resnet, "layer4")(torch.zeros(1, 3, 64, 64))
    assert _same_state(before, _state(resnet))


def test_the_map_front_ends_leave_the_concepts_kind_out(resnet) -> None:
    from gradcam.serve.render import offered

    assert registry.get("dff").kind == "concepts" and "dff" in registry.names(registry.KINDS)
    assert "dff" not in registry.names() and "dff" not in offered(True)
    with pytest.raises(GradCAMError, match="method 'dff' not offered"):
        Explainer(resnet, "dff")


def test_cli_writes_a_concept_overlay_per_image_and_a_legend(tmp_path) -> None:
    out = tmp_path / "out"
    images = [str(EXAMPLES / "cat.png"), str(EXAMPLES / "coffee.png")]
    runner = CliRunner()
    result = runner.invoke(
        app, ["explain", *images, "--method", "dff", "--concepts", "3", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document == json.loads((out / "concepts.json").read_text())
    assert document["method"] == "dff" and document["concepts"] == 3 and document["layer"] == "_bn1"
    assert len(document["top_classes"]) == 3 and all(len(row) == 3 for row in document["top_classes"])
    cat = Image.open(document["images"][0]["overlay"])
    assert cat.size == (384, 255)  # over the whole picture at --overlay-size, like the other overlays
    original = np.asarray(Image.open(EXAMPLES / "cat.png").convert("RGB").resize(cat.size)).astype(float)
    assert np.abs(np.asarray(cat).astype(float) - original).mean() > 5  # coloured, not the picture
    assert Image.open(document["legend"]).height > 3 * 14
    refused = runner.invoke(
        app, ["explain", images[0], "--method", "dff", "--target", "1", "--out", str(out)]
    )
    assert refused.exit_code == 2 and "--target does not apply to --method dff" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.output
