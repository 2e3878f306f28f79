"""Writing an evaluation: ``metrics.json``, ``report.md``, ``items.jsonl`` and the curve plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from gradcam.files import atomic_write_bytes
from gradcam.metrics import catalogue
from gradcam.metrics.evaluation import EvaluationResult
from gradcam.metrics.saliency import BASELINES
from gradcam.viz import save_figure

# (key in a method's summary, column title, True when higher is better)
_COLUMNS = [
    ("pointing_game", "pointing game", True),
    ("localization_accuracy", "loc. accuracy", True),
    ("top1_localization_error", "top-1 loc. error", False),
    ("top5_localization_error", "top-5 loc. error", False),
    ("deletion_auc", "deletion AUC", False),
    ("insertion_auc", "insertion AUC", True),
    ("average_drop", "Average Drop %", False),
    ("increase_in_confidence", "Increase in Conf. %", True),
    ("road.morf", "ROAD MoRF", False),
    ("road.lerf", "ROAD LeRF", True),
    ("road.combined", "ROAD combined", True),
]


def _value(summary: dict, key: str) -> float | None:
    for part in key.split("."):
        if not isinstance(summary, dict) or part not in summary:
            return None
        summary = summary[part]
    return None if summary is None or (isinstance(summary, float) and math.isnan(summary)) else summary


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def markdown(metrics: dict) -> str:
    """The report: a table of every metric per method (the best value of each column in bold), the
    Win % matrix, the protocol, and the skipped images."""
    methods: dict[str, dict] = metrics["methods"]
    more = [
        (name, name.replace("_", " "), better == "higher")
        for name, better in metrics.get("better", {}).items()
    ]
    columns = [c for c in _COLUMNS + more if any(_value(s, c[0]) is not None for s in methods.values())]
    best = {}
    for key, _, higher in columns:
        values = [v for s in methods.values() if (v := _value(s, key)) is not None]
        best[key] = max(values) if higher else min(values)
    lines = [
        f"# Explanation evaluation: {metrics['model']}",
        "",
        f"{metrics['images']} images, {metrics['targets']} targets ({metrics['target']} classes). "
        "Baselines: " + ", ".join(f"`{b}`" for b in metrics["baselines"]) + ". "
        "↑ higher is better, ↓ lower is better; the best value of each column is in bold.",
        "",
        "| method | " + " | ".join(f"{title} {'↑' if up else '↓'}" for _, title, up in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, summary in methods.items():
        cells = []
        for key, _, _ in columns:
            value = _value(summary, key)
            text = "n/a" if value is None else f"{value:.3f}"
            cells.append(f"**{text}**" if value is not None and value == best[key] else text)
        label = f"{name} (baseline)" if name in BASELINES else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    wins = metrics.get("win_percentage", {})
    if len(wins) > 1:
        names = list(wins)
        lines += ["", "## Win % (row beats column: smaller confidence drop on the same image)", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for a in names:
            cells = ["—" if a == b else f"{wins[a][b]:.1f}" for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## Protocol", ""]
    if catalogue.STANDARD in metrics["settings"].get("metrics", [catalogue.STANDARD]):
        lines += _standard_protocol(metrics["settings"])
    lines += [
        f"- {name.replace('_', ' ')}: {catalogue.get(name).description}."
        for name in metrics.get("better", {})
    ]
    if metrics["errors"]:
        lines += ["", f"## Errors ({len(metrics['errors'])})", ""]
        lines += [f"- {e['error']}" for e in metrics["errors"]]
    if metrics["skipped"]:
        lines += ["", f"## Skipped ({len(metrics['skipped'])})", ""]
        lines += [f"- `{e['image']}`: {e['reason']}" for e in metrics["skipped"]]
    return "\n".join(lines) + "\n"


def _standard_protocol(settings: dict) -> list[str]:
    steps = settings["steps"] if settings["steps"] is not None else "one image row per step (RISE)"
    return [
        f"- Box: largest 8-connected segment of the map >= {settings['box_threshold']} x its maximum "
        f"(Grad-CAM paper); correct when IoU >= {settings['min_iou']} with a ground-truth box.",
        f"- Pointing game: the map's maximum within {settings['tolerance']} px of a box of the class.",
        f"- Deletion (zero baseline) and insertion (blurred baseline): RISE, steps: {steps}; "
        "softmax probability of the target; trapezoid AUC.",
        "- Average Drop / Increase in Confidence / Win %: Grad-CAM++ (image x upsampled map); any strict "
        "increase counts, as in the paper, however small.",
        "- ROAD: noisy linear imputation, fractions removed "
        + ", ".join(f"{f:g}" for f in settings["road_fractions"])
        + "; combined = mean (LeRF - MoRF) / 2.",
        "",
        "![deletion curves](deletion.png) ![insertion curves](insertion.png)",
        "",
    ]


def plot_curves(result: EvaluationResult, kind: str, path: str | os.PathLike[str]) -> Path:
    """The mean deletion or insertion curve of each method (baselines dashed), with its AUC."""
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    for name, scores in result.scores.items():
        if not scores.pointing:
            continue
        curve = scores.curve(kind).numpy()
        fractions = scores.fractions.numpy()
        auc = scores.auc(kind)
        style = "--" if name in BASELINES else "-"
        axes.plot(fractions, curve, style, label=f"{name} (AUC {auc:.3f})")
    axes.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "inserted"))
    axes.set_ylabel("probability of the target class")
    axes.set_xlim(0, 1)
    axes.set_ylim(bottom=0)
    axes.set_title(f"{kind} curves (mean over targets)")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def write_evaluation(result: EvaluationResult, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the evaluation's files into ``out``; each file appears whole or not at all."""
    folder = Path(out)
    metrics = result.to_json()
    written = {
        "metrics": atomic_write_bytes(folder / "metrics.json", _json_bytes(metrics)),
        "items": atomic_write_bytes(
            folder / "items.jsonl", "".join(json.dumps(r) + "\n" for r in result.records).encode()
        ),
    }
    if metrics["methods"] and result.settings.standard:
        written["deletion"] = plot_curves(result, "deletion", folder / "deletion.png")
        written["insertion"] = plot_curves(result, "insertion", folder / "insertion.png")
    written["report"] = atomic_write_bytes(folder / "report.md", markdown(metrics).encode())
    return written
