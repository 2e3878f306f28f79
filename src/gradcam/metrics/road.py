"""ROAD, RemOve And Debias: a perturbation metric whose removed pixels are imputed, not blacked out.

Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022 (arXiv:2202.00449).

Deleting pixels by setting them to a constant leaks the shape of the removed region to the model (the
"class information leakage" of the paper), so MoRF and LeRF curves then rank explanations inconsistently.
ROAD fills the removed pixels with the *noisy linear imputation*: each removed pixel i takes the weighted
average of its in-image 8-neighbours j,

    W_i x_i = sum_j w_ij x_j,      w_ij = 1/6 (up, down, left, right),  1/12 (the 4 diagonals),
    W_i = sum_j w_ij               (the weights of the neighbours that lie inside the image),

where a kept neighbour contributes its value and a removed one is another unknown. Together these are one
sparse linear system A x = b per image (A is the weighted graph Laplacian of the removed pixels with the
kept ones as boundary, symmetric positive definite as soon as one pixel is kept), solved for all channels
at once. Then x_i += noise * N(0, 1) on the imputed pixels only.

For each image, fraction f and order, exactly k = round(f H W) pixels (Python's round, half to even) are
removed and the model scores the imputed image with p = softmax(f(x~))[t]:

- MoRF (most relevant first): the k highest-ranked pixels; a good map makes p fall fast (low is good).
- LeRF (least relevant first): the k lowest-ranked pixels; a good map keeps p high (high is good).
- combined = mean_f (LeRF(f) - MoRF(f)) / 2, the ROAD authors' single score (high is good).

Pixels are ranked by a *stable* sort of the map values, ties broken by raster index (row-major, the
earlier pixel first, in both orders), so that exactly k pixels go even when the map has ties, e.g. the
zeros of a ReLU-ed CAM; the removed sets are nested across fractions. pytorch-grad-cam's ROAD instead
thresholds the map at a percentile, which removes too many or too few pixels when the map has ties.
Imputation works on the model inputs as given (normalised tensors), in float64 on the CPU.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.metrics.perturbation import salience_order
from gradcam.metrics.scoring import DEFAULT_BATCH_SIZE, score_stream

#: The ROAD paper's fractions of removed pixels.
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Standard deviation of the Gaussian noise added to imputed pixels (the ROAD authors' default).
DEFAULT_NOISE = 0.01
#: (dy, dx, weight) of the 8 neighbours in the imputation: 1/6 direct, 1/12 diagonal.
NEIGHBOURS = (
    (-1, 0, 1 / 6),
    (1, 0, 1 / 6),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (-1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (1, 1, 1 / 12),
)
ORDERS = ("morf", "lerf")


def noisy_linear_impute(
    image: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = DEFAULT_NOISE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels of ``image``.

    Args:
        image: (C,H,W) floating tensor.
        removed: (H,W) bool tensor, True where a pixel (all its channels) is removed.
        noise: standard deviation of the Gaussian noise added to each imputed value (0: none).
        generator: the torch.Generator the noise is drawn from (None: torch's global one).

    Each removed pixel i solves W_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij x_j over its
    in-image 8-neighbours j, w_ij = 1/6 for the 4 direct and 1/12 for the 4 diagonal neighbours,
    W_i = sum_j w_ij: the imputed value is the weighted average of its neighbours (Rong et al., ICML 2022).
    The sparse system is built from index arrays and solved once for all C channels (LU, float64); then
    noise * N(0, 1) is added to the imputed values. Kept pixels are returned unchanged, in a new tensor
    of the input's dtype and device.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise GradCAMError(f"image must be a floating (C,H,W) tensor, got {_describe(image)}")
    if not isinstance(removed, torch.Tensor) or removed.dtype != torch.bool:
        raise GradCAMError(f"removed must be a bool (H,W) tensor, got {_describe(removed)}")
    channels, height, width = image.shape
    if tuple(removed.shape) != (height, width):
        raise GradCAMError(
            f"removed must have the image's (H,W) = {(height, width)}, got {tuple(removed.shape)}"
        )
    _check_noise(noise)
    mask = removed.detach().cpu().numpy().reshape(-1)
    unknown = np.flatnonzero(mask)
    if unknown.size == 0:
        return image.clone()
    if unknown.size == mask.size:
        raise GradCAMError("cannot impute an image with every pixel removed")

    values = image.detach().cpu().double().reshape(channels, -1).numpy().copy()
    solved = _solve_neighbour_average(values, unknown, height, width)
    if noise > 0:
        device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.randn(solved.shape, generator=generator, dtype=torch.float64, device=device)
        solved = solved + noise * draws.cpu().numpy()
    values[:, unknown] = solved.T
    out = torch.from_numpy(values).reshape(channels, height, width)
    return out.to(dtype=image.dtype, device=image.device)


def _solve_neighbour_average(values: np.ndarray, unknown: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,C) solution of the imputation system for the raster indices ``unknown`` (N,) of ``values``
    (C,H*W); at least one pixel must be known, which makes the matrix symmetric positive definite."""
    n = unknown.size
    position = np.full(height * width, -1, dtype=np.int64)
    position[unknown] = np.arange(n)
    ys, xs = np.divmod(unknown, width)
    diagonal = np.zeros(n)
    rhs = np.zeros((n, values.shape[0]))
    rows, cols, data = [np.arange(n)], [np.arange(n)], []
    for dy, dx, weight in NEIGHBOURS:  # 8 offsets; each step handles every removed pixel at once
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        i = np.flatnonzero(inside)  # rows are unique within one offset, so += below does not collide
        j = ny[inside] * width + nx[inside]
        diagonal[i] += weight
        column = position[j]
        is_unknown = column >= 0
        rows.append(i[is_unknown])
        cols.append(column[is_unknown])
        data.append(np.full(int(is_unknown.sum()), -weight))
        rhs[i[~is_unknown]] += weight * values[:, j[~is_unknown]].T
    data.insert(0, diagonal)
    matrix = sparse.coo_matrix(
        (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    return sparse_linalg.splu(matrix.tocsc()).solve(rhs)


def removal_masks(maps: torch.Tensor, fraction: float, order: str) -> torch.Tensor:
    """(B,H,W) bool masks of the round(fraction * H * W) pixels ``order`` removes from each map (B,H,W).

    "morf" takes the highest map values, "lerf" the lowest; a stable sort breaks ties by raster index
    (the earlier pixel first, in both orders), so the count is exact even when the map has ties.
    """
    maps = _check_maps(maps)
    _check_fraction(fraction, "fraction")
    if order not in ORDERS:
        raise GradCAMError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    batch, height, width = maps.shape
    count = round(fraction * height * width)
    ranking = _ranking(maps, order)[:, :count]
    masks = torch.zeros(batch, height * width, dtype=torch.bool)
    masks.scatter_(1, ranking, True)
    return masks.reshape(batch, height, width)


def _ranking(maps: torch.Tensor, order: str) -> torch.Tensor:
    """(B, H*W) raster indices in removal order (the same stable order as deletion's)."""
    return salience_order(maps, descending=order == "morf")


@dataclass(frozen=True)
class RoadResult:
    """ROAD curves of B images at F fractions.

    Attributes:
        fractions: the F fractions of removed pixels.
        morf: (B,F) float64, target probability with the most relevant pixels removed and imputed.
        lerf: (B,F) float64, the same with the least relevant pixels removed.
        base: (B,) float64, target probability on the unperturbed image.
    """

    fractions: tuple[float, ...]
    morf: torch.Tensor
    lerf: torch.Tensor
    base: torch.Tensor

    @property
    def morf_mean(self) -> torch.Tensor:
        """(B,) mean over fractions of the MoRF curve; lower is a better explanation."""
        return self.morf.mean(dim=1)

    @property
    def lerf_mean(self) -> torch.Tensor:
        """(B,) mean over fractions of the LeRF curve; higher is a better explanation."""
        return self.lerf.mean(dim=1)

    @property
    def combined(self) -> torch.Tensor:
        """(B,) mean over fractions of (LeRF - MoRF) / 2, the ROAD authors' combined score; higher is
        better, 0 when removing either end of the ranking changes the probability alike."""
        return ((self.lerf - self.morf) / 2).mean(dim=1)


def road_curves(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    base: torch.Tensor | None = None,
) -> RoadResult:
    """ROAD MoRF and LeRF curves (Rong et al., ICML 2022) of saliency ``maps`` for ``model``.

    Args:
        model: the classifier; left exactly as found (it is run in eval mode without grad, each
            module's flag restored; parameters, gradients and hooks are not touched).
        inputs: (B,C,H,W) model inputs (normalised tensors), on the model's device or the CPU.
        maps: (B,H,W) saliency at the inputs' resolution; higher means more relevant.
        targets: (B,) class ids.
        fractions: fractions f of pixels removed, each strictly between 0 and 1.
        noise: standard deviation of the noise added to the imputed pixels (see
            :func:`noisy_linear_impute`); 0 makes the result deterministic.
        seed: seeds the one torch.Generator all the noise is drawn from, so results are reproducible.
        batch_size: images per forward pass.
        base: (B,) the target probabilities of the unperturbed inputs when already known (they are the
            same for every method explaining these inputs); None scores them.

    For each image and fraction f, exactly k = round(f H W) pixels are removed: the k highest-ranked for
    MoRF, the k lowest for LeRF, ranked by a stable sort of the map (ties broken by raster index; unlike
    pytorch-grad-cam's percentile threshold, which removes too many or too few pixels when the map has
    ties, e.g. the zeros after a ReLU). They are imputed by :func:`noisy_linear_impute` and scored with
    softmax(f(x~))[t]. Perturbed images are generated lazily and forwarded ``batch_size`` at a time.
    """
    inputs, maps, targets, fractions = _check_road_args(inputs, maps, targets, fractions, noise, batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    rankings = {order: _ranking(maps, order) for order in ORDERS}
    height, width = maps.shape[1:]
    counts = [round(f * height * width) for f in fractions]

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(inputs)):
            target = targets[b : b + 1]
            if base is None:
                yield inputs[b : b + 1], target
            for order in ORDERS:
                for count in counts:
                    removed = torch.zeros(height * width, dtype=torch.bool)
                    removed[rankings[order][b, :count]] = True
                    imputed = noisy_linear_impute(
                        inputs[b], removed.reshape(height, width), noise=noise, generator=generator
                    )
                    yield imputed[None], target

    probabilities = score_stream(model, images(), batch_size=batch_size)
    per_image = probabilities.reshape(len(inputs), -1)
    if base is not None:
        known = torch.as_tensor(base, dtype=torch.float64).reshape(-1).cpu()
        per_image = torch.cat([known[:, None], per_image], dim=1)
    curves = per_image[:, 1:].reshape(len(inputs), 2, len(fractions))
    return RoadResult(
        fractions=fractions,
        morf=curves[:, 0].clone(),
        lerf=curves[:, 1].clone(),
        base=per_image[:, 0].clone(),
    )


def _check_road_args(
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    fractions: Sequence[float],
    noise: float,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, ...]]:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        raise GradCAMError(f"inputs must be a floating (B,C,H,W) tensor, got {_describe(inputs)}")
    batch, _, height, width = inputs.shape
    maps = _check_maps(maps)
    if tuple(maps.shape) != (batch, height, width):
        raise GradCAMError(
            f"maps must be (B,H,W) = {(batch, height, width)} to match inputs (upsample them to the "
            f"input's size first), got {tuple(maps.shape)}"
        )
    try:
        targets = torch.as_tensor(targets).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise GradCAMError(f"targets must be (B,) class ids, got {type(targets).__name__}") from error
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise GradCAMError(f"targets must be integer class ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != (batch,):
        raise GradCAMError(f"targets must be (B,) = ({batch},) to match inputs, got {tuple(targets.shape)}")
    if (targets < 0).any():
        raise GradCAMError(f"targets must be class ids >= 0, got {targets.tolist()}")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
        raise GradCAMError(f"fractions must be a non-empty sequence of numbers in (0, 1), got {fractions!r}")
    fractions = tuple(float(f) if isinstance(f, numbers.Real) else f for f in fractions)
    for f in fractions:
        _check_fraction(f, "fractions")
        if round(f * height * width) >= height * width:
            raise GradCAMError(
                f"fractions: {f} removes all {height * width} pixels of a {height}x{width} image; "
                "use a smaller fraction or a larger image"
            )
    _check_noise(noise)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GradCAMError(f"batch_size must be a positive integer, got {batch_size!r}")
    return inputs.detach(), maps, targets.long(), fractions


def _check_maps(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` as a (B,H,W) float64 CPU tensor of finite values, or a GradCAMError."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.dtype.is_complex:
        raise GradCAMError(f"maps must be a real (B,H,W) tensor, got {_describe(maps)}")
    maps = maps.detach().cpu().double()
    if not torch.isfinite(maps).all():
        raise GradCAMError("maps must be finite, got NaN or infinite values")
    return maps


def _check_fraction(fraction: float, name: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise GradCAMError(f"{name}: each must be a number strictly between 0 and 1, got {fraction!r}")


def _check_noise(noise: float) -> None:
    number = isinstance(noise, numbers.Real) and not isinstance(noise, bool)
    if not number or not math.isfinite(noise) or noise < 0:
        raise GradCAMError(f"noise must be a finite number >= 0, got {noise!r}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
