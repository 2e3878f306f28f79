"""Selecting a study's images and pre-rendering its pairs, on the real EfficientNet-Lite1 (stronger) and
Lite0 (weaker): only images both classify alike (and as annotated) are kept; each robot's picture is the
right model's view for the shared class."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam.errors import GradCAMError
from gradcam.io import load_image
from gradcam.models.pool import ModelPool
from gradcam.serve.render import render
from gradcam.study.pairs import (
    annotated_classes,
    assign_sides,
    build_pairs,
    list_images,
    read_annotations,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STRONGER, WEAKER = "efficientnet-lite1", "efficientnet-lite0"
EGYPTIAN_CAT, ESPRESSO, TABBY = 285, 967, 281


def study_folder(root: Path) -> Path:
    """cat.png and coffee.png (both models agree), red.png (they disagree), broken.png (not an image),
    and a hidden file that is never listed."""
    folder = root / "set1"
    (folder / "more").mkdir(parents=True)
    Image.open(EXAMPLES / "cat.png").save(folder / "cat.png")
    Image.open(EXAMPLES / "coffee.png").save(folder / "more" / "coffee.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    return folder


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool([STRONGER, WEAKER])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return study_folder(tmp_path_factory.mktemp("images"))


def top1(pool: ModelPool, name: str, paths: list[Path]) -> list[int]:
    loaded = pool.get(name)
    with torch.no_grad():
        return (
            loaded.module(torch.stack([loaded.preprocess(load_image(p)) for p in paths])).argmax(1).tolist()
        )


def test_the_fixture_images_are_what_the_tests_assume(pool: ModelPool, folder: Path) -> None:
    paths = [folder / "cat.png", folder / "more" / "coffee.png", folder / "red.png"]
    strong, weak = top1(pool, STRONGER, paths), top1(pool, WEAKER, paths)
    assert strong[:2] == weak[:2] == [EGYPTIAN_CAT, ESPRESSO]
    assert strong[2] != weak[2]


def test_images_are_listed_by_their_name_in_the_folder(folder: Path) -> None:
    assert [name for name, _ in list_images(folder)] == [
        "broken.png",
        "cat.png",
        "more/coffee.png",
        "red.png",
    ]


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def selection(pool: ModelPool, folder: Path):
    return build_pairs(pool, STRONGER, WEAKER, ["gradcam", "guided-backprop"], list_images(folder), seed=4)


def test_only_images_both_models_agree_on_are_kept(selection) -> None:
    assert selection.kept == [("cat.png", EGYPTIAN_CAT), ("more/coffee.png", ESPRESSO)]
    reasons = {s.image: s.reason for s in selection.skipped}
    assert set(reasons) == {"broken.png", "red.png"}
    assert reasons["broken.png"].startswith("unreadable")
    assert reasons["red.png"].startswith("the models disagree")
    assert [(p.image, p.method, p.class_name) for p in selection.pairs] == [
        ("cat.png", "gradcam", "Egyptian cat"),
        ("cat.png", "guided-backprop", "Egyptian cat"),
        ("more/coffee.png", "gradcam", "espresso"),
        ("more/coffee.png", "guided-backprop", "espresso"),
    ]
    for method in ("gradcam", "guided-backprop"):  # balanced within each method: one pair each side
        assert sorted(p.stronger_side for p in selection.pairs if p.method == method) == ["A", "B"]


def test_each_robot_shows_its_own_models_view_of_the_shared_class(
    pool: ModelPool, folder: Path, selection
) -> None:
    cat = load_image(folder / "cat.png")
    for method in ("gradcam", "guided-backprop"):
        pair = next(p for p in selection.pairs if p.image == "cat.png" and p.method == method)
        stronger, weaker = (
            (pair.robot_a, pair.robot_b) if pair.stronger_side == "A" else (pair.robot_b, pair.robot_a)
        )
        for model, shown, other in ((STRONGER, stronger, weaker), (WEAKER, weaker, stronger)):
            [expected] = render(pool.get(model), method, [cat], [[EGYPTIAN_CAT]])
            target = expected.targets[0]
            # The service sends the heatmap; a CAM pair shows it over the picture at opacity 0.5.
            view = (
                target.guided
                if target.heatmap is None
                else Image.blend(expected.picture, target.heatmap, 0.5)
            )
            picture = np.asarray(view.convert("RGB"), dtype=np.int16)
            # Rendered alone here, in a batch of two there: float noise may move a pixel by a level or two.
            assert decoded(shown).shape == picture.shape
            assert np.abs(decoded(shown) - picture).max() <= 3, (method, model)
            other_picture = decoded(other)
            assert other_picture.shape != picture.shape or np.abs(other_picture - picture).mean() > 5


def test_sides_follow_the_seed(pool: ModelPool, folder: Path, selection) -> None:
    # The same seed gives the same study; the sides are assign_sides' balanced draw (tested for its
    # randomness in test_study_store.py), method after method, from one generator seeded with the seed.
    rng = random.Random(4)
    expected = {method: assign_sides(2, rng) for method in ("gradcam", "guided-backprop")}
    assert [p.stronger_side for p in selection.pairs if p.method == "gradcam"] == expected["gradcam"]
    assert [p.stronger_side for p in selection.pairs if p.method == "guided-backprop"] == expected[
        "guided-backprop"
    ]
    again = build_pairs(pool, STRONGER, WEAKER, ["gradcam"], list_images(folder), seed=4)
    assert [(p.stronger_side, p.robot_a, p.robot_b) for p in again.pairs] == [
        (p.stronger_side, p.robot_a, p.robot_b) for p in selection.pairs if p.method == "gradcam"
    ]


def test_annotations_keep_only_correctly_classified_images(
    pool: ModelPool, folder: Path, tmp_path: Path
) -> None:
    labels = pool.get(STRONGER).labels
    simple = tmp_path / "labels.json"
    simple.write_text(json.dumps({"cat.png": "Egyptian cat", "coffee.png": TABBY}))  # coffee mislabelled
    annotations = read_annotations(simple, labels)
    assert annotations == {"cat.png": frozenset({EGYPTIAN_CAT}), "coffee.png": frozenset({TABBY})}
    assert annotated_classes(annotations, "more/coffee.png") == frozenset({TABBY})  # found by file name
    chosen = build_pairs(
        pool, STRONGER, WEAKER, ["gradcam"], list_images(folder), seed=1, annotations=annotations
    )
    assert chosen.kept == [("cat.png", EGYPTIAN_CAT)]
    reasons = {s.image: s.reason for s in chosen.skipped}
    assert reasons["more/coffee.png"] == "both models say 'espresso', annotated 'tabby'"
    assert reasons["red.png"] == "not in the annotations"
    # The evaluation's format (objects with boxes) works too; the boxes are ignored.
    boxed = tmp_path / "boxes.json"
    boxed.write_text(json.dumps({"coffee.png": [{"label": ESPRESSO, "box": [0, 0, 10, 10]}]}))
    assert read_annotations(boxed, labels) == {"coffee.png": frozenset({ESPRESSO})}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cat.png": "no such class"}))
    with pytest.raises(GradCAMError, match="cat.png"):
        read_annotations(bad, labels)


def test_max_images_draws_a_reproducible_subset(pool: ModelPool, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("cat.png", "coffee.png"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    images = list_images(folder)
    # Seeds 0 and 1 shuffle the two images into different orders (random.Random(seed).shuffle).
    first, second, again = (
        build_pairs(pool, STRONGER, WEAKER, ["gradcam"], images, seed=seed, max_images=1)
        for seed in (0, 1, 0)
    )
    assert [len(p.pairs) for p in (first, second, again)] == [1, 1, 1]
    assert {first.kept[0][0], second.kept[0][0]} == {"cat.png", "coffee.png"}
    assert again.kept == first.kept and again.pairs == first.pairs


@pytest.mark.parametrize(
    ("stronger", "weaker", "methods", "message"),
    [
        (STRONGER, STRONGER, ["gradcam"], "both 'efficientnet-lite1'"),
        (STRONGER, "resnet18", ["gradcam"], "not served"),
        (STRONGER, WEAKER, ["nonesuch"], "method 'nonesuch' not found"),
        (STRONGER, WEAKER, [], "methods is empty"),
    ],
)
def test_bad_settings_are_refused(pool: ModelPool, folder: Path, stronger, weaker, methods, message) -> None:
    with pytest.raises(GradCAMError, match=message):
        build_pairs(pool, stronger, weaker, methods, list_images(folder), seed=0)
