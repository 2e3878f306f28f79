r"""Deep Feature Factorization (Collins, Achanta & Süsstrunk, "Deep Feature Factorization For Concept
Discovery", ECCV 2018): concepts shared by a batch, found by non-negative matrix factorisation.

With A (B, K, h, w) the activations of one layer for the whole batch, the non-negative matrix

    V = ReLU(A) arranged as K x (B h w)          (column (b, i, j) = the feature vector at (i, j) of b)

is factorised with scikit-learn's NMF (Frobenius loss, ``init="random"``, seeded) into

    V ~= W H,    W >= 0 (K x C),   H >= 0 (C x B h w),   C = ``concepts``

Column c of W is concept c's embedding (a feature vector of the layer); row c of H, reshaped to
(B, h, w), says how strongly each position of each image expresses it. The factorisation is
class-agnostic and batch-level: the concepts are those of the whole batch, each image gets a map of
every concept. A concept's classifier scores are the model's response to a feature map made entirely
of its embedding (w_c at every position, fed to the layers after the chosen one); for a head that is a
linear layer on globally pooled features (torchvision's ResNets) that is exactly ``fc(w_c)``.

Against pytorch-grad-cam's ``DeepFeatureFactorization``: it makes V non-negative by subtracting each
channel's minimum over the batch (and adds it back to W) where the paper's activations are simply
post-ReLU; here V = ReLU(A). The two agree exactly when every channel reaches 0 somewhere in the batch
(then the offset is 0): H and W are then the same matrices. pytorch-grad-cam also min-max scales each
image's concept map on its own before resizing it; :attr:`Concepts.upsampled` is the raw map resized
(an affine change per map, so their correlation is 1), and :meth:`Concepts.strengths` scales the
concepts comparably instead: the norm of concept c's part of the reconstruction, ||w_c|| H_c.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gradcam import layers as _layers
from gradcam import layouts
from gradcam.attention import attention_modules, inside_attention
from gradcam.capture import capture, eval_mode, resolve_module
from gradcam.errors import GradCAMError
from gradcam.explanation import upsample
from gradcam.layouts import Layout, LayoutSpec
from gradcam.targets import model_logits


@dataclass(frozen=True)
class Concepts:
    """What :class:`DeepFeatureFactorization` found in a batch.

    Attributes:
        layer: the factorised layer.
        maps: (B, C, h, w) the raw concept maps, rows of H reshaped per image.
        upsampled: (B, C, H, W) ``maps`` resized bilinearly (align_corners=False) to the input.
        embeddings: (C, K) the concepts' embeddings, the columns of W.
        scores: (C, classes) each concept's logits (see the module docstring), None when the model's
            output is not class logits.
        error: the relative reconstruction error ||V - W H||_F / ||V||_F.
    """

    layer: str
    maps: torch.Tensor
    upsampled: torch.Tensor
    embeddings: torch.Tensor
    scores: torch.Tensor | None
    error: float

    @property
    def count(self) -> int:
        """The number of concepts C."""
        return int(self.embeddings.shape[0])

    def strengths(self) -> torch.Tensor:
        """(B, C, H, W) in [0, 1]: ||w_c|| times concept c's upsampled map (the norm of its part of the
        reconstruction), divided by the image's largest value over all concepts (a blank image stays 0)."""
        weighted = self.upsampled * self.embeddings.norm(dim=1)[None, :, None, None]
        peak = weighted.flatten(1).amax(dim=1).clamp_min(0)
        scale = torch.where(peak > 0, peak, torch.ones_like(peak))
        return weighted / scale[:, None, None, None]

    def top_classes(self, k: int = 3) -> list[list[tuple[int, float]]]:
        """Per concept, its ``k`` best classes as (index, softmax probability); empty lists when the
        scores are not known."""
        if k < 1:
            raise GradCAMError(f"top classes k must be at least 1, got {k}")
        if self.scores is None:
            return [[] for _ in range(self.count)]
        probabilities = self.scores.double().softmax(dim=-1)
        best = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        return [
            [(int(index), float(value)) for index, value in zip(row_indices, row_values, strict=True)]
            for row_indices, row_values in zip(best.indices, best.values, strict=True)
        ]


def factorize(
    features: torch.Tensor, concepts: int, *, seed: int = 0, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """NMF of a batch's feature maps (B, K, h, w): (maps (B, C, h, w), embeddings (C, K), relative
    error), with V = ReLU(features) as K x (B h w) ~= W H (see the module docstring)."""
    from sklearn.decomposition import NMF

    if features.dim() != 4:
        raise GradCAMError(f"feature maps must be (B, K, h, w), got shape {tuple(features.shape)}")
    batch, channels, height, width = features.shape
    if isinstance(concepts, bool) or not isinstance(concepts, int) or not 1 <= concepts <= channels:
        raise GradCAMError(
            f"concepts must be an integer from 1 to the layer's {channels} channels, got {concepts}"
        )
    values = features.detach().float().cpu()
    if not bool(torch.isfinite(values).all()):
        raise GradCAMError("the layer's activations hold NaN or infinite values; nothing to factorise")
    matrix = values.relu().transpose(0, 1).reshape(channels, -1).numpy()
    total = float((matrix.astype("float64") ** 2).sum())
    if total == 0.0:
        raise GradCAMError("the layer's activations are nowhere positive; nothing to factorise")
    nmf = NMF(n_components=concepts, init="random", random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        # Not converged within max_iter is reported as the relative error instead.
        warnings.filterwarnings("ignore", message="Maximum number of iterations")
        loadings = nmf.fit_transform(matrix)  # W, K x C
    components = torch.from_numpy(nmf.components_.astype("float32"))  # H, C x (B h w)
    maps = components.reshape(concepts, batch, height, width).transpose(0, 1).contiguous()
    error = float(nmf.reconstruction_err_) / math.sqrt(total)
    return maps, torch.from_numpy(loadings.astype("float32")).T.contiguous(), error


@contextmanager
def _replaced_output(model: nn.Module, module: nn.Module, replacement: torch.Tensor) -> Iterator[None]:
    """For the block: ``module`` returns ``replacement`` instead of its output, the model in eval mode;
    the hook is removed and the flags restored on exit, also on error."""
    handle = module.register_forward_hook(lambda _module, _args, _output: replacement)
    try:
        with eval_mode(model):
            yield
    finally:
        handle.remove()


class DeepFeatureFactorization:
    """Deep Feature Factorization of one layer over a batch (see the module docstring).

    Args:
        model: a model taking (B, 3, H, W) batches. Left exactly as found: each call runs it in eval
            mode, restores every module's flag and removes its hooks, also on error.
        layer: None (automatic, as for Grad-CAM), a qualified module name or the module.
        concepts: C, the number of concepts (NMF components).
        seed: NMF's random initialisation.
        layout: how to read the layer's output as (B, K, h, w) (see :mod:`gradcam.layouts`).
    """

    method = "dff"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        concepts: int = 5,
        seed: int = 0,
        layout: LayoutSpec = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradCAMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(concepts, bool) or not isinstance(concepts, int) or concepts < 1:
            raise GradCAMError(f"concepts must be a positive integer, got {concepts!r}")
        self.model, self.concepts, self.seed = model, concepts, seed
        self._layer = None if layer is None else resolve_module(model, layer)
        self._explicit = layouts.parse(layout)

    def _resolve(self, inputs: torch.Tensor) -> tuple[str, nn.Module]:
        if self._layer is not None:
            return self._layer
        stage = _layers.backbone_stage(self.model)
        return resolve_module(self.model, stage or _layers.find_layer(self.model, inputs[:1]))

    def __call__(self, inputs: torch.Tensor) -> Concepts:
        """Factorise the layer's activations for the batch ``inputs`` (B, C, H, W)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
            got = (
                f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            )
            raise GradCAMError(f"dff explains a float (B, C, H, W) batch of images, got {got}")
        x = inputs.detach().clone()
        name, module = self._resolve(x)
        with capture(self.model, [(name, module)], graph=False) as (captured, run):
            output = run(x)
        activation = captured.activations[0]
        assert activation is not None
        layout = layouts.decide(
            self.model,
            name,
            module,
            tuple(activation.shape),
            (int(x.shape[-2]), int(x.shape[-1])),
            explicit=self._explicit,
            inside_attention=inside_attention(name, attention_modules(self.model)),
            batch=int(x.shape[0]),
        )
        features = layout.feature_map(activation)
        maps, embeddings, error = factorize(features, self.concepts, seed=self.seed)
        scores = self._scores(x, output, module, layout, activation, embeddings, features.shape[-2:])
        upsampled = upsample(maps, (int(x.shape[-2]), int(x.shape[-1])))
        return Concepts(name, maps, upsampled, embeddings, scores, error)

    def _scores(
        self,
        x: torch.Tensor,
        output: object,
        module: nn.Module,
        layout: Layout,
        activation: torch.Tensor,
        embeddings: torch.Tensor,
        grid: torch.Size,
    ) -> torch.Tensor | None:
        """(C, classes) the model's logits for feature maps made of one concept's embedding everywhere;
        None when the model's output is not class logits (or the layout cannot be written back)."""
        try:
            model_logits(output, int(x.shape[0]))
        except GradCAMError:
            return None
        count = len(embeddings)
        tiled = embeddings.to(activation.device, activation.dtype)[:, :, None, None].expand(-1, -1, *grid)
        try:
            replacement = layout.layer_output(tiled.contiguous(), activation[:1])
        except GradCAMError:
            return None
        with torch.no_grad(), _replaced_output(self.model, module, replacement):
            logits = model_logits(self.model(x[:1].expand(count, *x.shape[1:])), count)
        return logits.detach().float().cpu()
