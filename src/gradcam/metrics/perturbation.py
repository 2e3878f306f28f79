r"""Deletion and insertion curves (Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for
Explanation of Black-box Models", BMVC 2018).

Pixels are ranked by saliency, most salient first (a stable sort: ties keep raster order). With
S steps and n_i = round(i H W / S) pixels at step i = 0..S:

- deletion: start from the image and replace its n_i most salient pixels with the baseline (RISE: zeros
  of the model's input, i.e. the normalisation mean); a faithful map makes the probability fall fast;
- insertion: start from the baseline (RISE: the image blurred with a Gaussian, kernel 11, sigma 5) and
  put back the n_i most salient pixels of the image; a faithful map makes it rise fast.

The curve is the target's softmax probability p_i against the fraction x_i = n_i / (H W); its area is
the trapezoid rule sum_i (x_{i+1} - x_i) (p_i + p_{i+1}) / 2. Lower deletion AUC and higher insertion
AUC are better. RISE's default is one image row of pixels per step (S = H); pass ``steps`` to trade
resolution for speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from gradcam.errors import GradCAMError
from gradcam.metrics.scoring import DEFAULT_BATCH_SIZE, score_stream
from gradcam.models.base import model_device

#: RISE's blur for the insertion baseline.
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

Baseline = str | float | torch.Tensor


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve per image: ``probabilities`` (B, S+1) against ``fractions`` (S+1,)."""

    kind: str
    fractions: torch.Tensor
    probabilities: torch.Tensor

    @property
    def auc(self) -> torch.Tensor:
        """(B,) trapezoid-rule area under each image's curve, in [0, 1]."""
        return torch.trapezoid(self.probabilities, self.fractions, dim=-1)


def salience_order(maps: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """(B, H*W) raster indices of each map's pixels, most salient first (``descending``) or least salient
    first. Stable: equal values keep raster order (the earlier pixel first, in both orders), so removing
    the first k pixels removes exactly k even when the map has ties."""
    flat = maps.flatten(1)
    return torch.argsort(-flat if descending else flat, dim=1, stable=True)


def salience_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) long: each pixel's position in :func:`salience_order` (0 = most salient)."""
    flat = maps.flatten(1)
    order = salience_order(maps)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks.reshape(maps.shape)


def pixel_counts(pixels: int, steps: int) -> torch.Tensor:
    """n_i = round(i * pixels / steps) for i = 0..steps (n_0 = 0, n_S = pixels)."""
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long()


def baseline_image(inputs: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The image that removed pixels take their values from: "zero", "blur", a number, or a tensor
    broadcastable to ``inputs`` (B,C,H,W)."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros_like(inputs)
        if baseline == "blur":
            if min(inputs.shape[-2:]) <= BLUR_KERNEL // 2:
                raise GradCAMError(
                    f"the 'blur' baseline needs images larger than {BLUR_KERNEL // 2} pixels a side, got "
                    f"{tuple(inputs.shape[-2:])}"
                )
            # Borders are reflected; RISE's own code pads with zeros, which darkens the frame's edge.
            return TF.gaussian_blur(inputs, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
        raise GradCAMError(f"baseline must be 'zero', 'blur', a number or a tensor; got {baseline!r}")
    if isinstance(baseline, (int, float)):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs.device, inputs.dtype), inputs.shape).clone()
        except RuntimeError:
            raise GradCAMError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' "
                f"{tuple(inputs.shape)}"
            ) from None
    raise GradCAMError(
        f"baseline must be 'zero', 'blur', a number or a tensor; got {type(baseline).__name__}"
    )


def check_batch(inputs: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if inputs.dim() != 4:
        raise GradCAMError(f"inputs must be (B,C,H,W), got shape {tuple(inputs.shape)}")
    if maps.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise GradCAMError(
            f"maps must be (B,H,W) = {(inputs.shape[0], *inputs.shape[2:])} like the inputs, "
            f"got {tuple(maps.shape)}; upsample them to the input size first"
        )
    targets = torch.as_tensor(targets).reshape(-1)
    if targets.numel() != inputs.shape[0]:
        raise GradCAMError(
            f"targets must hold one class per image ({inputs.shape[0]}), got {targets.numel()}"
        )
    return targets.long()


def _curve(
    kind: str,
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    steps: int | None,
    baseline: Baseline,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
    unperturbed: torch.Tensor | None,
) -> Curve:
    targets = check_batch(inputs, maps, targets)
    batch, _, height, width = inputs.shape
    steps = height if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GradCAMError(f"steps must be a positive integer, got {steps!r}")
    device = model_device(model)
    inputs = inputs.detach().to(device)
    ranks = salience_ranks(maps.detach().to(device))
    fill = baseline_image(inputs, baseline)
    counts = pixel_counts(height * width, steps).to(device)
    # Deletion's first image and insertion's last are the inputs themselves: reuse known scores.
    skip = None if unperturbed is None else (0 if kind == "deletion" else steps)
    scored = counts if skip is None else torch.cat([counts[:skip], counts[skip + 1 :]])

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(batch):
            for start in range(0, len(scored), batch_size):
                n = scored[start : start + batch_size]
                chosen = (ranks[b] < n[:, None, None])[:, None]  # (k,1,H,W) the n_i most salient
                if kind == "deletion":
                    x = torch.where(chosen, fill[b], inputs[b])
                else:
                    x = torch.where(chosen, inputs[b], fill[b])
                yield x, targets[b].expand(len(n))

    probs = score_stream(model, images(), batch_size=batch_size, on_batch=on_batch).reshape(batch, -1)
    if skip is not None:
        known = torch.as_tensor(unperturbed, dtype=torch.float64).reshape(batch, 1).cpu()
        probs = torch.cat([probs[:, :skip], known, probs[:, skip:]], dim=1)
    fractions = counts.cpu().double() / (height * width)
    return Curve(kind, fractions, probs)


def deletion(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    steps: int | None = None,
    baseline: Baseline = "zero",
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    unperturbed: torch.Tensor | None = None,
) -> Curve:
    """RISE's deletion curve of each image (module docstring). ``inputs`` (B,C,H,W) as the model takes
    them, ``maps`` (B,H,W) at the input's size, ``targets`` (B,) classes. ``unperturbed`` (B,): the
    targets' probabilities on the inputs when already known (the same for every method), else scored.
    The model is left as found."""
    return _curve(
        "deletion", model, inputs, maps, targets, steps, baseline, batch_size, on_batch, unperturbed
    )


def insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    steps: int | None = None,
    baseline: Baseline = "blur",
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    unperturbed: torch.Tensor | None = None,
) -> Curve:
    """RISE's insertion curve of each image (module docstring); arguments as :func:`deletion`."""
    return _curve(
        "insertion", model, inputs, maps, targets, steps, baseline, batch_size, on_batch, unperturbed
    )
