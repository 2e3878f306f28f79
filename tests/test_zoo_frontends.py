"""``timm:`` and ``hf:`` models through every front end: ``gradcam explain`` (a few files, a streamed folder,
``--engine ray``), ``layers``, ``evaluate``, ``sanity``, ``serve -m`` (its API and its trust study) and
``gradcam study create``.

The models are small: timm's ViT-Tiny with random weights (``--random-weights``; 224 px, a 14x14 patch grid
behind a class token) and a two-layer Hugging Face ViT saved with ``save_pretrained`` (64 px, 4x4 patches).
Everything runs in this process (CliRunner; the service through the app ``gradcam serve`` builds), so a map
a command writes is checked against :class:`gradcam.GradCAM` on the same weights: the hf folder's, which are
on disk, or timm's random ones rebuilt after the same ``torch.manual_seed``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import gradcam
from conftest import require, tiny_vit_options
from gradcam import models
from gradcam.cli import app
from gradcam.cli.study import study_app
from scenes import compose_scenes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CAT, COFFEE = EXAMPLES / "cat.png", EXAMPLES / "coffee.png"  # 451x300 and 600x400
TIMM = "timm:vit_tiny_patch16_224"
TIMM_LAYER = "blocks.11.norm1"  # the input of the last block's attention
LABELS = {0: "cat", 1: "dog", 2: "bird"}
SEED = 5  # timm's random weights: the same in the command and in the test
TOKEN = "zoo-frontends-admin-token"
runner = CliRunner()


def cli(*args: str | Path, command=app):  # type: ignore[no-untyped-def]
    return runner.invoke(command, [str(a) for a in args], env={"COLUMNS": "200"})


def timm_model() -> models.LoadedModel:
    """The random ViT-Tiny a command loads with --random-weights right after torch.manual_seed(SEED)."""
    torch.manual_seed(SEED)
    return models.load(TIMM, pretrained=False)


def library_map(loaded: models.LoadedModel, path: Path, target: int) -> np.ndarray:
    """The raw map of ``gradcam.GradCAM`` (automatic layer) for one image file and class."""
    batch = loaded.preprocess(gradcam.io.load_image(path))[None]
    return gradcam.GradCAM(loaded.module)(batch, [target]).raw[0].numpy()


def hf_layer(loaded: models.LoadedModel) -> str:
    """The input of the last attention of a transformers ViT (its name varies with the version)."""
    return [n for n, _ in loaded.module.named_modules() if n.endswith("layernorm_before")][-1]


def decode_png(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    picture.load()
    assert picture.format == "PNG"
    return picture


def one_line_error(result, words: str) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.output


def _save_vit(folder: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        **tiny_vit_options(
            image_size=64, patch_size=16, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
        )
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # "cat" first whatever the picture: two such models agree (the study keeps all)
        model.classifier.bias.copy_(torch.tensor([3.0, 0.0, -1.0]))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> tuple[str, str]:
    """Two tiny Hugging Face ViTs (other weights, the same classes) as hf:<folder> names."""
    names = []
    for seed in (2, 3):  # seed 1 gives an all-negative (zero) cat map for "cat": a chance of random weights
        folder = tmp_path_factory.mktemp(f"tiny-vit-{seed}")
        _save_vit(folder, seed)
        names.append(f"hf:{folder}")
    return names[0], names[1]


@pytest.fixture(scope="module")
def hf_model(hf_folders) -> models.LoadedModel:
    return models.load(hf_folders[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A small nested folder of photos: cat.png, sub/coffee.png, sub/small.jpg."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / "cat.png").write_bytes(CAT.read_bytes())
    (root / "sub" / "coffee.png").write_bytes(COFFEE.read_bytes())
    with Image.open(CAT) as cat:
        cat.convert("RGB").resize((150, 100)).save(root / "sub" / "small.jpg", quality=95)
    return root


KEYS = {"cat.png", "sub/coffee.png", "sub/small.jpg"}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ explain: a few files


@pytest.mark.parametrize("zoo", ["timm", "hf"])
def test_explain_a_few_files_writes_patch_grid_maps_equal_to_the_library(zoo, hf_folders, tmp_path) -> None:
    if zoo == "timm":
        torch.manual_seed(SEED)
        result = cli("explain", CAT, COFFEE, "-m", TIMM, "--random-weights", "--json", "--out", tmp_path)
        loaded, layer, grid, overlay = timm_model(), TIMM_LAYER, (14, 14), {CAT: (224, 224)}
    else:
        result = cli("explain", CAT, COFFEE, "-m", hf_folders[0], "--json", "--out", tmp_path)
        loaded = models.load(hf_folders[0])
        layer, grid, overlay = hf_layer(loaded), (4, 4), {CAT: (384, 255)}  # the whole photo, 384 px
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"] == loaded.name and document["layer"] == layer
    assert [r["image"] for r in document["results"]] == [str(CAT), str(COFFEE)]
    for path, image in zip((CAT, COFFEE), document["results"], strict=True):
        x = loaded.preprocess(gradcam.io.load_image(path))[None]
        with torch.no_grad():
            logits = loaded.module(x)
        logits = getattr(logits, "logits", logits)  # a transformers ImageClassifierOutput
        top = logits.softmax(dim=1)[0].topk(min(5, len(loaded.labels)))
        assert [p["index"] for p in image["predictions"]] == top.indices.tolist()
        assert [p["class"] for p in image["predictions"]] == [loaded.labels[i] for i in top.indices]
        assert [p["probability"] for p in image["predictions"]] == pytest.approx(
            top.values.tolist(), abs=1e-5
        )
        (explained,) = image["explanations"]
        assert explained["target"] == image["predictions"][0]["index"]
        raw = np.load(explained["files"]["map"])
        assert raw.shape == grid and raw.max() > 0
        np.testing.assert_allclose(raw, library_map(loaded, path, explained["target"]), rtol=1e-5, atol=1e-7)
        for kind in ("overlay", "panel"):
            assert Path(explained["files"][kind]).parent == tmp_path
        with Image.open(explained["files"]["overlay"]) as picture:
            assert path not in overlay or picture.size == overlay[path]
    if zoo == "hf":
        assert {p["class"] for r in document["results"] for p in r["predictions"]} == set(LABELS.values())


# ------------------------------------------------------------------------------ explain: a dataset


def test_explain_a_folder_with_an_hf_model_streams_every_image(
    hf_folders, hf_model, images, tmp_path
) -> None:
    result = cli(
        "explain", images, "-m", hf_folders[0], "--topk", "2", "--batch-size", "2", "--workers", "0",
        "--json", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["targets"], summary["errors"]) == (3, 6, 0)
    assert summary["layer"] == hf_layer(hf_model)
    records = manifest(tmp_path)
    assert sorted((r["key"], r["rank"]) for r in records) == sorted((k, n) for k in KEYS for n in (0, 1))
    for record in records:
        assert record["class"] == LABELS[record["target"]]
        assert [p["class"] for p in record["top5"]] == [LABELS[p["index"]] for p in record["top5"]]
        assert record["top5"][0]["class"] == "cat"  # the classifier's bias
        assert (tmp_path / record["files"]["overlay"]).parent == tmp_path / Path(record["key"]).parent
        raw = np.load(tmp_path / record["files"]["map"])
        assert raw.shape == (4, 4)
        expected = library_map(hf_model, images / record["key"], record["target"])
        np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "errors.jsonl").read_text() == ""


@pytest.fixture
def ray_instance():
    """One small local Ray instance, as in test_ray_engine.py (the command uses the running one)."""
    ray = require("ray", "the Ray engine needs Ray: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_explain_a_folder_with_a_timm_vit_on_ray(ray_instance, images, tmp_path) -> None:
    torch.manual_seed(SEED)
    result = cli(
        "explain", images, "-m", TIMM, "--random-weights", "--engine", "ray", "--batch-size", "2",
        "--json", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ray_instance.is_initialized()  # the running instance was used and left running
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["targets"], summary["errors"]) == (3, 3, 0)
    assert summary["layer"] == TIMM_LAYER
    records = manifest(tmp_path)
    assert sorted(r["key"] for r in records) == sorted(KEYS)
    loaded = timm_model()  # the weights the workers were sent
    for record in records:
        assert record["rank"] == 0 and record["class"] == loaded.labels[record["target"]]
        assert (tmp_path / record["files"]["overlay"]).is_file()
        raw = np.load(tmp_path / record["files"]["map"])
        assert raw.shape == (14, 14) and raw.dtype == np.float32
        expected = library_map(loaded, images / record["key"], record["target"])
        np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("zoo", ["timm", "hf"])
def test_layers_names_the_automatic_layer_and_its_token_layout(zoo, hf_folders, hf_model) -> None:
    if zoo == "timm":
        result = cli("layers", "-m", TIMM, "--random-weights")
        layer, shape, layout = TIMM_LAYER, "1x197x192", "tokens 1+14x14"
    else:
        result = cli("layers", "-m", hf_folders[0])
        layer, shape, layout = hf_layer(hf_model), "1x17x32", "tokens 1+4x4"
    assert result.exit_code == 0, result.output
    (chosen,) = [line for line in result.stdout.splitlines() if "automatic choice" in line]
    cells = [cell.strip() for cell in chosen.split("│")]
    assert layer in cells and shape in cells and layout in cells
    assert sum(layout in line for line in result.stdout.splitlines()) > 10  # every block reads as tokens


# ------------------------------------------------------------------------------ evaluate, sanity


def test_evaluate_an_hf_model_writes_every_methods_scores(hf_folders, tmp_path) -> None:
    annotations = compose_scenes(tmp_path / "scenes", 2, size=224, seed=1)  # a cat and an espresso
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"Egyptian cat": "cat", "espresso": "bird"}))
    out = tmp_path / "report"
    result = cli(
        "evaluate", tmp_path / "scenes", "--annotations", annotations, "--label-map", label_map,
        "-m", hf_folders[0], "--methods", "gradcam,gradcam++", "--steps", "4", "--road-fractions", "0.5",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == hf_folders[0] and metrics["images"] == 2 and metrics["errors"] == []
    names = ["gradcam", "gradcam++", "random", "center", "sobel"]
    assert list(metrics["methods"]) == names
    for summary in metrics["methods"].values():
        assert summary["targets"] == 2
        assert 0 <= summary["pointing_game"] <= 1 and 0 <= summary["deletion_auc"] <= 1
        assert 0 <= summary["insertion_auc"] <= 1 and set(summary["road"]) == {"morf", "lerf", "combined"}
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(names * 2)
    report = (out / "report.md").read_text()
    assert "| gradcam |" in report and "| gradcam++ |" in report
    assert (out / "deletion.png").is_file() and (out / "insertion.png").is_file()


@pytest.mark.parametrize("zoo", ["timm", "hf"])
def test_sanity_randomises_a_zoo_model_block_by_block(zoo, hf_folders, tmp_path, one_thread) -> None:
    model = ["-m", TIMM, "--random-weights"] if zoo == "timm" else ["-m", hf_folders[0]]
    photos = [CAT] if zoo == "timm" else [CAT, COFFEE]  # ViT-Tiny: 16 steps, each 2 methods per image
    methods = "gradcam,guided-backprop"
    result = cli("sanity", *photos, *model, "--methods", methods, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "sanity.json").read_text())
    steps = document["steps"]
    if zoo == "timm":
        assert document["model"] == TIMM
        assert steps[:2] == ["original", "head"] and "blocks.11" in steps and "blocks.0" in steps
    else:
        assert document["model"] == hf_folders[0] and set(document["classes"]) <= set(LABELS.values())
        # ViTModel is not a plain container: the whole backbone is one block, re-initialised at once.
        assert steps == ["original", "classifier", "vit"]
    assert document["images"] == [str(p) for p in photos] and len(document["classes"]) == len(photos)
    assert list(document["methods"]) == ["gradcam", "guided-backprop"]
    for curve in document["methods"].values():
        assert [s["layer"] for s in curve] == steps
        assert curve[0]["spearman"] == pytest.approx(1.0) and len(curve[-1]["spearman_per_image"]) == len(
            photos
        )
        assert all(-1 <= s["spearman"] <= 1 for s in curve)
    # Grad-CAM depends on the top layers: re-initialising the classifier changes its map.
    assert document["methods"]["gradcam"][1]["spearman"] < 0.99
    written = {p.name for p in tmp_path.iterdir()}
    assert {"sanity.json", "sanity.png"} <= written
    assert {f"sanity_{p.stem}_{m}.png" for p in photos for m in methods.split(",")} <= written


# ------------------------------------------------------------------------------ serve -m, the service's study


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_app(monkeypatch: pytest.MonkeyPatch, *args: str | Path):  # type: ignore[no-untyped-def]
    """The application `gradcam serve ARGS` builds (uvicorn.run is caught: nothing listens)."""
    import uvicorn

    built = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **_: built.append(application))
    result = cli("serve", "--port", str(_free_port()), "--admin-token", TOKEN, *args)
    assert result.exit_code == 0, result.output
    (application,) = built
    return application


@pytest.fixture(scope="module")
def served(hf_folders, images, tmp_path_factory):
    """`gradcam serve -m hf:A -m hf:B --study-images ...` under a TestClient."""
    from fastapi.testclient import TestClient

    study_root = tmp_path_factory.mktemp("study-root")
    for key in KEYS:
        (study_root / "photos" / key).parent.mkdir(parents=True, exist_ok=True)
        (study_root / "photos" / key).write_bytes((images / key).read_bytes())
    db = tmp_path_factory.mktemp("db") / "study.db"
    with pytest.MonkeyPatch.context() as monkeypatch:
        application = serve_app(
            monkeypatch, "-m", hf_folders[0], "-m", hf_folders[1], "--study-images", study_root,
            "--db", f"sqlite:///{db}",
        )  # fmt: skip
    with TestClient(application) as client:
        yield client


def test_serve_lists_and_explains_with_an_hf_model(served, hf_folders, hf_model) -> None:
    listed = served.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == list(hf_folders) and [m["default"] for m in listed] == [True, False]
    assert all(m["input_size"] == [64, 64] and m["classes"] == 3 for m in listed)
    response = served.post(
        "/v1/explain",
        files={"image": ("cat.png", CAT.read_bytes(), "image/png")},
        data={"model": hf_folders[0], "target": ["dog", "0"], "raw": "true"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == hf_folders[0] and body["layer"] == hf_layer(hf_model)
    assert [p["class"] for p in body["predictions"]] == [LABELS[p["index"]] for p in body["predictions"]]
    assert {p["class"] for p in body["predictions"]} == set(LABELS.values())  # 3 classes: all in the top-5
    assert [(t["index"], t["class"]) for t in body["targets"]] == [(1, "dog"), (0, "cat")]
    for target in body["targets"]:
        raw = np.array(target["raw_map"])
        assert raw.shape == (4, 4)
        np.testing.assert_allclose(raw, library_map(hf_model, CAT, target["index"]), rtol=1e-4, atol=1e-6)
        assert decode_png(target["heatmap"]).size == (451, 300)


def test_serve_gives_the_labels_of_an_hf_model(served, hf_folders) -> None:
    from urllib.parse import quote

    response = served.get(f"/v1/models/{quote(hf_folders[0], safe='')}/labels")
    assert response.status_code == 200 and response.json()["labels"] == list(LABELS.values())


def test_the_services_study_renders_pairs_of_two_hf_models(served, hf_folders) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {
        "name": "zoo",
        "stronger_model": hf_folders[0],
        "weaker_model": hf_folders[1],
        "methods": ["gradcam", "guided-gradcam"],
        "folder": "photos",
        "seed": 3,
    }
    response = served.post("/v1/studies", json=body, headers=admin)
    assert response.status_code == 202, response.text  # rendered in the background
    while (study := served.get(response.json()["status_path"], headers=admin).json())["state"] in (
        "queued",
        "rendering",
    ):
        time.sleep(0.05)
    assert study["state"] == "ready", study
    assert study["pairs"] == 6  # 3 images x 2 methods: both models put "cat" first
    invitations = served.post(
        f"/v1/admin/studies/{study['id']}/invitations", json={"count": 1}, headers=admin
    ).json()["invitations"]
    token = invitations[0]["link"].split("#", 1)[1]
    shown = served.get(f"/v1/studies/{study['id']}/next", headers={"Authorization": f"Bearer {token}"}).json()
    assert shown["done"] is False and shown["class"] == "cat" and shown["total"] == 6
    a, b = decode_png(shown["robot_a"]), decode_png(shown["robot_b"])
    assert a.size == b.size and shown["robot_a"] != shown["robot_b"]  # two models, two pictures


def test_serve_explains_with_a_timm_vit_with_random_weights(monkeypatch) -> None:
    from fastapi.testclient import TestClient

    application = serve_app(monkeypatch, "-m", TIMM, "--random-weights", "--db", "sqlite://")
    torch.manual_seed(SEED)  # the server loads its models when it starts
    with TestClient(application) as client:
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == [TIMM]
        response = client.post(
            "/v1/explain", files={"image": ("coffee.png", COFFEE.read_bytes())}, data={"raw": "true"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    loaded = timm_model()
    assert body["model"] == TIMM and body["layer"] == TIMM_LAYER
    assert len(body["predictions"]) == 5
    assert all(p["class"] == loaded.labels[p["index"]] for p in body["predictions"])
    (target,) = body["targets"]
    assert target["index"] == body["predictions"][0]["index"]
    raw = np.array(target["raw_map"])
    assert raw.shape == (14, 14)
    np.testing.assert_allclose(raw, library_map(loaded, COFFEE, target["index"]), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ gradcam study create


def test_study_create_renders_the_pairs_of_two_hf_models(hf_folders, images, tmp_path) -> None:
    from gradcam.study.store import StudyStore

    db = tmp_path / "study.db"
    result = cli(
        "create", "--stronger", hf_folders[0], "--weaker", hf_folders[1], "--images", images,
        "--methods", "gradcam,guided-backprop", "--db", db, "--seed", "4", command=study_app,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    match = re.search(
        r"study (\S+): 6 pairs \(3 images x 2 methods\), 0 images skipped, seed 4", result.stdout
    )
    assert match, result.stdout
    with StudyStore(f"sqlite:///{db}") as store:
        (found,) = store.list_studies()
        assert (found.id, found.stronger_model, found.weaker_model) == (match[1], *hf_folders)
        rater = store.invite(found.id)[0].rater
        seen = []
        while (pair := store.next_pair(found.id, rater)) is not None:
            seen.append(
                (pair.class_name, Image.open(io.BytesIO(pair.robot_a)).format, pair.robot_a != pair.robot_b)
            )
            store.record_rating(found.id, rater, pair.id, 1)
    assert seen == [("cat", "PNG", True)] * 6


# ------------------------------------------------------------------------------ unknown zoo names


@pytest.mark.parametrize(
    "args",
    [
        ["explain", str(CAT), "-m", "timm:nosuch", "--random-weights"],
        ["serve", "-m", "timm:nosuch"],
        ["layers", "-m", "timm:nosuch", "--random-weights"],
        ["sanity", str(CAT), "-m", "timm:nosuch", "--random-weights", "--out", "{tmp}"],
        ["evaluate", "{tmp}", "--annotations", "{tmp}", "-m", "timm:nosuch", "--out", "{tmp}"],
        [
            "study",
            "create",
            "--stronger",
            "timm:nosuch",
            "--weaker",
            TIMM,
            "--images",
            "{tmp}",
            "--db",
            "{tmp}/s.db",
        ],
        ["explain", str(CAT), "-m", "hf:/no/such/folder"],
    ],
)
def test_unknown_zoo_models_are_one_line_exit_2(args: list[str], tmp_path) -> None:
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    one_line_error(result, args[args.index("-m") + 1] if "-m" in args else "timm:nosuch")
    assert "not found" in result.stderr


# ------------------------------------------------------------------------- forwards, counted


@pytest.fixture
def forwarded(monkeypatch):  # type: ignore[no-untyped-def]
    """Images through the tiny ViTs' forward, counted while the test runs."""
    from transformers import ViTForImageClassification

    seen = {"images": 0}
    original = ViTForImageClassification.forward

    def counting(self, pixel_values=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["images"] += int(pixel_values.shape[0])
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(ViTForImageClassification, "forward", counting)
    return seen


def test_explain_forwards_each_image_once_for_its_predictions_and_topk_maps(
    hf_folders, tmp_path, forwarded
) -> None:
    result = cli("explain", CAT, COFFEE, "-m", hf_folders[0], "--topk", "3", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert forwarded["images"] == 1 + 2  # one probe for the automatic layer, then the two images once
    document = json.loads(result.stdout)
    assert [len(r["explanations"]) for r in document["results"]] == [3, 3]


def test_a_study_forwards_each_image_once_per_model_and_once_guided(hf_folders, tmp_path, forwarded) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, source in enumerate((CAT, COFFEE, CAT, COFFEE)):
        (folder / f"{index}.png").write_bytes(source.read_bytes())
    result = cli(
        "study", "create", "--stronger", hf_folders[0], "--weaker", hf_folders[1], "--images", folder,
        "--methods", "guided-backprop,guided-gradcam", "--seed", "1", "--db", tmp_path / "study.db",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 pairs (4 images x 2 methods)" in result.stdout
    # Per model: one probe, one forward of the 4 images (top-1 and Grad-CAM), one guided forward.
    assert forwarded["images"] == 2 * (1 + 4 + 4)
