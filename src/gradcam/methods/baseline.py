"""Baselines that an explanation method must beat in evaluations."""

from __future__ import annotations

import torch
from torch import nn

from gradcam.layouts import LayoutSpec
from gradcam.methods.base import CAM, LayersSpec


class RandomCAM(CAM):
    r"""Random channel weights: L = ReLU( sum_k w_k A^k ),  w_k ~ Uniform(-1, 1).

    A sanity baseline (as in pytorch-grad-cam): it looks like a CAM, uses the layer's real activations,
    and knows nothing about the class. ``seed`` makes it reproducible; each call draws new weights from
    the seeded generator, so two calls on one object differ, two objects with one seed agree.
    """

    method = "randomcam"
    uses_gradients = False
    class_specific = False

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        seed: int | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(model, layer, layout=layout)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        batch, channels = activations.shape[:2]
        weights = torch.rand(batch, channels, generator=self._generator, dtype=torch.float64) * 2 - 1
        return weights.to(activations.device, activations.dtype)
