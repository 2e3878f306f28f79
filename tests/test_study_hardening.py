"""The study against hostile input: names that are spreadsheet formulas in the ratings CSV, and symlinks
out of the study image folder (folders, annotation files, images), through the store, the selection and
the service's admin API. The models are two copies of one tiny network (they always agree), so every
readable image that is used is kept."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import new_rater, tiny_classifier
from gradcam.models.pool import ModelPool
from gradcam.serve.app import ServeSettings, create_app
from gradcam.study import folders
from gradcam.study.pairs import ESCAPES, build_pairs, list_images
from gradcam.study.results import CSV_COLUMNS, ratings_csv
from gradcam.study.store import NotFound, PairRow, Skipped, StudyStore

STRONG, WEAK = "tiny-strong", "tiny-weak"
TOKEN = "hardening-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def rate_all(store: StudyStore, study_id: str, rater: str, answer: int) -> None:
    """The rater answers ``answer`` to every pair, in the order the store serves them."""
    while (pair := store.next_pair(study_id, rater)) is not None:
        store.record_rating(study_id, rater, pair.id, answer)


# ------------------------------------------------------------------------------------ spreadsheets

#: Image and class names a spreadsheet would run as formulas, and a number that must stay one.
HOSTILE_IMAGES = (
    '=HYPERLINK("http://x","y")',
    "+1+2",
    "@SUM(A1)",
    "-2+3",
    "\t=1+1",
    "\r=1+1",
    "a;=1+1",
    "-1.5",
    "cat.png",
)
HOSTILE_CLASS = "=cmd|' /C calc'!A0"


def test_csv_cells_that_are_formulas_are_escaped_and_numbers_stay_numbers(tmp_path: Path) -> None:
    pairs = [PairRow(name, 2, HOSTILE_CLASS, "gradcam", "A", b"a", b"b") for name in HOSTILE_IMAGES]
    with StudyStore(f"sqlite:///{tmp_path / 'study.db'}") as store:
        study = store.create_study(
            name="hostile", stronger_model="@strong", weaker_model="-weak", methods=["gradcam"],
            folder="f", seed=0, pairs=pairs,
        )  # fmt: skip
        rater = new_rater(store, study.id)
        rate_all(store, study.id, rater, -2)
        text = ratings_csv(study, store.ratings(study.id))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(HOSTILE_IMAGES)
    images = {r["image"] for r in rows}
    assert images == {
        '\'=HYPERLINK("http://x","y")', "'+1+2", "'@SUM(A1)", "'-2+3", "'\t=1+1", "'\r=1+1", "a;=1+1",
        "-1.5", "cat.png",
    }  # fmt: skip
    for row in rows:
        assert (row["class"], row["stronger_model"], row["weaker_model"]) == (
            "'" + HOSTILE_CLASS,
            "'@strong",
            "'-weak",
        )
        assert (row["answer"], row["score"], row["class_index"]) == ("-2", "-2", "2")  # numbers stay numbers
        assert (row["study"], row["rater"]) == (study.id, rater)  # the server's ids, as the API gives them
        for column, cell in row.items():
            if column not in ("study", "pair", "rater", "answer", "score"):
                assert not cell.startswith(FORMULA_STARTS) or cell == "-1.5", (column, cell)
    # Text cells are quoted: a spreadsheet splitting at ';' or a tab cannot start a cell mid-name.
    assert '"a;=1+1"' in text and '"\'\t=1+1"' in text and ",-2,-2," in text


# ----------------------------------------------------------------------------------------- symlinks


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (the study image root) and outside/ (elsewhere on the server), linked every way:

    root/set/a.png, set/sub/b.png: images; set/in.png -> set/a.png, set/sub-link.png -> sub/b.png: links
    that stay inside; set/out.png -> outside/secret.png, set/outdir -> outside/: links out of it;
    set/labels.json, set/leak.json -> outside/secret.json; root/inside -> root/set (a folder link that
    stays inside), root/escape -> outside/ (one that leaves), root/top.png -> outside/secret.png."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    picture(root / "set" / "a.png", 0)
    picture(root / "set" / "sub" / "b.png", 1)
    picture(outside / "secret.png", 2)
    (outside / "secret.json").write_text('{"secret.png": 0}')
    (root / "set" / "labels.json").write_text('{"a.png": 0}')
    links = {
        "set/in.png": "a.png",
        "set/sub-link.png": "sub/b.png",
        "set/out.png": "../../outside/secret.png",
        "set/outdir": "../../outside",
        "set/leak.json": "../../outside/secret.json",
        "inside": "set",
        "escape": "../outside",
        "top.png": "../outside/secret.png",
    }
    for link, target in links.items():
        os.symlink(target, root / link)
    return root


def test_folders_that_resolve_outside_the_root_are_not_offered(tree: Path) -> None:
    assert list(folders.folders(tree)) == ["inside", "set"]  # no "escape"; no "." for top.png either
    assert folders.folder(tree, "inside").resolve() == (tree / "set").resolve()
    with pytest.raises(NotFound, match="folder 'escape' is not offered: it is a symlink to outside"):
        folders.folder(tree, "escape")
    with pytest.raises(NotFound, match="folder 'elsewhere' not found; choose from inside, set"):
        folders.folder(tree, "elsewhere")


def test_annotation_files_that_resolve_outside_their_folder_are_not_offered(tree: Path) -> None:
    assert list(folders.annotation_files(tree / "set")) == ["labels.json"]
    with pytest.raises(NotFound, match="annotations 'leak.json' is not offered: it is a symlink to outside"):
        folders.annotation_file(tree / "set", "leak.json", "set")


def test_images_that_resolve_outside_their_folder_are_skipped_and_reported(tree: Path) -> None:
    images = list_images(tree / "set")
    # outdir/ is listed (to be reported), not walked: outside/secret.png never shows under it.
    assert [name for name, _ in images] == [
        "a.png",
        "in.png",
        "out.png",
        "outdir/",
        "sub-link.png",
        "sub/b.png",
    ]
    pool = ModelPool([STRONG, WEAK], loader=tiny_classifier)
    chosen = build_pairs(pool, STRONG, WEAK, ["gradcam"], images, seed=0)
    assert sorted(name for name, _ in chosen.kept) == ["a.png", "in.png", "sub-link.png", "sub/b.png"]
    assert chosen.skipped == [Skipped("out.png", ESCAPES), Skipped("outdir/", ESCAPES)]
    assert sorted(p.image for p in chosen.pairs) == ["a.png", "in.png", "sub-link.png", "sub/b.png"]
    # The folder's own images through a folder link that stays inside the root: the same ones kept.
    linked = build_pairs(pool, STRONG, WEAK, ["gradcam"], list_images(tree / "inside"), seed=0)
    assert [name for name, _ in linked.kept] == [name for name, _ in chosen.kept]
    assert linked.skipped == chosen.skipped


@pytest.fixture
def admin(tree: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServeSettings(
        models=[STRONG, WEAK],
        loader=tiny_classifier,
        db_url=f"sqlite:///{tmp_path / 'study.db'}",
        admin_token=TOKEN,
        study_images=tree,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_admin_api_offers_nothing_outside_and_reports_skipped_links(admin: TestClient) -> None:
    listed = admin.get("/v1/admin/folders", headers=ADMIN).json()["folders"]
    assert [(f["name"], f["annotations"]) for f in listed] == [
        ("inside", ["labels.json"]),
        ("set", ["labels.json"]),
    ]
    body = {
        "name": "links",
        "stronger_model": STRONG,
        "weaker_model": WEAK,
        "methods": ["gradcam"],
        "seed": 1,
    }
    refused = admin.post("/v1/studies", json={**body, "folder": "escape"}, headers=ADMIN)
    assert refused.status_code == 404 and "symlink to outside" in refused.text
    leak = admin.post(
        "/v1/studies", json={**body, "folder": "set", "annotations": "leak.json"}, headers=ADMIN
    )
    assert leak.status_code == 404 and "symlink to outside" in leak.text
    created = admin.post("/v1/studies", json={**body, "folder": "set"}, headers=ADMIN)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 60
    while (study := admin.get(created.headers["location"], headers=ADMIN).json())["state"] not in (
        "ready",
        "failed",
    ):
        assert time.monotonic() < deadline, study
        time.sleep(0.05)
    assert (study["state"], study["kept"], study["pairs"]) == ("ready", 4, 4), study
    assert study["skipped"] == [{"image": name, "reason": ESCAPES} for name in ("out.png", "outdir/")]
