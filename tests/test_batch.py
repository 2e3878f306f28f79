"""Dataset runs of `gradcam explain`: inputs, mirrored outputs, manifest, errors, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_gradcam
from gradcam.batch.inputs import collect_images, output_keys
from gradcam.batch.manifest import RunLog
from gradcam.errors import GradCAMError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def make_dataset(root: Path) -> dict[str, str]:
    """Nested folders, mixed formats, and inputs that cannot be read; returns bad file -> reason."""
    (root / "cats" / "close").mkdir(parents=True)
    (root / "cups").mkdir()
    with Image.open(EXAMPLES / "cat.png") as cat, Image.open(EXAMPLES / "coffee.png") as cup:
        cat.convert("RGB").save(root / "cats" / "cat.jpg", quality=90)
        cat.save(root / "cats" / "close" / "cat.png")
        cat.convert("RGB").resize((200, 133)).save(root / "cats" / "close" / "small.webp")
        cup.save(root / "cups" / "cup.png")
        cup.convert("RGB").save(root / "cups" / "cup.bmp")
        cup.convert("RGB").save(root / "cups" / "cup.jpg")  # same stem as cup.png: outputs must not clash
    (root / "cups" / "empty.jpg").write_bytes(b"")
    (root / "cups" / "notes.jpg").write_text("not an image at all")
    data = (root / "cats" / "cat.jpg").read_bytes()
    (root / "cats" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "README.txt").write_text("a file that is not an image and has no image extension")
    return {"cups/empty.jpg": "empty", "cups/notes.jpg": "not an image", "cats/truncated.jpg": "truncated"}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_collect_images_folders_globs_lists_and_missing_files(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{tmp_path / 'cups' / 'cup.png'}\n\n{tmp_path / 'missing.png'}\n")
    files = collect_images(
        [
            str(tmp_path / "cats"),
            str(tmp_path / "cups" / "*.jpg"),
            f"@{listing}",
            str(tmp_path / "cats" / "cat.jpg"),
        ]
    )
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == [
        "cats/cat.jpg", "cats/close/cat.png", "cats/close/small.webp", "cats/truncated.jpg",
        "cups/cup.jpg", "cups/empty.jpg", "cups/notes.jpg", "cups/cup.png", "missing.png",
    ]  # fmt: skip
    assert output_keys(files)[:2] == ["cats/cat.jpg", "cats/close/cat.png"]
    with pytest.raises(GradCAMError, match="list file"):
        collect_images([f"@{tmp_path / 'nope.txt'}"])


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess, dict[str, str]]:
    root = tmp_path_factory.mktemp("data")
    bad = make_dataset(root)
    out = root.parent / (root.name + "-out")
    result = run_gradcam("explain", str(root), "--out", str(out), "--topk", "2", "--batch-size", "3")
    return root, out, result, bad


def test_a_folder_streams_into_a_mirrored_layout_with_one_manifest_line_per_image_and_target(
    dataset_run,
) -> None:
    root, out, result, bad = dataset_run
    assert result.returncode == 1  # some inputs could not be read; the rest was explained
    records = manifest(out)
    good = {
        "cats/cat.jpg",
        "cats/close/cat.png",
        "cats/close/small.webp",
        "cups/cup.png",
        "cups/cup.bmp",
        "cups/cup.jpg",
    }
    assert sorted((r["key"], r["target"]) for r in records) == sorted(
        {(r["key"], r["target"]) for r in records}
    )  # no duplicate
    assert {r["key"] for r in records} == good and len(records) == 2 * len(good)
    for r in records:
        assert r["of"] == 2 and r["rank"] in (0, 1) and len(r["top5"]) == 5
        assert r["class"] == r["top5"][r["rank"]]["class"]
        overlay, raw = out / r["files"]["overlay"], out / r["files"]["map"]
        assert overlay.parent == out / Path(r["key"]).parent  # the input folders, mirrored
        with Image.open(overlay) as picture:  # the picture, its longer side at most 384 (--overlay-size)
            width, height = r["size"]
            assert max(picture.size) == min(384, max(width, height))
            assert picture.width / picture.height == pytest.approx(width / height, rel=0.01)
        assert np.load(raw).shape == (7, 7)
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= r["size"][0] and 0 <= y0 < y1 <= r["size"][1]
        assert x0 <= r["peak"]["x"] <= x1 and y0 <= r["peak"]["y"] <= y1
    cats = [r for r in records if r["key"].startswith("cats/") and r["rank"] == 0]
    assert all(281 <= r["target"] <= 287 for r in cats)  # cat classes, by the pretrained model
    assert not list(out.rglob("*.tmp"))


def test_unreadable_inputs_are_listed_in_errors_jsonl_and_never_stop_the_run(dataset_run) -> None:
    root, out, result, bad = dataset_run
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == sorted(bad)
    assert "README.txt" not in (out / "errors.jsonl").read_text()  # no image extension: not an input
    assert "Traceback" not in result.stderr
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == len(bad)


def test_other_settings_are_refused_unless_overwrite(dataset_run, tmp_path: Path) -> None:
    root, out, _, _ = dataset_run
    before = (out / "manifest.jsonl").read_bytes()
    refused = run_gradcam("explain", str(root), "--out", str(out), "--method", "gradcam++")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "other settings" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "manifest.jsonl").read_bytes() == before  # the refused run touched nothing


def test_resume_after_kill_minus_nine_writes_each_line_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    with Image.open(EXAMPLES / "cat.png") as cat:
        base = cat.convert("RGB").resize((160, 106))
    for index in range(36):
        base.rotate(index * 10).save(folder / f"img{index:02d}.jpg")
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "gradcam",
        "explain",
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    manifest_path = out / "manifest.jsonl"
    while time.monotonic() < deadline:
        if manifest_path.exists() and manifest_path.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = manifest_path.read_bytes().count(b"\n")
    assert 6 <= partial < 36, "the run must be killed part-way"
    resumed = run_gradcam("explain", str(folder), "--out", str(out), "--batch-size", "2", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["already_done"] >= 6 and summary["images"] == 36 - summary["already_done"]
    records = manifest(out)
    assert sorted(r["key"] for r in records) == [f"img{i:02d}.jpg" for i in range(36)]
    for r in records:
        assert (out / r["files"]["overlay"]).is_file() and (out / r["files"]["map"]).is_file()
    assert not list(out.rglob(".*.tmp"))
    again = run_gradcam("explain", str(folder), "--out", str(out), "--json")
    assert json.loads(again.stdout)["images"] == 0 and len(manifest(out)) == 36


def test_run_log_cuts_a_half_written_line_and_finishes_partly_written_images(tmp_path: Path) -> None:
    settings = {"model": "m"}
    RunLog(tmp_path, settings).close()
    line = {"key": "a.jpg", "target": 1, "of": 2}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n" + '{"key": "b.jpg", "tar')
    with RunLog(tmp_path, settings) as log:
        assert (tmp_path / "manifest.jsonl").read_text() == json.dumps(line) + "\n"
        assert "a.jpg" not in log.done  # one of its two targets is missing
        log.append([line, {"key": "a.jpg", "target": 7, "of": 2}])
    assert [json.loads(x)["target"] for x in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [1, 7]
    with RunLog(tmp_path, settings) as log:
        assert "a.jpg" in log.done
    with pytest.raises(GradCAMError, match="other settings"):
        RunLog(tmp_path, {"model": "other"})
    with RunLog(tmp_path, {"model": "other"}, overwrite=True) as log:
        assert log.records == []


def test_a_small_run_with_other_settings_is_replaced_a_larger_one_is_refused(tmp_path: Path) -> None:
    lines = [{"key": f"{i}.jpg", "target": 0, "of": 1} for i in range(3)]
    with RunLog(tmp_path, {"model": "m"}) as log:
        log.append(lines)
    with pytest.raises(GradCAMError, match="other settings"):
        RunLog(tmp_path, {"model": "other"}, replace_at_most=2)  # 3 images are more than 2
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 3
    with RunLog(tmp_path, {"model": "other"}, replace_at_most=3) as log:
        assert log.records == [] and not (tmp_path / "manifest.jsonl").exists()
    (tmp_path / "run.json").unlink()  # a manifest without its settings: the same rule
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(GradCAMError, match="manifest without run.json"):
        RunLog(tmp_path, {"model": "m"}, replace_at_most=2)
    with RunLog(tmp_path, {"model": "m"}, replace_at_most=3) as log:
        assert log.records == []


def test_run_log_removes_what_killed_writes_left_and_keeps_everything_else(tmp_path: Path) -> None:
    nested = tmp_path / "cats" / "indoor"
    nested.mkdir(parents=True)
    stale = [tmp_path / ".a.jpg_overlay.png.0123abcd.tmp", nested / ".b.jpg_map.npy.deadbeef.tmp"]
    kept = [
        nested / "b.jpg_map.npy",
        tmp_path / "notes.tmp",
        tmp_path / ".hidden.tmp",
        nested / ".x.zzzzzzzz.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"partial")
    RunLog(tmp_path, {"model": "m"}).close()
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in kept] == [True] * len(kept)


def test_a_folder_in_use_by_another_run_is_refused_until_released(tmp_path: Path) -> None:
    with RunLog(tmp_path, {"model": "m"}):
        with pytest.raises(GradCAMError, match="in use by another gradcam run"):
            RunLog(tmp_path, {"model": "m"})
        script = "import sys, pathlib, gradcam.batch.manifest as m; m.RunLog(pathlib.Path(sys.argv[1]), {})"
        other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another gradcam run" in other.stderr
    RunLog(tmp_path, {"model": "m"}).close()  # released: the next run may start


def test_npz_shards_hold_every_map_under_its_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_gradcam("explain", str(EXAMPLES), "--out", str(out), "--maps", "npz", "--topk", "2")
    assert result.returncode == 0, result.stderr
    records = manifest(out)
    assert len(records) == 4
    for r in records:
        with np.load(out / r["files"]["map"]) as shard:
            assert shard[f"{r['key']}#{r['target']}"].shape == (7, 7)
