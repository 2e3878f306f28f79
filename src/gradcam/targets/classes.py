"""Class targets of classifiers: the logits in a model's output, class indices per image, class names."""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradcam.errors import GradCAMError

TargetSpec = int | Sequence[int] | torch.Tensor | None


def model_logits(output: object, batch: int | None = None) -> torch.Tensor:
    """The logits (B, classes) in a model's output, by one rule.

    The output itself when it is a tensor; else its ``logits``: the ``"logits"`` entry of a mapping or
    the ``.logits`` attribute of an object (a Hugging Face ``ModelOutput`` is both); else the first
    element of a tuple or list. Anything else, or logits that are not (B, classes), is refused with one
    line saying what came back.
    """
    found = output
    if not isinstance(found, torch.Tensor):
        if isinstance(found, Mapping) and "logits" in found:
            found = found["logits"]
        elif isinstance(getattr(found, "logits", None), torch.Tensor):
            found = found.logits
        elif isinstance(found, (tuple, list)) and found and isinstance(found[0], torch.Tensor):
            found = found[0]
    if not isinstance(found, torch.Tensor):
        keys = f" with keys {', '.join(map(str, list(output)[:5]))}" if isinstance(output, Mapping) else ""
        raise GradCAMError(
            f"model returned {type(output).__name__}{keys}; expected logits (B, classes) (a tensor, a "
            "mapping or object with 'logits', or a tuple of them first), or give a target function "
            "(gradcam.targets: Segmentation, Box, Detections, Similarity, Regression)"
        )
    expected = f"({batch}, classes)" if batch is not None else "(B, classes)"
    if found.dim() != 2 or (batch is not None and found.shape[0] != batch):
        raise GradCAMError(f"model must return logits of shape {expected}, got {tuple(found.shape)}")
    return found


def resolve(logits: torch.Tensor, targets: TargetSpec) -> torch.Tensor:
    """Class index per image, as a (B,) long tensor on the logits' device.

    ``None`` picks each image's top-1 class; an int applies to every image; a sequence or 1-D tensor
    gives one class per image and must have exactly B entries (never silently padded or cut).
    """
    batch, num_classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    if isinstance(targets, bool):
        raise GradCAMError(f"targets must be class indices, got {targets!r}")
    if isinstance(targets, numbers.Integral):
        ids = torch.full((batch,), int(targets), dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.dim() == 0:
            targets = targets.reshape(1).expand(batch)
        if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise GradCAMError(
                f"targets tensor must be 1-D integer with {batch} entries, "
                f"got dtype {targets.dtype} and shape {tuple(targets.shape)}"
            )
        ids = targets.detach().to("cpu", torch.long)
    elif isinstance(targets, Sequence) and not isinstance(targets, str):
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if bad:
            raise GradCAMError(f"targets must be integer class indices, got {bad[0]!r}")
        ids = torch.tensor([int(t) for t in targets], dtype=torch.long)
    else:
        raise GradCAMError(
            f"targets must be None, an int, a sequence of ints or a 1-D tensor, got {type(targets).__name__}"
        )
    if ids.numel() != batch:
        raise GradCAMError(f"got {ids.numel()} targets for a batch of {batch} images; expected {batch}")
    out_of_range = ids[(ids < 0) | (ids >= num_classes)]
    if out_of_range.numel():
        raise GradCAMError(
            f"target class {int(out_of_range[0])} is out of range; expected 0..{num_classes - 1}"
        )
    return ids.to(logits.device)


def parse_class(spec: str, labels: Sequence[str]) -> int:
    """A class given on the command line: an index ("281") or a class name ("tabby", any case)."""
    text = spec.strip()
    if len(text) > 200:
        raise GradCAMError(f"target class '{text[:40]}...' is too long to be a class name or index")
    # ASCII digits only: str.isdigit() also accepts '²' or '--1', which int() refuses.
    if re.fullmatch(r"-?[0-9]{1,12}", text):
        index = int(text)
        if not 0 <= index < len(labels):
            raise GradCAMError(f"target class {index} is out of range; expected 0..{len(labels) - 1}")
        return index
    if text in labels:
        return list(labels).index(text)
    lowered = [label.lower() for label in labels]
    matches = [index for index, label in enumerate(lowered) if label == text.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        options = ", ".join(f"{labels[i]!r} ({i})" for i in matches)
        raise GradCAMError(f"target class '{text}' is ambiguous: {options}; give the exact name or index")
    close = difflib.get_close_matches(text.lower(), lowered, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(labels[lowered.index(c)]) for c in close)}?" if close else ""
    raise GradCAMError(f"target class '{text}' is not a class name or index of this model{hint}")
