"""The result of explaining a batch: raw maps at the layer's resolution and their derived views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def upsample(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (B,h,w) maps to (B,H,W)."""
    return F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each (H,W) map by its own maximum; an all-zero map stays zero (never NaN)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(0)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps / scale[:, None, None]


@dataclass
class Explanation:
    """Maps for a batch of B images, one target class each. Tensors are detached, on the CPU.

    Attributes:
        raw: (B,h,w) map at the layer's resolution, not normalised (for Grad-CAM,
            ReLU(sum_k alpha_k^c A^k)).
        maps: (B,H,W) ``raw`` upsampled bilinearly to the input's size, each divided by its maximum.
        targets: (B,) class index explained for each image.
        scores: (B,) the target's pre-softmax score y^c.
        probs: (B,) the target's softmax probability.
        layer: qualified name of the explained module.
        method: the method's name, e.g. "gradcam".
        logits: (B,classes) the model's pre-softmax output for the batch (one forward serves all
            targets, e.g. to read the top-k predictions).
    """

    raw: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    layer: str
    method: str
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.raw.shape[0]

    def peaks(self) -> torch.Tensor:
        """(B,2) long tensor of each map's maximum location as (row, column) in input pixels."""
        flat = self.maps.flatten(1).argmax(dim=1)
        width = self.maps.shape[2]
        return torch.stack([flat // width, flat % width], dim=1)
