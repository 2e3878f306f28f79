"""``gradcam evaluate --metrics``: the catalogue's metrics run inside an evaluation equal the metric
functions called by hand on the maps Grad-CAM gives the same inputs, and the files say which direction is
better. A 32x32 stand-in classifier keeps it fast; the metrics themselves are checked against Quantus in
test_metrics_quantus.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_classifier
from gradcam.cli import app
from gradcam.errors import GradCAMError
from gradcam.explanation import normalise, upsample
from gradcam.methods import GradCAM
from gradcam.metrics import catalogue
from gradcam.metrics.annotations import load_annotations
from gradcam.metrics.concentration import complexity, sparseness
from gradcam.metrics.evaluation import EvaluationSettings, evaluate
from gradcam.metrics.flipping import pixel_flipping
from gradcam.metrics.relevance import box_masks, relevance_mass
from gradcam.metrics.report import write_evaluation

BOXES = {"a.png": [4, 6, 20, 22], "b.png": [10, 2, 30, 18], "c.png": [0, 0, 16, 16]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name in BOXES:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name)
    annotations = root / "boxes.json"
    annotations.write_text(json.dumps({n: [{"label": "dog", "box": b}] for n, b in BOXES.items()}))
    return root, annotations


def test_catalogue_metrics_in_an_evaluation_are_the_functions_on_gradcams_maps(folder) -> None:
    root, annotations = folder
    loaded = tiny_classifier("tiny")
    names = ("standard", "sparseness", "complexity", "relevance_mass", "pixel_flipping")
    settings = EvaluationSettings(methods=("gradcam",), metrics=names, steps=4, road_fractions=(0.5,))
    files = [root / n for n in BOXES]
    result = evaluate(loaded, files, load_annotations(annotations, loaded.labels), settings)
    metrics = result.to_json()
    assert metrics["better"] == {
        "sparseness": "higher",
        "complexity": "lower",
        "relevance_mass": "higher",
        "pixel_flipping": "lower",
    }
    ours = metrics["methods"]["gradcam"]
    assert "pointing_game" in ours and ours["targets"] == 3

    # By hand: the same inputs, Grad-CAM's maps at the input's size, the functions called directly.
    x = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([1, 1, 1])
    raw = GradCAM(loaded.module)(x, labels).raw  # the automatic layer, as the evaluation's
    maps = normalise(upsample(raw, (32, 32)))
    masks = box_masks([torch.tensor([b], dtype=torch.float32) for b in BOXES.values()], 32, 32)
    expected = {
        "sparseness": sparseness(maps),
        "complexity": complexity(maps),
        "relevance_mass": relevance_mass(maps, masks),
        "pixel_flipping": pixel_flipping(loaded.module, x, maps, labels, pixels_per_step=16),
    }
    for name, values in expected.items():
        assert ours[name] == pytest.approx(float(values.double().mean()), rel=1e-5, abs=1e-9), name
    assert len({round(ours[n], 6) for n in expected}) == 4  # four different numbers, not one copied
    records = [r for r in result.records if r["method"] == "gradcam"]
    assert [r["relevance_mass"] for r in records] == pytest.approx(
        expected["relevance_mass"].tolist(), rel=1e-5
    )


def test_the_report_states_each_direction_and_the_standard_set_can_be_left_out(folder, tmp_path) -> None:
    root, annotations = folder
    loaded = tiny_classifier("tiny")
    settings = EvaluationSettings(methods=("gradcam",), metrics=("sparseness", "complexity"))
    result = evaluate(
        loaded, [root / n for n in BOXES], load_annotations(annotations, loaded.labels), settings
    )
    written = write_evaluation(result, tmp_path)
    assert "deletion" not in written and not (tmp_path / "deletion.png").exists()  # no curves to plot
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["methods"]["gradcam"]) == {"targets", "sparseness", "complexity"}
    report = (tmp_path / "report.md").read_text()
    assert "| method | sparseness ↑ | complexity ↓ |" in report
    assert catalogue.get("sparseness").description in report and "Pointing game" not in report


def test_metrics_are_chosen_on_the_command_line_and_mistakes_are_one_line(folder, tmp_path) -> None:
    with pytest.raises(GradCAMError, match="metric 'nope' not found; available: standard, sparseness"):
        EvaluationSettings(metrics=("standard", "nope"))
    root, annotations = folder
    refused = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(root),
            "--annotations",
            str(annotations),
            "--out",
            str(tmp_path),
            "--metrics",
            "gini",
        ],
    )
    assert refused.exit_code == 2 and "metric 'gini' not found" in refused.output
    assert "Traceback" not in refused.output
