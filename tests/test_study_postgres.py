"""The study's database on a real PostgreSQL server (tests/conftest.py's ``postgres_server``: a throwaway
cluster on a Unix socket, a new database per test), not only SQLite: the store's records and JSON
columns, its CHECK and UNIQUE rules (one rating per pair and rater under concurrent submissions),
timestamps in UTC although the server runs in another zone, results and CSV equal to SQLite's for the
same operations, a server restart under a pooled engine, and the service's API for one rater's session.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from conftest import POSTGRES_TIMEZONE, PostgresServer, new_rater, tiny_classifier
from gradcam.serve.app import ServeSettings, create_app
from gradcam.study.results import ratings_csv, results_dict, summarise
from gradcam.study.rows import RatingRow
from gradcam.study.store import DuplicateRating, PairRow, Skipped, StudyStore

STRONG, WEAK = "tiny-strong", "tiny-weak"
TOKEN = "postgres-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
#: Pairs of two methods, with names a spreadsheet would run (escaped alike on both databases).
PAIRS = [
    PairRow(image, index, name, method, side, f"{image}/{method}/a".encode(), f"{image}/{method}/b".encode())
    for image, index, name in (("cat.png", 0, "cat"), ("=cmd()", 1, "@dog"), ("über/-1.5.png", 2, "fish"))
    for method, side in (("gradcam", "A"), ("guided-backprop", "B"))
]
FIELDS = dict(
    name="on postgres",
    stronger_model=STRONG,
    weaker_model=WEAK,
    methods=["gradcam", "guided-backprop"],
    folder="set",
    seed=3,
    total=4,
    kept=3,
    skipped=[Skipped("broken.png", "unreadable: not an image (ü)")],
)


def answer_of(pair: PairRow, rater: int) -> int:
    """A fixed answer per (image, method, rater number): the same ratings whatever the serving order."""
    return (len(pair.image) + len(pair.method) + rater) % 5 - 2


@pytest.fixture
def store(postgres_url: str) -> Iterator[StudyStore]:
    with StudyStore(postgres_url) as opened:
        yield opened


def rate_all(store: StudyStore, study_id: str, rater: str, number: int) -> int:
    """The rater answers every pair served, in the store's order; how many."""
    count = 0
    while (pair := store.next_pair(study_id, rater)) is not None:
        store.record_rating(study_id, rater, pair.id, answer_of(pair, number))
        count += 1
    return count


def is_utc(stamp: datetime) -> bool:
    return stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)


def test_the_server_runs_in_another_zone_and_only_on_a_socket(store: StudyStore) -> None:
    import psycopg

    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW timezone").scalar() == "UTC"  # make_engine's sessions
        assert connection.exec_driver_sql("SHOW listen_addresses").scalar() == ""
        assert connection.exec_driver_sql("SELECT inet_server_addr()").scalar() is None  # a Unix socket
    url = make_url(store.url)
    with psycopg.connect(host=url.query["host"], user=url.username, dbname=url.database) as plain:
        assert plain.execute("SHOW timezone").fetchone() == (POSTGRES_TIMEZONE,)  # the server's own


def test_a_study_round_trips_with_its_json_columns_pictures_and_utc_times(store: StudyStore) -> None:
    before = datetime.now(UTC)
    study = store.create_study(pairs=PAIRS, **FIELDS)
    found = store.get_study(study.id)
    assert (found.name, found.methods, found.state) == (
        "on postgres",
        ["gradcam", "guided-backprop"],
        "ready",
    )
    assert found.skipped == [Skipped("broken.png", "unreadable: not an image (ü)")]
    assert (found.pairs, found.raters, found.ratings, found.kept, found.total) == (6, 0, 0, 3, 4)
    assert is_utc(found.created) and before - timedelta(seconds=5) <= found.created <= datetime.now(UTC)
    assert [s.id for s in store.list_studies()] == [study.id]
    assert store.pair_methods(study.id) == {"gradcam": 3, "guided-backprop": 3}
    rater = new_rater(store, study.id)
    pictures = {}
    while (pair := store.next_pair(study.id, rater)) is not None:
        pictures[(pair.image, pair.method)] = (pair.robot_a, pair.robot_b)
        store.record_rating(study.id, rater, pair.id, 1)
    assert pictures == {(p.image, p.method): (p.robot_a, p.robot_b) for p in PAIRS}  # BYTEA, byte for byte
    ratings = store.ratings(study.id)
    assert len(ratings) == 6 and all(is_utc(r.created) for r in ratings)
    assert {r.score for r in ratings} == {1, -1}  # stronger side A: the answer; B: its negation
    rows = list(csv.DictReader(io.StringIO(ratings_csv(found, ratings))))
    assert all(r["time"].endswith("+00:00") for r in rows)
    assert {r["image"] for r in rows} == {"cat.png", "'=cmd()", "über/-1.5.png"}


def test_the_database_enforces_the_checks_and_one_rating_per_pair_and_rater(store: StudyStore) -> None:
    with pytest.raises(IntegrityError, match="study_state"):
        store.create_study(**{**FIELDS, "state": "finished"})
    study = store.create_study(pairs=PAIRS[:1], **FIELDS)
    rater = new_rater(store, study.id)
    pair = store.next_pair(study.id, rater)
    row = dict(study_id=study.id, pair_id=pair.id, rater_id=rater, created=datetime.now(UTC))
    with pytest.raises(IntegrityError, match="rating_answer"), store.engine.begin() as connection:
        connection.execute(insert(RatingRow.__table__).values(**row, answer=3))
    with store.engine.begin() as connection:
        connection.execute(insert(RatingRow.__table__).values(**row, answer=2))
    with pytest.raises(IntegrityError, match="one_rating_per_pair_and_rater"), store.engine.begin() as c:
        c.execute(insert(RatingRow.__table__).values(**row, answer=-2))
    assert [r.answer for r in store.ratings(study.id)] == [2]


THREADS = 8


def submit_together(store: StudyStore, study_id: str, rater: str, pair: str | int) -> list[str]:
    """THREADS threads submit the same rating at once; each one's outcome, sorted."""
    start = threading.Barrier(THREADS)

    def submit(_: int) -> str:
        start.wait()
        try:
            store.record_rating(study_id, rater, pair, 2)
        except DuplicateRating:
            return "duplicate"
        return "stored"

    with ThreadPoolExecutor(THREADS) as threads:
        return sorted(threads.map(submit, range(THREADS)))


def test_concurrent_submissions_of_one_rating_store_exactly_one(store: StudyStore) -> None:
    study = store.create_study(pairs=PAIRS, **FIELDS)
    rater = new_rater(store, study.id)
    for _ in PAIRS:
        pair = store.next_pair(study.id, rater)
        assert submit_together(store, study.id, rater, pair.id) == ["duplicate"] * (THREADS - 1) + ["stored"]
    assert store.next_pair(study.id, rater) is None
    assert len(store.ratings(study.id)) == len(PAIRS) and store.progress(study.id, rater).rated == len(PAIRS)


def test_concurrent_raters_each_store_every_rating(store: StudyStore) -> None:
    study = store.create_study(pairs=PAIRS, **FIELDS)
    raters = [new_rater(store, study.id) for _ in range(6)]
    with ThreadPoolExecutor(len(raters)) as threads:
        counts = list(
            threads.map(lambda item: rate_all(store, study.id, item[1], item[0]), enumerate(raters))
        )
    assert counts == [len(PAIRS)] * len(raters)
    found = store.get_study(study.id)
    assert (found.raters, found.ratings) == (6, 6 * len(PAIRS))


def session_of(store: StudyStore) -> tuple[dict, list[tuple]]:
    """The same operations on any store: a study, three raters rating every pair; the results (ratings
    in one order: the store serves pairs in each rater's own random order) and the CSV's rows with the
    random ids replaced by what they stand for."""
    study = store.create_study(pairs=PAIRS, **FIELDS)
    raters = [new_rater(store, study.id) for _ in range(3)]
    for number, rater in enumerate(raters):
        rate_all(store, study.id, rater, number)
    study = store.get_study(study.id)
    ratings = store.ratings(study.id)
    ordered = sorted(ratings, key=lambda r: (raters.index(r.rater), r.image, r.method))
    results = results_dict(summarise(study, ordered, store.pair_methods(study.id)))
    assert results.pop("study") == study.id
    rows = []
    for row in csv.DictReader(io.StringIO(ratings_csv(study, ratings))):
        assert row.pop("study") == study.id and is_utc(datetime.fromisoformat(row.pop("time")))
        row.pop("pair")
        rows.append((raters.index(row.pop("rater")), *row.values()))
    return results, sorted(rows)


def test_results_and_csv_are_those_of_sqlite(store: StudyStore, tmp_path: Path) -> None:
    with StudyStore(f"sqlite:///{tmp_path / 'study.db'}") as lite:
        expected = session_of(lite)
    assert session_of(store) == expected
    assert len(expected[1]) == 3 * len(PAIRS) and expected[0]["methods"][0]["ci_low"] is not None


def test_a_pooled_engine_survives_a_server_restart(
    store: StudyStore, postgres_server: PostgresServer
) -> None:
    study = store.create_study(pairs=PAIRS, **FIELDS)
    rater = new_rater(store, study.id)
    postgres_server.restart()  # every pooled connection is cut
    assert rate_all(store, study.id, rater, 0) == len(PAIRS)
    assert store.get_study(study.id).ratings == len(PAIRS)


# ------------------------------------------------------------------------------------------ the API


def rater_session(client: TestClient, study_id: str) -> tuple[list[dict], list[int]]:
    """One rater's whole session over HTTP: every pair served, in order, and each answer's status."""
    invited = client.post(f"/v1/admin/studies/{study_id}/invitations", json={"count": 1}, headers=ADMIN)
    assert invited.status_code == 201, invited.text
    token = invited.json()["invitations"][0]["link"].split("#", 1)[1]
    rater = {"Authorization": f"Bearer {token}"}
    served, statuses = [], []
    while not (step := client.get(f"/v1/studies/{study_id}/next", headers=rater).json())["done"]:
        assert client.get(f"/v1/studies/{study_id}/next", headers=rater).json()["pair"] == step["pair"]
        answer = {"pair": step["pair"], "answer": 2 if len(served) % 2 else -1}
        statuses.append(
            client.post(f"/v1/studies/{study_id}/ratings", json=answer, headers=rater).status_code
        )
        statuses.append(
            client.post(f"/v1/studies/{study_id}/ratings", json=answer, headers=rater).status_code
        )
        served.append(step)
    return served, statuses


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i in range(3):
        (root / "set").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "set" / f"{i}.png")
    (root / "set" / "broken.png").write_bytes(b"not a png")
    return root


def test_one_raters_session_through_the_api(postgres_url: str, images: Path) -> None:
    settings = ServeSettings(
        models=[STRONG, WEAK],
        loader=tiny_classifier,
        db_url=postgres_url,
        admin_token=TOKEN,
        study_images=images,
    )
    with TestClient(create_app(settings)) as client:
        body = {"name": "api", "stronger_model": STRONG, "weaker_model": WEAK, "folder": "set", "seed": 2}
        created = client.post(
            "/v1/studies", json={**body, "methods": ["gradcam", "guided-backprop"]}, headers=ADMIN
        )
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 120
        while (study := client.get(created.headers["location"], headers=ADMIN).json())["state"] != "ready":
            assert study["state"] in ("queued", "rendering") and time.monotonic() < deadline, study
            time.sleep(0.05)
        assert (study["pairs"], study["kept"], study["total"]) == (6, 3, 4)
        assert [s["image"] for s in study["skipped"]] == ["broken.png"]
        assert datetime.fromisoformat(study["created"]).utcoffset() == timedelta(0)
        served, statuses = rater_session(client, study["id"])
        assert len(served) == 6 and len({s["pair"] for s in served}) == 6
        assert statuses == [201, 409] * 6  # each answer stored once; the repeat refused
        results = client.get(f"/v1/studies/{study['id']}/results", headers=ADMIN).json()
        assert (results["ratings"], results["raters"]) == (6, 1)
        assert [m["ratings"] for m in results["methods"]] == [3, 3]
        text = client.get(f"/v1/studies/{study['id']}/ratings.csv", headers=ADMIN).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sorted(r["pair"] for r in rows) == sorted(str(s["pair"]) for s in served)
        assert all(r["time"].endswith("+00:00") for r in rows)
        assert client.get("/v1/studies/nope/results", headers=ADMIN).status_code == 404
