"""Argument checks for the metrics of batches of maps: maps (B,H,W), masks (B,H,W), counts and seeds.

Each failure is one GradCAMError line naming the argument and what was expected.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from gradcam.errors import GradCAMError


def map_batch(maps: object, name: str = "maps") -> torch.Tensor:
    """``maps`` as a float64 CPU tensor (B,H,W): non-empty, real, finite; else a GradCAMError."""
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(maps)
    if not isinstance(maps, torch.Tensor):
        raise GradCAMError(f"{name} must be a (B,H,W) tensor, got {type(maps).__name__}")
    if maps.dim() != 3 or maps.numel() == 0:
        raise GradCAMError(f"{name} must be a non-empty (B,H,W) tensor, got shape {tuple(maps.shape)}")
    if maps.is_complex() or maps.dtype == torch.bool:
        raise GradCAMError(f"{name} must hold real numbers, got dtype {maps.dtype}")
    maps = maps.detach().to("cpu", torch.float64)
    if not torch.isfinite(maps).all():
        raise GradCAMError(f"{name} holds NaN or infinite values")
    return maps


def mask_batch(masks: object, shape: tuple[int, ...], name: str = "masks") -> torch.Tensor:
    """``masks`` as a bool CPU tensor of ``shape`` (B,H,W), each with at least one True pixel."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        kind = f"dtype {masks.dtype}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise GradCAMError(f"{name} must be a bool (B,H,W) tensor, got {kind}")
    if tuple(masks.shape) != tuple(shape):
        raise GradCAMError(f"{name} must have the maps' shape {tuple(shape)}, got {tuple(masks.shape)}")
    masks = masks.detach().cpu()
    empty = torch.nonzero(~masks.flatten(1).any(dim=1)).flatten()
    if len(empty):
        raise GradCAMError(f"{name}[{int(empty[0])}] is empty; expected at least one True pixel per image")
    return masks


def positive_int(value: object, name: str, *, most: int | None = None) -> int:
    """``value`` as an int in 1..``most`` (no bound when None), else a GradCAMError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise GradCAMError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:
        raise GradCAMError(f"{name} must be at most {most}, got {value}")
    return int(value)


def numpy_rng(seed: object) -> np.random.RandomState:
    """A private NumPy RandomState (Mersenne Twister, the legacy stream ``np.random.seed`` also sets)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise GradCAMError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return np.random.RandomState(int(seed))
