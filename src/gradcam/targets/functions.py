r"""Target functions: one differentiable score per image from any model output.

A target function maps the model's output for a batch of B images to a tensor (B,) of scores, computed
from the output by differentiable operations, so that Grad-CAM's y^c can be any quantity the model
computes. Any callable does (``lambda out: out[:, 3] - out[:, 5]``, a contrast of two logits); the
named ones below read the outputs of segmenters, detectors, embedding models, multi-label and
regression heads, each with its formula.

A callable must treat the images of a batch alike (it is also applied to the outputs of perturbed
copies of one image, by Score-CAM and Ablation-CAM). A target whose parameters differ per image (one
mask or box per image) says which parameters belong to image b through ``for_image(b)``; the named
targets do.

>>> cam(batch, targets=Segmentation(15))                  # pixels predicted as class 15 ("person")
>>> cam(images, targets=Box(label=18, box=[40, 30, 210, 190]))   # a detection, in image pixels
>>> cam(batch, targets=Similarity(reference_embedding))   # cosine similarity of the embeddings
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from gradcam.errors import GradCAMError


@runtime_checkable
class Target(Protocol):
    """Any callable: the model's output for B images -> (B,) differentiable scores."""

    def __call__(self, output: object) -> torch.Tensor: ...


def part(output: object, key: str | None, what: str) -> torch.Tensor:
    """The tensor a target reads: the output itself, its ``key`` entry (a mapping) or attribute (an
    object such as a Hugging Face ``ModelOutput``), or ``logits`` when no key is given."""
    found = output
    if key is None and not isinstance(output, torch.Tensor):
        key = "logits"
    if key is not None and not isinstance(output, torch.Tensor):
        found = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
    if not isinstance(found, torch.Tensor):
        keys = f" (keys: {', '.join(map(str, list(output)[:6]))})" if isinstance(output, Mapping) else ""
        raise GradCAMError(
            f"{what}: model returned {type(output).__name__}{keys} with no tensor '{key}'; pass key= "
            "to name the output to read"
        )
    return found


def _index(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GradCAMError(f"{what} must be an integer index, got {value!r}")
    return int(value)


def _column(values: torch.Tensor, index: int | None, what: str) -> torch.Tensor:
    """Column ``index`` of a (B, K) head, or a (B,)/(B, 1) head's only value."""
    if values.dim() == 1 or (values.dim() == 2 and values.shape[1] == 1 and index in (None, 0)):
        return values.reshape(len(values))
    if values.dim() != 2:
        raise GradCAMError(f"{what}: expected a (B,) or (B, K) output, got {tuple(values.shape)}")
    if index is None:
        raise GradCAMError(f"{what}: the output has {values.shape[1]} values per image; give index=")
    if not 0 <= index < values.shape[1]:
        raise GradCAMError(f"{what}: index {index} is out of range; expected 0..{values.shape[1] - 1}")
    return values[:, index]


@dataclass(frozen=True, eq=False)
class Segmentation:
    r"""Semantic segmentation: the class's logits summed over a mask.

        y^c = sum_{(i,j) in M} S^c_{ij}

    with S^c (H, W) the class-c logits of the image in the segmenter's output (the ``"out"`` entry of
    torchvision's FCN, DeepLabV3 and LRASPP; ``key=None`` for a model returning the (B, K, H, W) tensor)
    and M the mask: ``mask`` (H, W) for every image or (B, H, W) one per image, boolean or 0/1; by
    default the pixels the model assigns to c, M = {(i, j): argmax_k S^k_{ij} = c}, read from the same
    forward and not differentiated. This is Grad-CAM for segmentation (Vinogradova, Dibrov & Myers,
    "Towards Interpretable Semantic Segmentation via Gradient-Weighted Class Activation Mapping", AAAI
    2020), and pytorch-grad-cam's ``SemanticSegmentationTarget`` when the mask is given.
    """

    category: int | Sequence[int]
    mask: torch.Tensor | None = None
    key: str | None = "out"

    def __post_init__(self) -> None:
        if isinstance(self.category, (Sequence, torch.Tensor)):
            values = torch.as_tensor(self.category).tolist()
            categories = tuple(_index(c, "Segmentation class") for c in values)
            object.__setattr__(self, "category", categories)
        else:
            object.__setattr__(self, "category", _index(self.category, "Segmentation class"))
        if self.mask is not None:
            mask = torch.as_tensor(self.mask)
            if mask.dim() not in (2, 3):
                raise GradCAMError(f"Segmentation mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")
            object.__setattr__(self, "mask", mask)

    @property
    def label(self) -> int | torch.Tensor:
        """The class, or one class per image."""
        return torch.tensor(self.category) if isinstance(self.category, tuple) else self.category

    def categories(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) the class of each image."""
        if isinstance(self.category, tuple):
            if len(self.category) != batch:
                raise GradCAMError(f"Segmentation: {len(self.category)} classes for {batch} images")
            return torch.tensor(self.category, device=device)
        return torch.full((batch,), self.category, device=device, dtype=torch.long)

    def region(self, logits: torch.Tensor) -> torch.Tensor:
        """The mask M (B, H, W) as floats for segmentation logits (B, K, H, W)."""
        if self.mask is None:
            wanted = self.categories(len(logits), logits.device)[:, None, None]
            return (logits.detach().argmax(dim=1) == wanted).to(logits.dtype)
        mask = self.mask.to(logits.device, logits.dtype)
        fits = tuple(mask.shape[-2:]) == tuple(logits.shape[-2:])
        if not fits or (mask.dim() == 3 and len(mask) != len(logits)):
            raise GradCAMError(
                f"Segmentation mask {tuple(mask.shape)} does not match the output's "
                f"{tuple(logits.shape[:1]) + tuple(logits.shape[-2:])} (B, H, W)"
            )
        return mask.expand(len(logits), *mask.shape[-2:])

    def logits(self, output: object) -> torch.Tensor:
        """The segmenter's logits (B, K, H, W), checked."""
        logits = part(output, self.key, "Segmentation")
        if logits.dim() != 4:
            raise GradCAMError(f"Segmentation: expected logits (B, K, H, W), got {tuple(logits.shape)}")
        bad = [c for c in torch.as_tensor(self.category).reshape(-1).tolist() if not 0 <= c < logits.shape[1]]
        if bad:
            raise GradCAMError(
                f"Segmentation class {bad[0]} is out of range; expected 0..{logits.shape[1] - 1}"
            )
        return logits

    def __call__(self, output: object) -> torch.Tensor:
        logits = self.logits(output)
        index = self.categories(len(logits), logits.device)
        chosen = logits[torch.arange(len(logits), device=logits.device), index]  # (B, H, W)
        return (chosen * self.region(logits)).sum(dim=(1, 2))

    def for_image(self, index: int) -> Segmentation:
        mask = self.mask[index] if self.mask is not None and self.mask.dim() == 3 else self.mask
        category = self.category[index] if isinstance(self.category, tuple) else self.category
        return replace(self, category=category, mask=mask)


@dataclass(frozen=True)
class SegmentedClasses:
    r"""A segmenter's own classes as target rows, chosen from the explained forward: image b's classes
    are ``classes`` (named, every image) or else its ``topk`` predicted classes by area (pixels whose
    argmax is the class), ``background`` left out; row n explains each image's n-th by its
    :class:`Segmentation` target over the predicted mask. An image with fewer repeats its last; one
    with no predicted class but the background has none of its own (``wanted`` empty).

    The rows carry the predicted masks (N, B, H, W) on the output's pixels, for the overlays.
    """

    #: a chooser of rows, not a target: called once with the explained forward's output
    chooses_rows: ClassVar[bool] = True
    classes: Sequence[int] = ()
    topk: int = 1
    background: int | None = 0
    key: str | None = "out"

    def __call__(self, output: object) -> object:
        from gradcam.targets.rows import TargetRows

        logits = Segmentation(0, key=self.key).logits(output).detach()
        predicted = logits.argmax(dim=1)  # (B, H, W)
        wanted = []
        for image in predicted:
            if self.classes:
                wanted.append([int(c) for c in self.classes])
                continue
            areas = torch.bincount(image.flatten(), minlength=logits.shape[1])
            if self.background is not None:
                areas[self.background] = 0
            order = [int(c) for c in areas.argsort(descending=True) if areas[c] > 0]
            wanted.append(order[: self.topk])
        rows = max([len(w) for w in wanted] + [1])
        grid = [[w[min(n, len(w) - 1)] if w else 0 for w in wanted] for n in range(rows)]
        targets = [Segmentation(row, key=self.key) for row in grid]
        classes = torch.tensor(grid, device=predicted.device)[:, :, None, None]
        return TargetRows(targets, len(predicted), wanted=wanted, masks=(predicted[None] == classes).cpu())


@dataclass(frozen=True, eq=False)
class Sigmoid:
    r"""A multi-label or binary head: the logit z_c of label c, its probability sigma(z_c).

        y^c = z_c,    p^c = 1 / (1 + exp(-z_c))

    The score is the pre-sigmoid logit, as Grad-CAM takes the pre-softmax score (Selvaraju et al., ICCV
    2017, Sec. 3: the gradient of the probability vanishes where the model is sure); the probability is
    what is reported. The head is (B, K), or (B,) / (B, 1) for a binary one (``index`` 0).
    """

    index: int = 0
    key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", _index(self.index, "Sigmoid index"))

    @property
    def label(self) -> int:
        return self.index

    def __call__(self, output: object) -> torch.Tensor:
        return _column(part(output, self.key, "Sigmoid"), self.index, "Sigmoid")

    def probability(self, output: object) -> torch.Tensor:
        return torch.sigmoid(self(output))


@dataclass(frozen=True, eq=False)
class Regression:
    r"""A regression output: y = f_i(x), value ``index`` of a (B, K) output, or the (B,) output itself.

    Grad-CAM of a regressor shows what raises the predicted value; ``counterfactual=True`` what lowers it.
    """

    index: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.index is not None:
            object.__setattr__(self, "index", _index(self.index, "Regression index"))

    @property
    def label(self) -> int:
        return -1 if self.index is None else self.index

    def __call__(self, output: object) -> torch.Tensor:
        return _column(part(output, self.key, "Regression"), self.index, "Regression")


@dataclass(frozen=True, eq=False)
class Similarity:
    r"""Embedding similarity: the cosine of the model's embedding e_b and a reference r.

        y_b = cos(e_b, r) = e_b . r / (|e_b| |r|)

    ``reference`` is (D,) for every image or (B, D) one per image; :meth:`of_image` embeds a reference
    image with the same model. The embedding is the model's output (B, D), or its ``key`` entry
    (``"image_embeds"``, ``"pooler_output"`` ...). pytorch-grad-cam's ``SimilarityToConceptTarget``.
    """

    reference: torch.Tensor
    key: str | None = None

    def __post_init__(self) -> None:
        reference = torch.as_tensor(self.reference).detach()
        if reference.dim() not in (1, 2) or not reference.is_floating_point():
            raise GradCAMError(
                f"Similarity reference must be a float (D,) or (B, D) embedding, got {tuple(reference.shape)}"
            )
        object.__setattr__(self, "reference", reference)

    @classmethod
    def of_image(cls, model: nn.Module, image: torch.Tensor, key: str | None = None) -> Similarity:
        """The target of the embedding of ``image`` (C, H, W) or (1, C, H, W), computed with ``model`` in
        eval mode without gradients (every module's flag is restored)."""
        from gradcam.capture import eval_mode

        batch = image[None] if image.dim() == 3 else image
        with torch.no_grad(), eval_mode(model):
            embedding = _embedding(model(batch), key)
        return cls(embedding[0], key)

    @property
    def label(self) -> int:
        return -1

    def __call__(self, output: object) -> torch.Tensor:
        embedding = _embedding(output, self.key)
        reference = self.reference.to(embedding.device, embedding.dtype)
        if reference.shape[-1] != embedding.shape[1] or (
            reference.dim() == 2 and len(reference) != len(embedding)
        ):
            raise GradCAMError(
                f"Similarity reference {tuple(reference.shape)} does not match the embeddings "
                f"{tuple(embedding.shape)}; expected (D,) or (B, D)"
            )
        return F.cosine_similarity(embedding, reference.expand_as(embedding), dim=1)

    def for_image(self, index: int) -> Similarity:
        return self if self.reference.dim() == 1 else replace(self, reference=self.reference[index])


def _embedding(output: object, key: str | None) -> torch.Tensor:
    found = (
        part(output, key, "Similarity") if key is not None or not isinstance(output, torch.Tensor) else output
    )
    if found.dim() != 2:
        raise GradCAMError(f"Similarity: expected embeddings (B, D), got {tuple(found.shape)}; pass key=")
    return found


def label_of(target: object) -> int:
    """The class or label a target names (-1 for none): what front ends show and file names carry."""
    label = getattr(target, "label", -1)
    return int(label) if isinstance(label, (int, torch.Tensor)) and torch.as_tensor(label).dim() == 0 else -1


def name_of(target: object) -> str:
    """A short name of a target for captions and file names: its class name, else the function's."""
    return getattr(target, "__name__", None) or type(target).__name__.lower()
