r"""What a captured activation's axes mean, decided from what the model and the input say.

A layer's output reaches a CAM method as a feature map (B, C, h, w). It can come in three layouts:

* ``channels-first`` (B, C, h, w): convolutions, PyTorch's own convention for images;
* ``channels-last`` (B, h, w, C): Swin and ConvNeXt blocks, anything after a ``LayerNorm``/``Linear``
  applied to the last axis of a 4-D tensor;
* ``tokens`` (B, N, D) with N = prefix + h*w: vision transformers. The first ``prefix`` tokens (class,
  distillation and register tokens) are not on the image and are left out of the map; the others are
  the patch grid in raster order.

The layout is decided from facts, never from a guess at shapes (:func:`decide`):

* the **patch grid** comes from the model: timm's ``patch_embed`` (``dynamic_feat_size`` for the
  input's H and W), LeViT's ``stem.stride``, Hugging Face's ``config.patch_size``, torchvision's
  ``VisionTransformer.patch_size``, together with the input's H and W. Hierarchical transformers
  (Swin, LeViT) halve it at each stage, rounding up, so stage k's grid is ceil(grid / 2^k);
* the **prefix** is the model's declared count (timm's ``num_prefix_tokens``; 1 for torchvision's
  class token), else N - h*w on the patch grid (Hugging Face: 1 for ViT, 2 for DeiT, 1 + registers);
* a 4-D output is read by the module that produced it (convolutions, batch/group norms, pooling and
  ``LayerNorm2d`` are channels-first; ``LayerNorm`` and ``Linear`` act on the last axis, which is then
  the channels), else by the input's geometry: the two spatial axes must be the input shrunk by one
  factor (up to the few pixels valid convolutions and rounding lose). When both readings fit, a model
  with no transformer facts follows PyTorch's channels-first convention; a transformer is refused.

An activation produced *inside* an attention module (the (B, heads, N, d) queries, keys and attention
probabilities) is never taken for a feature map, nor is a windowed tensor whose leading axis is not the
batch. Where the layout cannot be decided the call is refused with one line that names the layer, its
shape and how to pass the layout: ``layout=Layout.tokens(grid=(14, 14), prefix=1)``, the strings
``"channels-first"``, ``"channels-last"``, ``"tokens"`` or ``"tokens:14x14+1"``, or a callable that maps
the activation (B, ...) to (B, C, h, w) as pytorch-grad-cam's ``reshape_transform`` does (it is applied
to the activations and, identically, to their gradients).

Every layout is an exact re-indexing (a slice, a reshape and a permutation): gradients taken with
respect to the layer's own output are re-indexed the same way, so a map on the patch grid is exactly the
map a hand-written ``reshape_transform`` gives when it is right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradcam.errors import GradCAMError

CHANNELS_FIRST = "channels-first"
CHANNELS_LAST = "channels-last"
TOKENS = "tokens"
CUSTOM = "custom"
VOLUME = "channels-first-3d"

#: The most prefix tokens (class + distillation + registers) derived as N - h*w when none is declared.
MAX_DERIVED_PREFIX = 32
#: How many cells each spatial axis of a 4-D activation may be off the input shrunk by one factor
#: (what valid convolutions and floor/ceil rounding lose; Inception's 299x400 input gives 8x11).
GEOMETRY_SLACK = 1.0


@dataclass(frozen=True)
class Layout:
    """How to read a layer's output as a feature map (B, C, h, w).

    Build one with :meth:`channels_first`, :meth:`channels_last`, :meth:`tokens` or :meth:`custom`, or
    let :func:`decide` find it. ``grid`` and ``prefix`` of a tokens layout may be left ``None`` to be
    filled in from the model.
    """

    kind: str
    grid: tuple[int, int] | None = None
    prefix: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    depth: int | None = None  # a volume's time (or depth) axis t

    @classmethod
    def volume(cls, depth: int) -> Layout:
        """(B, C, t, h, w), as 3-D convolutions produce (video and volume models). It is read as the
        feature map (B, C, t*h, w): every method that treats the positions of a map as a set (the
        gradient CAMs, Eigen-CAM, Ablation-CAM) is then exact, and :meth:`unfold` gives the
        (..., t, h, w) map back."""
        return cls(VOLUME, depth=int(depth))

    @classmethod
    def channels_first(cls) -> Layout:
        """(B, C, h, w), as convolutions produce."""
        return cls(CHANNELS_FIRST)

    @classmethod
    def channels_last(cls) -> Layout:
        """(B, h, w, C), as Swin and ConvNeXt blocks produce."""
        return cls(CHANNELS_LAST)

    @classmethod
    def tokens(cls, grid: tuple[int, int] | None = None, prefix: int | None = None) -> Layout:
        """(B, prefix + h*w, D): ``prefix`` leading tokens off the image, then the (h, w) patch grid."""
        if grid is not None:
            if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
                raise GradCAMError(f"tokens layout: grid must be two positive integers (h, w), got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
            raise GradCAMError(f"tokens layout: prefix must be a non-negative integer, got {prefix!r}")
        return cls(TOKENS, grid, prefix)

    @classmethod
    def custom(cls, transform: Callable[[torch.Tensor], torch.Tensor]) -> Layout:
        """A callable mapping the activation (B, ...) to (B, C, h, w), applied alike to its gradients."""
        if not callable(transform):
            raise GradCAMError(f"layout transform must be callable, got {type(transform).__name__}")
        return cls(CUSTOM, transform=transform)

    def grid_of(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (h, w) of the map this layout reads from an output of ``shape``; None for a custom one."""
        if self.kind == TOKENS:
            return self.grid
        if self.kind == CHANNELS_FIRST and len(shape) == 4:
            return (shape[2], shape[3])
        if self.kind == CHANNELS_LAST and len(shape) == 4:
            return (shape[1], shape[2])
        if self.kind == VOLUME and len(shape) == 5:
            return (shape[3], shape[4])
        return None

    def describe(self, shape: tuple[int, ...] | None = None) -> str:
        """A few words for tables: ``tokens 1+14x14``, ``channels-last 7x7``, ``channels-first 7x7``."""
        grid = self.grid_of(shape or ())
        if grid is None:
            return self.kind
        prefix = f"{self.prefix or 0}+" if self.kind == TOKENS else ""
        prefix = f"{self.depth}x" if self.kind == VOLUME else prefix
        return f"{self.kind} {prefix}{grid[0]}x{grid[1]}"

    def unfold(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps (..., h', w) read from this layout back on the layer's grid: (..., t, h, w) for a volume
        (h' = t*h), unchanged otherwise."""
        return maps.unflatten(-2, (self.depth, -1)) if self.kind == VOLUME else maps

    def feature_map(self, tensor: torch.Tensor, leading: int = 0) -> torch.Tensor:
        """The (..., B, C, h, w) feature map of ``tensor`` (the layer's output, or its gradient with
        ``leading`` extra dimensions in front of the batch)."""
        if self.kind == CHANNELS_FIRST:
            return tensor
        if self.kind == CHANNELS_LAST:
            return tensor.movedim(-1, -3)
        if self.kind == VOLUME:
            return tensor.flatten(-3, -2)
        if self.kind == TOKENS:
            assert self.grid is not None and self.prefix is not None
            patches = tensor[..., self.prefix :, :]
            return patches.reshape(*patches.shape[:-2], *self.grid, patches.shape[-1]).movedim(-1, -3)
        assert self.transform is not None
        front = tensor.shape[:leading]
        flat = tensor.reshape(-1, *tensor.shape[leading + 1 :]) if leading else tensor
        out = self.transform(flat)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GradCAMError(f"layout transform returned {got}; expected a 4-D tensor (B, C, h, w)")
        return out.reshape(*front, -1, *out.shape[1:]) if leading else out

    def layer_output(self, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`feature_map`: (n, C, h, w) maps written back into the layer's own layout,
        with ``like`` (1, ...) giving what the map leaves out (the prefix tokens)."""
        if self.kind == CHANNELS_FIRST:
            return maps
        if self.kind == CHANNELS_LAST:
            return maps.movedim(-3, -1)
        if self.kind == VOLUME:
            return maps.unflatten(-2, (self.depth, -1))
        if self.kind == TOKENS:
            assert self.prefix is not None
            patches = maps.movedim(-3, -1).flatten(-3, -2)
            prefix = like[..., : self.prefix, :].expand(len(maps), -1, -1)
            return torch.cat([prefix.to(patches.dtype), patches], dim=-2)
        raise GradCAMError("a custom layout transform has no inverse; pass a built-in layout for this method")


LayoutSpec = Layout | str | Callable[[torch.Tensor], torch.Tensor] | None


def parse(spec: LayoutSpec) -> Layout | None:
    """A caller's layout: None (decide), a :class:`Layout`, a string or a callable."""
    if spec is None or isinstance(spec, Layout):
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower().replace("_", "-")
        aliases = {"channels-first": CHANNELS_FIRST, "nchw": CHANNELS_FIRST, "channels-last": CHANNELS_LAST}
        aliases["nhwc"] = CHANNELS_LAST
        if text in aliases:
            return Layout(aliases[text])
        match = re.fullmatch(r"tokens(?::(\d+)x(\d+)(?:\+(\d+))?)?", text)
        if match:
            h, w, prefix = match.groups()
            grid = (int(h), int(w)) if h else None
            return Layout.tokens(grid, int(prefix) if prefix is not None else (0 if grid else None))
        raise GradCAMError(
            f"layout '{spec}' not understood; expected channels-first, channels-last, tokens or "
            "tokens:HxW+PREFIX (e.g. tokens:14x14+1)"
        )
    if callable(spec):
        return Layout.custom(spec)
    raise GradCAMError(f"layout must be a Layout, a string or a callable, got {type(spec).__name__}")


@dataclass(frozen=True)
class ModelFacts:
    """What a model declares about its tokens: patch stride, how the grid rounds, prefix count."""

    patch: tuple[int, int] | None = None
    prefix: int | None = None
    source: str = ""
    ceil: bool = False
    timm_embed: nn.Module | None = None

    @property
    def is_transformer(self) -> bool:
        return self.patch is not None

    def patch_grid(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The (h, w) patch grid for an input of ``size`` = (H, W), or None when the model has none."""
        if self.patch is None:
            return None
        if self.timm_embed is not None and hasattr(self.timm_embed, "dynamic_feat_size"):
            grid = self.timm_embed.dynamic_feat_size(size)
            return (int(grid[0]), int(grid[1]))
        if self.ceil:
            return (math.ceil(size[0] / self.patch[0]), math.ceil(size[1] / self.patch[1]))
        return (size[0] // self.patch[0], size[1] // self.patch[1])

    def stage_grids(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The patch grid and its halvings (rounded up), down to 1x1: the grids of hierarchical stages."""
        grid = self.patch_grid(size)
        grids = []
        while grid is not None and grid[0] * grid[1] >= 1:
            grids.append(grid)
            if grid == (1, 1):
                break
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        return grids


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def model_facts(model: nn.Module) -> ModelFacts:
    """The token facts ``model`` declares: timm, Hugging Face and torchvision transformers (see module)."""
    family = type(model).__module__.split(".")[0]
    embed = getattr(model, "patch_embed", None)
    if family == "timm" and isinstance(embed, nn.Module) and _pair(getattr(embed, "patch_size", None)):
        prefix = getattr(model, "num_prefix_tokens", None)
        prefix = prefix if isinstance(prefix, int) else None
        return ModelFacts(_pair(embed.patch_size), prefix, "timm patch_embed", timm_embed=embed)
    stem = getattr(model, "stem", None)
    if family == "timm" and _pair(getattr(stem, "stride", None)) and hasattr(model, "stages"):
        return ModelFacts(_pair(stem.stride), 0, "timm stem stride", ceil=True)  # LeViT
    config = getattr(model, "config", None)
    if family == "transformers" and _pair(getattr(config, "patch_size", None)):
        return ModelFacts(_pair(config.patch_size), None, "config.patch_size")
    if family == "torchvision" and type(model).__name__ == "VisionTransformer":
        return ModelFacts(_pair(model.patch_size), 1, "torchvision patch_size")
    return ModelFacts()


def _fits_input(grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """True when ``grid`` is the input shrunk by one factor r: |h - rH| and |w - rW| within the slack."""
    (h, w), (height, width) = grid, size
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    low = max((h - GEOMETRY_SLACK) / height, (w - GEOMETRY_SLACK) / width, 0.0)
    high = min((h + GEOMETRY_SLACK) / height, (w + GEOMETRY_SLACK) / width)
    return low <= high


_CHANNELS_FIRST_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
)


def module_reading(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """The layout a 4-D output has because of what produced it, or None when the type does not say."""
    if isinstance(module, _CHANNELS_FIRST_MODULES):
        return CHANNELS_FIRST
    if isinstance(module, nn.LayerNorm):
        if type(module).__name__.endswith("2d"):  # timm's and torchvision's LayerNorm2d permute inside
            return CHANNELS_FIRST
        return CHANNELS_LAST if tuple(module.normalized_shape) == (shape[-1],) else None
    if isinstance(module, nn.Linear):
        return CHANNELS_LAST if module.out_features == shape[-1] else None
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)):
        return {(0, 2, 3, 1): CHANNELS_LAST, (0, 3, 1, 2): CHANNELS_FIRST}.get(tuple(dims))
    return None


class LayoutError(GradCAMError):
    """A layer output whose layout cannot be decided; ``reason`` says why in a few words."""

    def __init__(self, name: str, shape: tuple[int, ...], reason: str) -> None:
        super().__init__(
            f"layer '{name}' outputs shape {tuple(shape)}: {reason}; pass the layout "
            "(layout='channels-first', 'channels-last', 'tokens:HxW+PREFIX' or a callable; CLI --layout) "
            "or choose another layer"
        )
        self.reason = reason


def decide(
    model: nn.Module,
    name: str,
    module: nn.Module,
    shape: tuple[int, ...],
    size: tuple[int, int],
    *,
    explicit: Layout | None = None,
    inside_attention: bool = False,
    facts: ModelFacts | None = None,
    batch: int | None = None,
) -> Layout:
    """The layout of layer ``name``'s output ``shape`` for inputs of ``size`` = (H, W) (see the module
    docstring for the rules); a one-line GradCAMError when it cannot be decided (a :class:`LayoutError`
    unless an explicit layout does not fit). With ``batch``, the output must lead with it (a custom
    layout transform is trusted to know its tensor)."""
    facts = facts if facts is not None else model_facts(model)
    if explicit is not None and explicit.kind == CUSTOM:
        return explicit
    if batch is not None and (not shape or shape[0] != batch):
        why = f"its leading axis is not the batch of {batch} (windows or heads folded into it)"
        raise LayoutError(name, shape, why)
    if explicit is not None:
        return _complete(explicit, name, shape, size, facts)
    if len(shape) == 3:
        return _token_layout(name, shape, size, facts)
    if len(shape) == 5:
        return _volume_layout(name, shape, size)
    if len(shape) != 4:
        raise LayoutError(name, shape, "expected (B,C,h,w), (B,h,w,C), (B,C,t,h,w) or tokens (B,N,D)")
    if inside_attention:
        why = "it is computed inside an attention module (heads, not a feature map)"
        raise LayoutError(name, shape, why)
    readings = [
        kind for kind in (CHANNELS_FIRST, CHANNELS_LAST) if _fits_input(Layout(kind).grid_of(shape), size)
    ]
    by_module = module_reading(module, shape)
    if by_module is not None and by_module in readings:
        return Layout(by_module)
    if len(readings) == 1:
        return Layout(readings[0])
    if not readings:
        grid = f"{size[0]}x{size[1]}"
        raise LayoutError(name, shape, f"neither axes 2-3 nor 1-2 are a spatial grid of the {grid} input")
    if not facts.is_transformer:
        return Layout.channels_first()
    raise LayoutError(name, shape, "both channels-first and channels-last fit the input")


def _volume_layout(name: str, shape: tuple[int, ...], size: tuple[int, int]) -> Layout:
    """A 5-D output in PyTorch's 3-D convention (B, C, t, h, w), its (h, w) the input's grid shrunk."""
    if not _fits_input((shape[3], shape[4]), size):
        grid = f"{size[0]}x{size[1]}"
        raise LayoutError(name, shape, f"axes 3-4 are not a spatial grid of the {grid} input")
    return Layout.volume(shape[2])


def _token_layout(name: str, shape: tuple[int, ...], size: tuple[int, int], facts: ModelFacts) -> Layout:
    tokens = shape[1]
    grids = facts.stage_grids(size)
    if not grids:
        raise LayoutError(name, shape, "the model declares no patch grid, so its tokens cannot be placed")
    first = grids[0]
    extra = tokens - first[0] * first[1]
    if facts.prefix is not None and extra == facts.prefix:
        return Layout(TOKENS, first, facts.prefix)
    if facts.prefix is None and 0 <= extra <= MAX_DERIVED_PREFIX:
        return Layout(TOKENS, first, extra)
    for grid in grids[1:]:
        if tokens == grid[0] * grid[1]:
            return Layout(TOKENS, grid, 0)
    declared = f"{facts.prefix} prefix + " if facts.prefix else ""
    grid = f"{first[0]}x{first[1]}"
    why = f"{tokens} tokens fit neither {declared}the {grid} patch grid nor its stages"
    raise LayoutError(name, shape, why)


def _complete(
    layout: Layout, name: str, shape: tuple[int, ...], size: tuple[int, int], facts: ModelFacts
) -> Layout:
    """An explicit layout checked against the shape, a tokens layout's missing grid/prefix filled in."""
    if layout.kind in (CHANNELS_FIRST, VOLUME) and len(shape) == 5:
        return Layout.volume(shape[2])
    if layout.kind in (CHANNELS_FIRST, CHANNELS_LAST):
        if len(shape) != 4:
            raise GradCAMError(f"layer '{name}' outputs {tuple(shape)}; a {layout.kind} layout needs 4 axes")
        return layout
    if len(shape) != 3:
        raise GradCAMError(f"layer '{name}' outputs {tuple(shape)}; a tokens layout needs (B, N, D)")
    if layout.grid is None:
        found = _token_layout(name, shape, size, facts)
        if layout.prefix is not None and found.prefix != layout.prefix:
            raise LayoutError(name, shape, f"its tokens do not fit the given prefix {layout.prefix}")
        return found
    prefix = layout.prefix if layout.prefix is not None else shape[1] - layout.grid[0] * layout.grid[1]
    if prefix < 0 or prefix + layout.grid[0] * layout.grid[1] != shape[1]:
        raise GradCAMError(
            f"layer '{name}' has {shape[1]} tokens; the layout's {layout.prefix or 0} prefix + "
            f"{layout.grid[0]}x{layout.grid[1]} grid does not add up to that"
        )
    return Layout(TOKENS, layout.grid, prefix)
