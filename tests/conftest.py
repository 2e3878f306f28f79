"""Shared fixtures: small networks whose maps can be derived by hand or checked against captum."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: Set by .ci/run: there a test that needs a missing module or tool fails instead of skipping.
REQUIRE_ALL = "GRADCAM_REQUIRE_ALL"


def require(name: str, reason: str, *, tool: bool = False) -> Any:
    """The module ``name``, imported, or with ``tool=True`` the path of the program ``name`` (on PATH, or
    an absolute path). When it is missing the calling test (or, at module level, the whole module) is
    skipped with ``reason``, unless ``GRADCAM_REQUIRE_ALL=1``: then it fails, so that CI cannot pass with
    a part of the suite silently left out."""
    if tool:
        found: Any = shutil.which(name)
        problem = f"{name} not found" if found is None else None
    else:
        try:
            found, problem = importlib.import_module(name), None
        except ImportError as error:
            found, problem = None, f"cannot import {name}: {error}"
    if problem is None:
        return found
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}; {problem}, and {REQUIRE_ALL}=1 makes that a failure", pytrace=False)
    pytest.skip(f"{reason} ({problem})", allow_module_level=True)


class TinyHead(nn.Module):
    """x -> conv (the explained layer) -> [in-place ReLU] -> global average pool -> linear."""

    def __init__(self, channels: int = 4, classes: int = 3, inplace_relu: bool = False, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace_relu) if relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class GuidedRule(torch.autograd.Function):
    """relu forward; backward passes relu(R) only where the input was positive: Guided Backpropagation's
    rule (Springenberg et al. 2015), written out for the tests' references."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return grad.clamp_min(0) * (x > 0)


class SpatialHead(nn.Module):
    """conv (explained) -> ReLU -> 1x1 conv -> position-weighted sum -> linear: gradients vary by position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.mix = nn.Conv2d(5, 6, 1)
        self.register_buffer("where", torch.rand(1, 1, 6, 7))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((torch.relu(self.mix(torch.relu(self.conv(x)))) * self.where).sum(dim=(2, 3)))

    def reference(self, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """A = conv(x) and G = dS^c/dA by plain autograd, as numpy arrays (B,K,h,w)."""
        activations = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1).detach().requires_grad_(True)
        head = (torch.relu(self.mix(torch.relu(activations))) * self.where).sum(dim=(2, 3))
        scores = self.fc(head)[torch.arange(len(targets)), targets]
        (gradients,) = torch.autograd.grad(scores.sum(), activations)
        return activations.detach().numpy(), gradients.numpy()


def tiny_classifier(name: str, device: str | None = None) -> Any:
    """A stand-in for ``models.load`` (a ModelPool's or ServeSettings' ``loader``): a
    :class:`TinyHead` on 32x32 inputs with classes cat, dog, fish, the same weights under every name,
    so two of them always agree on an image (as a study's stronger and weaker model must)."""
    from gradcam.models import LoadedModel
    from gradcam.models.base import Preprocess

    generator = torch.Generator().manual_seed(0)
    module = TinyHead()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    preprocess = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return LoadedModel(name, module.eval(), preprocess, ["cat", "dog", "fish"])


def new_rater(store: Any, study_id: str) -> str:
    """A new rater of a study in ``store`` (a StudyStore), by invitation where the store has them, else
    by the older self-issued rater id."""
    if hasattr(store, "invite"):
        return store.invite(study_id)[0].rater
    return store.issue_rater(study_id)


def tiny_vit_options(**overrides: object) -> dict[str, object]:
    """The small Hugging Face ViT/DeiT config the transformer tests share (2 layers, 2 heads, width 32);
    ``overrides`` set the image and patch size, labels, attention implementation."""
    options: dict[str, object] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return {**options, **overrides}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of tiny networks: with several, synchronisation costs more than the
    arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_gradcam(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``gradcam`` command in a real subprocess (wide columns, so rich does not wrap its output)."""
    return subprocess.run(
        [sys.executable, "-m", "gradcam", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
