"""``gradcam explain``, ``layers``, ``methods``, ``models``: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer
from PIL import Image
from rich.markup import escape
from rich.table import Table

from gradcam import io, methods, models, viz
from gradcam.batch.dataset import OVERLAY_SIZE
from gradcam.batch.explain import Explainer, explain_batch
from gradcam.batch.inputs import collect_images
from gradcam.batch.local import Job
from gradcam.batch.writer import MAP_FORMATS
from gradcam.cli.common import (
    DeviceOption,
    LabelsOption,
    LayoutOption,
    ModelOption,
    RandomOption,
    WeightsOption,
    app,
    fail,
    load_model,
    output_folder,
    parse_device,
    stderr,
    stdout,
)
from gradcam.cli.stream import stream, streams
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.layers import LayerInfo, choose_layer, list_layers
from gradcam.methods import GuidedBackprop
from gradcam.outputs import slug, unique_stems, write_explanation
from gradcam.targets import parse_class

BATCH = 16


@dataclass
class _Item:
    path: Path
    stem: str
    image: Image.Image | None = None
    tensor: torch.Tensor | None = None
    predictions: list[dict] = field(default_factory=list)
    explanations: list[dict] = field(default_factory=list)


def _report(errors: list[dict], path: Path, message: str) -> None:
    stderr.print(f"error: {message}", markup=False)
    errors.append({"image": str(path), "error": message})


def _explain_batch(
    items: list[_Item],
    loaded: models.LoadedModel,
    explainer: Explainer,
    targets: list[int],
    topk: int,
    out: Path,
    errors: list[dict],
) -> str:
    """Explain one batch for every wanted class and write the files; returns the explained layer."""
    device = next(loaded.module.parameters()).device
    batch = torch.stack([item.tensor for item in items]).to(device)
    result = explain_batch(explainer, batch, targets, topk)
    per_image, ids, many, index_of = result.targets, result.ids, result.explanation, result.at
    rows = len(ids)
    for row, item in enumerate(items):
        item.predictions = [
            {"index": i, "class": loaded.labels[i], "probability": round(p, 6)} for i, p in result.top5[row]
        ]
    guided = _guided_gradients(explainer, batch, ids) if explainer.guided else None
    peaks = many.peaks()
    suffix = "_counterfactual" if explainer.cam.counterfactual else ""
    method = explainer.cam.method
    tag = "" if method == "gradcam" else f"_{slug(method.replace('+', 'p'))}"  # gradcam++ -> gradcampp
    for n in range(rows):
        for row, item in enumerate(items):
            if n >= len(per_image[row]) or str(item.path) in {e["image"] for e in errors}:
                continue
            at = index_of(n, row)
            index, name = int(ids[n, row]), loaded.labels[int(ids[n, row])]
            probability = float(many.probs[at])
            kind = f"{method} counterfactual" if suffix else method
            title = f"{item.path.name}: {name} ({probability:.1%}) {kind}"
            extra = {}
            if guided is not None:
                # Guided Backprop, and Guided Grad-CAM = Guided Backprop x the (upsampled) map.
                extra["guided-backprop"] = viz.guided_image(guided[n, row])
                extra["guided-gradcam"] = viz.guided_image(guided[n, row] * many.maps[at])
            try:
                files = write_explanation(
                    out,
                    f"{item.stem}_{index}-{slug(name)}{tag}{suffix}",
                    loaded.preprocess.frame(item.image),
                    many.maps[at],
                    many.raw[at],
                    title,
                    extra,
                )
            except OSError as error:
                reason = error.strerror or str(error)
                _report(errors, item.path, f"{item.path}: cannot write its outputs ({reason})")
                continue
            peak_row, peak_col = peaks[at].tolist()
            item.explanations.append(
                {
                    "index": index,
                    "class": name,
                    "probability": round(probability, 6),
                    "score": round(float(many.scores[at]), 6),
                    "peak": {"row": peak_row, "col": peak_col},
                    "files": files,
                }
            )
    return many.layer


def _guided_gradients(explainer: Explainer, batch: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N,B,C,H,W) Guided Backpropagation gradients for each row of targets."""
    guided = GuidedBackprop(explainer.cam.model)
    return torch.stack([guided(batch, row.tolist()) for row in ids])


@app.command()
def explain(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files, folders (recursive), globs or @list.txt files.", show_default=False
        ),
    ],
    model: ModelOption = models.DEFAULT,
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    method: Annotated[str, typer.Option(help="Method (`gradcam methods` lists them).")] = "gradcam",
    layer: Annotated[
        list[str] | None,
        typer.Option(help="Layer to explain (default: automatic); repeat for a fused multi-layer map."),
    ] = None,
    layout: LayoutOption = None,
    target: Annotated[list[str] | None, typer.Option(help="Class index or name; repeat for several.")] = None,
    topk: Annotated[int, typer.Option(min=0, help="Explain each image's K best classes.")] = 0,
    counterfactual: Annotated[bool, typer.Option(help="Regions that speak against the class.")] = False,
    guided: Annotated[
        bool, typer.Option(help="Also write Guided Backprop and Guided Grad-CAM images.")
    ] = False,
    aug_smooth: Annotated[bool, typer.Option(help="Average over flips and scales (4 passes).")] = False,
    eigen_smooth: Annotated[
        bool, typer.Option(help="First principal component of the weighted activations.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("gradcam-out"),
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch when streaming.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decoding processes when streaming.")] = 2,
    maps: Annotated[str, typer.Option(help="Raw maps when streaming: npy files or npz shards.")] = "npy",
    overwrite: Annotated[bool, typer.Option(help="Replace a run made with other settings in --out.")] = False,
    overlay_size: Annotated[
        int,
        typer.Option(min=0, help="Streaming: longer side of the overlays in pixels (0: the full picture)."),
    ] = OVERLAY_SIZE,
    engine: Annotated[
        str, typer.Option(help="Streaming engine: local or ray (pip install 'gradcam[ray]').")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to use: auto, ray://head:10001 (default: start a local one)."),
    ] = None,
) -> None:
    """Explain images: writes an overlay PNG, a panel PNG and the raw map (.npy) per image and class.

    Folders, globs, @list files or more than 16 images are streamed: overlay and raw map per image and
    class, mirroring the input folders under --out, with manifest.jsonl and errors.jsonl; a rerun after
    an interruption finishes what is left."""
    if engine not in ("local", "ray"):
        raise fail(f"--engine '{engine}': expected local or ray")
    # On a Ray cluster the GPUs are the workers'; the machine running the command may have none.
    torch_device = parse_device(device) if engine == "local" else torch.device("cpu")
    specs = [str(spec) for spec in images]
    try:
        files = collect_images(specs)
    except GradCAMError as error:
        raise fail(str(error)) from None
    streaming = streams(specs, files)
    if streaming:
        if not files:
            raise fail("no image files found in the given folders, globs or lists")
        if guided:
            raise fail("--guided writes pictures per image: use it on a few image files, not a dataset")
        if maps not in MAP_FORMATS:
            raise fail(f"--maps '{maps}': expected one of {', '.join(MAP_FORMATS)}")
        if engine == "ray" and maps == "npz":
            raise fail("--maps npz is not available with --engine ray; use --maps npy")
    try:
        loaded = load_model(model, weights, labels, random_weights).to(torch_device)
        wanted = [parse_class(spec, loaded.labels) for spec in target or []]
        method_class = methods.get(method)
        chosen = layer[0] if layer and len(layer) == 1 else (layer or None)
        options: dict[str, object] = {"counterfactual": True} if counterfactual else {}
        if layout is not None:
            options["layout"] = layout
        explainer = Explainer(
            method_class(loaded.module, chosen, **options), aug_smooth, eigen_smooth, guided
        )
    except GradCAMError as error:
        raise fail(str(error)) from None
    if streaming:
        settings = {
            "model": model,
            "weights": str(weights) if weights else None,
            "labels": str(labels) if labels else None,
            "random_weights": random_weights,
            "method": method,
            "layer": list(layer or []),
            "layout": layout,
            "target": list(target or []),
            "topk": topk,
            "counterfactual": counterfactual,
            "aug_smooth": aug_smooth,
            "eigen_smooth": eigen_smooth,
            "maps": maps,
            "overlay_size": overlay_size,
        }
        job = Job(loaded, explainer, out, wanted, topk, maps, batch_size, workers, overlay_size)
        ray = {"address": ray_address, "device": device} if engine == "ray" else None
        stream(job, files, settings, overwrite, as_json, ray)
        return
    output_folder(out)

    errors: list[dict] = []
    done: list[_Item] = []
    layer_name = None
    pending = [_Item(path, stem) for path, stem in zip(files, unique_stems(files), strict=True)]
    for start in range(0, len(pending), BATCH):
        # One batch of decoded images in memory at a time.
        chunk = []
        for item in pending[start : start + BATCH]:
            try:
                item.image = io.load_image(item.path)
            except ImageLoadError as error:
                _report(errors, item.path, str(error))
                continue
            item.tensor = loaded.preprocess(item.image)
            chunk.append(item)
        if not chunk:
            continue
        try:
            layer_name = _explain_batch(chunk, loaded, explainer, wanted, topk, out, errors)
        except GradCAMError as error:
            raise fail(str(error)) from None
        except RuntimeError as error:  # the model's own forward failed on these inputs
            reason = str(error).strip().splitlines()[0]
            for item in chunk:
                _report(errors, item.path, f"{item.path}: model forward failed ({reason})")
            continue
        for item in chunk:
            item.image = item.tensor = None
            if item.explanations:
                done.append(item)

    if as_json:
        document = {
            "model": loaded.name,
            "layer": layer_name,
            "method": method,
            "counterfactual": counterfactual,
            "aug_smooth": aug_smooth,
            "eigen_smooth": eigen_smooth,
            "results": [
                {"image": str(i.path), "predictions": i.predictions, "explanations": i.explanations}
                for i in done
            ],
            "errors": errors,
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif done:
        _print_results(done, loaded.name, layer_name, method)
    if errors:
        raise typer.Exit(1)


def _print_results(items: list[_Item], model: str, layer: str | None, method: str) -> None:
    for item in items:
        top5 = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in item.predictions)
        stdout.print(f"{item.path} top-5: {top5}", markup=False, highlight=False)
    folders = {str(Path(path).parent) for i in items for e in i.explanations for path in e["files"].values()}
    table = Table(title=escape(f"{method} · {model} · layer {layer}"))
    table.add_column("image", overflow="fold")
    table.add_column("class", overflow="fold")
    table.add_column("prob.", justify="right")
    table.add_column(escape(f"files written to {', '.join(sorted(folders))}"), no_wrap=True)
    for item in items:
        for explained in item.explanations:
            table.add_row(
                escape(item.path.name),
                escape(f"{explained['class']} ({explained['index']})"),
                f"{explained['probability']:.1%}",
                escape("\n".join(Path(path).name for path in explained["files"].values())),
            )
    stdout.print(table)


@app.command("layers")
def layers_command(
    model: ModelOption = models.DEFAULT,
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    all_layers: Annotated[
        bool, typer.Option("--all", help="List every module, not only those that read as a feature map.")
    ] = False,
) -> None:
    """List the model's layers in execution order with output shapes and layouts (channels-first,
    channels-last, tokens with prefix and patch grid); the automatic choice is marked."""
    try:
        loaded = load_model(model, weights, labels, random_weights)
        dummy = torch.zeros(1, 3, *loaded.input_size)
        infos = list_layers(loaded.module, dummy)
        chosen = choose_layer(infos)
    except GradCAMError as error:
        raise fail(str(error)) from None
    table = Table(
        title=f"{loaded.name}: layers in execution order (input 1x3x{dummy.shape[2]}x{dummy.shape[3]})"
    )
    for column in ("#", "layer", "type", "output shape", "layout", "calls", "note"):
        table.add_column(column, overflow="fold")
    for number, info in enumerate(infos):
        if not all_layers and info.layout is None:
            continue
        shape = "x".join(map(str, info.output_shape or ())) or "-"
        note = _layer_note(info, chosen)
        table.add_row(str(number), info.name, info.kind, shape, info.layout or "-", str(info.calls), note)
    stdout.print(table)


def _layer_note(info: LayerInfo, chosen: str) -> str:
    if info.name == chosen:
        return "← automatic choice"
    if info.calls > 1:
        return f"shared: runs {info.calls}x, not usable"
    if info.is_candidate:
        return "candidate, feeds attention" if info.attention_input else "candidate"
    return escape(info.reason or "")


@app.command("methods")
def methods_command() -> None:
    """List the explanation methods `--method` accepts."""
    table = Table(title="Methods")
    table.add_column("name", no_wrap=True)
    table.add_column("what it is", overflow="fold")
    for name in methods.names():
        table.add_row(name, escape(methods.describe(name)))
    stdout.print(table)


@app.command("models")
def models_command() -> None:
    """List the models `--model` accepts and whether their pretrained weights are at hand; timm:<name> and
    hf:<folder|repo id> are accepted too (zoo extra)."""
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
    stdout.print(escape(models.zoo_note()))
