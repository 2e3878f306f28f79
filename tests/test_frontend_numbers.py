"""What the front ends WRITE, number for number, against maps derived in this file.

Every map a front end writes (``gradcam explain FOLDER`` with ``--maps npy`` and ``--maps npz``, after a
``kill -9`` and a resume, ``--counterfactual``, ``--topk`` over every class) is compared with Grad-CAM
derived here with a forward hook and ``torch.autograd.grad`` in float64 (and with captum's
``LayerGradCam`` for the all-class maps), at 1e-5 of the map's peak; the maps are not left-right
symmetric, so a mirrored or transposed file fails. The summaries (``--json``, ``metrics.json``,
``report.md``, the printed table) are checked against their per-item records, the bold cells of
``report.md`` against each column's better direction, and deletion / insertion AUC and ROAD MoRF / LeRF
against curves recomputed here.

The model is a two-stage Hugging Face ResNet (64 px inputs, 8x8 maps, three classes) saved with
``save_pretrained`` and loaded by every front end as ``hf:<folder>``. The pictures are 64x64 PNGs, so the
model's input is known exactly: (pixels / 255 - 0.5) / 0.5, computed here without the library.
The service and the Ray engine are in test_frontend_numbers_serve.py and test_frontend_numbers_ray.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from PIL import Image
from typer.testing import CliRunner

import gradcam
from gradcam.cli import app

LAYER = "resnet.encoder.stages.1"  # the last stage: (B, 12, 8, 8), after the block's ReLU
LABELS = {0: "cat", 1: "dog", 2: "bird"}
SIZE = 64
#: The folder of the CLI tests: key -> picture seed (a nested layout, as datasets have).
KEYS = {"a.png": 0, "sub/b.png": 1, "sub/deeper/c.png": 2, "d.png": 3, "e.png": 4}
RTOL = 1e-5  # of the map's peak
runner = CliRunner()


# ------------------------------------------------------------------------------ model, pictures, oracles


def picture(seed: int) -> np.ndarray:
    """(64, 64, 3) uint8: a left-to-right colour ramp, an off-centre blob and grain (no symmetry)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    ramp = rng.uniform(0, 255, 3)[None, None] * (0.3 + 0.7 * xx[..., None] / (SIZE - 1))
    cy, cx = rng.uniform(10, SIZE - 10, 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)[..., None] * rng.uniform(-200, 200, 3)
    return np.clip(ramp + blob + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def model_input(pixels: np.ndarray) -> torch.Tensor:
    """(3, 64, 64) float32: the saved processor's rescale and normalisation (mean = std = 0.5), by hand
    (in float32, as a preprocessing pipeline computes it: the evaluation's pixel rankings see every bit)."""
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() * (1 / 255) - 0.5) / 0.5


def inputs_of(seeds: list[int]) -> torch.Tensor:
    return torch.stack([model_input(picture(s)) for s in seeds])


def _save_model(folder: Path) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 12],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    torch.manual_seed(3)
    model = ResNetForImageClassification(config).eval()
    x = inputs_of(list(KEYS.values()))
    with torch.no_grad():  # logits that differ from picture to picture: not one class for all
        model.classifier[1].weight.mul_(10)
        model.classifier[1].bias.sub_(model(x).logits.mean(dim=0))
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """(hf:<folder>, the module read back from the folder: the weights every front end uses)."""
    folder = tmp_path_factory.mktemp("tiny-resnet")
    _save_model(folder)
    name = f"hf:{folder}"
    return name, gradcam.models.load(name).module


def logits_of(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        out = model(x.double())
    return getattr(out, "logits", out)


def oracle(
    module: torch.nn.Module, x: torch.Tensor, targets: list[int], *, counterfactual: bool = False
) -> np.ndarray:
    """(B, 8, 8) Grad-CAM in float64: A by a forward hook on LAYER, G = dy^c/dA by autograd,
    ReLU(sum_k mean(G_k) A_k); with ``counterfactual``, G = -dy^c/dA (Grad-CAM paper, section 5.3)."""
    model = copy.deepcopy(module).double().eval()
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[LAYER].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        out = model(x.double())
    finally:
        handle.remove()
    logits = getattr(out, "logits", out)
    (activations,) = captured
    chosen = logits[torch.arange(len(targets)), torch.tensor(targets)]
    (gradients,) = torch.autograd.grad(chosen.sum(), activations)
    if counterfactual:
        gradients = -gradients
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1)).detach().numpy()


def captum_maps(module: torch.nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """(B, 8, 8) captum's LayerGradCam on LAYER, float64."""
    model = copy.deepcopy(module).double().eval()
    layer = dict(model.named_modules())[LAYER]
    attributions = LayerGradCam(lambda inputs: model(inputs).logits, layer).attribute(
        x.double(), target=targets, relu_attributions=True
    )
    return attributions[:, 0].detach().numpy()


def assert_map(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """``actual`` equals ``expected`` to RTOL of the expected map's peak, in the same orientation."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    assert error <= RTOL * scale, f"{what}: off by {error / scale:.2e} of the map's peak"


def assert_discriminating(maps: np.ndarray) -> None:
    """The oracle maps can tell a right file from a mirrored one: most are not zero and none of those is
    left-right symmetric."""
    peaks = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    assert (peaks > 0).mean() >= 0.6, "too many all-zero maps: the test could not see a mirror"
    for m, peak in zip(maps, peaks, strict=True):
        if peak > 0:
            assert np.abs(m - m[:, ::-1]).max() > 0.05 * peak


def cli(*args: str | Path):  # type: ignore[no-untyped-def]
    """The ``gradcam`` command in this process."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def errors_of(out: Path) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_pictures(root: Path, keys: dict[str, int]) -> None:
    for key, seed in keys.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(seed)).save(root / key)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The KEYS pictures in nested folders, and one corrupt file."""
    root = tmp_path_factory.mktemp("pictures")
    write_pictures(root, KEYS)
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


PRINTED = re.compile(r"(\d+) images, (\d+) maps, (\d+) errors \((\d+) already done\)")


def explain_folder(
    tiny, folder: Path, out: Path, *options: str, as_json: bool = True
) -> tuple[dict, list[dict]]:
    """``gradcam explain FOLDER`` in this process: (its summary, --json or the printed line, the manifest)."""
    result = cli(
        "explain", folder, "-m", tiny[0], "--layer", LAYER, "--workers", "0", "--batch-size", "2",
        "--out", out, *(["--json"] if as_json else []), *options,
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the corrupt file, listed; every other image explained
    assert "broken.png" in result.stderr
    if as_json:
        return json.loads(result.stdout), manifest(out)
    (found,) = PRINTED.findall(result.stdout)
    images, targets, errors, done = map(int, found)
    summary = {"images": images, "targets": targets, "errors": errors, "already_done": done}
    return {**summary, "layer": LAYER, "manifest": str(out / "manifest.jsonl")}, manifest(out)


def check_summary(summary: dict, records: list[dict], out: Path) -> None:
    """The printed summary of a fresh run counts what the manifest and errors.jsonl hold."""
    assert summary["images"] == len({r["key"] for r in records})
    assert summary["targets"] == len(records)
    assert summary["errors"] == len(errors_of(out))
    assert summary["already_done"] == 0
    assert summary["layer"] == LAYER
    assert Path(summary["manifest"]) == out / "manifest.jsonl"


def by_key(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in records:
        grouped.setdefault(r["key"], []).append(r)
    return grouped


def test_the_model_and_pictures_can_tell_images_classes_and_mirrors_apart(tiny) -> None:
    """Preconditions of every test here: the top-1 class differs between pictures, the classes' maps
    differ, and no map is its own mirror image."""
    x = inputs_of(list(KEYS.values()))
    top1 = logits_of(tiny[1], x).argmax(dim=1)
    assert len(set(top1.tolist())) >= 2
    every = np.stack([oracle(tiny[1], x, [c] * len(x)) for c in LABELS])  # (3, B, 8, 8)
    assert_discriminating(every.reshape(-1, 8, 8))
    assert np.abs(every[0] - every[1]).max() > 0.1 * np.abs(every).max()
    # The hand-made input is the library's preprocessing of the PNG.
    loaded = gradcam.models.load(tiny[0])
    png = Image.fromarray(picture(0))
    torch.testing.assert_close(loaded.preprocess(png), model_input(picture(0)), rtol=0, atol=0)


# ------------------------------------------------------------------------------ gradcam explain FOLDER


def test_npy_maps_of_every_class_equal_captum_and_the_hand_derived_map(tiny, folder, tmp_path) -> None:
    """--topk 3 of a 3-class model: every class of every image, ranked per image (other classes at each
    rank from image to image). Each .npy file, its probability, score, rank and top-5 against the
    oracle; the --json summary against the manifest."""
    out = tmp_path / "out"
    summary, records = explain_folder(tiny, folder, out, "--topk", "3", "--maps", "npy")
    check_summary(summary, records, out)
    assert summary["images"] == len(KEYS) and summary["targets"] == 3 * len(KEYS) and summary["errors"] == 1
    assert [e["key"] for e in errors_of(out)] == ["sub/broken.png"]
    grouped = by_key(records)
    assert set(grouped) == set(KEYS)
    keys = sorted(KEYS)
    x = inputs_of([KEYS[k] for k in keys])
    logits = logits_of(tiny[1], x)
    probabilities = logits.softmax(dim=1)
    ranking = logits.argsort(dim=1, descending=True)
    firsts = set()
    for row, key in enumerate(keys):
        mine = grouped[key]
        assert [r["target"] for r in mine] == ranking[row].tolist()  # in rank order, each class once
        firsts.add(mine[0]["target"])
        assert [t["index"] for t in mine[0]["top5"]] == ranking[row].tolist()
        for r in mine:
            t = r["target"]
            assert r["rank"] == ranking[row].tolist().index(t) and r["of"] == 3
            assert r["class"] == LABELS[t]
            assert r["probability"] == pytest.approx(float(probabilities[row, t]), abs=2e-6)
            assert r["score"] == pytest.approx(float(logits[row, t]), abs=2e-6)
    assert len(firsts) >= 2  # the images' top-1 classes differ
    # Every map, against captum and the hand-derived map (one call per class for all images).
    targets = [r["target"] for k in keys for r in grouped[k]]
    rows = [keys.index(r["key"]) for k in keys for r in grouped[k]]
    expected = oracle(tiny[1], x[rows], targets)
    reference = captum_maps(tiny[1], x[rows], targets)
    np.testing.assert_allclose(expected, reference, rtol=1e-9, atol=1e-12)
    assert_discriminating(expected)
    written = [r for k in keys for r in grouped[k]]
    for r, wanted in zip(written, expected, strict=True):
        raw = np.load(out / r["files"]["map"])
        assert raw.dtype == np.float32
        assert_map(raw, wanted, f"{r['key']} class {r['target']}")


def test_npz_shards_hold_the_hand_derived_maps_under_their_keys(tiny, folder, tmp_path) -> None:
    """--maps npz with --topk 1 --target dog: each image's top-1 and class 1 (once when they coincide)."""
    out = tmp_path / "out"
    summary, records = explain_folder(tiny, folder, out, "--topk", "1", "--target", "dog", "--maps", "npz")
    check_summary(summary, records, out)
    keys = sorted(KEYS)
    x = inputs_of([KEYS[k] for k in keys])
    top1 = logits_of(tiny[1], x).argmax(dim=1).tolist()
    grouped = by_key(records)
    for row, key in enumerate(keys):
        assert [r["target"] for r in grouped[key]] == list(dict.fromkeys([top1[row], 1]))
    stored: dict[str, np.ndarray] = {}
    for shard in sorted((out / "maps").glob("shard-*.npz")):
        with np.load(shard) as arrays:
            stored.update({name: arrays[name] for name in arrays.files})
    assert set(stored) == {f"{r['key']}#{r['target']}" for r in records}  # no map missing, none extra
    rows = [keys.index(r["key"]) for r in records]
    expected = oracle(tiny[1], x[rows], [r["target"] for r in records])
    assert_discriminating(expected)
    for r, wanted in zip(records, expected, strict=True):
        assert (out / r["files"]["map"]).is_file()
        raw = stored[f"{r['key']}#{r['target']}"]
        assert raw.dtype == np.float32
        assert_map(raw, wanted, f"{r['key']} class {r['target']}")
    # A rerun on the finished folder: nothing new, the failed input tried (and listed) again.
    before = (out / "manifest.jsonl").read_bytes()
    again, _ = explain_folder(
        tiny, folder, out, "--topk", "1", "--target", "dog", "--maps", "npz", as_json=False
    )
    assert (out / "manifest.jsonl").read_bytes() == before
    assert again["already_done"] == len({r["key"] for r in records}) == len(KEYS)
    assert (again["images"], again["targets"], again["errors"]) == (0, 0, len(errors_of(out))) == (0, 0, 1)


def test_counterfactual_maps_are_relu_of_the_negated_gradient_weights(tiny, folder, tmp_path) -> None:
    """--counterfactual: ReLU(sum_k mean(-dy^c/dA_k) A_k) for each image's top-1 class, which is not the
    plain map."""
    out = tmp_path / "out"
    summary, records = explain_folder(tiny, folder, out, "--counterfactual", as_json=False)
    check_summary(summary, records, out)
    keys = sorted(KEYS)
    x = inputs_of([KEYS[k] for k in keys])
    top1 = logits_of(tiny[1], x).argmax(dim=1).tolist()
    assert sorted((r["key"], r["target"]) for r in records) == list(zip(keys, top1, strict=True))
    records.sort(key=lambda r: r["key"])
    expected = oracle(tiny[1], x, top1, counterfactual=True)
    plain = oracle(tiny[1], x, top1)
    assert_discriminating(expected)
    assert np.abs(expected - plain).max() > 0.5 * np.abs(expected).max()  # the sign matters here
    for r, wanted in zip(records, expected, strict=True):
        assert_map(np.load(out / r["files"]["map"]), wanted, f"{r['key']} counterfactual")


def test_maps_after_kill_minus_nine_and_resume_equal_the_hand_derived_maps(tiny, tmp_path) -> None:
    """A run killed with SIGKILL part-way and resumed: every image once in the manifest, every map (the
    killed run's and the resumed run's) equal to the oracle, the resumed run's summary counting only
    what it did."""
    data = tmp_path / "many"
    count = 160
    keys = {f"img{i:03d}.png": 100 + i for i in range(count)}
    write_pictures(data, keys)
    out = tmp_path / "out"
    args = ["explain", str(data), "-m", tiny[0], "--layer", LAYER, "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "gradcam", *args, "--batch-size", "1", "--workers", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest_path = out / "manifest.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if manifest_path.exists() and manifest_path.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.005)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    partial = manifest_path.read_bytes().count(b"\n")
    assert 4 <= partial < count, f"the run must be killed part-way ({partial} of {count} lines)"
    resumed = cli(*args, "--batch-size", "7", "--json")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    records = manifest(out)
    assert sorted(r["key"] for r in records) == sorted(keys)  # each image exactly once
    assert summary["already_done"] >= 4
    assert summary["images"] == summary["targets"] == count - summary["already_done"]
    assert summary["errors"] == 0 and not errors_of(out) and summary["layer"] == LAYER
    assert not list(out.rglob("*.tmp"))
    records.sort(key=lambda r: r["key"])
    x = inputs_of([keys[r["key"]] for r in records])
    top1 = logits_of(tiny[1], x).argmax(dim=1).tolist()
    assert [r["target"] for r in records] == top1
    expected = oracle(tiny[1], x, top1)
    assert_discriminating(expected)
    for r, wanted in zip(records, expected, strict=True):
        assert_map(np.load(out / r["files"]["map"]), wanted, r["key"])


# ------------------------------------------------------------------------------ all classes, the library


def test_library_all_classes_topk_and_per_image_grids_equal_captum_per_class(tiny) -> None:
    """targets="all", topk=3 and an (N,B) grid with other classes for each image, against captum's
    LayerGradCam for each (image, class)."""
    seeds = list(KEYS.values())
    x = inputs_of(seeds)
    cam = gradcam.GradCAM(tiny[1], LAYER)
    every = cam(x, "all")
    assert every.targets.tolist() == [[c] * len(seeds) for c in LABELS]
    expected = np.stack([captum_maps(tiny[1], x, [c] * len(seeds)) for c in LABELS])  # (3, B, 8, 8)
    assert_discriminating(expected.reshape(-1, 8, 8))
    logits = logits_of(tiny[1], x)
    for c in LABELS:
        for b in range(len(seeds)):
            assert_map(every.raw[c, b].numpy(), expected[c, b], f"all: image {b} class {c}")
            assert float(every.scores[c, b]) == pytest.approx(float(logits[b, c]), abs=1e-5)
    ranked = cam(x, topk=3)
    ranking = logits.argsort(dim=1, descending=True).T  # (3, B): row n, every image's n-th class
    assert ranked.targets.tolist() == ranking.tolist()
    grid = torch.tensor([[2, 0, 1, 1, 0], [0, 2, 2, 0, 1]])
    chosen = cam(x, grid)
    assert chosen.targets.tolist() == grid.tolist()
    for result, ids in ((ranked, ranking), (chosen, grid)):
        for n in range(ids.shape[0]):
            for b in range(len(seeds)):
                c = int(ids[n, b])
                assert_map(result.raw[n, b].numpy(), expected[c, b], f"image {b} class {c}")


# ------------------------------------------------------------------------------ gradcam evaluate

#: Each column of report.md and whether higher is better, from what the metric measures.
HIGHER_IS_BETTER = {
    "pointing game": True,
    "loc. accuracy": True,
    "top-1 loc. error": False,
    "top-5 loc. error": False,
    "deletion AUC": False,  # the probability should fall fast as the most salient pixels go
    "insertion AUC": True,  # ... and rise fast as they come back
    "Average Drop %": False,
    "Increase in Conf. %": True,
    "ROAD MoRF": False,
    "ROAD LeRF": True,
    "ROAD combined": True,
}
COLUMN_KEYS = {
    "pointing game": "pointing_game",
    "loc. accuracy": "localization_accuracy",
    "top-1 loc. error": "top1_localization_error",
    "top-5 loc. error": "top5_localization_error",
    "deletion AUC": "deletion_auc",
    "insertion AUC": "insertion_auc",
    "Average Drop %": "average_drop",
    "Increase in Conf. %": "increase_in_confidence",
    "ROAD MoRF": "road.morf",
    "ROAD LeRF": "road.lerf",
    "ROAD combined": "road.combined",
}
# image -> annotated objects (two classes on the first), boxes in its 64x64 pixels
BOXES = {
    "a.png": [{"label": "cat", "box": [4, 6, 30, 40]}, {"label": "bird", "box": [34, 20, 60, 58]}],
    "b.png": [{"label": "dog", "box": [10, 10, 40, 44]}],
    "c.png": [{"label": "bird", "box": [30, 2, 62, 30]}],
    "d.png": [{"label": "cat", "box": [0, 30, 28, 64]}],
}
FRACTIONS = (0.2, 0.5, 0.8)
STEPS = 4


def _metric(summary: dict, key: str) -> float:
    for part in key.split("."):
        summary = summary[part]
    return summary  # type: ignore[return-value]


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory) -> tuple[Path, dict, list[dict], str]:
    """``gradcam evaluate`` on four pictures (five targets): (out, metrics.json, items.jsonl, stdout)."""
    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    write_pictures(images, {name: seed for seed, name in enumerate(BOXES)})
    annotations = root / "boxes.json"
    annotations.write_text(json.dumps(BOXES))
    out = root / "out"
    result = cli(
        "evaluate", images, "--annotations", annotations, "--out", out, "-m", tiny[0], "--layer", LAYER,
        "--methods", "gradcam,gradcam++", "--steps", str(STEPS),
        "--road-fractions", ",".join(map(str, FRACTIONS)), "--batch-size", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    return out, metrics, items, result.stdout


def _targets(items: list[dict], method: str) -> list[dict]:
    return [r for r in items if r["method"] == method]


def test_metrics_json_means_are_the_means_of_the_per_item_records(evaluated) -> None:
    _, metrics, items, _ = evaluated
    methods = ["gradcam", "gradcam++", "random", "center", "sobel"]
    assert list(metrics["methods"]) == methods
    assert metrics["images"] == len(BOXES) == len({r["image"] for r in items})
    assert metrics["targets"] == sum(len(objects) for objects in BOXES.values()) == 5
    for name in methods:
        mine = _targets(items, name)
        summary = metrics["methods"][name]
        assert summary["targets"] == len(mine) == metrics["targets"]
        means = {
            "pointing_game": np.mean([r["pointing_hit"] for r in mine]),
            "localization_accuracy": np.mean([r["localized"] for r in mine]),
            "deletion_auc": np.mean([r["deletion_auc"] for r in mine]),
            "insertion_auc": np.mean([r["insertion_auc"] for r in mine]),
            "average_drop": 100 * np.mean([r["drop"] for r in mine]),
        }
        for key, value in means.items():
            assert summary[key] == pytest.approx(value, abs=1e-9), (name, key)
        assert summary["road"]["combined"] == pytest.approx(
            np.mean([r["road_combined"] for r in mine]), abs=1e-9
        )
        # combined = mean (LeRF - MoRF) / 2, per target and so on average
        assert summary["road"]["combined"] == pytest.approx(
            (summary["road"]["lerf"] - summary["road"]["morf"]) / 2, abs=1e-9
        )


def _evaluation_batch(items: list[dict], method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs (float32) and classes of ``method``'s targets, in the evaluation's order."""
    names = list(BOXES)
    mine = _targets(items, method)
    x = inputs_of([names.index(Path(r["image"]).name) for r in mine])
    return x, torch.tensor([r["label"] for r in mine])


def _maps(tiny, method: str, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The maps the evaluation scores: the method's raw maps upsampled to 64x64, each divided by its peak."""
    explain = gradcam.metrics.saliency.make_saliency(
        method, tiny[1], layer=LAYER, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0
    )
    raw = explain(x, labels).detach().float()
    if method == "gradcam":  # the library's maps are Grad-CAM's, as derived here
        expected = oracle(tiny[1], x, labels.tolist())
        for b in range(len(x)):
            assert_map(raw[b].numpy(), expected[b], f"evaluate gradcam target {b}")
    up = F.interpolate(raw[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp_min(0)
    return up / torch.where(peak > 0, peak, torch.ones_like(peak))[:, None, None]


def test_deletion_and_insertion_auc_recomputed_from_the_same_maps(tiny, evaluated) -> None:
    """Per target and on average, deletion (zero baseline) and insertion (blurred baseline) AUC as the
    library's curve functions give them on the maps the evaluation scored; the two differ, so a file
    reporting one as the other fails."""
    from gradcam.metrics.perturbation import deletion, insertion

    _, metrics, items, _ = evaluated
    for method in ("gradcam", "center"):
        x, labels = _evaluation_batch(items, method)
        maps = _maps(tiny, method, x, labels)
        curves = {
            "deletion_auc": deletion(tiny[1], x, maps, labels, steps=STEPS),
            "insertion_auc": insertion(tiny[1], x, maps, labels, steps=STEPS),
        }
        for key, curve in curves.items():
            assert curve.fractions.tolist() == pytest.approx([i / STEPS for i in range(STEPS + 1)])
            auc = torch.trapezoid(curve.probabilities, curve.fractions, dim=-1)  # by the trapezoid rule
            per_item = [r[key] for r in _targets(items, method)]
            np.testing.assert_allclose(per_item, auc.numpy(), rtol=0, atol=1e-5, err_msg=f"{method} {key}")
            assert metrics["methods"][method][key] == pytest.approx(float(auc.mean()), abs=1e-5)
        gap = metrics["methods"][method]["insertion_auc"] - metrics["methods"][method]["deletion_auc"]
        assert abs(gap) > 0.01, "deletion and insertion must differ for the test to tell them apart"


def _road_by_hand(tiny, x: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor) -> dict[str, np.ndarray]:
    """ROAD (Rong et al. 2022) replayed here: for each image, MoRF then LeRF, for each fraction, remove the
    round(f H W) highest (MoRF) / lowest (LeRF) pixels of the map (stable ranking, ties in raster order),
    impute them with the library's noisy linear imputation (the noise drawn from one generator seeded 0,
    in that order) and score softmax(f(x~))[t]. Returns (B,) mean curves per order."""
    from gradcam.metrics.road import DEFAULT_NOISE, noisy_linear_impute

    generator = torch.Generator().manual_seed(0)
    model = tiny[1].eval()
    pixels = SIZE * SIZE
    curves: dict[str, list[list[float]]] = {"morf": [], "lerf": []}
    for b in range(len(x)):
        flat = maps[b].flatten()
        for order, ranking in (
            ("morf", torch.argsort(-flat, stable=True)),
            ("lerf", torch.argsort(flat, stable=True)),
        ):
            row = []
            for fraction in FRACTIONS:
                removed = torch.zeros(pixels, dtype=torch.bool)
                removed[ranking[: round(fraction * pixels)]] = True
                imputed = noisy_linear_impute(
                    x[b], removed.reshape(SIZE, SIZE), noise=DEFAULT_NOISE, generator=generator
                )
                with torch.no_grad():
                    probabilities = model(imputed[None]).logits.double().softmax(dim=1)
                row.append(float(probabilities[0, labels[b]]))
            curves[order].append(row)
    return {order: np.array(rows).mean(axis=1) for order, rows in curves.items()}


def test_road_morf_and_lerf_recomputed_by_hand(tiny, evaluated) -> None:
    _, metrics, items, _ = evaluated
    for method in ("gradcam", "sobel"):
        x, labels = _evaluation_batch(items, method)
        road = _road_by_hand(tiny, x, labels, _maps(tiny, method, x, labels))
        reported = metrics["methods"][method]["road"]
        assert reported["morf"] == pytest.approx(float(road["morf"].mean()), abs=1e-5), method
        assert reported["lerf"] == pytest.approx(float(road["lerf"].mean()), abs=1e-5), method
        combined = (road["lerf"] - road["morf"]) / 2
        np.testing.assert_allclose([r["road_combined"] for r in _targets(items, method)], combined, atol=1e-5)
        # MoRF and LeRF differ by far more than the tolerance: a file reporting one as the other fails.
        assert abs(road["morf"].mean() - road["lerf"].mean()) > 1e-4, method


def _report_table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """(column headers, method -> cells) of report.md's first table."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[0] == "method" and set(lines[1]) <= set("|-: ")
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        rows[cells[0].removesuffix(" (baseline)")] = cells[1:]
    return header[1:], rows


def test_report_table_is_metrics_json_and_the_bold_cell_is_each_columns_best(evaluated) -> None:
    out, metrics, _, _ = evaluated
    headers, rows = _report_table((out / "report.md").read_text())
    assert list(rows) == list(metrics["methods"])
    seen_distinct = 0
    for column, header in enumerate(headers):
        title, arrow = header[:-2], header[-1]
        higher = HIGHER_IS_BETTER[title]
        assert arrow == ("↑" if higher else "↓"), f"column {title}: marked {arrow}"
        values = {m: _metric(s, COLUMN_KEYS[title]) for m, s in metrics["methods"].items()}
        best = max(values.values()) if higher else min(values.values())
        for method, cells in rows.items():
            cell = cells[column]
            bold = cell.startswith("**") and cell.endswith("**")
            assert cell.strip("*") == f"{values[method]:.3f}", (title, method)
            assert bold == (values[method] == best), f"column {title}: {method} {cell}, best {best:.3f}"
        seen_distinct += len(set(values.values())) > 1
    assert seen_distinct >= 5  # the columns whose best is a choice, where a wrong bold shows
    assert {"deletion AUC ↓", "insertion AUC ↑", "ROAD MoRF ↓", "ROAD LeRF ↑"} <= set(headers)


def test_printed_summary_table_is_metrics_json(evaluated) -> None:
    _, metrics, _, stdout = evaluated
    keys = ["pointing_game", "localization_accuracy", "deletion_auc", "insertion_auc", "average_drop",
            "increase_in_confidence", "road.combined"]  # fmt: skip
    assert f"{metrics['images']} images, {metrics['targets']} targets" in stdout
    for name, summary in metrics["methods"].items():
        (line,) = [row for row in stdout.splitlines() if re.match(rf"^\W*{re.escape(name)}\s*│", row)]
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        assert cells == [name, *(f"{_metric(summary, k):.3f}" for k in keys)]
