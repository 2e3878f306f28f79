"""What every ``gradcam`` command shares: the typer app, consoles, options, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from gradcam import models

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Grad-CAM for PyTorch image classifiers: where did the model look?",
)
stdout = Console()
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name (`gradcam models`).")]
WeightsOption = Annotated[
    Path | None, typer.Option(help="State-dict file of a fine-tuned model of this architecture.")
]
LabelsOption = Annotated[Path | None, typer.Option(help="Class names, one per line.")]
RandomOption = Annotated[bool, typer.Option("--random-weights", help="Random weights (no download).")]
DeviceOption = Annotated[str, typer.Option(help="cpu or cuda.")]
LayoutOption = Annotated[
    str | None,
    typer.Option(
        help="How the layer's output reads as a map when it cannot be told from the model: "
        "channels-first, channels-last, tokens or tokens:HxW+PREFIX (e.g. tokens:14x14+1)."
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr (one line, no markup) and return the Exit to raise."""
    stderr.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def parse_device(name: str) -> torch.device:
    """The --device option as a torch device, or a one-line error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise fail(f"--device '{name}' is not a device; expected cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise fail(f"--device '{name}': expected cpu or cuda")
    return device


def load_model(
    model: str, weights: Path | None, labels: Path | None, random_weights: bool
) -> models.LoadedModel:
    """The model the options name (GradCAMError when it cannot be loaded)."""
    return models.load(model, pretrained=not random_weights, weights=weights, labels=labels)


def output_folder(out: Path) -> Path:
    """Create the --out folder, or a one-line error when it is a file or cannot be created."""
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file; expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fail(f"--out {out}: cannot create the output folder ({error.strerror or error})") from None
    return out
