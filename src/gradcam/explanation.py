"""The result of explaining a batch: raw maps at the layer's resolution and their derived views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F

from gradcam.errors import GradCAMError


def upsample(raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear (2-D ``size`` (H, W)) or trilinear (3-D ``size`` (T, H, W)) upsampling,
    align_corners=False, of (..., h, w) or (..., t, h, w) maps."""
    dims = len(size)
    leading = raw.shape[:-dims]
    flat = raw.reshape(-1, 1, *raw.shape[-dims:])
    mode = "bilinear" if dims == 2 else "trilinear"
    resized = F.interpolate(flat, size=tuple(size), mode=mode, align_corners=False)
    return resized.reshape(*leading, *size)


def normalise(maps: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Divide each map (its last ``dims`` axes: (H, W), or (T, H, W) for a clip) by its own maximum; an
    all-zero map stays zero (never NaN)."""
    peak = maps.flatten(-dims).amax(dim=-1).clamp_min(0)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps / scale[(...,) + (None,) * dims]


@dataclass(frozen=True)
class Placement:
    """Where each image of a batch lies on the canvas the layers saw.

    A torchvision detector (``GeneralizedRCNNTransform``) resizes image b from its own (H_b, W_b) to
    ``placed[b]`` = (h_b, w_b) and pads the batch, top-left aligned, to one ``canvas`` (H_c, W_c). A map on
    the canvas grid goes back to image b by the detector's resize undone: upsampled to the canvas,
    cropped to [0, h_b) x [0, w_b), resized to (H_b, W_b) (bilinear, align_corners=False).
    """

    canvas: tuple[int, int]
    placed: tuple[tuple[int, int], ...]
    sizes: tuple[tuple[int, int], ...]

    def image_map(self, raw: torch.Tensor, index: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(..., H, W) image ``index``'s part of canvas maps (..., h, w), at ``size`` (default: its own)."""
        height, width = self.placed[index]
        on_canvas = upsample(raw, self.canvas)[..., :height, :width]
        return upsample(on_canvas, tuple(size or self.sizes[index]))


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
            ReLU(sum_k alpha_k^c A^k)); T the shape of ``targets``. For clips (B, C, T, H, W) it is
            (*T, t, h, w), on the layer's time and space grid.
        targets: (*T) class index (or label) explained; -1 for a target function naming none.
        scores: (*T) the target's score y^c (a classifier's pre-softmax score).
        probs: (*T) the target's softmax (sigmoid) probability; NaN where the target has none.
        layer: qualified name of the explained module.
        method: the method's name, e.g. "gradcam".
        logits: (B, classes) the model's pre-softmax output for the batch; None when the model is no
            classifier (a segmenter, a detector, an embedding model).
        input_size: (H, W) of the explained inputs, (T, H, W) for clips; None for a list of images of
            their own sizes (a detector's), whose ``placement`` says where each lies on the layer's grid.
        placement: for a detector's list of images, where each lies on the canvas its layers saw.
    """

    raw: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    layer: str
    method: str
    logits: torch.Tensor | None = None
    input_size: tuple[int, ...] | None = None
    placement: Placement | None = None

    @property
    def dims(self) -> int:
        """The maps' spatial axes: 2 for images, 3 for clips."""
        return len(self.input_size) if self.input_size is not None else 2

    @cached_property
    def maps(self) -> torch.Tensor:
        """(*T, H, W) (clips: (*T, T, H, W)): ``raw`` upsampled (bi- or trilinearly) to ``input_size``,
        each map divided by its own maximum (a clip's over all its frames). For a detector's images,
        each image's map on its own pixels (see :class:`Placement`); refused when their sizes differ
        (use :meth:`image_maps`). Computed on first access (for all 1000 classes it is large)."""
        if self.placement is not None:
            sizes = set(self.placement.sizes)
            if len(sizes) > 1:
                raise GradCAMError(
                    "the images have different sizes, so their maps do not stack; use image_maps(b) "
                    "or map_at(n, b, size)"
                )
            return torch.stack([self.image_maps(b) for b in range(len(self))], dim=-3)
        return self.maps_at(self.input_size or tuple(self.raw.shape[-self.dims :]))

    def image_maps(self, row: int) -> torch.Tensor:
        """(*N, H_b, W_b): image ``row``'s maps on its own pixels, each divided by its maximum."""
        raw = self.raw[(slice(None),) * (self.targets.dim() - 1) + (row,)]
        if self.placement is None:
            return normalise(upsample(raw, self.input_size or tuple(raw.shape[-2:])), self.dims)
        return normalise(self.placement.image_map(raw, row))

    def maps_at(self, size: tuple[int, ...]) -> torch.Tensor:
        """(*T, H, W): ``raw`` upsampled to ``size`` = (H, W) (clips: (T, H, W)) in one step (the size a
        picture is drawn at), each map divided by its own maximum. Not cached."""
        if self.placement is not None:
            per_image = [self.placement.image_map(self.raw[..., b, :, :], b, size) for b in range(len(self))]
            return normalise(torch.stack(per_image, dim=-3))
        return normalise(upsample(self.raw, tuple(size)), len(size))

    def map_at(self, n: int, row: int, size: tuple[int, ...]) -> torch.Tensor:
        """(H, W) (clips: (T, H, W)): class n of image ``row`` of an (N,B) explanation, as
        :meth:`maps_at` gives it for all, computing that one map only."""
        if self.placement is not None:
            return normalise(self.placement.image_map(self.raw[n, row], row, size))
        return normalise(upsample(self.raw[n, row], tuple(size)), len(size))

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
        """Each map's maximum location as (row, column) in input pixels (clips: (frame, row, column)):
        shape (..., 2) or (..., 3), long."""
        maps = self.maps
        flat = maps.flatten(-self.dims).argmax(dim=-1)
        return torch.stack(torch.unravel_index(flat, tuple(maps.shape[-self.dims :])), dim=-1)


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
