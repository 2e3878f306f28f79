r"""The model-parameter randomisation test, cascading form (Adebayo, Gilmer, Muelly, Goodfellow, Hardt and
Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018, section 3.1).

If a saliency map explains the *model*, it must change when the model's learned parameters are destroyed.
The cascading test destroys them one block at a time, from the top (output) layer down to the input,
cumulatively: step k has blocks 1..k re-initialised. After each step the map is recomputed for the same
images and the SAME target classes (the original model's, fixed once), and compared with the original
model's map by

- the Spearman rank correlation of the absolute values of the two maps (flattened), and
- SSIM, the structural similarity (Wang et al., IEEE TIP 2004) of the two maps scaled to [0, 1]
  (``skimage.metrics.structural_similarity`` with ``data_range=1``, its default 7x7 uniform window).

A method sensitive to the model's parameters loses similarity as the randomisation goes deeper; the paper
finds Grad-CAM does, while Guided Backpropagation stays almost unchanged down to the lowest layers (it
acts largely as an edge detector).

Protocol details here:

- The blocks are those of :func:`randomisation_steps`, randomised in reverse order of first execution.
- Re-initialising a block calls ``reset_parameters()`` on every submodule of the block that has one, as
  Quantus's ``ModelParameterRandomisation`` does (``nn.Conv2d`` / ``nn.Linear``: PyTorch's default
  Kaiming-uniform initialisation; ``nn.BatchNorm``: running statistics reset, weight 1, bias 0). It runs
  with the CPU (and the model's CUDA devices') random generator seeded with ``seed + step`` inside
  :func:`torch.random.fork_rng`, so a run is reproducible and the caller's random state is untouched.
  Parameters owned by modules without ``reset_parameters`` (custom layers holding a raw
  ``nn.Parameter``, parameters set on the root module itself, blocks that never run in the forward pass)
  are left as trained: :attr:`SanityResult.not_reset` names them.
- Maps come from :func:`gradcam.metrics.saliency.make_saliency`, are upsampled bilinearly to the input's size
  and divided by their maximum (an all-zero map stays zero).
- When either map is constant (a randomised Grad-CAM map is often all zero after its ReLU) the rank
  correlation is undefined (``scipy.stats.spearmanr`` returns NaN); it is taken as 0: a map with no
  ordering shares no ranking with the original.
- Step 0 is the original model: similarity 1 by definition.

Everything runs on a deep copy of the model; the model passed in is never modified.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from gradcam.capture import eval_mode, resolve_module
from gradcam.errors import GradCAMError
from gradcam.explanation import normalise, upsample
from gradcam.layouts import LayoutSpec
from gradcam.metrics.checks import as_map
from gradcam.metrics.saliency import make_saliency
from gradcam.targets import TargetSpec, model_logits, resolve
from gradcam.viz import save_figure

#: Containers that are expanded into their items instead of being randomised whole (exact types: a
#: subclass such as torchvision's ``Conv2dNormActivation`` is a layer of its own and stays whole).
CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: The label of step 0, the original model.
ORIGINAL = "original"
#: SSIM's window side (scikit-image's default); smaller maps use the largest odd side that fits.
SSIM_WINDOW = 7


# --------------------------------------------------------------------------------------------- blocks


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _candidate_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks in definition order (see :func:`randomisation_steps`)."""
    blocks: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def collect(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            if not _has_parameters(child):
                continue
            qualified = f"{prefix}{name}"
            if type(child) in CONTAINERS:
                collect(child, qualified + ".")
            else:
                blocks.append((qualified, child))

    collect(model, "")
    if not blocks and next(model.parameters(recurse=False), None) is not None:
        blocks.append(("", model))  # a bare layer (nn.Linear) is its own single block
    return blocks


def _resettable(block_name: str, block: nn.Module) -> list[str]:
    """Qualified names of the block's submodules (itself included) that have ``reset_parameters``."""
    names = []
    for sub, module in block.named_modules():
        if callable(getattr(module, "reset_parameters", None)):
            names.append(".".join(part for part in (block_name, sub) if part))
    return names


def randomisation_steps(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, list[str]]]:
    """The blocks the cascading randomisation re-initialises, top (output) first.

    Each entry is ``(label, modules)``: the block's qualified name and the qualified names of the modules
    whose ``reset_parameters()`` re-initialises it (the block's submodules that have one, itself included).

    The rule: walk the model's children from the root. A child without parameters is skipped. A plain
    container (exactly ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``, whose items are the
    network's repeated blocks) is expanded into its items, recursively; any other child with parameters is
    one block, kept whole. So torchvision's ResNet gives ``fc``, ``layer4.1``, ``layer4.0``, ...,
    ``layer1.0``, ``bn1``, ``conv1`` and EfficientNet-Lite gives ``_fc``, ``_bn1``, ``_conv_head``,
    ``_blocks.15``, ..., ``_blocks.0``, ``_bn0``, ``_conv_stem``; the layers of a flat ``nn.Sequential``
    (VGG's ``features``) are blocks one by one.

    The blocks are ordered by when they are first called in one inference forward pass on ``inputs[:1]``
    (temporary pre-hooks, removed afterwards; the model runs in eval mode, every flag restored), then
    reversed. Blocks that never run have no effect on the output and are left out. Parameters held by the
    root module itself belong to no block (a root without children but with parameters is one block,
    labelled "(model)").
    """
    if not isinstance(model, nn.Module):
        raise GradCAMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_inputs(inputs)
    blocks = _candidate_blocks(model)
    first_call: dict[int, int] = {}
    handles = []

    def make_hook(index: int):
        def hook(module: nn.Module, args: object) -> None:
            first_call.setdefault(index, len(first_call))

        return hook

    with eval_mode(model):
        try:
            for index, (_, block) in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(make_hook(index)))
            with torch.no_grad():
                model(inputs[:1].detach().clone())
        finally:
            for handle in handles:
                handle.remove()
    ran = sorted(first_call, key=first_call.__getitem__, reverse=True)
    return [(blocks[i][0] or "(model)", _resettable(*blocks[i])) for i in ran]


# ----------------------------------------------------------------------------------------- similarity


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of |a| and |b|, two (H,W) maps flattened (ties get average ranks).

    0.0 when either map is constant: the correlation is undefined there (no ordering to compare), and a
    map with no ordering shares no ranking with the other.
    """
    x, y = np.abs(as_map(a)).ravel(), np.abs(as_map(b)).ravel()
    if x.shape != y.shape:
        raise GradCAMError(f"maps differ in shape: {as_map(a).shape} and {as_map(b).shape}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """SSIM of two (H,W) maps with values in [0, 1] (scikit-image, ``data_range=1``, 7x7 uniform window;
    smaller maps use the largest odd window that fits, at least 3)."""
    x, y = as_map(a), as_map(b)
    if x.shape != y.shape:
        raise GradCAMError(f"maps differ in shape: {x.shape} and {y.shape}")
    side = min(SSIM_WINDOW, min(x.shape))
    side -= 1 - side % 2
    if side < 3:
        raise GradCAMError(f"SSIM needs maps of at least 3x3 pixels, got {x.shape}")
    return float(structural_similarity(x, y, data_range=1.0, win_size=side))


# ---------------------------------------------------------------------------------------------- result


@dataclass
class SanityStep:
    """One step of the cascade for one method.

    Attributes:
        index: 0 for the original model, k when the top k blocks are re-initialised.
        layer: the block re-initialised at this step ("original" at step 0).
        spearman: mean over the images of the rank correlation with the original map.
        ssim: mean over the images of the SSIM with the original map.
        spearman_per_image, ssim_per_image: the B values behind the means.
        maps: (B,H,W) the maps at this step, at the input's size, each divided by its maximum (CPU).
    """

    index: int
    layer: str
    spearman: float
    ssim: float
    spearman_per_image: list[float]
    ssim_per_image: list[float]
    maps: torch.Tensor


@dataclass
class SanityResult:
    """The cascading randomisation of one batch.

    Attributes:
        steps: the step labels, ``"original"`` then the blocks top-down (``steps[k]`` labels step k).
        blocks: :func:`randomisation_steps` of the model: (label, modules reset) per step from 1.
        methods: per method name, its :class:`SanityStep` list, index-aligned with ``steps``.
        targets: (B,) the explained classes, fixed for every step (CPU).
        not_reset: qualified names of parameters no step re-initialised (see the module docstring).
        seed: step k re-initialised its block with the random generators seeded with seed + k.
    """

    steps: list[str]
    blocks: list[tuple[str, list[str]]]
    methods: dict[str, list[SanityStep]]
    targets: torch.Tensor
    not_reset: list[str]
    seed: int

    def curve(self, method: str, metric: str = "spearman") -> list[float]:
        """One method's mean similarity ("spearman" or "ssim") per step, step 0 first."""
        if method not in self.methods:
            raise GradCAMError(f"method '{method}' not in this result; have {', '.join(self.methods)}")
        if metric not in ("spearman", "ssim"):
            raise GradCAMError(f"metric must be 'spearman' or 'ssim', got {metric!r}")
        return [getattr(step, metric) for step in self.methods[method]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no maps)."""
        return {
            "methods": {
                name: [
                    {
                        "step": s.index,
                        "layer": s.layer,
                        "spearman": s.spearman,
                        "ssim": s.ssim,
                        "spearman_per_image": list(s.spearman_per_image),
                        "ssim_per_image": list(s.ssim_per_image),
                    }
                    for s in steps
                ]
                for name, steps in self.methods.items()
            },
            "steps": list(self.steps),
            "blocks": [{"layer": label, "modules": list(modules)} for label, modules in self.blocks],
            "targets": [int(t) for t in self.targets],
            "not_reset": list(self.not_reset),
            "seed": self.seed,
        }


# ------------------------------------------------------------------------------------------ the test


def _check_inputs(inputs: object) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.dtype.is_floating_point:
        got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise GradCAMError(f"inputs must be a 4-D float tensor (B,C,H,W), got {got}")
    if inputs.shape[0] == 0:
        raise GradCAMError("inputs must hold at least one image, got an empty batch")
    return inputs


def _cuda_devices(model: nn.Module) -> list[int]:
    devices = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cuda":
            index = tensor.device.index
            devices.add(torch.cuda.current_device() if index is None else index)
    return sorted(devices)


@contextmanager
def _private_rng(cuda_devices: list[int]) -> Iterator[None]:
    """The CPU generator and the given CUDA devices' generators, restored on exit."""
    with torch.random.fork_rng(devices=cuda_devices):
        yield


def _seed(seed: int, cuda_devices: list[int]) -> None:
    # Not torch.manual_seed: it would also (lazily) seed every CUDA device, outside the forked ones.
    torch.default_generator.manual_seed(seed)
    for device in cuda_devices:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _not_reset(model: nn.Module, blocks: list[tuple[str, list[str]]]) -> list[str]:
    owners = {name for _, modules in blocks for name in modules}
    left = []
    for owner, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if owner not in owners:
                left.append(f"{owner}.{name}" if owner else name)
    return left


def _maps(function: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raw = function(inputs, targets).detach().to("cpu", torch.float32)
    return normalise(upsample(raw, (inputs.shape[2], inputs.shape[3])).abs())


def _compare(original: torch.Tensor, maps: torch.Tensor) -> tuple[list[float], list[float]]:
    return (
        [spearman(a, b) for a, b in zip(original, maps, strict=True)],
        [ssim(a, b) for a, b in zip(original, maps, strict=True)],
    )


def cascading_randomisation(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetSpec = None,
    methods: Sequence[str] = ("gradcam", "guided-backprop"),
    *,
    layer: str | nn.Module | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    layout: LayoutSpec = None,
) -> SanityResult:
    """Run the cascading model-parameter randomisation test (Adebayo et al., NeurIPS 2018) on a batch.

    Args:
        model: a classifier returning pre-softmax scores (B, classes). Never modified: the test runs on
            ``copy.deepcopy(model)`` (state, train/eval flags, ``requires_grad``, ``.grad`` and hooks of
            the model passed in are left as they are; hooks it carries are copied along and run on the
            copy).
        inputs: (B,C,H,W) model inputs, on the model's device.
        targets: the classes to explain, fixed for every step; None: each image's top-1 class under the
            original model.
        methods: names accepted by :func:`gradcam.metrics.saliency.make_saliency` (a CAM method,
            "guided-backprop", "guided-gradcam", or a model-free baseline as a control).
        layer: the CAM layer: a qualified name, a module of ``model`` (its name is looked up), or None
            (automatic, chosen once on the original model).
        mean, std: the model's input normalisation (for the "sobel" baseline).
        seed: step k re-initialises its block with the random generators seeded with ``seed + k``
            (inside :func:`torch.random.fork_rng`: the caller's random state is left as it was).
        layout: the CAM layer's layout when it cannot be decided (see :class:`gradcam.GradCAM`).

    Returns:
        A :class:`SanityResult`: per method and step the mean and per-image Spearman rank correlation of
        the absolute maps and SSIM with the original model's maps, and the maps themselves.

    See the module docstring for the protocol and its limits (modules without ``reset_parameters``).
    """
    if not isinstance(model, nn.Module):
        raise GradCAMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _check_inputs(inputs)
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise GradCAMError("methods is empty; expected at least one method name")
    if len(set(names)) != len(names):
        raise GradCAMError(f"methods repeat a name: {names}")

    if isinstance(layer, nn.Module):
        layer = resolve_module(model, layer)[0]  # the copy has its own modules: pass it on by name
    subject = copy.deepcopy(model)
    blocks = randomisation_steps(subject, inputs)
    with torch.no_grad(), eval_mode(subject):
        logits = model_logits(subject(inputs.detach().clone()), inputs.shape[0])
    ids = resolve(logits, targets)
    # Built once: a layer given by name is resolved to the copy's module, which the resets modify in place.
    functions = {
        name: make_saliency(name, subject, layer=layer, mean=mean, std=std, seed=seed, layout=layout)
        for name in names
    }

    devices = _cuda_devices(subject)
    batch = inputs.shape[0]
    results: dict[str, list[SanityStep]] = {}
    with _private_rng(devices):
        originals = {name: _maps(function, inputs, ids) for name, function in functions.items()}
        for name, maps in originals.items():
            ones = [1.0] * batch
            results[name] = [SanityStep(0, ORIGINAL, 1.0, 1.0, ones, list(ones), maps)]
        for index, (label, modules) in enumerate(blocks, start=1):
            _seed(seed + index, devices)
            for qualified in modules:
                subject.get_submodule(qualified).reset_parameters()
            for name, function in functions.items():
                maps = _maps(function, inputs, ids)
                rho, structure = _compare(originals[name], maps)
                results[name].append(
                    SanityStep(
                        index,
                        label,
                        float(np.mean(rho)),
                        float(np.mean(structure)),
                        rho,
                        structure,
                        maps,
                    )
                )
    return SanityResult(
        steps=[ORIGINAL, *(label for label, _ in blocks)],
        blocks=blocks,
        methods=results,
        targets=ids.detach().cpu(),
        not_reset=_not_reset(subject, blocks),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------ plots


def plot_similarity(result: SanityResult, path: str | os.PathLike[str]) -> Path:
    """Spearman rank correlation and SSIM against randomisation depth, one line per method; PNG, written
    atomically. The x axis runs from the original model to the fully randomised one, labelled by block."""
    depth = np.arange(len(result.steps))
    figure = Figure(figsize=(max(8.0, 0.32 * len(depth) + 3.0), 7.5), dpi=100)
    axes = figure.subplots(2, 1, sharex=True)
    for ax, metric, title in zip(
        axes, ("spearman", "ssim"), ("Spearman rank correlation", "SSIM"), strict=True
    ):
        for method in result.methods:
            ax.plot(depth, result.curve(method, metric), marker="o", markersize=3, label=method)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_ylabel(title)
        ax.set_ylim(min(-0.1, *(min(result.curve(m, metric)) - 0.05 for m in result.methods)), 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Cascading model-parameter randomisation (Adebayo et al., 2018)", fontsize=10)
    axes[1].set_xticks(depth)
    axes[1].set_xticklabels(result.steps, rotation=90, fontsize=7)
    axes[1].set_xlabel("re-initialised down to (top to bottom)")
    figure.tight_layout()
    return save_figure(figure, path, tight=False)


def plot_strip(
    result: SanityResult,
    method: str,
    path: str | os.PathLike[str],
    image_index: int = 0,
    pictures: torch.Tensor | None = None,
) -> Path:
    """One image's maps at every step of the cascade, left to right, for one method; PNG, written
    atomically. With ``pictures`` (B,3,H,W) in [0, 1], the image itself comes first."""
    if method not in result.methods:
        raise GradCAMError(f"method '{method}' not in this result; have {', '.join(result.methods)}")
    steps = result.methods[method]
    batch = steps[0].maps.shape[0]
    if not -batch <= image_index < batch:
        raise GradCAMError(f"image_index {image_index} is out of range for a batch of {batch}")
    panels: list[tuple[str, np.ndarray, bool]] = []
    if pictures is not None:
        if pictures.dim() != 4 or pictures.shape[0] != batch or pictures.shape[1] != 3:
            raise GradCAMError(f"pictures must be ({batch},3,H,W), got shape {tuple(pictures.shape)}")
        picture = pictures[image_index].detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
        panels.append(("image", np.clip(picture, 0.0, 1.0), False))
    for step in steps:
        panels.append((step.layer, step.maps[image_index].numpy(), True))
    figure = Figure(figsize=(1.25 * len(panels), 1.75), dpi=100)
    for position, (title, array, is_map) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), position + 1)
        if is_map:
            ax.imshow(array, cmap="jet", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(array)
        ax.set_title(title, fontsize=6, parse_math=False)
        ax.axis("off")
    figure.suptitle(f"{method}: cascading randomisation", fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.78, wspace=0.05)
    return save_figure(figure, path, tight=False)


__all__ = [
    "SanityResult",
    "SanityStep",
    "cascading_randomisation",
    "plot_similarity",
    "plot_strip",
    "randomisation_steps",
    "spearman",
    "ssim",
]
