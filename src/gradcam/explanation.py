"""The result of explaining a batch: raw maps at the layer's resolution and their derived views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F

from gradcam.errors import GradCAMError


def upsample(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (..., h, w) maps to (..., H, W)."""
    leading = raw.shape[:-2]
    flat = raw.reshape(-1, 1, *raw.shape[-2:])
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.reshape(*leading, *size)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each (H,W) map by its own maximum; an all-zero map stays zero (never NaN)."""
    peak = maps.flatten(-2).amax(dim=-1).clamp_min(0)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps / scale[..., None, None]


@dataclass(frozen=True)
class Explanation:
    """Maps for a batch of B images; frozen. Tensors are detached, on the CPU.

    **Shape rule.** The leading shape of every per-target tensor is the shape of ``targets``, and
    ``targets`` has the shape of what the caller asked for: one class per image (``targets=None``, an
    int, B ints, a 1-D tensor) gives (B,); several classes per image (``topk=k``, ``targets="all"``, an
    (N,B) tensor, and every :func:`gradcam.pipeline.explain` result) give (N,B), row n holding every
    image's n-th class, also when N is 1. :meth:`rows` gives the (N,B) form of either.

    Attributes:
        raw: (*T, h, w) map at the layer's resolution, not normalised (for Grad-CAM,
            ReLU(sum_k alpha_k^c A^k)); T the shape of ``targets``.
        targets: (*T) class index explained.
        scores: (*T) the target's pre-softmax score y^c.
        probs: (*T) the target's softmax probability.
        layer: qualified name of the explained module.
        method: the method's name, e.g. "gradcam".
        logits: (B, classes) the model's pre-softmax output for the batch.
        input_size: (H, W) of the explained inputs.
    """

    raw: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    layer: str
    method: str
    logits: torch.Tensor | None = None
    input_size: tuple[int, int] | None = None

    @cached_property
    def maps(self) -> torch.Tensor:
        """(*T, H, W): ``raw`` upsampled bilinearly to ``input_size``, each map divided by its own
        maximum. Computed on first access (for all 1000 classes it is large)."""
        return self.maps_at(self.input_size or tuple(self.raw.shape[-2:]))

    def maps_at(self, size: tuple[int, int]) -> torch.Tensor:
        """(*T, H, W): ``raw`` upsampled bilinearly to ``size`` = (H, W) in one step (the size a picture
        is drawn at), each map divided by its own maximum. Not cached."""
        return normalise(upsample(self.raw, tuple(size)))

    def map_at(self, n: int, row: int, size: tuple[int, int]) -> torch.Tensor:
        """(H, W): class n of image ``row`` of an (N,B) explanation, as :meth:`maps_at` gives it for all
        (upsampled straight to ``size``, divided by its maximum), computing that one map only."""
        return normalise(upsample(self.raw[n, row], tuple(size)))

    def rows(self) -> Explanation:
        """This explanation with a leading (N,B) shape: itself when it has one, else N = 1."""
        if self.targets.dim() == 2:
            return self
        return replace(
            self,
            raw=self.raw[None],
            targets=self.targets[None],
            scores=self.scores[None],
            probs=self.probs[None],
        )

    def __len__(self) -> int:
        return self.targets.shape[-1]

    def peaks(self) -> torch.Tensor:
        """Each map's maximum location as (row, column) in input pixels: shape (..., 2), long."""
        flat = self.maps.flatten(-2).argmax(dim=-1)
        width = self.maps.shape[-1]
        return torch.stack([flat // width, flat % width], dim=-1)


def fuse(explanations: Sequence[Explanation]) -> Explanation:
    """One map from several layers' explanations of the same batch and targets.

    Each layer's map is upsampled to the input size and normalised (``maps``); the fused map is their
    element-wise maximum (as in LayerCAM's multi-layer fusion, Jiang et al., TIP 2021). Its ``raw`` is
    that map, at the input's resolution (so its ``maps`` is the fused map, normalised).
    """
    if not explanations:
        raise GradCAMError("fuse needs at least one explanation")
    first = explanations[0]
    for other in explanations[1:]:
        if other.maps.shape != first.maps.shape or not torch.equal(other.targets, first.targets):
            raise GradCAMError("fuse needs explanations of the same batch, targets and input size")
    fused = torch.stack([e.maps for e in explanations]).amax(dim=0)
    return replace(first, raw=fused, layer="+".join(e.layer for e in explanations))
