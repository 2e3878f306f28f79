"""``gradcam study create / results / list`` on the real EfficientNet-Lite1 and Lite0: a study made from
the command line, its results read back as a table, JSON and CSV; user mistakes are one line, exit 2."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gradcam.cli.study import study_app
from gradcam.study.store import DEFAULT_DB_URL, StudyStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STRONGER, WEAKER = "efficientnet-lite1", "efficientnet-lite0"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a temporary folder: a command that fell back to the default database would write there."""
    monkeypatch.chdir(tmp_path)


def study(*args: str):
    return runner.invoke(study_app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name in ("cat.png", "coffee.png"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")  # the models disagree on it
    return folder


@pytest.fixture(scope="module")
def created(images: Path, tmp_path_factory) -> tuple[str, str]:
    """A study made with `create` (its id and database URL)."""
    db = tmp_path_factory.mktemp("db") / "study.db"
    result = study(
        "create", "--stronger", STRONGER, "--weaker", WEAKER, "--images", str(images), "--methods", "gradcam",
        "--db", str(db), "--name", "cli study", "--seed", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    match = re.search(
        r"study (\S+): 2 pairs \(2 images x 1 methods\), 1 images skipped, seed 5", result.stdout
    )
    assert match, result.stdout
    assert f"raters: by invitation: gradcam study invite {match[1]} --count N" in result.stdout
    assert "skipped red.png: the models disagree" in result.stderr
    return match[1], f"sqlite:///{db}"


def test_invite_prints_single_person_links_whose_tokens_the_store_knows(created: tuple[str, str]) -> None:
    study_id, url = created
    result = study("invite", study_id, "--count", "3", "--db", url, "--base-url", "https://study.example.org/")
    assert result.exit_code == 0, result.output
    links = result.stdout.split()
    assert len(links) == 3 and "3 rater links" in result.stderr
    prefix = f"https://study.example.org/studies/{study_id}#"
    assert all(link.startswith(prefix) for link in links)
    with StudyStore(url) as store:
        raters = [store.rater_of(study_id, link.removeprefix(prefix)) for link in links]
    assert len(set(raters)) == 3
    for args, words in (
        (("invite", "nope", "--db", url), "study 'nope' not found"),
        (("invite", study_id, "--count", "0", "--db", url), "--count"),
    ):
        refused = study(*args)
        assert refused.exit_code == 2 and words in refused.output and "Traceback" not in refused.output


def test_the_default_database_is_a_file_in_the_working_directory() -> None:
    assert DEFAULT_DB_URL == "sqlite:///gradcam-study.db"


def test_results_as_json_table_and_csv(created: tuple[str, str], tmp_path: Path) -> None:
    study_id, url = created
    with StudyStore(url) as store:
        found = store.study(study_id)
        assert (found.name, found.pairs, found.stronger_model, found.seed) == ("cli study", 2, STRONGER, 5)
        raters = [store.invite(study_id)[0].rater for _ in range(2)]
        pairs = []
        for rater, answer in zip(raters, (2, -1), strict=True):
            while (pair := store.next_pair(study_id, rater)) is not None:
                store.record_rating(study_id, rater, pair.id, answer)
                pairs.append((pair.stronger_side, answer))
    scores = [answer if side == "A" else -answer for side, answer in pairs]
    out = tmp_path / "ratings.csv"
    result = study("results", study_id, "--db", url, "--json", "--csv", str(out))
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    [method] = body["methods"]
    assert (method["method"], method["ratings"], method["raters"], method["pairs"]) == ("gradcam", 4, 2, 2)
    assert method["mean"] == pytest.approx(sum(scores) / 4)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(int(r["score"]) for r in rows) == sorted(scores) and {r["study"] for r in rows} == {
        study_id
    }
    assert f"wrote 4 ratings to {out}" in result.stderr
    table = study("results", study_id, "--db", url)
    assert table.exit_code == 0 and "gradcam" in table.stdout
    assert f"{sum(scores) / 4:+.2f}" in table.stdout and "4 ratings by 2 raters" in table.stdout
    listed = study("list", "--db", url)
    assert listed.exit_code == 0 and study_id in listed.stdout


def test_a_plain_path_is_a_sqlite_database(created: tuple[str, str]) -> None:
    study_id, url = created
    result = study("results", study_id, "--db", url.removeprefix("sqlite:///"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["study"] == study_id


CREATE = ("create", "--stronger", STRONGER, "--weaker", WEAKER, "--images", "{images}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("results", "nope"), "study 'nope' not found"),
        (("results", "x", "--db", "{tmp}/missing.db"), "no study database at"),
        (("list", "--db", "{tmp}/missing.db"), "no study database at"),
        (("results", "x", "--db", "nosuch://x"), "Can't load plugin"),
        (("create", "--stronger", STRONGER, "--weaker", STRONGER, "--images", "{images}"), "two models"),
        (
            ("create", "--stronger", STRONGER, "--weaker", "nosuch", "--images", "{images}"),
            "'nosuch' not found",
        ),
        ((*CREATE, "--methods", "gradcam,x"), "method 'x' not found"),
        ((*CREATE, "--methods", ","), "--methods is empty"),
        ((*CREATE[:-1], "{tmp}/nothing"), "not a folder"),
        ((*CREATE, "--seed", "-1"), "--seed"),
        ((*CREATE, "--device", "tpu"), "--device"),
        ((*CREATE, "--db", "{tmp}/a/b.db"), "does not exist"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(created, images: Path, tmp_path: Path, args, message: str) -> None:
    _, url = created
    filled = [a.format(tmp=tmp_path, images=images) for a in args]
    fresh = tmp_path / "fresh.db"
    if "--db" not in filled:
        filled += ["--db", url if filled[0] == "results" else str(fresh)]
    result = study(*filled)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not fresh.exists()  # a refused study leaves no database behind


def test_a_folder_without_agreeing_images_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "disagree"
    folder.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    db = tmp_path / "study.db"
    result = study(
        "create", "--stronger", STRONGER, "--weaker", WEAKER, "--images", str(folder), "--methods", "gradcam",
        "--db", str(db),
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: --images" in result.stderr and "no image is classified alike" in result.stderr
    with StudyStore(f"sqlite:///{db}") as store:
        assert store.list_studies() == []
