"""`gradcam evaluate` / `gradcam sanity` end to end on composed scenes with known boxes, and the evaluation
runner's shortcuts checked against the plain metric calls."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import run_gradcam
from gradcam.metrics.confidence import confidence_change
from gradcam.metrics.perturbation import deletion, insertion
from gradcam.metrics.road import road_curves
from gradcam.metrics.scoring import score_stream
from scenes import OBJECTS, compose_scenes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCENES = 6
BASELINES = ("random", "center", "sobel")


def gradcam(*args: str) -> subprocess.CompletedProcess:
    return run_gradcam(*args, timeout=600)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    root = tmp_path_factory.mktemp("scenes")
    annotations = compose_scenes(root / "images", SCENES, seed=0)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    boxes = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({**boxes, "broken.png": [{"label": 285, "box": [0, 0, 10, 10]}]}))
    Image.new("RGB", (64, 64), "gray").save(root / "images" / "unannotated.png")
    out = root / "report"
    result = gradcam(
        "evaluate", str(root / "images"), "--annotations", str(annotations), "--methods", "gradcam",
        "--steps", "8", "--road-fractions", "0.5", "--batch-size", "8", "--out", str(out),
    )  # fmt: skip
    return result, out, annotations


def test_gradcam_beats_the_random_and_centre_baselines_on_composed_scenes(evaluated) -> None:
    result, out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "efficientnet-lite0" and metrics["images"] == SCENES
    assert list(metrics["methods"]) == ["gradcam", *BASELINES]
    scores = metrics["methods"]
    for baseline in ("random", "center"):
        assert scores["gradcam"]["pointing_game"] > scores[baseline]["pointing_game"]
        assert scores["gradcam"]["deletion_auc"] < scores[baseline]["deletion_auc"]
    # The scenes keep every object clear of the centre, so the centre prior never points at one.
    assert scores["center"]["pointing_game"] == 0.0
    for summary in scores.values():
        assert summary["targets"] == SCENES
        assert set(summary) >= {
            "pointing_game", "localization_accuracy", "top1_localization_error", "top5_localization_error",
            "deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "road",
        }  # fmt: skip
        assert set(summary["road"]) == {"morf", "lerf", "combined"}
        assert 0 <= summary["deletion_auc"] <= 1 and 0 <= summary["average_drop"] <= 100
    assert set(metrics["win_percentage"]["gradcam"]) == set(BASELINES)


def test_a_broken_image_is_reported_and_skipped_not_fatal(evaluated) -> None:
    result, out, _ = evaluated
    assert result.returncode == 1  # some input could not be evaluated; everything else was written
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert "Traceback" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [Path(e["image"]).name for e in metrics["errors"]] == ["broken.png"]
    # an image nobody annotated is listed as skipped, not counted as an error
    assert [(Path(e["image"]).name, e["reason"]) for e in metrics["skipped"]] == [
        ("unannotated.png", "no annotated objects")
    ]


def test_report_table_plots_and_per_target_records(evaluated) -> None:
    result, out, _ = evaluated
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    pointing = metrics["methods"]["gradcam"]["pointing_game"]
    assert "| gradcam |" in report and f"{pointing:.3f}" in report
    for baseline in BASELINES:
        assert f"| {baseline} (baseline) |" in report
    assert "broken.png" in report
    for name in ("deletion.png", "insertion.png"):
        with Image.open(out / name) as plot:
            assert plot.format == "PNG" and plot.width > 300
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == SCENES * 4
    hits = [r["pointing_hit"] for r in records if r["method"] == "gradcam"]
    assert sum(hits) / len(hits) == pytest.approx(pointing)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert "gradcam" in result.stdout and "sobel" in result.stdout  # the printed summary table


def test_voc_folder_with_wordnet_ids_and_a_mapping_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    annotations = compose_scenes(images, 2, seed=3)
    boxes = json.loads(annotations.read_text())
    voc = tmp_path / "xml"
    voc.mkdir()
    wnids = {"Egyptian cat": "n02124075", "espresso": "n07920052"}
    for name, objects in boxes.items():
        (x0, y0, x1, y1), label = objects[0]["box"], objects[0]["label"]
        # ImageNet style: the file name without its extension, 1-based inclusive pixel coordinates.
        (voc / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{Path(name).stem}</filename><object><name>{wnids[label]}</name>"
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
            "</bndbox></object></annotation>"
        )
    mapping = tmp_path / "synsets.txt"
    mapping.write_text("".join(f"{wnid} {label}\n" for label, wnid in wnids.items()))
    out = tmp_path / "report"
    result = gradcam(
        "evaluate", str(images), "--annotations", str(voc), "--label-map", str(mapping),
        "--methods", "gradcam", "--target", "predicted", "--steps", "4", "--road-fractions", "0.5",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["target"] == "predicted"
    assert "top1_localization_error" not in metrics["methods"]["gradcam"]  # needs annotated targets


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--annotations", "missing.json"], "annotations 'missing.json' not found"),
        (["--annotations", "{boxes}", "--methods", "gradcam,nope"], "method 'nope' not found"),
        (["--annotations", "{boxes}", "--target", "sideways"], "target must be one of annotated, predicted"),
        (["--annotations", "{boxes}", "--road-fractions", "0.5,1.5"], "strictly between 0 and 1"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"cat.png": [{"label": 285, "box": [0, 0, 10, 10]}]}))
    args = [a.replace("{boxes}", str(boxes)) for a in args]
    result = gradcam("evaluate", str(EXAMPLES), *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_sanity_command_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sanity"
    methods = "gradcam,guided-backprop"
    result = gradcam("sanity", str(EXAMPLES / "cat.png"), "--methods", methods, "--out", str(out))
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "sanity.json").read_text())
    assert document["classes"] == ["Egyptian cat"]
    gradcam_steps = document["methods"]["gradcam"]
    guided_steps = document["methods"]["guided-backprop"]
    assert [s["layer"] for s in gradcam_steps][:3] == ["original", "_fc", "_bn1"]
    assert gradcam_steps[-1]["layer"] == "_conv_stem"
    # Grad-CAM changes once the classifier is random; Guided Backprop barely does (Adebayo et al.).
    assert gradcam_steps[1]["spearman"] < 0.5 < 0.95 < guided_steps[1]["spearman"]
    for name in ("sanity.png", "sanity_cat_gradcam.png", "sanity_cat_guided-backprop.png"):
        with Image.open(out / name) as plot:
            assert plot.format == "PNG"


class _Logistic(nn.Module):
    """Two classes: logit_1 = sum of the image's pixels times w, logit_0 = 0 (p_1 = sigmoid(w sum x))."""

    def __init__(self, w: float = 0.05) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.w * x.flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(one), one], dim=1)


def test_known_unperturbed_probabilities_give_the_same_metrics_as_scoring_them() -> None:
    torch.manual_seed(0)
    model = _Logistic()
    inputs, maps = torch.rand(3, 3, 12, 12), torch.rand(3, 12, 12)
    targets = torch.tensor([1, 0, 1])
    known = torch.sigmoid(torch.tensor([1.0, -1.0, 1.0]) * 0.05 * inputs.flatten(1).sum(1)).double()
    common = {"model": model, "inputs": inputs, "maps": maps, "targets": targets}
    for metric in (deletion, insertion):
        plain, reused = metric(**common, steps=5), metric(**common, steps=5, unperturbed=known)
        torch.testing.assert_close(reused.probabilities, plain.probabilities)
    torch.testing.assert_close(
        confidence_change(**common, original=known).explained, confidence_change(**common).explained
    )
    plain, reused = (
        road_curves(**common, fractions=(0.3, 0.6)),
        road_curves(**common, fractions=(0.3, 0.6), base=known),
    )
    torch.testing.assert_close(reused.morf, plain.morf)
    torch.testing.assert_close(reused.base, known)
    torch.testing.assert_close(plain.base, known)


def test_score_stream_forwards_exactly_batch_size_rows() -> None:
    sizes: list[int] = []
    model = _Logistic()
    model.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    pieces = [(torch.rand(n, 1, 2, 2), torch.ones(n, dtype=torch.long)) for n in (3, 3, 3, 1)]
    probabilities = score_stream(model, iter(pieces), batch_size=4)
    assert sizes == [4, 4, 2]
    expected = torch.sigmoid(0.05 * torch.cat([x for x, _ in pieces]).flatten(1).sum(1)).double()
    torch.testing.assert_close(probabilities, expected)


def test_scene_boxes_hold_the_pasted_object(tmp_path: Path) -> None:
    annotations = compose_scenes(tmp_path / "s", 2, seed=5)
    for name, objects in json.loads(annotations.read_text()).items():
        x0, y0, x1, y1 = objects[0]["box"]
        file, crop, _ = OBJECTS["cat" if "cat" in name else "coffee"]
        with Image.open(EXAMPLES / file) as photo, Image.open(tmp_path / "s" / name) as scene:
            expected = photo.convert("RGB").crop(crop).resize((x1 - x0, y1 - y0), Image.LANCZOS)
            assert np.array_equal(np.asarray(scene.crop((x0, y0, x1, y1))), np.asarray(expected))


# A GPU is hardware, not a tool the set-up installs: this skips without one, also under GRADCAM_REQUIRE_ALL=1.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_equal_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    inputs, maps, targets = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16), torch.tensor([0, 2])
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu_model = copy.deepcopy(model).cuda()
        for metric in (deletion, insertion):
            cpu = metric(model, inputs, maps, targets, steps=4).probabilities
            gpu = metric(gpu_model, inputs.cuda(), maps.cuda(), targets.cuda(), steps=4).probabilities
            torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)
        cpu_road = road_curves(model, inputs, maps, targets, fractions=(0.5,), noise=0.0)
        gpu_road = road_curves(
            gpu_model, inputs.cuda(), maps.cuda(), targets.cuda(), fractions=(0.5,), noise=0.0
        )
        torch.testing.assert_close(gpu_road.morf, cpu_road.morf, rtol=1e-5, atol=1e-6)
        cpu_change = confidence_change(model, inputs, maps, targets)
        gpu_change = confidence_change(gpu_model, inputs.cuda(), maps.cuda(), targets.cuda())
        torch.testing.assert_close(gpu_change.explained, cpu_change.explained, rtol=1e-5, atol=1e-6)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_a_class_whose_boxes_lie_outside_the_crop_is_skipped_and_model_failures_are_reported(
    tmp_path: Path,
) -> None:
    from gradcam import models
    from gradcam.metrics.annotations import load_annotations
    from gradcam.metrics.evaluation import EvaluationSettings, evaluate

    loaded = models.load("resnet18", pretrained=False)  # resize 256, centre crop 224
    Image.new("RGB", (400, 300), "white").save(tmp_path / "a.png")
    boxes = {"a.png": [{"label": 1, "box": [0, 0, 20, 300]}, {"label": 2, "box": [150, 100, 250, 200]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    annotations = load_annotations(tmp_path / "boxes.json", loaded.labels)
    settings = EvaluationSettings(methods=("gradcam",), steps=2, road_fractions=(0.5,))
    result = evaluate(loaded, [tmp_path / "a.png"], annotations, settings)
    # class 1's box (x < 20 px of 400) falls left of the crop (which starts at x = 58 / 0.8525 = 68 px)
    assert result.skipped == [
        {"image": str(tmp_path / "a.png"), "reason": "every box of class 1 lies outside the model's crop"}
    ]
    assert result.images == 1 and [r["label"] for r in result.records if r["method"] == "gradcam"] == [2]

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("CUDA out of memory (pretend)")

    broken = models.LoadedModel("broken", Broken(), loaded.preprocess, loaded.labels)
    result = evaluate(broken, [tmp_path / "a.png"], annotations, settings)
    assert result.images == 0 and not result.records
    assert [e["error"] for e in result.errors] == [
        f"{tmp_path / 'a.png'}: the model failed on this image's batch (CUDA out of memory (pretend))"
    ]
