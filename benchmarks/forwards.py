"""Images forwarded through the model by the front ends: counted, not timed.

Two runs, each counted with call-scoped global module hooks that add up the batch size of every
*outermost* module call (a model's forward; its submodules' calls inside it are not counted again):

* ``gradcam explain`` of two images with ``--topk 3`` on the bundled model (needed: one probe for the
  automatic layer, then the two images once);
* ``gradcam study create`` with 4 images, two models (EfficientNet-Lite0 and Lite1) and the two guided
  methods (needed: 16 image-forwards, one probe per model).

Run: ``.venv/bin/python benchmarks/forwards.py``. Needs the test extra (Lite1's weights).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.modules import module as torch_module
from typer.testing import CliRunner

from gradcam.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextmanager
def counted() -> Iterator[dict[str, int]]:
    """Count images through outermost module calls while the block runs."""
    tally = {"images": 0, "calls": 0}
    depth = [0]

    def before(module: torch.nn.Module, args: tuple) -> None:
        # torchvision's transforms are modules too: preprocessing is not a forward of the model.
        transform = type(module).__module__.startswith("torchvision.transforms")
        if depth[0] == 0 and not transform and args and isinstance(args[0], torch.Tensor):
            tally["images"] += int(args[0].shape[0]) if args[0].dim() else 1
            tally["calls"] += 1
        depth[0] += 1

    def after(module: torch.nn.Module, args: tuple, output: object) -> None:
        depth[0] -= 1

    handles = [
        torch_module.register_module_forward_pre_hook(before),
        torch_module.register_module_forward_hook(after, always_call=True),
    ]
    try:
        yield tally
    finally:
        for handle in handles:
            handle.remove()


def run(label: str, args: list[str], check: Callable[[str], None] = lambda out: None) -> None:
    with counted() as tally:
        result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"{label}: exit {result.exit_code}\n{result.output}")
    print(f"{label:62} {tally['images']:4d} images in {tally['calls']:3d} forwards")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gradcam-forwards-"))
    try:
        cat, coffee = SAMPLES / "cat.png", SAMPLES / "coffee.png"
        run(
            "explain 2 images --topk 3 (needed: 1 probe + 2)",
            ["explain", str(cat), str(coffee), "--topk", "3", "--out", str(work / "explain")],
        )
        folder = work / "images"
        folder.mkdir()
        for index, source in enumerate((cat, coffee, cat, coffee)):
            shutil.copy(source, folder / f"{index}-{source.name}")
        run(
            "study create 4 images x 2 models x 2 guided (needed: 16 + 2)",
            [
                "study", "create", "--stronger", "efficientnet-lite1", "--weaker", "efficientnet-lite0",
                "--images", str(folder), "--seed", "1", "--db", str(work / "study.db"),
            ],
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
