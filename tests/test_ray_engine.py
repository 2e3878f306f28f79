"""The Ray engine writes what the local engine writes: same manifest, maps, overlays, errors, resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require

ray = require("ray", "the Ray engine tests need Ray: pip install -e '.[ray]'")

from gradcam import models  # noqa: E402
from gradcam.batch.core import Job  # noqa: E402
from gradcam.batch.inputs import collect_images, output_keys  # noqa: E402
from gradcam.batch.local import run_local  # noqa: E402
from gradcam.batch.manifest import RunLog  # noqa: E402
from gradcam.batch.ray_engine import MISSING_RAY, run_ray  # noqa: E402
from gradcam.errors import GradCAMError  # noqa: E402
from gradcam.pipeline import Explainer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Ray Data's own deprecated settings, warned about when it copies its context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
SETTINGS = {"model": "efficientnet-lite0", "method": "gradcam", "topk": 2, "engine-test": True}


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray instance for the module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The two examples, a nested copy of one, and a corrupt file."""
    root = tmp_path_factory.mktemp("images")
    shutil.copy(EXAMPLES / "cat.png", root / "cat.png")
    shutil.copy(EXAMPLES / "coffee.png", root / "coffee.png")
    (root / "sub").mkdir()
    shutil.copy(EXAMPLES / "cat.png", root / "sub" / "cat.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def job_factory():
    """Jobs over one loaded model (the bundled pretrained EfficientNet-Lite0), each its own --out."""
    loaded = models.load("efficientnet-lite0")
    explainer = Explainer(loaded.module, "gradcam")

    def make(out: Path, **options) -> Job:
        return Job(loaded, explainer, out, topk=2, batch_size=2, workers=0, **options)

    return make


def _run(engine, job: Job, files: list[Path], **options):
    seen: list[int] = []
    errors: list[str] = []
    with RunLog(job.out, SETTINGS) as log:
        summary = engine(
            job, files, output_keys(files), log, progress=seen.append, on_error=errors.append, **options
        )
    return summary, seen, errors


@pytest.fixture(scope="module")
def runs(ray_instance, folder, job_factory, tmp_path_factory):
    """The same folder through both engines, into two output folders."""
    files = collect_images([str(folder)])
    local_out, ray_out = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    local = _run(run_local, job_factory(local_out), files)
    # Half a CPU per actor keeps decoding in separate tasks (equal resources would fuse the two stages
    # into the actor), as on a GPU cluster; the rerun below runs the fused pipeline.
    remote = _run(run_ray, job_factory(ray_out), files, actor_cpus=0.5)
    return files, (local_out, local), (ray_out, remote)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _manifest(out: Path) -> list[dict]:
    return sorted(_lines(out / "manifest.jsonl"), key=lambda r: (r["key"], r["target"]))


def test_manifests_agree_record_by_record(runs) -> None:
    _, (local_out, _), (ray_out, _) = runs
    local, remote = _manifest(local_out), _manifest(ray_out)
    assert [(r["key"], r["target"]) for r in remote] == [(r["key"], r["target"]) for r in local]
    assert {r["key"] for r in remote} == {"cat.png", "coffee.png", "sub/cat.png"}
    assert len(remote) == 6  # top-2 of three images
    for mine, theirs in zip(remote, local, strict=True):
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4, abs=1e-4)
        for name, other in zip(mine["top5"], theirs["top5"], strict=True):
            assert name["index"] == other["index"]
            assert name["probability"] == pytest.approx(other["probability"], abs=1e-5)
        exact = ("key", "image", "target", "class", "rank", "of", "peak", "box", "size", "files")
        assert {k: mine[k] for k in exact} == {k: theirs[k] for k in exact}
        assert set(mine) == set(theirs)


def test_maps_equal_and_overlays_written(runs) -> None:
    _, (local_out, _), (ray_out, _) = runs
    for record in _manifest(ray_out):
        files = record["files"]
        assert (ray_out / files["overlay"]).is_file()
        mine, theirs = np.load(ray_out / files["map"]), np.load(local_out / files["map"])
        assert mine.dtype == np.float32 and mine.shape == theirs.shape
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-6)
    assert (ray_out / "sub").is_dir()  # the input folders are mirrored


def test_corrupt_file_listed_in_both_and_summary(runs) -> None:
    files, (local_out, (local, local_seen, _)), (ray_out, (summary, seen, errors)) = runs
    assert _lines(ray_out / "errors.jsonl") == _lines(local_out / "errors.jsonl")
    (error,) = _lines(ray_out / "errors.jsonl")
    assert error["key"] == "broken.png" and error["image"] == str(files[0])
    assert len(errors) == 1 and errors[0] == error["error"]
    assert (summary.images, summary.targets, summary.errors) == (3, 6, 1)
    assert (summary.images, summary.targets, summary.errors) == (local.images, local.targets, local.errors)
    assert summary.failed == local.failed
    assert summary.layer == local.layer and summary.layer is not None
    assert sum(seen) == sum(local_seen) == 4


def test_rerun_on_a_finished_folder_writes_nothing(runs, job_factory) -> None:
    files, _, (ray_out, _) = runs
    before = (ray_out / "manifest.jsonl").read_bytes()
    summary, seen, errors = _run(run_ray, job_factory(ray_out), files)
    assert (ray_out / "manifest.jsonl").read_bytes() == before
    assert (summary.images, summary.targets, summary.already_done) == (0, 0, 3)
    # A failed input is tried again on a rerun (and listed once again).
    assert summary.errors == 1 and sum(seen) == 1 and len(_lines(ray_out / "errors.jsonl")) == 1
    assert ray.is_initialized()  # the caller's instance is left running


def test_unwritable_output_stops_the_run_with_one_line(ray_instance, folder, job_factory, tmp_path) -> None:
    (tmp_path / "sub").write_text("a file where the folder sub/ must go")
    files = collect_images([str(folder)])
    with pytest.raises(GradCAMError, match="cannot write the outputs in"):
        _run(run_ray, job_factory(tmp_path), files)
    written = tmp_path / "manifest.jsonl"  # absent when the failing batch came first
    assert all(not r["key"].startswith("sub/") for r in (_lines(written) if written.exists() else []))


def test_cuda_without_a_gpu_in_the_cluster_is_refused(ray_instance, job_factory, tmp_path: Path) -> None:
    with pytest.raises(GradCAMError, match="no GPU"):
        _run(run_ray, job_factory(tmp_path), [EXAMPLES / "cat.png"], device="cuda")
    with pytest.raises(GradCAMError, match="cpu or cuda"):
        _run(run_ray, job_factory(tmp_path), [EXAMPLES / "cat.png"], device="tpu")


def test_npz_maps_are_refused(job_factory, folder, tmp_path: Path) -> None:
    files = collect_images([str(folder)])
    with pytest.raises(GradCAMError, match="npz"):
        _run(run_ray, job_factory(tmp_path, maps="npz"), files)


def test_missing_ray_gives_one_clear_line(job_factory, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(GradCAMError) as caught:
        _run(run_ray, job_factory(tmp_path), [EXAMPLES / "cat.png"])
    assert str(caught.value) == MISSING_RAY == "the ray engine needs Ray: pip install 'gradcam[ray]'"


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"min_score": 0.0, "topk": 2}),
        ("lraspp_mobilenet_v3_large", {}),
    ],
)
def test_task_models_write_what_the_local_engine_writes(ray_instance, tmp_path: Path, name, options) -> None:
    """A detector's list of images of their own sizes and a segmenter's unequal sizes travel through Ray
    Data as objects; both engines write the same task fields and maps."""
    from gradcam.models import torchvision_tasks

    loaded = models.load(name, pretrained=False)
    torchvision_tasks.set_score_threshold(loaded.module, 0.0)
    explainer = Explainer(loaded.module, "gradcam")
    files = [EXAMPLES / "cat.png", EXAMPLES / "coffee.png"]
    outs = {}
    for engine in (run_local, run_ray):
        out = tmp_path / engine.__name__
        out.mkdir()
        job = Job(loaded, explainer, out, batch_size=2, workers=0, **options)
        summary, _, errors = _run(engine, job, files)
        assert errors == [] and summary.images == 2
        outs[engine.__name__] = out
    local, remote = (_manifest(outs[k]) for k in ("run_local", "run_ray"))
    assert len(local) == (4 if "detection" in local[0]["task"] else 2) and len(remote) == len(local)
    for mine, theirs in zip(remote, local, strict=True):
        exact = ("key", "target", "class", "task", "detection", "mask", "size", "files")
        assert {k: mine.get(k) for k in exact} == {k: theirs.get(k) for k in exact}
        ours = np.load(outs["run_ray"] / mine["files"]["map"])
        np.testing.assert_allclose(
            ours, np.load(outs["run_local"] / theirs["files"]["map"]), rtol=1e-4, atol=1e-7
        )
