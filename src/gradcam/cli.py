"""The ``gradcam`` command line: parse, call the library, print. No map is computed here."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from gradcam import io, models
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.layers import choose_layer, list_layers
from gradcam.methods import GradCAM
from gradcam.outputs import slug, write_explanation
from gradcam.targets import parse_class

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Grad-CAM for PyTorch image classifiers: where did the model look?",
)
stdout = Console()
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

BATCH = 16

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name (`gradcam models`).")]
WeightsOption = Annotated[
    Path | None, typer.Option(help="State-dict file of a fine-tuned model of this architecture.")
]
LabelsOption = Annotated[Path | None, typer.Option(help="Class names, one per line.")]
RandomOption = Annotated[bool, typer.Option("--random-weights", help="Random weights (no download).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    stderr.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise _fail(f"--device '{name}' is not a device; expected cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise _fail(f"--device '{name}': expected cpu or cuda")
    return device


def _load_model(model: str, weights: Path | None, labels: Path | None, random_weights: bool):
    return models.load(model, pretrained=not random_weights, weights=weights, labels=labels)


@dataclass
class _Item:
    path: Path
    stem: str
    image: object
    tensor: torch.Tensor
    predictions: list[dict] = field(default_factory=list)
    explanations: list[dict] = field(default_factory=list)


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def _explain_batch(
    items: list[_Item], loaded, cam: GradCAM, targets: list[int], topk: int, out: Path, counterfactual: bool
) -> str:
    """Explain one batch for every wanted class, write the files; returns the explained layer's name."""
    batch = torch.stack([item.tensor for item in items]).to(next(loaded.module.parameters()).device)
    first = cam(batch)  # each image's top-1; its logits give the rankings for every other slot
    ranking = first.logits.softmax(dim=1)
    top_probs, top_ids = ranking.topk(min(5, ranking.shape[1]), dim=1)
    per_image_targets = []
    for row in range(len(items)):
        items[row].predictions = [
            {"index": int(i), "class": loaded.labels[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(top_probs[row], top_ids[row], strict=True)
        ]
        ranked = ranking[row].argsort(descending=True)[:topk].tolist() if topk else []
        wanted = list(dict.fromkeys(ranked + targets)) or [int(first.targets[row])]
        per_image_targets.append(wanted)
    slots = max(len(t) for t in per_image_targets)
    for slot in range(slots):
        # Images with fewer targets repeat their last one; those repeats are not written twice.
        ids = [t[min(slot, len(t) - 1)] for t in per_image_targets]
        explanation = first if ids == first.targets.tolist() else cam(batch, ids)
        for row, item in enumerate(items):
            if slot >= len(per_image_targets[row]):
                continue
            index = ids[row]
            name = loaded.labels[index]
            probability = float(explanation.probs[row])
            suffix = "_counterfactual" if counterfactual else ""
            picture = loaded.preprocess.frame(item.image)
            files = write_explanation(
                out,
                f"{item.stem}_{index}-{slug(name)}{suffix}",
                picture,
                explanation.maps[row],
                explanation.raw[row],
                f"{item.path.name}: {name} ({probability:.1%}){' counterfactual' if counterfactual else ''}",
            )
            peak_row, peak_col = explanation.peaks()[row].tolist()
            item.explanations.append(
                {
                    "index": index,
                    "class": name,
                    "probability": round(probability, 6),
                    "score": round(float(explanation.scores[row]), 6),
                    "peak": {"row": peak_row, "col": peak_col},
                    "files": files,
                }
            )
    return first.layer


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.", show_default=False)],
    model: ModelOption = models.DEFAULT,
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    layer: Annotated[str | None, typer.Option(help="Layer to explain (default: automatic).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Class index or name; repeat for several.")] = None,
    topk: Annotated[int, typer.Option(min=0, help="Explain each image's K best classes.")] = 0,
    counterfactual: Annotated[bool, typer.Option(help="Regions that speak against the class.")] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("gradcam-out"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
) -> None:
    """Explain images: writes an overlay PNG, a panel PNG and the raw map (.npy) per image and class."""
    torch_device = _device(device)
    try:
        loaded = _load_model(model, weights, labels, random_weights).to(torch_device)
        wanted = [parse_class(spec, loaded.labels) for spec in target or []]
        cam = GradCAM(loaded.module, layer, counterfactual=counterfactual)
    except GradCAMError as error:
        raise _fail(str(error)) from None

    errors: list[dict] = []
    items: list[_Item] = []
    for path, stem in zip(images, _unique_stems(images), strict=True):
        try:
            image = io.load_image(path)
        except ImageLoadError as error:
            stderr.print(f"error: {error}", markup=False)
            errors.append({"image": str(path), "error": str(error)})
            continue
        items.append(_Item(path=path, stem=stem, image=image, tensor=loaded.preprocess(image)))

    layer_name = None
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        try:
            layer_name = _explain_batch(chunk, loaded, cam, wanted, topk, out, counterfactual)
        except GradCAMError as error:
            raise _fail(str(error)) from None
        except RuntimeError as error:  # the model's own forward failed on these inputs
            reason = str(error).strip().splitlines()[0]
            for item in chunk:
                stderr.print(f"error: {item.path}: model forward failed ({reason})", markup=False)
                errors.append({"image": str(item.path), "error": reason})
            continue

    done = [item for item in items if item.explanations]
    if as_json:
        document = {
            "model": loaded.name,
            "layer": layer_name,
            "method": "gradcam",
            "counterfactual": counterfactual,
            "results": [
                {"image": str(i.path), "predictions": i.predictions, "explanations": i.explanations}
                for i in done
            ],
            "errors": errors,
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        _print_results(done, loaded.name, layer_name)
    if errors:
        raise typer.Exit(1)


def _print_results(items: list[_Item], model: str, layer: str | None) -> None:
    for item in items:
        top5 = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in item.predictions)
        stdout.print(f"[bold]{item.path}[/bold] top-5: {top5}", highlight=False)
    folders = {str(Path(path).parent) for i in items for e in i.explanations for path in e["files"].values()}
    table = Table(title=f"Grad-CAM · {model} · layer {layer}")
    table.add_column("image", overflow="fold")
    table.add_column("class", overflow="fold")
    table.add_column("prob.", justify="right")
    table.add_column(f"files written to {', '.join(sorted(folders))}", no_wrap=True)
    for item in items:
        for explained in item.explanations:
            table.add_row(
                item.path.name,
                f"{explained['class']} ({explained['index']})",
                f"{explained['probability']:.1%}",
                "\n".join(Path(path).name for path in explained["files"].values()),
            )
    stdout.print(table)


@app.command("layers")
def layers_command(
    model: ModelOption = models.DEFAULT,
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    all_layers: Annotated[bool, typer.Option("--all", help="List every module, not only 4-D ones.")] = False,
) -> None:
    """List the model's layers in execution order with output shapes; the automatic choice is marked."""
    try:
        loaded = _load_model(model, weights, labels, random_weights)
        dummy = torch.zeros(1, 3, *loaded.input_size)
        infos = list_layers(loaded.module, dummy)
        chosen = choose_layer(infos)
    except GradCAMError as error:
        raise _fail(str(error)) from None
    table = Table(
        title=f"{loaded.name}: layers in execution order (input 1x3x{dummy.shape[2]}x{dummy.shape[3]})"
    )
    for column in ("#", "layer", "type", "output shape", "calls", "note"):
        table.add_column(column, overflow="fold")
    for number, info in enumerate(infos):
        shape = info.output_shape
        if not all_layers and (shape is None or len(shape) != 4):
            continue
        if info.name == chosen:
            note = "← automatic choice"
        elif info.calls > 1:
            note = f"shared: runs {info.calls}x, not usable"
        elif info.is_candidate:
            note = "candidate"
        else:
            note = ""
        table.add_row(
            str(number), info.name, info.kind, "x".join(map(str, shape or ())) or "-", str(info.calls), note
        )
    stdout.print(table)


@app.command("models")
def models_command() -> None:
    """List the models `--model` accepts and whether their pretrained weights are at hand."""
    table = Table(title="Models")
    for column in ("name", "source", "pretrained weights"):
        table.add_column(column)
    for entry in models.available():
        table.add_row(
            entry.name + (" (default)" if entry.name == models.DEFAULT else ""),
            entry.source,
            "available" if entry.pretrained_available else "missing (use --random-weights)",
        )
    stdout.print(table)


def main() -> None:
    """Entry point of the ``gradcam`` command."""
    app()
