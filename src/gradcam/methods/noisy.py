r"""Noise-averaged CAM methods: Smooth Grad-CAM++, SS-CAM and IS-CAM.

Each averages its parent's channel weights over ``samples`` perturbed copies: Smooth Grad-CAM++ the
Grad-CAM++ gradient moments over noisy inputs, SS-CAM the Score-CAM score over noisy masks, IS-CAM the
Score-CAM score over masks scaled from the baseline to the full mask. The random ones take ``seed``
(default 0) and re-seed a fresh generator on every call, so two calls with the same arguments give the
same maps, on every device (the noise is drawn on the CPU in float32, then moved).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gradcam.capture import capture
from gradcam.errors import GradCAMError
from gradcam.layouts import Layout, LayoutSpec
from gradcam.methods.base import Inputs, LayersSpec
from gradcam.methods.gradient import GradCAMPlusPlus
from gradcam.methods.score import Progress, ScoreCAM
from gradcam.targets.rows import Rows


def _check_samples(samples: object) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise GradCAMError(f"samples must be a positive integer, got {samples!r}")
    return samples


def _check_std(std: object) -> float:
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std < 0:
        raise GradCAMError(f"std must be a finite number >= 0, got {std!r}")
    return float(std)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GradCAMError(f"seed must be an integer, got {seed!r}")
    return seed


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded for one call."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def plus_plus_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Smooth Grad-CAM++'s w (n,B,K) from A (B,K,h,w) and the samples' gradients G (n,S,B,K,h,w)."""
    d1, d2, d3 = (gradients.pow(p).mean(dim=-5) for p in (1, 2, 3))
    denominator = 2 * d2 + activations.sum(dim=(-2, -1), keepdim=True) * d3
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(denominator != 0, d2 / safe, torch.zeros_like(d2))
    return (alpha * torch.relu(d1)).sum(dim=(-2, -1))


class SmoothGradCAMpp(GradCAMPlusPlus):
    r"""Smooth Grad-CAM++ (Omeiza et al., "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
    Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224, 2019).

    Grad-CAM++'s closed form with SmoothGrad's averaged gradients. With g_s = dS^c/dA on the noisy copy
    X + eps_s, eps_s ~ N(0, std^2) per input element (s = 1..S, S = ``samples``), and A the activations of
    the clean image:

        D^p_{ij}    = (1/S) sum_s (g_s)_{ij}^p                         p = 1, 2, 3
        a_{ij}^{kc} = D^2_{ij} / ( 2 D^2_{ij} + sum_{a,b} A^k_{ab} D^3_{ij} )     (0 where the denominator is)
        w_k^c       = sum_{i,j} a_{ij}^{kc} ReLU(D^1_{ij})
        L^c         = ReLU( sum_k w_k^c A^k )

    ``samples=1, std=0`` is Grad-CAM++ exactly; as there, the exp(S^c) factor of the paper's Y^c is left
    out. The counterfactual map negates each g_s. The noise is drawn per call from a CPU generator
    seeded with ``seed``, as one ``torch.randn((S, *inputs.shape))`` draw (sample s is row s). Cost: S
    forwards and S backwards (each target chunk batched) besides the clean forward; the S gradients are
    kept until the moments are taken.

    Other implementations differ: torchcam (``SmoothGradCAMpp``) takes ReLU of the *last* sample's
    gradient instead of the averaged one, and weighs the activations of the last *noisy* forward instead
    of the clean image's; both agree with us for ``samples=1, std=0``.

    Args:
        model, layer, counterfactual, layout: as for :class:`gradcam.GradCAM`.
        samples: noisy copies S (torchcam's ``num_samples``; default 4, torchcam's).
        std: standard deviation of the noise, in the model input's units (default 0.3, torchcam's).
        seed: seed of the noise, the same on every call.
    """

    method = "smoothgradcam++"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        samples: int = 4,
        std: float = 0.3,
        seed: int = 0,
        counterfactual: bool = False,
        layout: LayoutSpec | Sequence[LayoutSpec] = None,
    ) -> None:
        super().__init__(model, layer, counterfactual=counterfactual, layout=layout)
        self.samples, self.std, self.seed = _check_samples(samples), _check_std(std), _check_seed(seed)
        self._call: tuple[torch.Tensor, Rows, list[tuple[str, nn.Module]]] | None = None

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return plus_plus_weights(activations, gradients.unflatten(-5, (-1, self.samples)))

    def _raw_maps(
        self,
        x: Inputs,
        rows: Rows,
        output: object,
        scores: torch.Tensor,
        activations: list[torch.Tensor],
        layers: list[tuple[str, nn.Module]],
        found: list[Layout],
        eigen_smooth: bool,
    ) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise GradCAMError(
                f"{self.method} adds noise to a tensor batch; explain a detector's images with gradcam++"
            )
        # What the noisy passes need travels on a per-call copy: the object itself keeps no call state.
        call = copy.copy(self)
        call._call = (x, rows, layers)
        raw_maps = super(SmoothGradCAMpp, call)._raw_maps
        return raw_maps(x, rows, output, scores, activations, layers, found, eigen_smooth)

    def _gradient_chunks(
        self, scores: torch.Tensor, activations: list[torch.Tensor], first: str, nothing: bool = False
    ) -> Iterator[tuple[slice, Sequence[torch.Tensor | None]]]:
        """Every row at once: per layer, the S samples' gradients (N*S, B, ...), row-major."""
        count = scores.shape[0]
        if nothing:
            yield (
                slice(0, count),
                [torch.zeros_like(a).expand(count * self.samples, *a.shape) for a in activations],
            )
            return
        assert self._call is not None
        x, rows, layers = self._call
        noise = torch.randn((self.samples, *x.shape), generator=_generator(self.seed)).mul_(self.std)
        noise = noise.to(x.device, x.dtype)
        per_sample: list[list[torch.Tensor | None]] = []
        for sample in range(self.samples):
            with capture(self.model, layers, graph=True) as (captured, run):
                noisy = rows.scores(run(x + noise[sample]))
                chunks = list(super()._gradient_chunks(noisy, captured.activations, first))  # type: ignore[arg-type]
            per_sample.append(
                [
                    None if chunk[0] is None else torch.cat(chunk)
                    for chunk in zip(*(g for _, g in chunks), strict=True)
                ]
            )
        stacked = [
            None if any(g is None for g in layer) else torch.stack(layer, dim=1).flatten(0, 1)  # type: ignore[misc]
            for layer in zip(*per_sample, strict=True)
        ]
        yield slice(0, count), stacked


class _SampledScoreCAM(ScoreCAM):
    """Score-CAM with each channel's score averaged over ``samples`` perturbed masks (the loop is
    :meth:`ScoreCAM.scored_weights`; a variant says how sample s of the masks is made)."""

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        samples: int,
        batch_size: int = 32,
        progress: Progress | bool | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(model, layer, batch_size=batch_size, progress=progress, layout=layout)
        self.samples = _check_samples(samples)

    def _sample_masks(self, masks: torch.Tensor, sample: int, noise: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class SSCAM(_SampledScoreCAM):
    r"""SS-CAM (Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    arXiv:2006.14255, 2020): Score-CAM's channel score averaged over noisy masks.

    With :class:`ScoreCAM`'s mask H^k = s(Up(A^k)), f^c the softmax probability and the zero baseline X_b:

        alpha_k^c = (1/S) sum_s f^c( X o (H^k + delta_{s,k}) ) - f^c(X_b),   delta_{s,k} ~ N(0, std^2)
        L^c       = ReLU( sum_k alpha_k^c A^k )

    delta_{s,k} is one value per pixel (shared by the colour channels), drawn anew for every sample,
    channel and image. As in :class:`ScoreCAM`, a channel constant over the layer's grid carries no spatial
    information and is left out (alpha_k^c = 0, no forwards); with noise its score would not be zero
    exactly, but would say nothing about A^k. Noise order: a CPU generator seeded with ``seed`` on every
    call; per image, per sample, one ``torch.randn((n, 1, H, W))`` draw for the image's n non-constant
    channels in ascending order (independent of ``batch_size``). Cost: S forwards per non-constant
    channel and image.

    Other implementations differ: torchcam (``SSCAM``) scores the *logit* against the original image's
    logit and applies a softmax across the channels (its weights sum to one), as its Score-CAM does.

    Args:
        model, layer, batch_size, progress, layout: as for :class:`ScoreCAM`.
        samples: noisy masks S per channel (torchcam's ``num_samples``; default 35, torchcam's).
        std: standard deviation of the noise on the [0, 1] masks (default 2.0, torchcam's).
        seed: seed of the noise, the same on every call.
    """

    method = "sscam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        samples: int = 35,
        std: float = 2.0,
        seed: int = 0,
        batch_size: int = 32,
        progress: Progress | bool | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(
            model, layer, samples=samples, batch_size=batch_size, progress=progress, layout=layout
        )
        self.std, self.seed = _check_std(std), _check_seed(seed)

    def _new_generator(self) -> torch.Generator | None:
        return _generator(self.seed)

    def _noise(self, generator: torch.Generator | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        return torch.randn(shape, generator=generator).mul_(self.std)

    def _sample_masks(self, masks: torch.Tensor, sample: int, noise: torch.Tensor | None) -> torch.Tensor:
        assert noise is not None
        return masks + noise.to(masks.device, masks.dtype)


class ISCAM(_SampledScoreCAM):
    r"""IS-CAM (Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    arXiv:2010.03023, 2020): Score-CAM's channel score integrated along the masks from the baseline.

    With :class:`ScoreCAM`'s mask H^k = s(Up(A^k)), f^c the softmax probability and the zero baseline X_b,
    a Riemann sum over the masks scaled i/S:

        alpha_k^c = (1/S) sum_{i=1}^{S} f^c( X o (i/S) H^k ) - f^c(X_b)
        L^c       = ReLU( sum_k alpha_k^c A^k )

    ``samples=1`` is :class:`ScoreCAM`. Deterministic: no noise, no seed. Constant channels are left out as
    in Score-CAM (their masks are zero at every scale, alpha_k^c = 0 exactly). Cost: S forwards per
    non-constant channel and image.

    Other implementations differ: torchcam (``ISCAM``) scales the i-th mask by the running sum
    sum_{j<=i} j/S (up to (S+1)/2 rather than 1), scores the *logit* against the original image's and
    applies a softmax across the channels, as its Score-CAM does.

    Args:
        model, layer, batch_size, progress, layout: as for :class:`ScoreCAM`.
        samples: integration steps S (torchcam's ``num_samples``; default 10, torchcam's).
    """

    method = "iscam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        samples: int = 10,
        batch_size: int = 32,
        progress: Progress | bool | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(
            model, layer, samples=samples, batch_size=batch_size, progress=progress, layout=layout
        )

    def _sample_masks(self, masks: torch.Tensor, sample: int, noise: torch.Tensor | None) -> torch.Tensor:
        return masks * ((sample + 1) / self.samples)
