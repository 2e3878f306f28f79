r"""Average Drop %, Increase in Confidence % and Win % (Chattopadhyay, Sarkar, Howlader and
Balasubramanian, "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional
Networks", WACV 2018, section 5.1).

The explanation map of image i is the image multiplied pixel-wise by its map upsampled to the image and
scaled to [0, 1]: E_i = L_i * I_i (black where the map is 0). With Y_i the target's softmax probability
on the image and O_i on E_i:

    Average Drop %          = 100/N  sum_i max(0, Y_i - O_i) / Y_i        (lower is better)
    Increase in Confidence % = 100/N sum_i [Y_i < O_i]                     (higher is better)
    Win % of method a over b = 100/N sum_i [drop_i(a) < drop_i(b)],  drop_i = max(0, Y_i - O_i) / Y_i

(a tie wins for neither, so win(a, b) + win(b, a) <= 100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.metrics.perturbation import check_batch
from gradcam.metrics.scoring import DEFAULT_BATCH_SIZE, target_probabilities
from gradcam.models.base import model_device


@dataclass(frozen=True)
class ConfidenceChange:
    """Y (the image) and O (the image times its map) per image, as target probabilities (B,)."""

    original: torch.Tensor
    explained: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        """(B,) max(0, Y - O) / Y (0 where Y = 0: there is no confidence to lose)."""
        lost = (self.original - self.explained).clamp_min(0)
        return torch.where(self.original > 0, lost / self.original.clamp_min(1e-300), torch.zeros_like(lost))

    @property
    def average_drop(self) -> float:
        """Average Drop %."""
        return 100.0 * float(self.drop.mean())

    @property
    def increase_in_confidence(self) -> float:
        """Increase in Confidence %."""
        return 100.0 * float((self.explained > self.original).double().mean())


def confidence_change(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    black: float | torch.Tensor = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    original: torch.Tensor | None = None,
) -> ConfidenceChange:
    """Score the images and the images times their maps.

    Args:
        inputs: (B,C,H,W) as the model takes them (normalised).
        maps: (B,H,W) at the input's size with values in [0, 1] (e.g. :attr:`Explanation.maps`).
        black: a black pixel in the model's input space, a number or a (C,) tensor: for inputs
            normalised as (x - mean) / std it is -mean / std. The explained image is
            black + maps * (inputs - black), the picture times the map before normalisation.
        original: (B,) Y when already known (it is the same for every method), else scored.
    """
    targets = check_batch(inputs, maps, targets)
    if not torch.isfinite(maps).all() or maps.min() < 0 or maps.max() > 1:
        raise GradCAMError("maps must lie in [0, 1] (divide each by its maximum)")
    device = model_device(model)
    x = inputs.detach().to(device)
    black_t = torch.as_tensor(black, dtype=x.dtype, device=device)
    if black_t.dim() == 1:
        black_t = black_t[:, None, None]
    explained = black_t + maps.detach().to(device, x.dtype)[:, None] * (x - black_t)
    if original is None:
        original = target_probabilities(model, x, targets, batch_size=batch_size)
    scored = target_probabilities(model, explained, targets, batch_size=batch_size)
    return ConfidenceChange(torch.as_tensor(original, dtype=torch.float64).reshape(-1).cpu(), scored)


def win_percentage(a: ConfidenceChange, b: ConfidenceChange) -> float:
    """Win % of method a over method b on the same images: how often a's drop is strictly smaller."""
    if a.original.shape != b.original.shape or not torch.allclose(a.original, b.original):
        raise GradCAMError("win_percentage compares two methods on the same images and classes")
    return 100.0 * float((a.drop < b.drop).double().mean())
