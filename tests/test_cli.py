"""The `gradcam` command end to end, in a real subprocess, on the bundled model and samples."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import run_gradcam
from gradcam.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CAT, COFFEE = EXAMPLES / "cat.png", EXAMPLES / "coffee.png"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# Drawn by hand on cat.png (451x300): the cat fills x < 370; right of x = 390 is background.
CAT_RIGHT_EDGE, BACKGROUND_LEFT_EDGE = 370, 390


def gradcam(*args: str) -> subprocess.CompletedProcess:
    return run_gradcam(*args, timeout=300)


@pytest.fixture(scope="module")
def cat_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cat")
    result = gradcam("explain", str(CAT), str(COFFEE), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), out


def test_cat_is_a_cat_and_the_map_lies_on_the_cat(cat_run) -> None:
    document, _ = cat_run
    assert document["model"] == "efficientnet-lite0" and document["method"] == "gradcam"
    assert document["layer"] == "_bn1"
    cat = document["results"][0]
    assert cat["predictions"][0]["index"] in CAT_CLASSES
    assert cat["predictions"][0]["probability"] > 0.5
    explained = cat["explanations"][0]
    assert explained["target"] == cat["predictions"][0]["index"]
    overlay = Image.open(explained["files"]["overlay"])
    assert overlay.size == (384, 255)  # laid over the whole original picture, at --overlay-size
    raw = np.load(explained["files"]["map"])
    assert raw.shape == (7, 7) and raw.max() > 0
    # The peak in the photo's pixels (the manifest's rule for every run).
    assert explained["peak"]["x"] < CAT_RIGHT_EDGE and explained["size"] == [451, 300]
    upsampled = np.asarray(Image.fromarray(raw / raw.max()).resize((451, 300), Image.Resampling.BILINEAR))
    assert upsampled[:, :CAT_RIGHT_EDGE].mean() > 2 * upsampled[:, BACKGROUND_LEFT_EDGE:].mean()


def test_coffee_is_espresso_or_cup(cat_run) -> None:
    document, _ = cat_run
    coffee = document["results"][1]
    assert coffee["predictions"][0]["class"] in ("espresso", "cup")


def test_writes_overlay_panel_and_map_for_each_image(cat_run) -> None:
    document, out = cat_run
    for result in document["results"]:
        for explained in result["explanations"]:
            files = explained["files"]
            assert set(files) == {"overlay", "panel", "map"}
            for path in files.values():
                assert Path(path).parent == out and Path(path).stat().st_size > 0
    # No temporary files left; the run's lock file stays, as in every run's folder.
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_cli_map_equals_the_library_map(cat_run) -> None:
    import gradcam as library

    document, _ = cat_run
    loaded = library.models.load()
    batch = loaded.preprocess(library.io.load_image(CAT))[None]
    expected = library.GradCAM(loaded.module)(batch).raw[0].numpy()
    written = np.load(document["results"][0]["explanations"][0]["files"]["map"])
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-7)


def test_targets_by_name_and_index_topk_and_table(tmp_path: Path) -> None:
    result = gradcam(
        "explain",
        str(CAT),
        "--target",
        "tabby",
        "--target",
        "282",
        "--topk",
        "2",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)["results"][0]["explanations"]
    indices = [e["target"] for e in explained]
    assert indices[:2] == [285, 282] and 281 in indices and len(indices) == len(set(indices)) == 3
    probabilities = [e["probability"] for e in explained[:2]]
    assert probabilities == sorted(probabilities, reverse=True)
    table = gradcam("explain", str(CAT), "--target", "tabby", "--out", str(tmp_path))
    assert table.returncode == 0
    assert "tabby (281)" in table.stdout and "cat.png_281-tabby_overlay.png" in table.stdout


def test_counterfactual_writes_another_map(tmp_path: Path, cat_run) -> None:
    result = gradcam("explain", str(CAT), "--counterfactual", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)["results"][0]["explanations"][0]
    assert explained["files"]["map"].endswith("_counterfactual_map.npy")
    plain = np.load(cat_run[0]["results"][0]["explanations"][0]["files"]["map"])
    assert not np.allclose(np.load(explained["files"]["map"]), plain)


def test_bad_files_are_reported_and_the_rest_processed(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(CAT.read_bytes()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.touch()
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    result = gradcam(
        "explain", str(missing), str(corrupt), str(CAT), str(text), str(empty), "--out", str(out)
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4
    for bad, line in zip((missing, corrupt, text, empty), lines, strict=True):
        assert line.startswith("error: ") and str(bad) in line
    # Inputs from several folders are mirrored under --out below their deepest common folder.
    assert len(list(out.rglob("cat.png_285-egyptian-cat_overlay.png"))) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet9000"], "model 'resnet9000' not found"),
        (["--target", "egyptian kat"], "did you mean 'Egyptian cat'"),
        (["--target", "1000"], "out of range; expected 0..999"),
        (["--layer", "layer4"], "layer 'layer4' not found; candidates"),
        (["--layer", "_swish"], "'_swish' runs more than once"),
        (["--model", "resnet18"], "resnet18-f37072fd.pth"),
        (["--weights", "nowhere.pt"], "weights file nowhere.pt: no such file"),
    ],
)
def test_user_mistakes_give_one_line_and_no_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    # In-process for speed; the exit must be a clean SystemExit(2), never an escaping exception.
    result = CliRunner().invoke(app, ["explain", str(CAT), "--out", str(tmp_path), *args])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_user_mistake_in_a_real_process() -> None:
    result = gradcam("explain", str(CAT), "--model", "resnet9000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: model 'resnet9000' not found") and result.stderr.count("\n") == 1


def test_layers_marks_the_automatic_choice() -> None:
    result = CliRunner().invoke(app, ["layers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    chosen = [line for line in result.stdout.splitlines() if "automatic" in line]
    assert len(chosen) == 1 and "_bn1" in chosen[0] and "1x1280x7x7" in chosen[0]
    assert any("_swish" in line and "shared" in line for line in result.stdout.splitlines())


def test_models_lists_the_bundled_default() -> None:
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "efficientnet-lite0 (default)" in result.stdout and "resnet50" in result.stdout


def test_awkward_file_names_get_distinct_outputs_and_print_literally(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    odd = tmp_path / "a" / "x$\\foo$ [bold]draft[red].png"  # rich markup and TeX in a name
    odd.write_bytes(CAT.read_bytes())
    (tmp_path / "b" / "cat.png").write_bytes(COFFEE.read_bytes())
    (tmp_path / "Cat-2.png").write_bytes(CAT.read_bytes())
    paths = [str(odd), str(CAT), str(tmp_path / "b" / "cat.png"), str(tmp_path / "Cat-2.png")]
    out = tmp_path / "out"
    result = gradcam("explain", *paths, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert str(odd) in result.stdout  # printed as given, not parsed as markup
    records = ("run.json", "manifest.jsonl", "errors.jsonl", ".lock")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in records)
    assert len(written) == 12 and len({name.lower() for name in written}) == 12
    maps = {tuple(np.load(p).ravel()[:5]) for p in out.rglob("*_map.npy")}
    assert len(maps) == 2  # three cat copies share a map; the coffee's differs and was not overwritten
    coffee_map = [p for p in out.rglob("*_map.npy") if "espresso" in p.name]
    assert len(coffee_map) == 1


def test_usage_mistakes_in_a_real_process(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args, message in (
        (["explain", str(CAT), "--topk", "-1"], "--topk"),
        (["explain", str(CAT), "--tpok", "3"], "No such option: --tpok"),
        (["explain", str(CAT), "--out", str(a_file)], "is a file; expected a folder"),
    ):
        result = gradcam(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_method_fused_layers_and_smoothing_options(tmp_path: Path) -> None:
    import gradcam as library

    args = [
        "explain",
        str(CAT),
        "--method",
        "gradcam++",
        "--layer",
        "_blocks.15",
        "--layer",
        "_bn1",
        "--eigen-smooth",
        "--out",
        str(tmp_path),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["method"] == "gradcam++" and document["layer"] == "_blocks.15+_bn1"
    explained = document["results"][0]["explanations"][0]
    assert explained["files"]["map"].endswith("_gradcampp_map.npy")
    loaded = library.models.load()
    batch = loaded.preprocess(library.io.load_image(CAT))[None]
    cam = library.GradCAMPlusPlus(loaded.module, ["_blocks.15", "_bn1"])
    expected = library.explanation.fuse(cam(batch, eigen_smooth=True)).raw[0].numpy()
    np.testing.assert_allclose(np.load(explained["files"]["map"]), expected, rtol=1e-5, atol=1e-7)


def test_methods_lists_every_method() -> None:
    import gradcam as library

    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in library.methods.names():
        assert f" {name} " in result.stdout
    bad = CliRunner().invoke(app, ["explain", str(CAT), "--method", "gradcam+"])
    assert bad.exit_code == 2 and "method 'gradcam+' not found" in bad.stderr


def test_guided_writes_guided_backprop_and_guided_gradcam(tmp_path: Path) -> None:
    import gradcam as library

    result = CliRunner().invoke(app, ["explain", str(COFFEE), "--guided", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["results"][0]["explanations"][0]["files"]
    loaded = library.models.load()
    batch = loaded.preprocess(library.io.load_image(COFFEE))[None]
    gradient = library.GuidedBackprop(loaded.module)(batch)[0].numpy()
    product = library.GuidedGradCAM(loaded.module)(batch)[0].numpy()
    for kind, values in (("guided-backprop", gradient), ("guided-gradcam", product)):
        display = np.clip(0.5 + 0.1 * (values - values.mean()) / (values.std() + 1e-5), 0, 1)
        expected = (display * 255).round().transpose(1, 2, 0)
        written = np.asarray(Image.open(files[kind]), dtype=np.float64)
        assert np.abs(written - expected).max() <= 1
