"""`gradcam explain` for segmenters, detectors and video models (random weights): the files, the
manifest's task fields and the maps equal what the test derives from the same model and inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from gradcam import GradCAM, models, video
from gradcam.cli import app
from gradcam.models import torchvision_tasks
from gradcam.targets import Box, Segmentation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CAT, COFFEE = EXAMPLES / "cat.png", EXAMPLES / "coffee.png"
SEGMENTER, DETECTOR, VIDEO = "lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "r3d_18"


def _explain(tmp_path: Path, *args: str) -> dict:
    """`gradcam explain ... --json` in this process, its random weights drawn after seed 0 (as
    :func:`_model` draws them), and its JSON document."""
    torch.manual_seed(0)
    result = CliRunner().invoke(
        app, ["explain", *args, "--json", "--random-weights", "--workers", "0", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _model(name: str) -> models.LoadedModel:
    torch.manual_seed(0)
    return models.load(name, pretrained=False)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_segmenter_explains_its_largest_class_and_outlines_its_mask(tmp_path: Path) -> None:
    document = _explain(tmp_path, str(CAT), "--model", SEGMENTER, "--overlay-size", "0")
    [record] = _manifest(tmp_path)
    loaded = _model(SEGMENTER)
    image = Image.open(CAT).convert("RGB")
    x = loaded.preprocess(image)[None]
    with torch.no_grad():
        predicted = loaded.module(x)["out"].argmax(dim=1)[0]
    areas = torch.bincount(predicted.flatten(), minlength=len(loaded.labels))
    areas[0] = 0  # the background is never explained
    largest = int(areas.argmax())
    assert record["task"] == "segmentation" and record["target"] == largest
    assert record["class"] == loaded.labels[largest]
    assert record["mask"]["fraction"] == pytest.approx(float(areas[largest]) / predicted.numel(), abs=1e-6)
    assert record["probability"] is None  # a sum of logits has no probability
    expected = GradCAM(loaded.module)(x, targets=Segmentation(largest)).raw[0]
    assert record["layer"] == "backbone.16"
    np.testing.assert_allclose(
        np.load(tmp_path / record["files"]["map"]), expected.numpy(), rtol=1e-4, atol=1e-5
    )
    # The mask outline (cyan) is drawn along the predicted mask's boundary, at the frame's size.
    overlay = np.asarray(Image.open(tmp_path / record["files"]["overlay"]).convert("RGB"))
    cyan = (overlay == [0, 255, 255]).all(axis=2)
    mask = np.asarray(
        Image.fromarray(predicted.numpy() == largest).resize(image.size, Image.Resampling.NEAREST)
    )
    assert cyan.any() and overlay.shape[:2] == (image.height, image.width)
    padded = np.pad(mask, 1)  # outside the picture counts as outside the mask
    boundary = find_boundaries(padded, mode="inner")[1:-1, 1:-1]
    near = binary_dilation(boundary, iterations=3)
    assert near[cyan].all()  # nothing drawn away from the mask's edge
    assert cyan[boundary].mean() > 0.9  # and the edge is drawn
    assert document["results"][0]["explanations"][0]["mask"] == record["mask"]


def test_segmenter_named_class_and_unknown_name(tmp_path: Path) -> None:
    _explain(tmp_path / "named", str(CAT), "--model", SEGMENTER, "--target", "cat")
    [record] = _manifest(tmp_path / "named")
    assert record["target"] == 8 and record["class"] == "cat"
    bad = CliRunner().invoke(
        app, ["explain", str(CAT), "--model", SEGMENTER, "--random-weights", "--target", "kat"]
    )
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "'cat'" in bad.stderr


def _detections(loaded: models.LoadedModel, paths: list[Path]) -> tuple[list[torch.Tensor], list[dict]]:
    torchvision_tasks.set_score_threshold(loaded.module, 0.0)
    images = [loaded.preprocess(Image.open(p).convert("RGB")) for p in paths]
    with torch.no_grad():
        return images, loaded.module(images)


def test_detector_explains_each_detection_and_draws_its_box(tmp_path: Path) -> None:
    _explain(
        tmp_path, str(CAT), str(COFFEE), "--model", DETECTOR, "--min-score", "0", "--topk", "2", "--json"
    )
    records = sorted(_manifest(tmp_path), key=lambda r: (r["key"], r["detection"]["index"]))
    loaded = _model(DETECTOR)
    images, outputs = _detections(loaded, [CAT, COFFEE])
    assert [r["key"] for r in records] == ["cat.png", "cat.png", "coffee.png", "coffee.png"]
    for record in records:
        b = 0 if record["key"] == "cat.png" else 1
        n = record["detection"]["index"]
        box = outputs[b]["boxes"][n]
        assert record["task"] == "detection" and record["target"] == int(outputs[b]["labels"][n])
        assert record["detection"]["box"] == pytest.approx(box.tolist(), abs=0.06)
        assert record["detection"]["score"] == pytest.approx(float(outputs[b]["scores"][n]), abs=1e-6)
        # The CLI explains both images in one batch, row n holding each image's n-th detection.
        labels = [int(outputs[i]["labels"][n]) for i in range(2)]
        boxes = torch.stack([outputs[i]["boxes"][n] for i in range(2)])
        explained = GradCAM(loaded.module)(images, targets=Box(labels, boxes))
        # the saved map keeps the grid cells that cover the image on the detector's padded canvas
        (height, width), (placed_h, placed_w) = explained.placement.canvas, explained.placement.placed[b]
        rows = -(-explained.raw.shape[-2] * placed_h // height)
        cols = -(-explained.raw.shape[-1] * placed_w // width)
        expected = explained.raw[b, :rows, :cols]
        saved = np.load(tmp_path / record["files"]["map"])
        np.testing.assert_allclose(
            saved, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max())
        )
        assert Path(record["files"]["overlay"]).name.startswith(f"{record['key']}_det{n}_")
    # The box is drawn in yellow on the overlay, scaled to the overlay's size.
    first = records[0]
    overlay = np.asarray(Image.open(tmp_path / first["files"]["overlay"]).convert("RGB"))
    scale = overlay.shape[1] / first["size"][0]
    x0, y0, x1, y1 = (round(v * scale) for v in first["detection"]["box"])
    yellow = (overlay == [255, 255, 0]).all(axis=2)
    left_edge = yellow[max(y0, 0) + 2 : y1 - 2, max(x0, 0) : max(x0, 0) + 3].any(axis=1)
    assert left_edge.mean() > 0.9


def test_detector_with_nothing_above_min_score_records_why(tmp_path: Path) -> None:
    document = _explain(tmp_path, str(CAT), "--model", DETECTOR, "--min-score", "0.99")
    [record] = _manifest(tmp_path)
    assert record["target"] is None and record["files"] == {} and "0.99" in record["none"]
    assert document["errors"] == 0 and document["images"] == 1
    # a rerun finds the image done
    again = _explain(tmp_path, str(CAT), "--model", DETECTOR, "--min-score", "0.99")
    assert again["already_done"] == 1 and again["images"] == 0


def test_video_model_on_a_folder_of_frames(tmp_path: Path) -> None:
    frames_dir = tmp_path / "clip"
    frames_dir.mkdir()
    base = Image.open(CAT).convert("RGB").resize((96, 80))
    for index in range(10):
        base.rotate(index * 4).save(frames_dir / f"frame{index}.png")
    (tmp_path / "notes.txt").write_text("not a clip")
    out = tmp_path / "out"
    torch.manual_seed(0)
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(frames_dir),
            "--model",
            VIDEO,
            "--random-weights",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    [record] = _manifest(out)
    loaded = _model(VIDEO)
    assert loaded.clip_length == 16 and record["task"] == "video" and record["frames"] == 16
    frames = video.sample_frames(video.read_frames(frames_dir), 16)
    clip = torch.stack([loaded.preprocess(f) for f in frames], dim=1)[None]  # (1, C, T, H, W)
    expected = GradCAM(loaded.module)(clip)
    assert record["target"] == int(expected.targets[0]) and record["layer"] == expected.layer
    saved = np.load(out / record["files"]["map"])
    assert saved.shape == tuple(expected.raw.shape[1:]) and saved.ndim == 3  # (t, h, w)
    np.testing.assert_allclose(saved, expected.raw[0].numpy(), rtol=1e-4, atol=1e-5)
    gif = Image.open(out / record["files"]["overlay"])
    assert gif.n_frames >= 2 and gif.size == (112, 112)
    strip = Image.open(out / record["files"]["strip"])
    assert strip.width > 112 * 7  # eight frames a row
    peak = record["peak"]
    t, y, x = np.unravel_index(int(expected.maps[0].argmax()), tuple(expected.maps.shape[1:]))
    assert (peak["frame"], peak["x"], peak["y"]) == (int(t), x + 0.5, y + 0.5)


def test_video_model_reports_and_skips_a_bad_clip(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    torch.manual_seed(0)
    result = CliRunner().invoke(
        app, ["explain", str(bad), "--model", VIDEO, "--random-weights", "--out", str(tmp_path / "o")]
    )
    assert "Traceback" not in result.output and "broken.mp4" in result.output
    errors = [json.loads(line) for line in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "broken.mp4" in errors[0]["error"]
