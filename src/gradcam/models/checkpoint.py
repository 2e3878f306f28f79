"""Reading user checkpoints and label files safely."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from gradcam.errors import GradCAMError


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict without running code from the file.

    ``.safetensors`` files are read with safetensors (tensors only by design), anything else with
    ``torch.load(weights_only=True)``. Accepts a bare state dict or one wrapped as
    ``{"state_dict": ...}`` / ``{"model": ...}``, and strips the ``module.`` prefix that DataParallel
    and DistributedDataParallel add.
    """
    file = Path(path)
    if not file.is_file():
        raise GradCAMError(f"weights file {file}: no such file")
    state = _read_safetensors(file) if file.suffix == ".safetensors" else _read_pickle(file)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GradCAMError(f"weights file {file}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _read_pickle(file: Path) -> object:
    """``torch.load(weights_only=True)`` with one-line errors."""
    if not _looks_like_torch_save(file):  # else pickle reads text as opcodes and blames "objects"
        raise GradCAMError(f"weights file {file}: not a PyTorch state dict file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise GradCAMError(
                f"weights file {file}: holds objects other than tensors; refused (only plain state dicts "
                "are loaded, so that no code from the file can run)"
            ) from None
        raise GradCAMError(f"weights file {file}: not a PyTorch state dict file") from None
    except Exception:  # torch raises many types for a corrupt file; all mean the same here
        raise GradCAMError(f"weights file {file}: not a PyTorch state dict file") from None


def _looks_like_torch_save(file: Path) -> bool:
    """Whether ``file`` can be a ``torch.save`` file: a zip archive (torch >= 1.6) or the legacy format,
    which starts with a pickle protocol 2+ header."""
    if zipfile.is_zipfile(file):
        return True
    with file.open("rb") as handle:
        return handle.read(1) == b"\x80"


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, on the CPU, with one-line errors."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise GradCAMError(
            f"weights file {file}: reading .safetensors needs safetensors: pip install 'gradcam[zoo]'"
        ) from None
    try:
        return load_file(file, device="cpu")
    except Exception:  # SafetensorError, OSError, ...: all mean a file that is not valid safetensors
        raise GradCAMError(f"weights file {file}: not a valid .safetensors file") from None


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """Name of the last Linear/Conv2d module producing ``num_classes`` outputs: the classifier."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            found = name
    if found is None:
        raise GradCAMError(f"cannot find the classifier layer of {type(model).__name__}")
    return found


def num_classes_in(state: dict[str, torch.Tensor], classifier: str, file: object) -> int:
    """Number of classes stored in a state dict, read from the classifier's weight."""
    key = f"{classifier}.weight"
    if key not in state:
        raise GradCAMError(f"weights file {file}: no '{key}' entry; is it for this architecture?")
    return int(state[key].shape[0])


def load_into(model: nn.Module, state: dict[str, torch.Tensor], file: object) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not fit."""
    own = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    if mismatched:
        raise GradCAMError(
            f"weights file {file} does not fit {type(model).__name__}: "
            f"shape mismatch {', '.join(mismatched[:3])} (file vs model)"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # anything the shape check above did not foresee
        reason = str(error).strip().splitlines()[-1].strip() if str(error).strip() else "load failed"
        raise GradCAMError(f"weights file {file} does not fit {type(model).__name__}: {reason}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:3])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
    if problems:
        raise GradCAMError(f"weights file {file} does not fit {type(model).__name__}: {'; '.join(problems)}")


def read_labels(path: str | os.PathLike[str], num_classes: int | None = None) -> list[str]:
    """Class names from a text file, one per line (blank lines at the end ignored)."""
    file = Path(path)
    if not file.is_file():
        raise GradCAMError(f"labels file {file}: no such file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GradCAMError(f"labels file {file}: not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if num_classes is not None and len(labels) != num_classes:
        raise GradCAMError(f"labels file {file} has {len(labels)} names; the model has {num_classes} classes")
    return labels
