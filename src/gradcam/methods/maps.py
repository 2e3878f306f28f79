"""Maps that know nothing about the model: the baselines an explanation method has to beat.

- ``random``: i.i.d. Uniform(0, 1) values on a grid 1/32 of the input's size (the grid of a typical last
  convolutional layer), upsampled bilinearly by the evaluation like any CAM. A random map as smooth as a
  CAM, so that a method beating it beats chance on the same footing (a per-pixel noise map would instead
  lose every perturbation metric to its salt-and-pepper pattern).
- ``center``: the centre prior, a centred Gaussian exp(-((y-c_y)^2 / (2 (s H)^2) + (x-c_x)^2 / (2 (s W)^2)))
  with s = 0.25, evaluated at pixel centres. Photographers centre objects; a method must beat that.
- ``sobel``: the Sobel gradient magnitude sqrt(S_x^2 + S_y^2) of the picture's luma
  Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), an edge detector (Adebayo et al., NeurIPS 2018, show
  that some saliency methods are indistinguishable from it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

#: The random baseline's grid is the input size divided by this (rounded up).
RANDOM_GRID_STRIDE = 32
#: The centre prior's standard deviation as a fraction of the image's height and width.
CENTER_SIGMA = 0.25
_LUMA = (0.299, 0.587, 0.114)


def random_map(batch: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(batch, ceil(H/32), ceil(W/32)) i.i.d. Uniform(0, 1) maps, to be upsampled to ``size`` (H, W)."""
    grid = (math.ceil(size[0] / RANDOM_GRID_STRIDE), math.ceil(size[1] / RANDOM_GRID_STRIDE))
    return torch.rand(batch, *grid, generator=generator, dtype=torch.float64).float()


def center_map(batch: int, size: tuple[int, int], sigma: float = CENTER_SIGMA) -> torch.Tensor:
    """(batch, H, W) centred Gaussian prior with standard deviations sigma*H and sigma*W; peak 1."""
    height, width = size
    rows = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / (sigma * height)
    cols = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / (sigma * width)
    prior = torch.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2))
    return prior.float().expand(batch, height, width).clone()


def sobel_map(pictures: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Sobel gradient magnitude of the luma of RGB ``pictures`` (B,3,H,W) with values in [0, 1]
    (the picture the model sees, before normalisation). Borders use reflection (scipy's default)."""
    weights = torch.tensor(_LUMA, dtype=torch.float64)
    luma = torch.einsum("bchw,c->bhw", pictures.detach().double().cpu(), weights).numpy()
    # One image at a time: on a stacked array ndimage.sobel would also smooth across the batch axis.
    edges = [np.hypot(ndimage.sobel(image, axis=1), ndimage.sobel(image, axis=0)) for image in luma]
    return torch.from_numpy(np.stack(edges)).float()


def unnormalise(inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The [0, 1] picture behind normalised model inputs: x * std + mean per channel."""
    m = torch.tensor(mean, dtype=inputs.dtype, device=inputs.device)[:, None, None]
    s = torch.tensor(std, dtype=inputs.dtype, device=inputs.device)[:, None, None]
    return inputs * s + m


# The registry's model-free baselines, behind one signature: (inputs (B,C,H,W) normalised as the model
# takes them, their normalisation, a seeded generator) -> maps (B,h,w).


def random_baseline(
    inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """:func:`random_map` for ``inputs``."""
    return random_map(len(inputs), (inputs.shape[2], inputs.shape[3]), generator)


def center_baseline(
    inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """:func:`center_map` for ``inputs``."""
    return center_map(len(inputs), (inputs.shape[2], inputs.shape[3]))


def sobel_baseline(
    inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """:func:`sobel_map` of the picture behind ``inputs``."""
    return sobel_map(unnormalise(inputs, mean, std))
