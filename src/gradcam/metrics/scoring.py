"""Scoring perturbed images: the target's softmax probability, in bounded batches, model left as found."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.models.base import model_device
from gradcam.targets import model_logits

#: Images scored per forward pass by the perturbation metrics unless told otherwise.
DEFAULT_BATCH_SIZE = 32


@torch.no_grad()
def target_probabilities(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """softmax(f(x_m))[t_m] for each row m of ``inputs`` (M,C,H,W) and ``targets`` (M,), as a float64
    CPU tensor (M,). Runs in eval mode (each module's flag restored), ``batch_size`` rows per forward."""
    device = model_device(model)
    out = []
    with torch.inference_mode(False), eval_mode(model):
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            t = targets[start : start + batch_size].to(device)
            logits = model_logits(model(x))
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= logits.shape[1]):
                raise GradCAMError(
                    f"target class {int(t.max()) if int(t.min()) >= 0 else int(t.min())} is out of range; "
                    f"expected 0..{logits.shape[1] - 1}"
                )
            probs = torch.softmax(logits.double(), dim=1)
            out.append(probs.gather(1, t[:, None].long())[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def score_stream(
    model: nn.Module,
    images: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Probabilities for a stream of (images (m,C,H,W), targets (m,)) pieces, regrouped into forwards of
    exactly ``batch_size`` rows (the last one shorter), so that perturbed images can be generated lazily
    with at most one batch in memory. Returns (M,) float64 in stream order."""
    pending_x: list[torch.Tensor] = []
    pending_t: list[torch.Tensor] = []
    pending = 0
    results = []

    def flush(rows: int) -> None:
        nonlocal pending
        x, t = torch.cat(pending_x), torch.cat(pending_t)
        pending_x[:] = [x[rows:]] if rows < len(x) else []
        pending_t[:] = [t[rows:]] if rows < len(t) else []
        pending = len(x) - rows
        results.append(target_probabilities(model, x[:rows], t[:rows], batch_size=batch_size))
        if on_batch is not None:
            on_batch(rows)

    for x, t in images:
        pending_x.append(x)
        pending_t.append(t)
        pending += len(x)
        while pending >= batch_size:
            flush(batch_size)
    if pending:
        flush(pending)
    return torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The model's logits (B, classes) for ``inputs``, as a float CPU tensor; eval mode, flags restored."""
    device = model_device(model)
    out = []
    with torch.inference_mode(False), eval_mode(model):
        for start in range(0, len(inputs), batch_size):
            out.append(model_logits(model(inputs[start : start + batch_size].to(device))).float().cpu())
    return torch.cat(out)
