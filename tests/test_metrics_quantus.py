"""The Quantus-family metrics of gradcam.metrics against Quantus 0.6 itself, run on the same numpy arrays
with the settings each docstring names (to 1e-6), the seeded ones against a hand-computed loop over the
same draws (and against Quantus after ``np.random.seed`` where its draws are the same), closed-form cases,
one-line errors, and the model left as found."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from skimage.segmentation import slic
from torch import nn

from conftest import require
from gradcam import GradCAM
from gradcam.errors import GradCAMError
from gradcam.metrics import (
    avg_sensitivity,
    complexity,
    energy_pointing_game,
    faithfulness_correlation,
    irof,
    max_sensitivity,
    monotonicity,
    pixel_flipping,
    random_logit,
    region_perturbation,
    relevance_mass,
    relevance_rank,
    selectivity,
    sparseness,
    top_k_intersection,
)
from gradcam.metrics.flipping import patch_ids, slic_segments

quantus = require("quantus", "the Quantus reference tests need quantus==0.6.0 (pip install quantus==0.6.0)")
from quantus.functions.perturb_func import baseline_replacement_by_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "numpy_trapz")
TOLERANCE = 1e-6
CLASSES = 5


@pytest.fixture
def numpy_trapz(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantus 0.6 integrates with np.trapz, which NumPy 2.4 removed; np.trapezoid is the same rule."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", module="quantus")


def tiny_net(channels: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv 3x3 -> ReLU -> 2x2 average pool -> linear, fixed weights, eval mode (Quantus refuses others).
    float64 by default: Quantus computes its softmax and sums in the model's precision, and in float32
    its curves' areas carry ~1e-6 of rounding, which would hide a real difference of that size."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )
    return net.to(dtype).eval()


def batch(
    size: int = 12, channels: int = 3, images: int = 3, seed: int = 1, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, channels, size, size, generator=generator, dtype=dtype)
    maps = torch.rand(images, size, size, generator=generator)  # continuous: no ties
    return x, maps


@contextmanager
def default_float64() -> Iterator[None]:
    """Quantus feeds the model torch.Tensor(x), which has torch's default dtype: float64 while inside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_quantus(
    metric: object, net: nn.Module, x: torch.Tensor, y: object, maps: torch.Tensor, **kw: object
) -> np.ndarray:
    """``metric`` on numpy copies of the same inputs (in their dtype), maps and targets, on the CPU."""
    inputs = x.detach().numpy().copy()
    with default_float64() if x.dtype == torch.float64 else warnings.catch_warnings():
        result = metric(net, inputs, np.asarray(y), a_batch=np32(maps), device="cpu", **kw)  # type: ignore[operator]
    return np.asarray(result, dtype=np.float64)


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32).copy()


def np64(t: torch.Tensor) -> np.ndarray:
    """Maps for Quantus's map-only metrics in float64, as ours compute (its float32 sums lose ~1e-5 on a
    signed map whose mass nearly cancels)."""
    return t.detach().double().numpy().copy()


def close(ours: torch.Tensor, reference: object) -> float:
    """Max |ours - reference|, asserted below TOLERANCE (NaN must meet NaN)."""
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape and ours.dtype == torch.float64
    assert np.array_equal(np.isnan(ours.numpy()), np.isnan(reference))
    gap = float(np.nanmax(np.abs(ours.numpy() - reference))) if reference.size else 0.0
    assert gap < TOLERANCE, gap
    return gap


def one_line_error(match: str, call: object) -> None:
    with pytest.raises(GradCAMError, match=match) as caught:
        call()  # type: ignore[operator]
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------ deterministic maps


def signed_and_camlike_maps() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    cam = torch.relu(torch.randn(3, 10, 10, generator=generator))  # ReLU-ed: zeros (ties) and a support
    smooth = torch.nn.functional.avg_pool2d(torch.rand(3, 1, 13, 13, generator=generator), 4, 1)[:, 0]
    signed = torch.randn(3, 10, 10, generator=generator)
    return [cam, smooth, signed]


@pytest.mark.parametrize("which", range(3))
def test_sparseness_and_complexity_match_quantus(which: int) -> None:
    maps = signed_and_camlike_maps()[which]
    x = torch.zeros(len(maps), 3, *maps.shape[1:])
    q_sparse = quantus.Sparseness(disable_warnings=True)(None, np32(x), np.zeros(3), a_batch=np64(maps))
    q_complex = quantus.Complexity(disable_warnings=True)(None, np32(x), np.zeros(3), a_batch=np64(maps))
    close(sparseness(maps), q_sparse)
    close(complexity(maps), q_complex)


def test_sparseness_and_complexity_in_closed_form() -> None:
    one_hot = torch.zeros(2, 4, 5)
    one_hot[0, 1, 2] = 3.0
    one_hot[1] = -2.0  # uniform magnitudes
    n = 20
    assert torch.allclose(sparseness(one_hot), torch.tensor([(n - 1) / n, 0.0], dtype=torch.float64))
    assert torch.allclose(complexity(one_hot), torch.tensor([0.0, np.log(n)], dtype=torch.float64))
    # two values 1 and 3: Gini = sum (2i - n - 1) a_(i) / (n sum a) = (-1 * 1 + 1 * 3) / (2 * 4) = 0.25
    pair = torch.tensor([[[3.0, 1.0]]])
    assert sparseness(pair).item() == pytest.approx(0.25)
    assert complexity(pair).item() == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))
    zeros = torch.zeros(1, 3, 3)
    assert torch.isnan(sparseness(zeros)).all() and torch.isnan(complexity(zeros)).all()


def random_masks(shape: tuple[int, ...], seed: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(shape, dtype=torch.bool)
    for b in range(shape[0]):
        r0, c0 = torch.randint(0, shape[1] // 2, (2,), generator=generator).tolist()
        masks[b, r0 : r0 + 2 + b, c0 : c0 + 3 + b] = True
    return masks


@pytest.mark.parametrize("which", [1, 2])  # maps without ties (the rank metrics' order is then unique)
def test_localisation_metrics_match_quantus(which: int) -> None:
    maps = signed_and_camlike_maps()[which]
    masks = random_masks(tuple(maps.shape))
    maps = maps + 0.3 * (maps.max() - maps.min()) * masks  # partly on the object: scores between 0 and 1
    x = np32(torch.zeros(len(maps), 3, *maps.shape[1:]))
    a, s, y = np64(maps), masks[:, None].numpy(), np.zeros(len(maps))
    close(
        relevance_mass(maps, masks), quantus.RelevanceMassAccuracy()(None, x, y, a_batch=a.copy(), s_batch=s)
    )
    close(
        relevance_rank(maps, masks), quantus.RelevanceRankAccuracy()(None, x, y, a_batch=a.copy(), s_batch=s)
    )
    for k in (1, 7, 40):
        reference = quantus.TopKIntersection(k=k)(None, x, y, a_batch=a.copy(), s_batch=s)
        close(top_k_intersection(maps, masks, k), reference)


def test_localisation_metrics_by_hand() -> None:
    maps = torch.tensor([[[4.0, 3.0, 0.0], [2.0, 1.0, 0.0]]])
    masks = torch.tensor([[[False, True, False], [True, False, True]]])  # pixels 3, 2, 0
    assert relevance_mass(maps, masks).item() == pytest.approx(5 / 10)
    # K = 3 most salient: 4, 3, 2 -> two of them (3 and 2) in the mask
    assert relevance_rank(maps, masks).item() == pytest.approx(2 / 3)
    assert top_k_intersection(maps, masks, 1).item() == 0.0
    assert top_k_intersection(maps, masks, 2).item() == 0.5
    # ties: the two zeros keep raster order, so the 5th and 6th pixels are (0,2) then (1,2)
    assert top_k_intersection(maps, masks, 5).item() == pytest.approx(2 / 5)
    assert top_k_intersection(maps, masks, 6).item() == pytest.approx(3 / 6)


def test_energy_pointing_game_is_quantus_mass_of_the_box_pixels() -> None:
    maps = signed_and_camlike_maps()[0]  # a ReLU-ed CAM, the game's intended input
    boxes = [
        torch.tensor([[1.7, 2.0, 6.0, 5.6]]),
        [[0.4, 0.4, 3.6, 9.2], [7, 7, 10, 10]],
        (2.5, 0.0, 4.5, 10.0),
    ]
    # pixel centres c + 0.5 inside [x0, x1): by hand
    masks = torch.zeros(maps.shape, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 0:9, 0:4] = True
    masks[1, 7:10, 7:10] = True
    masks[2, :, 2:4] = True
    x = np32(torch.zeros(len(maps), 3, *maps.shape[1:]))
    reference = quantus.RelevanceMassAccuracy()(
        None, x, np.zeros(3), a_batch=np64(maps), s_batch=masks[:, None].numpy()
    )
    close(energy_pointing_game(maps, boxes), reference)
    inside = (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)
    assert torch.allclose(energy_pointing_game(maps, boxes), inside.double())
    one_each = torch.tensor([[1.7, 2.0, 6.0, 5.6], [0.4, 0.4, 3.6, 9.2], [2.5, 0.0, 4.5, 10.0]])
    as_lists = energy_pointing_game(maps, [box.tolist() for box in one_each])
    assert torch.equal(energy_pointing_game(maps, one_each), as_lists)
    assert torch.equal(as_lists[[0, 2]], energy_pointing_game(maps, boxes)[[0, 2]])


# -------------------------------------------------------------------------------- model-based, Quantus


def put_back(x: np.ndarray):  # type: ignore[no-untyped-def]
    """Monotonicity's step as the paper has it: the chosen values come from the image, not the baseline."""
    flat = x.reshape(len(x), -1)

    def perturb(arr: np.ndarray, indices: np.ndarray, **_: object) -> np.ndarray:
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = flat[rows, indices]
        return out

    return perturb


def test_pixel_flipping_matches_quantus() -> None:
    net, (x, maps) = tiny_net(), batch()
    for k in (1, 4):
        metric = quantus.PixelFlipping(features_in_step=3 * k, return_auc_per_sample=True)
        reference = run_quantus(metric, net, x, [0, 1, 2], maps, softmax=True)
        close(pixel_flipping(net, x, maps, [0, 1, 2], pixels_per_step=k, batch_size=50), reference)
    metric = quantus.PixelFlipping(features_in_step=12, perturb_baseline="white", return_auc_per_sample=True)
    reference = run_quantus(metric, net, x, [3, 3, 1], maps, softmax=False)
    ours = pixel_flipping(net, x, maps, [3, 3, 1], pixels_per_step=4, baseline="white", softmax=False)
    close(ours, reference)


def test_pixel_flipping_matches_quantus_in_float32_to_its_rounding() -> None:
    net, (x, maps) = tiny_net(dtype=torch.float32), batch(dtype=torch.float32)
    metric = quantus.PixelFlipping(features_in_step=3, return_auc_per_sample=True)
    reference = run_quantus(metric, net, x, [0, 1, 2], maps, softmax=True)
    ours = pixel_flipping(net, x, maps, [0, 1, 2]).numpy()
    assert np.abs(ours - reference).max() < 1e-7 * 144 * np.abs(reference).max()  # 144 float32 points


def test_monotonicity_matches_quantus_with_the_papers_step_and_quantus_default_is_always_true() -> None:
    net, (x, maps) = tiny_net(), batch()
    y = np.array([0, 1, 4])
    for k in (3, 12):
        metric = quantus.Monotonicity(features_in_step=3 * k, abs=False, perturb_func=put_back(x.numpy()))
        close(monotonicity(net, x, maps, y, pixels_per_step=k), run_quantus(metric, net, x, y, maps))
    # Quantus's own perturbation never changes its black image: every map "passes", ours do not.
    default = run_quantus(quantus.Monotonicity(features_in_step=36, abs=False), net, x, y, maps)
    assert default.tolist() == [1.0, 1.0, 1.0]
    assert monotonicity(net, x, maps, y, pixels_per_step=12).tolist() != [1.0, 1.0, 1.0]


class SumLogit(nn.Module):
    """Two classes: logit_0 = 0, logit_1 = sum of the inputs, so p_1 rises with every value put back above
    the image's minimum (the black baseline) and p_0 falls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.double().sum(dim=(1, 2, 3)) / 10
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_monotonicity_in_closed_form() -> None:
    x, maps = batch(size=6, images=2)
    assert monotonicity(SumLogit(), x, maps, [1, 0], pixels_per_step=2).tolist() == [1.0, 0.0]
    # 1x5 pixels put back on 0 in pairs. Least salient first (the map's raster order here) adds
    # {-1, 3}, {-1, 3}, {1}: logit 0.2, 0.4, 0.5, rising. Most salient first would add {1, 3}, {-1, 3},
    # {-1}: 0.4, 0.6, 0.5, not monotonic.
    line = torch.tensor([-1.0, 3.0, -1.0, 3.0, 1.0]).reshape(1, 1, 1, 5)
    rising = torch.arange(5.0).reshape(1, 1, 5)
    assert monotonicity(SumLogit(), line, rising, [1], pixels_per_step=2, baseline=0.0).tolist() == [1.0]
    assert monotonicity(SumLogit(), line, -rising, [1], pixels_per_step=2, baseline=0.0).tolist() == [0.0]
    # an added pixel of value 0 keeps the score: still monotonic (p_{j+1} >= p_j)
    flat = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert monotonicity(SumLogit(), flat, torch.arange(2.0).reshape(1, 1, 2), [1], baseline=0.0).tolist() == [
        1.0
    ]


def test_mean_baseline_is_each_images_channel_means() -> None:
    net, (x, maps) = tiny_net(), batch()
    means = x.mean(dim=(2, 3), keepdim=True)  # (B,C,1,1)
    assert not torch.allclose(means, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(means))
    ours = pixel_flipping(net, x, maps, [0, 1, 2], pixels_per_step=8, baseline="mean")
    assert torch.equal(ours, pixel_flipping(net, x, maps, [0, 1, 2], pixels_per_step=8, baseline=means))


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_matches_quantus(order: str) -> None:
    net, (x, maps) = tiny_net(), batch()  # 12x12 in patches of 5: padded to 15 (1 + 2), 9 patches
    y = np.array([2, 0, 1])
    for regions in (4, 100):
        metric = quantus.RegionPerturbation(patch_size=5, order=order, regions_evaluation=regions)
        curves = run_quantus(metric, net, x, y, maps)
        steps = curves.shape[1]
        assert steps == min(regions, 9)
        ours = region_perturbation(net, x, maps, y, patch_size=5, regions=regions, order=order, batch_size=7)
        close(ours, curves.sum(axis=1) / (steps + 1))


def test_selectivity_matches_quantus() -> None:
    net, (x, maps) = tiny_net(), batch()
    y = np.array([1, 1, 3])
    for side, baseline in ((5, "black"), (4, "white"), (6, "black")):
        metric = quantus.Selectivity(patch_size=side, perturb_baseline=baseline)
        curves = run_quantus(metric, net, x, y, maps)
        close(selectivity(net, x, maps, y, patch_size=side, baseline=baseline), np.trapezoid(curves, axis=1))


def test_patch_grid_pads_like_quantus() -> None:
    ids, count = patch_ids(12, 12, 5)
    assert count == 9
    # padding 3 = 1 before + 2 after: the first patch row holds image rows 0..3, the second 4..8
    assert ids[:, 0].tolist() == [0] * 4 + [3] * 5 + [6] * 3
    assert ids[0].tolist() == [0] * 4 + [1] * 5 + [2] * 3


def broadcast_mask(arr: np.ndarray, mask: np.ndarray, **kwargs: object) -> np.ndarray:
    """Quantus's replacement with its (B,1,H,W) superpixel mask broadcast over the channels."""
    return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)


def test_irof_matches_quantus() -> None:
    net, (x, maps) = tiny_net(), batch(size=16)
    y = np.array([0, 4, 2])
    segments = slic_segments(x)
    for image, labels in zip(x, segments, strict=True):
        expected = slic(np.moveaxis(image.numpy(), 0, -1).astype("double"), start_label=0)
        assert np.array_equal(labels.numpy(), expected) and labels.max() > 1
    metric = quantus.IROF(return_aggregate=False, perturb_baseline=0.25, perturb_func=broadcast_mask)
    reference = run_quantus(metric, net, x, y, maps, batch_size=1)
    close(irof(net, x, maps, y, baseline=0.25, batch_size=16), reference)


def test_irof_matches_quantus_defaults_on_one_channel() -> None:
    net, (x, maps) = tiny_net(channels=1), batch(size=16, channels=1)
    y = np.array([1, 2, 3])
    metric = quantus.IROF(return_aggregate=False, perturb_baseline=-0.5)
    reference = run_quantus(metric, net, x, y, maps, batch_size=1)
    close(irof(net, x, maps, y, baseline=-0.5), reference)


def test_irof_with_given_segments_by_hand() -> None:
    x, maps = batch(size=4, images=1)
    segments = torch.tensor([[[7, 7, 2, 2]] * 2 + [[5, 5, 5, 5]] * 2])  # labels need not be 0..K-1
    maps = torch.zeros(1, 4, 4)
    maps[0, 2:] = 1.0  # label 5 first (mean 1), then 2 and 7 (mean 0: label order, 2 before 7)
    model = SumLogit()
    p = []
    fill = x.amin()
    current = x.clone()
    for region in (segments == 5, segments == 2, segments == 7):
        current = torch.where(region[:, None], fill, current)
        p.append(torch.softmax(model(current)[0], 0)[1].item())
    p0 = torch.softmax(model(x)[0], 0)[1].item()
    expected = 3 - np.trapezoid(np.array(p) / p0)
    assert irof(model, x, maps, [1], segments=segments, baseline="black").item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------- seeded metrics


def test_faithfulness_correlation_by_hand() -> None:
    net, (x, maps) = tiny_net(), batch()
    targets = [0, 3, 1]
    ours = faithfulness_correlation(net, x, maps, targets, runs=20, subset_size=30, seed=7, batch_size=9)
    rng = np.random.RandomState(7)
    draws = [[rng.choice(144, 30, replace=False) for _ in range(3)] for _ in range(20)]
    expected = []
    with torch.no_grad():
        logits = net(x)
        for b, t in enumerate(targets):
            mass, drop = [], []
            for run in range(20):
                removed = torch.zeros(144, dtype=torch.bool)
                removed[torch.from_numpy(draws[run][b])] = True
                image = torch.where(removed.reshape(1, 12, 12), x[b].min(), x[b])
                drop.append((logits[b, t] - net(image[None])[0, t]).item())
                mass.append(maps[b].flatten()[removed].double().sum().item())
            expected.append(stats.pearsonr(mass, drop)[0])
    close(ours, expected)
    again = faithfulness_correlation(net, x, maps, targets, runs=20, subset_size=30, seed=7)
    assert torch.equal(ours, again)
    assert not torch.allclose(
        ours, faithfulness_correlation(net, x, maps, targets, runs=20, subset_size=30, seed=8)
    )


def test_faithfulness_correlation_matches_quantus_on_one_channel() -> None:
    net, (x, maps) = tiny_net(channels=1), batch(channels=1)
    y = np.array([4, 0, 2])
    np.random.seed(11)
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=15, subset_size=20, perturb_baseline=0.0, return_aggregate=False
    )
    reference = run_quantus(metric, net, x, y, maps)
    ours = faithfulness_correlation(net, x, maps, y, runs=15, subset_size=20, baseline=0.0, seed=11)
    close(ours, reference)


def cam_explainer() -> tuple[nn.Module, GradCAM]:
    net = tiny_net(dtype=torch.float32)
    return net, GradCAM(net, "0")


def test_sensitivities_by_hand_and_against_quantus() -> None:
    net, cam = cam_explainer()
    x, _ = batch(images=2, dtype=torch.float32)
    targets = torch.tensor([1, 3])
    kwargs = dict(samples=6, radius=0.3, seed=5)
    ours_max = max_sensitivity(cam, x, targets, batch_size=5, **kwargs)  # two samples per call
    ours_avg = avg_sensitivity(cam, x, targets, **kwargs)
    absolute = max_sensitivity(cam, x, targets, relative=False, **kwargs)

    rng = np.random.RandomState(5)
    original = cam(x, targets).maps.double()
    ratios, distances = [], []
    for _ in range(6):
        noise = torch.from_numpy(rng.uniform(-0.3, 0.3, size=(2, 3 * 144))).reshape(x.shape)
        moved = cam((x.double() + noise).float(), targets).maps.double()
        distances.append(torch.linalg.vector_norm((moved - original).flatten(1), dim=1))
        ratios.append(distances[-1] / torch.linalg.vector_norm(original.flatten(1), dim=1))
    ratios_t, distances_t = torch.stack(ratios, 1), torch.stack(distances, 1)
    assert (ratios_t > 0.01).all()  # the noise moves the maps
    close(ours_max, ratios_t.amax(1).numpy())
    close(ours_avg, ratios_t.mean(1).numpy())
    close(absolute, distances_t.amax(1).numpy())

    def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        return cam(torch.from_numpy(inputs), torch.from_numpy(np.asarray(targets))).maps.numpy()

    for metric_class, ours in ((quantus.MaxSensitivity, ours_max), (quantus.AvgSensitivity, ours_avg)):
        np.random.seed(5)
        metric = metric_class(nr_samples=6, lower_bound=0.3, disable_warnings=True)
        reference = metric(net, np32(x), targets.numpy(), explain_func=explain_func, device="cpu")
        close(ours, reference)


def test_random_logit_by_hand_and_quantus_picks_the_same_classes() -> None:
    net, cam = cam_explainer()
    x, _ = batch(images=4, dtype=torch.float32)
    targets = torch.tensor([2, 4, 1, 2])  # picks 2, 0, 1, 3: two equal the target
    ours_asked: list[torch.Tensor] = []

    def recording(inputs: torch.Tensor, classes: torch.Tensor) -> object:
        ours_asked.append(classes.clone())
        return cam(inputs, classes)

    ours = random_logit(recording, x, targets, num_classes=CLASSES, seed=3)

    picks = np.random.RandomState(3).randint(0, CLASSES - 1, size=4)
    others = torch.from_numpy(np.where(picks >= targets.numpy(), picks + 1, picks))
    assert (others != targets).all()

    def scaled(m: torch.Tensor) -> np.ndarray:
        m = m.abs().double()
        return (m / m.flatten(1).amax(1)[:, None, None]).numpy()

    first, second = scaled(cam(x, targets).maps), scaled(cam(x, others).maps)
    expected = [
        structural_similarity(a, b, data_range=1.0, win_size=7) for a, b in zip(first, second, strict=True)
    ]
    close(ours, expected)
    assert (ours < 0.999).all()

    asked: list[np.ndarray] = []

    def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        asked.append(np.asarray(targets).copy())
        return cam(torch.from_numpy(inputs), torch.from_numpy(np.asarray(targets))).maps.numpy()

    metric = quantus.RandomLogit(
        num_classes=CLASSES, seed=3, similarity_func=lambda a, b, **_: np.zeros(len(a))
    )
    metric(net, np32(x), targets.numpy(), explain_func=explain_func, device="cpu")
    assert np.array_equal(asked[-1], others.numpy())
    assert [c.tolist() for c in ours_asked] == [targets.tolist(), others.tolist()]


# -------------------------------------------------------------------------------- errors, model as found


def test_bad_arguments_get_one_line_errors() -> None:
    net, (x, maps) = tiny_net(), batch()
    masks = random_masks(tuple(maps.shape))
    empty = masks.clone()
    empty[1] = False
    one_line_error(r"maps must be a non-empty \(B,H,W\)", lambda: sparseness(maps[0]))
    one_line_error(r"maps holds NaN", lambda: complexity(torch.full((1, 2, 2), float("nan"))))
    one_line_error(r"masks must be a bool", lambda: relevance_mass(maps, masks.float()))
    one_line_error(r"masks must have the maps' shape", lambda: relevance_rank(maps, masks[:, :5]))
    one_line_error(r"masks\[1\] is empty", lambda: relevance_mass(maps, empty))
    one_line_error(r"k must be a positive integer", lambda: top_k_intersection(maps, masks, 0))
    one_line_error(r"k must be at most 144", lambda: top_k_intersection(maps, masks, 145))
    one_line_error(r"boxes\[0\] covers no pixel", lambda: energy_pointing_game(maps, [[20, 20, 30, 30]] * 3))
    one_line_error(
        r"boxes must hold one entry .* per map \(3\)", lambda: energy_pointing_game(maps, [[0, 0, 4, 4]])
    )
    one_line_error(r"maps must be \(B,H,W\)", lambda: pixel_flipping(net, x, maps[:, :6], [0, 1, 2]))
    one_line_error(r"targets must hold one class per image", lambda: selectivity(net, x, maps, [0, 1]))
    one_line_error(
        r"pixels_per_step must be", lambda: monotonicity(net, x, maps, [0, 1, 2], pixels_per_step=0)
    )
    one_line_error(
        r"patch_size must be at most 12", lambda: selectivity(net, x, maps, [0, 1, 2], patch_size=13)
    )
    one_line_error(
        r"order must be 'morf' or 'lerf'", lambda: region_perturbation(net, x, maps, [0, 1, 2], order="x")
    )
    one_line_error(
        r"baseline must be 'black'", lambda: pixel_flipping(net, x, maps, [0, 1, 2], baseline="grey")
    )
    one_line_error(r"target class 7 is out of range", lambda: pixel_flipping(net, x, maps, [0, 7, 2]))
    one_line_error(
        r"targets must be classes 0..4", lambda: pixel_flipping(net, x, maps, [0, 7, 2], softmax=False)
    )
    one_segment = torch.zeros(3, 12, 12, dtype=torch.long)
    one_line_error(
        r"segments\[0\] has 1 segment", lambda: irof(net, x, maps, [0, 1, 2], segments=one_segment)
    )
    one_line_error(
        r"subset_size must be at most 143",
        lambda: faithfulness_correlation(net, x, maps, [0, 1, 2], subset_size=144),
    )
    one_line_error(
        r"seed must be an integer",
        lambda: faithfulness_correlation(net, x, maps, [0, 1, 2], subset_size=9, seed=-1),
    )
    one_line_error(
        r"explain must return maps of shape", lambda: max_sensitivity(lambda i, t: maps[:, :4], x, [0, 1, 2])
    )
    one_line_error(
        r"explain must return maps \(B,H,W\) or", lambda: avg_sensitivity(lambda i, t: None, x, [0, 1, 2])
    )
    one_line_error(
        r"radius must be a positive", lambda: max_sensitivity(lambda i, t: maps, x, [0, 1, 2], radius=0)
    )
    one_line_error(
        r"targets must be classes 0..4", lambda: random_logit(lambda i, t: maps, x, [0, 5, 1], num_classes=5)
    )


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_net()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.body(x))


def test_model_based_metrics_leave_a_training_model_as_found() -> None:
    x, maps = batch()
    net = DropoutNet().eval()
    expected = [
        pixel_flipping(net, x, maps, [0, 1, 2], pixels_per_step=12),
        faithfulness_correlation(net, x, maps, [0, 1, 2], runs=5, subset_size=10),
    ]
    net.train()
    net.body[0].weight.requires_grad_(False)
    calls = []
    handle = net.body[4].register_forward_hook(lambda *_: calls.append(1))
    got = [
        pixel_flipping(net, x, maps, [0, 1, 2], pixels_per_step=12),
        faithfulness_correlation(net, x, maps, [0, 1, 2], runs=5, subset_size=10),
    ]
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))  # dropout was off: eval mode
    assert net.training and net.drop.training and net.body.training
    assert not net.body[0].weight.requires_grad and net.body[4].weight.requires_grad
    assert calls and not net.body[4]._forward_hooks
