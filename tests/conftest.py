"""Shared fixtures: small networks whose maps can be derived by hand or checked against captum."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
