"""``gradcam explain``, ``layers``, ``methods``, ``models``: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from gradcam import models
from gradcam.batch.core import Job
from gradcam.batch.dataset import OVERLAY_SIZE
from gradcam.batch.inputs import collect_clips, collect_images
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
    stdout,
)
from gradcam.cli.stream import ChunkProgress, stream, streams
from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes
from gradcam.io import load_image
from gradcam.layers import LayerInfo, backbone_stage, choose_layer, list_layers
from gradcam.methods import registry
from gradcam.methods.factorization import DeepFeatureFactorization
from gradcam.models import torchvision_tasks
from gradcam.pipeline import Explainer
from gradcam.targets import parse_class
from gradcam.viz import MAX_CONCEPTS, concept_legend, concept_overlay, save_png, shrink


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
    target: Annotated[
        list[str] | None,
        typer.Option(help="Class (a detector's label) index or name; repeat for several."),
    ] = None,
    topk: Annotated[
        int,
        typer.Option(
            min=0, help="Each image's K best classes (a segmenter's largest, a detector's best detections)."
        ),
    ] = 0,
    min_score: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Detectors: explain the detections scoring at least this.")
    ] = 0.5,
    counterfactual: Annotated[bool, typer.Option(help="Regions that speak against the class.")] = False,
    guided: Annotated[
        bool, typer.Option(help="Also write Guided Backprop and Guided Grad-CAM images.")
    ] = False,
    aug_smooth: Annotated[bool, typer.Option(help="Average over flips and scales (4 passes).")] = False,
    eigen_smooth: Annotated[
        bool, typer.Option(help="First principal component of the weighted activations.")
    ] = False,
    panels: Annotated[
        bool, typer.Option(help="Write the original | heatmap | overlay panel of each image and class.")
    ] = True,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("gradcam-out"),
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decoding processes (0: none, decode in turn).")] = 2,
    maps: Annotated[str, typer.Option(help="Raw maps: npy files or npz shards.")] = "npy",
    overwrite: Annotated[bool, typer.Option(help="Replace a run made with other settings in --out.")] = False,
    overlay_size: Annotated[
        int,
        typer.Option(min=0, help="Longer side of the overlays and panels in pixels (0: the full picture)."),
    ] = OVERLAY_SIZE,
    engine: Annotated[str, typer.Option(help="Engine: local or ray (pip install 'gradcam[ray]').")] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to use: auto, ray://head:10001 (default: start a local one)."),
    ] = None,
    concepts: Annotated[
        int, typer.Option(min=1, max=MAX_CONCEPTS, help="--method dff: concepts shared by the images.")
    ] = 5,
) -> None:
    """Explain images: per image and class an overlay PNG, a panel PNG and the raw map (.npy), mirroring
    the input folders under --out, with manifest.jsonl (one line per image and class) and errors.jsonl.

    Segmenters (deeplabv3_resnet50 ...) explain --target classes (default: the largest predicted one)
    and outline the predicted mask; detectors (fasterrcnn_resnet50_fpn ...) explain each detection
    scoring at least --min-score and draw its box; video models (r3d_18 ...) take video files or folders
    of frames and write an animated overlay (GIF) and a frame strip.

    One engine for one image or a dataset: a rerun after an interruption finishes what is left, and a
    handful of image files (at most 16) also gets its results printed as a table (or --json).

    --method dff (Deep Feature Factorization) finds --concepts concepts shared by all the images (one
    batch) and writes per image a concept overlay, plus legend.png (concept, colour, top classes) and
    concepts.json."""
    specs = [str(spec) for spec in images]
    if method in registry.names(["concepts"]):
        unused = {"--target": bool(target), "--topk": topk > 0, "--counterfactual": counterfactual,
                  "--guided": guided, "--aug-smooth": aug_smooth, "--eigen-smooth": eigen_smooth,
                  "--engine ray": engine != "local", "several --layer": len(layer or []) > 1}  # fmt: skip
        for option, given in unused.items():
            if given:
                raise fail(f"{option} does not apply to --method {method} (concepts of a batch, no class)")
        run = _ConceptRun(model, weights, labels, random_weights, layer[0] if layer else None, layout)
        run.write(specs, concepts, out, device, overlay_size, as_json)
        return
    try:
        video_model = models.task_of(model) == "video"
        files = collect_clips(specs) if video_model else collect_images(specs)
    except GradCAMError as error:
        raise fail(str(error)) from None
    _check_run_options(files, engine, maps)
    # On a Ray cluster the GPUs are the workers'; the machine running the command may have none.
    torch_device = parse_device(device) if engine == "local" else torch.device("cpu")
    try:
        chunks = ChunkProgress() if registry.get(method).slow else None
        loaded = load_model(model, weights, labels, random_weights).to(torch_device)
        wanted = [parse_class(spec, loaded.labels) for spec in target or []]
        if loaded.task == "detection":  # our own copy: its threshold may drop to --min-score
            torchvision_tasks.set_score_threshold(loaded.module, min_score)
        chosen = layer[0] if layer and len(layer) == 1 else (layer or None)
        explainer = Explainer(
            loaded.module,
            method,
            layer=chosen,
            layout=layout,
            counterfactual=counterfactual,
            aug_smooth=aug_smooth,
            eigen_smooth=eigen_smooth,
            guided=guided,
            progress=chunks,
        )
    except GradCAMError as error:
        raise fail(str(error)) from None
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
        "min_score": min_score,
        "counterfactual": counterfactual,
        "guided": guided,
        "aug_smooth": aug_smooth,
        "eigen_smooth": eigen_smooth,
        "panels": panels,
        "maps": maps,
        "overlay_size": overlay_size,
    }
    job = Job(
        loaded, explainer, out, wanted, topk, maps, batch_size, workers, overlay_size, panels, min_score
    )
    ray = {"address": ray_address, "device": device} if engine == "ray" else None
    handful = not streams(specs, files)
    stream(job, files, settings, overwrite, as_json, ray, handful=handful, chunks=chunks)


def _check_run_options(files: list[Path], engine: str, maps: str) -> None:
    if engine not in ("local", "ray"):
        raise fail(f"--engine '{engine}': expected local or ray")
    if not files:
        raise fail("no image files found in the given folders, globs or lists")
    if maps not in MAP_FORMATS:
        raise fail(f"--maps '{maps}': expected one of {', '.join(MAP_FORMATS)}")
    if engine == "ray" and maps == "npz":
        raise fail("--maps npz is not available with --engine ray; use --maps npy")


class _ConceptRun:
    """``gradcam explain --method dff``: every image in one batch, one concept overlay per image."""

    def __init__(self, model: str, weights: Path | None, labels: Path | None, random_weights: bool,
                 layer: str | None, layout: str | None) -> None:  # fmt: skip
        self.options = (model, weights, labels, random_weights)
        self.layer, self.layout = layer, layout

    def write(
        self, specs: list[str], concepts: int, out: Path, device: str, overlay_size: int, as_json: bool
    ) -> None:
        try:
            loaded = load_model(*self.options).to(parse_device(device))
            if loaded.task != "classification":
                raise GradCAMError(
                    f"--method dff explains classifiers; {loaded.name} is a {loaded.task} model"
                )
            files = collect_images(specs)
            if not files:
                raise GradCAMError("no image files found in the given folders, globs or lists")
            prepared = [loaded.preprocess.prepare(load_image(path)) for path in files]
            batch = torch.stack([tensor for tensor, _ in prepared]).to(parse_device(device))
            dff = DeepFeatureFactorization(loaded.module, self.layer, concepts=concepts, layout=self.layout)
            found = dff(batch)
        except GradCAMError as error:
            raise fail(str(error)) from None
        folder = output_folder(out)
        strengths = found.strengths()
        names = [path.name for path in files]
        overlays = []
        for index, (path, (_, frame)) in enumerate(zip(files, prepared, strict=True)):
            name = path.name if names.count(path.name) == 1 else f"{index}-{path.name}"
            target = folder / f"{name}_concepts.png"
            save_png(concept_overlay(shrink(frame, overlay_size), strengths[index]), target)
            overlays.append({"image": str(path), "overlay": str(target)})
        top = [[{"index": c, "class": loaded.labels[c], "probability": round(p, 4)} for c, p in row]
               for row in found.top_classes(3)]  # fmt: skip
        captions = [
            f"concept {index}: " + (", ".join(f"{c['class']} {c['probability']:.2f}" for c in row) or "-")
            for index, row in enumerate(top)
        ]
        save_png(concept_legend(captions), folder / "legend.png")
        document = {
            "model": loaded.name, "method": "dff", "layer": found.layer, "concepts": found.count,
            "reconstruction_error": round(found.error, 6), "legend": str(folder / "legend.png"),
            "top_classes": top, "images": overlays,
        }  # fmt: skip
        text = json.dumps(document, indent=2)
        atomic_write_bytes(folder / "concepts.json", text.encode())
        if as_json:
            sys.stdout.write(text + "\n")
        else:
            stdout.print("\n".join(captions), markup=False, highlight=False)


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
        if loaded.task == "detection":
            stage = backbone_stage(loaded.module)
            raise GradCAMError(
                f"{loaded.name} is a detector: its layers are listed for tensor inputs only; "
                f"its automatic layer is {stage}"
            )
        clip = (loaded.clip_length,) if loaded.clip_length else ()
        dummy = torch.zeros(1, 3, *clip, *loaded.input_size)
        infos = list_layers(loaded.module, dummy)
        chosen = backbone_stage(loaded.module) or choose_layer(infos)
    except GradCAMError as error:
        raise fail(str(error)) from None
    table = Table(title=f"{loaded.name}: layers in execution order (input {'x'.join(map(str, dummy.shape))})")
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
    """List the methods: `--method` of explain takes the cam, attention, pixel and concepts kinds and
    randomcam; `gradcam evaluate --methods` takes every one but the concepts kind (dff)."""
    table = Table(title="Methods")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("what it is", overflow="fold")
    for entry in registry.entries(registry.KINDS):
        only = "explain only" if entry.kind == "concepts" else ""
        notes = [entry.kind, "slow" if entry.slow else "", "" if entry.needs_model else "evaluate only", only]
        kind = ", ".join(note for note in notes if note)
        table.add_row(entry.name, kind, escape(entry.description))
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
