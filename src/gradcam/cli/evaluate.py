"""``gradcam evaluate`` and ``gradcam sanity``: run the metrics, write the report, print a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gradcam import io
from gradcam.batch.inputs import collect_images
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
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.files import atomic_write_bytes
from gradcam.methods.maps import unnormalise
from gradcam.metrics import catalogue
from gradcam.metrics.annotations import load_annotations
from gradcam.metrics.evaluation import EvaluationSettings, evaluate
from gradcam.metrics.report import write_evaluation
from gradcam.metrics.road import DEFAULT_FRACTIONS
from gradcam.metrics.saliency import names as saliency_names
from gradcam.metrics.sanity import SanityResult, cascading_randomisation, plot_similarity, plot_strip
from gradcam.outputs import slug, unique_stems
from gradcam.targets import parse_class


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise fail(f"{option} is empty; expected comma-separated names")
    return names


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise fail(
            f"--road-fractions '{text}': expected comma-separated numbers such as 0.1,0.5,0.9"
        ) from None
    if not values or not all(0 < v < 1 for v in values):
        raise fail(f"--road-fractions '{text}': expected numbers strictly between 0 and 1")
    return values


@app.command("evaluate")
def evaluate_command(
    images_dir: Annotated[
        Path, typer.Argument(help="Folder of images (searched recursively).", show_default=False)
    ],
    annotations: Annotated[
        Path,
        typer.Option(help="JSON file of boxes, or a folder of PASCAL VOC XML files.", show_default=False),
    ],
    out: Annotated[Path, typer.Option(help="Output folder.", show_default=False)],
    model: ModelOption = "efficientnet-lite0",
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    label_map: Annotated[
        Path | None,
        typer.Option(help="Annotation names to classes: JSON {name: class} or 'KEY VALUE' lines."),
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to evaluate.")] = "gradcam,gradcam++",
    target: Annotated[
        str, typer.Option(help="annotated: each annotated class; predicted: top-1.")
    ] = "annotated",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Deletion/insertion steps (default: RISE's, one row per step).")
    ] = None,
    road_fractions: Annotated[str, typer.Option(help="ROAD fractions of pixels removed.")] = ",".join(
        f"{f:g}" for f in DEFAULT_FRACTIONS
    ),
    layer: Annotated[str | None, typer.Option(help="CAM layer (default: automatic).")] = None,
    layout: LayoutOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the random baseline and ROAD's noise.")] = 0,
    metrics: Annotated[
        str,
        typer.Option(
            help="Comma-separated metrics: 'standard' (the set above) and any of "
            + ", ".join(catalogue.names()[1:])
            + " (gradcam.metrics.catalogue)."
        ),
    ] = catalogue.STANDARD,
    device: DeviceOption = "cpu",
) -> None:
    """Score explanation methods and the random, center and sobel baselines against annotated boxes:
    pointing game, localisation, deletion/insertion AUC, Average Drop / Increase, ROAD (the standard
    set), and the further metrics --metrics names. Writes metrics.json, report.md, items.jsonl and, for
    the standard set, the curve plots."""
    torch_device = parse_device(device)
    if not images_dir.is_dir():
        raise fail(f"IMAGES_DIR {images_dir} is not a folder")
    try:
        settings = EvaluationSettings(
            methods=_names(methods, "--methods"),
            target=target,
            batch_size=batch_size,
            steps=steps,
            road_fractions=_fractions(road_fractions),
            layer=layer,
            layout=layout,
            seed=seed,
            metrics=tuple(_names(metrics, "--metrics")),
        )
        loaded = load_model(model, weights, labels, random_weights).to(torch_device)
        boxes = load_annotations(annotations, loaded.labels, mapping=label_map)
    except GradCAMError as error:
        raise fail(str(error)) from None
    files = collect_images([images_dir])  # the same folder walk as a dataset run of `gradcam explain`
    if not files:
        raise fail(f"IMAGES_DIR {images_dir} holds no image files")
    output_folder(out)

    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(files) * len(settings.evaluated))
        try:
            result = evaluate(
                loaded,
                files,
                boxes,
                settings,
                progress=lambda n: progress.advance(task, n),
                on_error=lambda path, message: progress.console.print(f"error: {message}", markup=False),
            )
        except GradCAMError as error:
            raise fail(str(error)) from None
    if result.images == 0:
        raise fail(f"no image in {images_dir} could be evaluated (see the messages above)", 1)
    written = write_evaluation(result, out)
    metrics = result.to_json()
    _print_summary(metrics)
    if result.skipped:
        stdout.print(f"skipped {len(result.skipped)} (listed in metrics.json and report.md)", markup=False)
    stdout.print(f"wrote {', '.join(str(p) for p in written.values())}", markup=False, highlight=False)
    if result.errors:
        raise typer.Exit(1)


def _print_summary(metrics: dict) -> None:
    table = Table(
        title=escape(f"{metrics['model']}: {metrics['images']} images, {metrics['targets']} targets")
    )
    columns = [
        ("pointing", "pointing_game"),
        ("loc. acc.", "localization_accuracy"),
        ("deletion", "deletion_auc"),
        ("insertion", "insertion_auc"),
        ("avg drop %", "average_drop"),
        ("incr. %", "increase_in_confidence"),
        ("ROAD comb.", "road.combined"),
    ]
    columns += [(name.replace("_", " "), name) for name in metrics.get("better", {})]
    shown = [(t, k) for t, k in columns if any(_get(s, k) is not None for s in metrics["methods"].values())]
    table.add_column("method")
    for title, key in shown:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(metrics.get("better", {}).get(key, ""), "")
        table.add_column(title + arrow, justify="right")
    for name, summary in metrics["methods"].items():
        values = [_get(summary, key) for _, key in shown]
        table.add_row(escape(name), *("n/a" if v is None else f"{v:.3f}" for v in values))
    stdout.print(table)


def _get(summary: dict, key: str) -> float | None:
    value: object = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


@app.command("sanity")
def sanity_command(
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder.", show_default=False)],
    model: ModelOption = "efficientnet-lite0",
    weights: WeightsOption = None,
    labels: LabelsOption = None,
    random_weights: RandomOption = False,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "gradcam,guided-backprop",
    layer: Annotated[str | None, typer.Option(help="CAM layer (default: automatic).")] = None,
    layout: LayoutOption = None,
    target: Annotated[str | None, typer.Option(help="Class index or name (default: each top-1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the re-initialisations.")] = 0,
    device: DeviceOption = "cpu",
) -> None:
    """Cascading model-parameter randomisation (Adebayo et al., 2018): re-initialise the model from the
    top block down and compare each method's maps with the original ones (Spearman, SSIM). Writes
    sanity.json, sanity.png and a strip of maps per method and image."""
    torch_device = parse_device(device)
    names = _names(methods, "--methods")
    try:
        unknown = [n for n in names if n not in saliency_names()]
        if unknown:
            raise GradCAMError(f"method '{unknown[0]}' not found; available: {', '.join(saliency_names())}")
        loaded = load_model(model, weights, labels, random_weights).to(torch_device)
        wanted = parse_class(target, loaded.labels) if target is not None else None
    except GradCAMError as error:
        raise fail(str(error)) from None
    errors: list[dict[str, str]] = []
    kept, pictures = [], []
    for path in images:
        try:
            image = io.load_image(path)
        except ImageLoadError as error:
            stderr.print(f"error: {error}", markup=False)
            errors.append({"image": str(path), "error": str(error)})
            continue
        kept.append(path)
        pictures.append(loaded.preprocess(image))
    if not kept:
        raise fail("no image could be read", 1)
    output_folder(out)
    inputs = torch.stack(pictures).to(torch_device)
    preprocess = loaded.preprocess
    with stderr.status("randomising the model block by block ..."):
        try:
            result = cascading_randomisation(
                loaded.module,
                inputs,
                wanted,
                names,
                layer=layer,
                mean=preprocess.mean,
                std=preprocess.std,
                seed=seed,
                layout=layout,
            )
        except GradCAMError as error:
            raise fail(str(error)) from None
    document = {
        "model": loaded.name,
        "images": [str(p) for p in kept],
        "classes": [loaded.labels[int(t)] for t in result.targets],
        **result.to_json(),
        "errors": errors,
    }
    written = [atomic_write_bytes(out / "sanity.json", (json.dumps(document, indent=2) + "\n").encode())]
    written.append(plot_similarity(result, out / "sanity.png"))
    shown = unnormalise(inputs, preprocess.mean, preprocess.std).clamp(0, 1)
    for name in names:
        for index, stem in enumerate(unique_stems(kept)):
            strip = out / f"sanity_{slug(stem)}_{slug(name)}.png"
            written.append(plot_strip(result, name, strip, image_index=index, pictures=shown))
    _print_sanity(result)
    stdout.print(f"wrote {', '.join(str(p) for p in written)}", markup=False, highlight=False)
    if errors:
        raise typer.Exit(1)


def _print_sanity(result: SanityResult) -> None:
    table = Table(title="similarity to the original maps (Spearman / SSIM), by randomisation depth")
    table.add_column("re-initialised down to")
    for name in result.methods:
        table.add_column(escape(name), justify="right")
    for index, step in enumerate(result.steps):
        cells = [
            f"{result.methods[n][index].spearman:.3f} / {result.methods[n][index].ssim:.3f}"
            for n in result.methods
        ]
        table.add_row(escape(step), *cells)
    stdout.print(table)
