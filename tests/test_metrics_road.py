"""ROAD (Rong et al., ICML 2022): noisy linear imputation against hand and dense references, exact removal
counts under ties, closed-form probabilities, reproducibility, the model left as found, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.metrics import road as road_module
from gradcam.metrics.road import RoadResult, noisy_linear_impute, removal_masks, road_curves


def dense_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Reference: the imputation system written pixel by pixel and solved densely with numpy."""
    channels, height, width = image.shape
    unknown = [(y, x) for y in range(height) for x in range(width) if removed[y, x]]
    index = {pixel: k for k, pixel in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), channels))
    for k, (y, x) in enumerate(unknown):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= ny < height and 0 <= nx < width):
                    continue
                weight = 1 / 12 if dy and dx else 1 / 6
                a[k, k] += weight
                if (ny, nx) in index:
                    a[k, index[(ny, nx)]] -= weight
                else:
                    b[k] += weight * image[:, ny, nx]
    solution = np.linalg.solve(a, b)
    out = image.copy()
    for k, (y, x) in enumerate(unknown):
        out[:, y, x] = solution[k]
    return out


def ramp(height: int, width: int) -> torch.Tensor:
    """(3,H,W) float64: channel c is a_c x + b_c y + c_c, a different plane per channel."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    planes = [(0.3, -1.7, 2.0), (-2.5, 0.25, -1.0), (1.0, 1.0, 0.0)]
    return torch.stack([a * xs + b * ys + c for a, b, c in planes])


class TinyNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> Dropout -> average pool -> linear: 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


class PixelLogit(nn.Module):
    """Logits (bias0, sum_k w_k x[0, y_k, x_k]): the class-1 probability is known in closed form."""

    def __init__(self, pixels: list[tuple[int, int]], weights: list[float], bias0: float) -> None:
        super().__init__()
        self.pixels, self.weights, self.bias0 = pixels, weights, bias0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = sum(w * x[:, 0, y, xx] for (y, xx), w in zip(self.pixels, self.weights, strict=True))
        return torch.stack([torch.full_like(score, self.bias0), score], dim=1)


# --- imputation ------------------------------------------------------------------------------------------


def test_interior_pixel_of_linear_ramp_is_recovered_exactly():
    image = ramp(16, 16)
    removed = torch.zeros(16, 16, dtype=torch.bool)
    removed[7, 9] = True
    corrupted = image.clone()
    corrupted[:, 7, 9] = 1e3  # the removed value must not leak into the result
    out = noisy_linear_impute(corrupted, removed, noise=0.0)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-12)


def test_interior_hole_of_linear_ramp_is_recovered_exactly():
    image = ramp(16, 16)
    removed = torch.zeros(16, 16, dtype=torch.bool)
    removed[3:11, 2:13] = True
    removed[11:14, 5:7] = True  # an irregular hole, still off the border
    assert not removed[0].any() and not removed[-1].any() and not removed[:, 0].any()
    assert not removed[:, -1].any()
    corrupted = image.masked_fill(removed, -5.0)
    out = noisy_linear_impute(corrupted, removed, noise=0.0)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-10)


def test_corner_pixel_is_the_weighted_average_of_its_three_neighbours():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64)
    removed = torch.zeros(5, 6, dtype=torch.bool)
    removed[0, 0] = removed[4, 5] = True
    out = noisy_linear_impute(image, removed, noise=0.0)
    # (1/6 right + 1/6 down + 1/12 diagonal) / (5/12)
    top_left = (image[:, 0, 1] / 6 + image[:, 1, 0] / 6 + image[:, 1, 1] / 12) / (5 / 12)
    bottom_right = (image[:, 4, 4] / 6 + image[:, 3, 5] / 6 + image[:, 3, 4] / 12) / (5 / 12)
    torch.testing.assert_close(out[:, 0, 0], top_left, rtol=0, atol=1e-14)
    torch.testing.assert_close(out[:, 4, 5], bottom_right, rtol=0, atol=1e-14)
    keep = ~removed
    assert torch.equal(out[:, keep], image[:, keep])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_mask_matches_dense_pixel_by_pixel_solve(seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(3, 6, 7))
    removed = rng.random((6, 7)) < 0.6
    removed[2, 3] = True  # never empty
    removed[0, 0] = False  # never full
    out = noisy_linear_impute(torch.from_numpy(image), torch.from_numpy(removed), noise=0.0)
    np.testing.assert_allclose(out.numpy(), dense_impute(image, removed), rtol=0, atol=1e-10)


def test_float32_input_keeps_dtype_and_matches_reference():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(3, 6, 7)).astype(np.float32)
    removed = rng.random((6, 7)) < 0.4
    removed[0, 0] = False
    removed[3, 3] = True
    out = noisy_linear_impute(torch.from_numpy(image), torch.from_numpy(removed), noise=0.0)
    assert out.dtype == torch.float32
    expected = dense_impute(image.astype(np.float64), removed)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_constant_image_stays_constant():
    image = torch.full((3, 9, 8), 0.37, dtype=torch.float64)
    removed = torch.rand(9, 8, generator=torch.Generator().manual_seed(0)) < 0.8
    removed[4, 4] = False
    assert removed.sum() > 40
    out = noisy_linear_impute(image, removed, noise=0.0)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-13)


def test_noise_touches_only_imputed_pixels_at_its_scale_and_is_reproducible():
    jitter = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    image = ramp(16, 16) + jitter
    removed = torch.zeros(16, 16, dtype=torch.bool)
    removed[2:12, 3:13] = True  # 100 pixels, 300 values
    clean = noisy_linear_impute(image, removed, noise=0.0)
    noise = 0.01
    noisy = noisy_linear_impute(image, removed, noise=noise, generator=torch.Generator().manual_seed(7))
    again = noisy_linear_impute(image, removed, noise=noise, generator=torch.Generator().manual_seed(7))
    other = noisy_linear_impute(image, removed, noise=noise, generator=torch.Generator().manual_seed(8))
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy[:, removed], other[:, removed])
    assert torch.equal(noisy[:, ~removed], image[:, ~removed])
    scaled = (noisy - clean)[:, removed].flatten() / noise
    assert (scaled != 0).all()
    assert scaled.abs().max() < 5
    assert 0.85 < scaled.std().item() < 1.15
    assert abs(scaled.mean().item()) < 0.2


def test_nothing_removed_returns_an_equal_copy():
    image = torch.rand(3, 4, 4)
    out = noisy_linear_impute(image, torch.zeros(4, 4, dtype=torch.bool), noise=0.5)
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()


@pytest.mark.parametrize(
    ("image", "removed", "noise", "match"),
    [
        (torch.rand(4, 4), torch.zeros(4, 4, dtype=torch.bool), 0.0, r"image must be a floating \(C,H,W\)"),
        (torch.ones(3, 4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.bool), 0.0, "image must"),
        (torch.rand(3, 4, 4), torch.zeros(4, 4), 0.0, r"removed must be a bool \(H,W\)"),
        (torch.rand(3, 4, 4), torch.zeros(4, 5, dtype=torch.bool), 0.0, r"removed must have the image's"),
        (torch.rand(3, 4, 4), torch.ones(4, 4, dtype=torch.bool), 0.0, "every pixel removed"),
        (torch.rand(3, 4, 4), torch.eye(4, dtype=torch.bool), -0.1, "noise must be a finite number >= 0"),
        (torch.rand(3, 4, 4), torch.eye(4, dtype=torch.bool), math.nan, "noise must be"),
    ],
)
def test_imputation_rejects_bad_inputs(image, removed, noise, match):
    with pytest.raises(GradCAMError, match=match):
        noisy_linear_impute(image, removed, noise=noise)


# --- removal sets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_all_zero_map_removes_the_exact_count_in_raster_order(order):
    masks = removal_masks(torch.zeros(2, 16, 16), 0.3, order)
    count = round(0.3 * 256)  # 77: a percentile threshold would remove 0 or 256 here
    assert masks.reshape(2, -1).sum(dim=1).tolist() == [count, count]
    expected = torch.zeros(256, dtype=torch.bool)
    expected[:count] = True
    assert torch.equal(masks[0].flatten(), expected) and torch.equal(masks[1].flatten(), expected)


def test_distinct_map_removes_its_top_and_bottom_pixels():
    values = np.random.default_rng(0).permutation(16 * 16).reshape(1, 16, 16).astype(np.float64)
    k = round(0.4 * 256)
    morf = removal_masks(torch.from_numpy(values), 0.4, "morf")[0].numpy()
    lerf = removal_masks(torch.from_numpy(values), 0.4, "lerf")[0].numpy()
    np.testing.assert_array_equal(morf, values[0] >= 256 - k)  # values are 0..255, each once
    np.testing.assert_array_equal(lerf, values[0] < k)


def test_relu_map_with_ties_removes_exact_counts_within_the_tie():
    # Half the map is exactly zero (as after a ReLU), the other half distinct positives.
    values = torch.zeros(1, 10, 10, dtype=torch.float64)
    values[0, 5:] = torch.arange(1, 51, dtype=torch.float64).reshape(5, 10)
    lerf = removal_masks(values, 0.3, "lerf")[0]
    morf = removal_masks(values, 0.7, "morf")[0]
    assert lerf.sum() == 30 and not lerf[5:].any()
    assert morf.sum() == 70 and morf[5:].all()
    # the 20 tied zeros MoRF takes are the first ones in raster order
    assert morf[:2].all() and not morf[2:5].any()


def test_road_imputes_exactly_round_f_hw_pixels_even_when_the_map_ties(monkeypatch):
    counts = []
    real = road_module.noisy_linear_impute

    def spy(image, removed, **kwargs):
        counts.append(int(removed.sum()))
        return real(image, removed, **kwargs)

    monkeypatch.setattr(road_module, "noisy_linear_impute", spy)
    inputs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    road_curves(TinyNet().eval(), inputs, torch.zeros(2, 16, 16), torch.tensor([0, 2]), fractions=(0.3, 0.55))
    # per image: MoRF 0.3, 0.55 then LeRF 0.3, 0.55
    assert counts == [77, 141, 77, 141] * 2


# --- ROAD curves -----------------------------------------------------------------------------------------


def test_constant_image_gives_flat_curves_and_zero_combined_score():
    inputs = torch.full((2, 3, 16, 16), 0.6)
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    model = TinyNet().eval()
    result = road_curves(model, inputs, maps, torch.tensor([1, 2]), noise=0.0)
    with torch.no_grad():
        base = torch.softmax(model(inputs).double(), dim=1)[[0, 1], [1, 2]]
    torch.testing.assert_close(result.base, base, rtol=0, atol=1e-12)
    assert result.morf.shape == result.lerf.shape == (2, 9)
    torch.testing.assert_close(result.morf, base[:, None].expand(2, 9), rtol=0, atol=1e-7)
    torch.testing.assert_close(result.lerf, base[:, None].expand(2, 9), rtol=0, atol=1e-7)
    torch.testing.assert_close(result.combined, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-7)


def test_closed_form_model_gives_hand_computed_probabilities():
    background = 0.2
    pixels = [(1, 1), (4, 5), (6, 2)]  # no two are neighbours, so each is imputed from background alone
    values = [2.0, 1.5, -1.0]
    weights = [1.0, 2.0, 0.5]
    bias0 = 0.3
    image = torch.full((3, 8, 8), background, dtype=torch.float64)
    saliency = torch.zeros(8, 8, dtype=torch.float64)
    for (y, x), value, rank in zip(pixels, values, (3.0, 2.0, 1.0), strict=True):
        image[0, y, x] = value
        saliency[y, x] = rank
    fractions = (1 / 64, 2 / 64, 3 / 64, 10 / 64, 0.5)  # k = 1, 2, 3, 10, 32

    def p1(v: list[float]) -> float:
        return 1 / (1 + math.exp(-(sum(w * x for w, x in zip(weights, v, strict=True)) - bias0)))

    # MoRF removes pixel 1, then 2, then 3, then background; every removed pixel is imputed to the
    # background value (all its kept neighbours hold it). LeRF never reaches the three pixels.
    base = p1(values)
    morf1 = [
        p1([background, values[1], values[2]]),
        p1([background, background, values[2]]),
        p1([background] * 3),
        p1([background] * 3),
        p1([background] * 3),
    ]
    model = PixelLogit(pixels, weights, bias0)
    inputs = image[None].expand(2, 3, 8, 8)
    maps = saliency[None].expand(2, 8, 8)
    result = road_curves(
        model, inputs, maps, torch.tensor([1, 0]), fractions=fractions, noise=0.0, batch_size=4
    )
    assert isinstance(result, RoadResult) and result.fractions == fractions
    expected_morf = torch.tensor([morf1, [1 - p for p in morf1]], dtype=torch.float64)
    expected_base = torch.tensor([base, 1 - base], dtype=torch.float64)
    torch.testing.assert_close(result.base, expected_base, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.morf, expected_morf, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.lerf, expected_base[:, None].expand(2, 5), rtol=0, atol=1e-12)
    morf_mean = sum(morf1) / 5
    torch.testing.assert_close(
        result.morf_mean, torch.tensor([morf_mean, 1 - morf_mean], dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(result.lerf_mean, expected_base, rtol=0, atol=1e-12)
    combined = (base - morf_mean) / 2  # mean_f (LeRF - MoRF) / 2 with LeRF = base
    torch.testing.assert_close(
        result.combined, torch.tensor([combined, -combined], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_lerf_imputation_is_scored_on_the_imputed_image():
    # A model reading one pixel that LeRF removes: its probability must follow the dense reference.
    rng = np.random.default_rng(4)
    image = rng.normal(size=(3, 6, 7))
    saliency = rng.permutation(42).reshape(6, 7).astype(np.float64)
    pixel = tuple(int(i) for i in np.argwhere(saliency == 0)[0])  # the first pixel LeRF removes
    model = PixelLogit([pixel], [1.5], 0.0)
    fraction = 0.25  # k = round(10.5) = 10
    removed = saliency < round(fraction * 42)
    expected = dense_impute(image, removed)[0][pixel]
    result = road_curves(
        model,
        torch.from_numpy(image)[None],
        torch.from_numpy(saliency)[None],
        torch.tensor([1]),
        fractions=(fraction,),
        noise=0.0,
    )
    torch.testing.assert_close(
        result.lerf[0, 0], torch.tensor(1 / (1 + math.exp(-1.5 * expected)), dtype=torch.float64)
    )
    removed_morf = saliency >= 42 - 10
    morf_value = dense_impute(image, removed_morf)[0][pixel]
    assert morf_value == image[0][pixel]  # MoRF keeps the pixel
    torch.testing.assert_close(
        result.morf[0, 0], torch.tensor(1 / (1 + math.exp(-1.5 * morf_value)), dtype=torch.float64)
    )


def test_seed_makes_noisy_results_reproducible():
    inputs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2))
    model = TinyNet().eval()
    kwargs = dict(fractions=(0.2, 0.6), noise=0.5)
    first = road_curves(model, inputs, maps, [0, 1], seed=3, **kwargs)
    second = road_curves(model, inputs, maps, [0, 1], seed=3, batch_size=3, **kwargs)
    third = road_curves(model, inputs, maps, [0, 1], seed=4, **kwargs)
    assert torch.equal(first.morf, second.morf) and torch.equal(first.lerf, second.lerf)
    assert not torch.equal(first.morf, third.morf)
    assert torch.equal(first.base, third.base)


def test_model_is_left_exactly_as_found():
    model = TinyNet().train()
    model.conv.bias.requires_grad_(False)
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.grad = torch.randn_like(param)
            grads[name] = (param.grad, param.grad.clone())
    calls = []
    handle = model.conv.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    flags = {name: m.training for name, m in model.named_modules()}
    running = model.bn.running_mean.clone()
    inputs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    trained = road_curves(model, inputs, maps, [0, 1, 2], fractions=(0.3, 0.7), noise=0.0, batch_size=4)

    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(flags.values())
    assert sum(calls) == 3 * (1 + 2 * 2)  # the hook stayed registered and saw every scored image
    assert handle.id in model.conv._forward_hooks
    assert not model.conv.bias.requires_grad and model.conv.bias.grad is None
    for name, param in model.named_parameters():
        if name in grads:
            assert param.requires_grad
            assert param.grad is grads[name][0] and torch.equal(param.grad, grads[name][1])
    assert torch.equal(model.bn.running_mean, running)  # BatchNorm ran in eval mode
    # dropout was off: the same numbers as with the model in eval mode
    evaluated = road_curves(
        model.eval(), inputs, maps, [0, 1, 2], fractions=(0.3, 0.7), noise=0.0, batch_size=4
    )
    assert torch.equal(trained.morf, evaluated.morf) and torch.equal(trained.base, evaluated.base)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(inputs=torch.rand(3, 8, 8)), r"inputs must be a floating \(B,C,H,W\) tensor"),
        (dict(maps=torch.rand(2, 4, 4)), r"maps must be \(B,H,W\) = \(2, 8, 8\).*upsample"),
        (dict(maps=torch.rand(2, 1, 8, 8)), r"maps must be a real \(B,H,W\) tensor"),
        (dict(maps=torch.full((2, 8, 8), math.nan)), "maps must be finite"),
        (dict(targets=torch.tensor([0, 1, 2])), r"targets must be \(B,\) = \(2,\)"),
        (dict(targets=torch.tensor([0.0, 1.0])), "targets must be integer class ids"),
        (dict(targets=torch.tensor([0, -1])), "targets must be class ids >= 0"),
        (dict(fractions=(0.0, 0.5)), "fractions: each must be a number strictly between 0 and 1"),
        (dict(fractions=(0.5, 1.0)), "fractions: each must be"),
        (dict(fractions=(1.5,)), "fractions: each must be"),
        (dict(fractions=()), "fractions must be a non-empty sequence"),
        (dict(fractions=0.5), "fractions must be a non-empty sequence"),
        (dict(fractions=(0.995,)), "removes all 64 pixels of a 8x8 image"),
        (dict(noise=-1.0), "noise must be a finite number >= 0"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_road_rejects_bad_inputs(change, match):
    args = dict(inputs=torch.rand(2, 3, 8, 8), maps=torch.rand(2, 8, 8), targets=torch.tensor([0, 1]))
    options = {key: value for key, value in change.items() if key not in args}
    args.update({key: value for key, value in change.items() if key in args})
    with pytest.raises(GradCAMError, match=match):
        road_curves(TinyNet(), args["inputs"], args["maps"], args["targets"], **options)


def test_removal_masks_rejects_bad_order_and_fraction():
    with pytest.raises(GradCAMError, match="order must be one of morf, lerf"):
        removal_masks(torch.zeros(1, 4, 4), 0.5, "random")
    with pytest.raises(GradCAMError, match="fraction: each must be a number strictly between 0 and 1"):
        removal_masks(torch.zeros(1, 4, 4), 1.0, "morf")
