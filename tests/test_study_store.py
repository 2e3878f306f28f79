"""The trust study's database, statistics and CSV (no model needed): ratings are stored exactly once, even
under concurrency, survive a restart, and are scored and summarised as the paper's protocol says."""

from __future__ import annotations

import csv
import io
import random
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gradcam.study.pairs import assign_sides
from gradcam.study.results import CSV_COLUMNS, mean_interval, ratings_csv, summarise
from gradcam.study.store import (
    DEFAULT_DB_URL,
    DuplicateRating,
    NotARater,
    NotFound,
    NotServed,
    PairRow,
    RaterRow,
    RatingRow,
    StudyError,
    StudyStore,
    database_url,
)


def png(tag: int) -> bytes:
    return b"\x89PNG fake " + bytes([tag])


def new_pair(image: str, method: str, side: str, index: int = 285, name: str = "Egyptian cat") -> PairRow:
    return PairRow(image, index, name, method, side, png(1), png(2))


# Four pairs with known sides: the stronger model is Robot A on the first of each method, B on the second.
PAIRS = [
    new_pair("cat.png", "guided-backprop", "A"),
    new_pair("coffee.png", "guided-backprop", "B", 967, "espresso"),
    new_pair("cat.png", "guided-gradcam", "A"),
    new_pair("coffee.png", "guided-gradcam", "B", 967, "espresso"),
]


def make_study(store: StudyStore, pairs: list[PairRow] = PAIRS, name: str = "trust"):
    return store.create_study(
        name=name, stronger_model="efficientnet-lite1", weaker_model="efficientnet-lite0",
        methods=["guided-backprop", "guided-gradcam"], folder="set1", seed=3, pairs=pairs,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    with StudyStore(f"sqlite:///{tmp_path / 'study.db'}") as opened:
        yield opened


def invite(store: StudyStore, study_id: str) -> str:
    """A new invited rater's id."""
    return store.invite(study_id)[0].rater


def serve(store: StudyStore, rater: str, pair: str) -> None:
    """Record ``pair`` as the one served to ``rater``, as if ``next_pair`` had chosen it (setup for tests
    that rate chosen pairs)."""
    with Session(store.engine) as session, session.begin():
        session.get(RaterRow, rater).served = pair


def rate(store: StudyStore, study_id: str, rater: str, pair: str, answer: int):
    """Serve ``pair`` to the rater, then record the answer."""
    serve(store, rater, pair)
    return store.record_rating(study_id, rater, pair, answer)


def pair_ids(store: StudyStore, study_id: str) -> dict[tuple[str, str], str]:
    with Session(store.engine) as session:
        rows = session.execute(
            select(PairRow.id, PairRow.image, PairRow.method).where(PairRow.study_id == study_id)
        )
        return {(image, method): pid for pid, image, method in rows}


def count_ratings(store: StudyStore) -> int:
    with Session(store.engine) as session:
        return len(session.scalars(select(RatingRow.id)).all())


# --------------------------------------------------------------------------------------------- store


def test_default_url_and_paths() -> None:
    assert DEFAULT_DB_URL == "sqlite:///gradcam-study.db"
    assert database_url("runs/study.db") == "sqlite:///runs/study.db"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_sqlite_file_is_in_wal_mode_with_a_busy_timeout(store: StudyStore) -> None:
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_bad_urls_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="not a SQLAlchemy URL"):
        StudyStore("not a url")
    with pytest.raises(StudyError, match="does not exist"):
        StudyStore(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(StudyError, match=r"u:\*\*\*@localhost") as raised:
        StudyStore("postgresql+nosuchdriver://u:secret@localhost/x")
    assert "secret" not in str(raised.value)  # the password is never shown


def test_a_study_is_stored_with_its_pairs_and_counts(store: StudyStore) -> None:
    first = make_study(store, name="first")
    second = make_study(store, PAIRS[:1], name="second")
    assert first.id != second.id and len(first.id) >= 12
    assert (first.pairs, first.raters, first.ratings) == (4, 0, 0)
    assert first.methods == ["guided-backprop", "guided-gradcam"] and first.seed == 3
    assert first.created.tzinfo is not None
    rater = invite(store, first.id)
    rate(store, first.id, rater, pair_ids(store, first.id)[("cat.png", "guided-backprop")], 1)
    found = store.study(first.id)
    assert (found.pairs, found.raters, found.ratings) == (4, 1, 1)
    assert {s.id: s.pairs for s in store.list_studies()} == {first.id: 4, second.id: 1}
    assert store.study("nope") is None
    assert store.pair_methods(first.id) == {"guided-backprop": 2, "guided-gradcam": 2}


def test_pairs_are_checked(store: StudyStore) -> None:
    with pytest.raises(StudyError, match="stronger_side"):
        make_study(store, [new_pair("cat.png", "gradcam", "C")])
    assert store.list_studies() == []  # nothing half-stored
    study = make_study(store, PAIRS[:1])
    store.add_pairs(study.id, PAIRS[1:2])
    assert store.study(study.id).pairs == 2
    with pytest.raises(NotFound):
        store.add_pairs("nope", PAIRS[:1])


def test_each_rater_gets_every_pair_once_in_an_order_of_their_own(store: StudyStore) -> None:
    pairs = [new_pair(f"img{i}.png", "gradcam", "AB"[i % 2]) for i in range(12)]
    study = make_study(store, pairs)
    orders = []
    for _ in range(3):
        rater = invite(store, study.id)
        seen = []
        while (pair := store.next_pair(study.id, rater)) is not None:
            assert store.next_pair(study.id, rater).id == pair.id  # the same until rated (a reload)
            assert (pair.robot_a, pair.robot_b) == (png(1), png(2))
            progress = store.record_rating(study.id, rater, pair.id, 0)
            seen.append(pair.id)
            assert (progress.rated, progress.total, progress.remaining) == (len(seen), 12, 12 - len(seen))
        assert sorted(seen) == sorted(pair_ids(store, study.id).values())
        orders.append(seen)
    assert len({tuple(order) for order in orders}) == 3  # 12! orders: three raters never share one
    assert count_ratings(store) == 36


def test_unknown_or_foreign_ids_are_refused(store: StudyStore) -> None:
    study, other = make_study(store), make_study(store, PAIRS[:1], name="other")
    rater, stranger = invite(store, study.id), invite(store, other.id)
    own_pair = pair_ids(store, study.id)[("cat.png", "guided-gradcam")]
    foreign_pair = next(iter(pair_ids(store, other.id).values()))
    with pytest.raises(NotFound, match="study 'nope'"):
        store.invite("nope")
    with pytest.raises(NotARater, match="rater"):
        store.next_pair(study.id, "no-such-rater")
    with pytest.raises(NotARater, match="rater"):
        store.next_pair(study.id, stranger)  # a rater of another study
    with pytest.raises(NotARater, match="rater"):
        store.record_rating(study.id, stranger, own_pair, 1)
    served = store.next_pair(study.id, rater).id
    for pair in (
        foreign_pair,
        "no-such-pair",
        next(p for p in pair_ids(store, study.id).values() if p != served),
    ):
        with pytest.raises(NotServed, match="not the pair served"):
            store.record_rating(study.id, rater, pair, 1)  # a pair of another study, none, one not served
    assert count_ratings(store) == 0


def test_only_the_pair_served_can_be_rated_and_only_once(store: StudyStore) -> None:
    # The ballot-stuffing finding: any pair of the study was accepted, served or not.
    study = make_study(store)
    rater = invite(store, study.id)
    pairs = set(pair_ids(store, study.id).values())
    with pytest.raises(NotServed):
        store.record_rating(study.id, rater, sorted(pairs)[0], 0)  # nothing served yet
    first = store.next_pair(study.id, rater).id
    for other in pairs - {first}:
        with pytest.raises(NotServed):
            store.record_rating(study.id, rater, other, 0)
    store.record_rating(study.id, rater, first, 2)
    with pytest.raises(DuplicateRating):
        store.record_rating(study.id, rater, first, -2)
    with pytest.raises(NotServed):  # rated: nothing is served until the next call
        store.record_rating(study.id, rater, sorted(pairs - {first})[0], 0)
    second = store.next_pair(study.id, rater).id
    assert second != first and store.record_rating(study.id, rater, second, 1).rated == 2
    assert sorted((r.pair, r.answer) for r in store.ratings(study.id)) == sorted([(first, 2), (second, 1)])


def test_pair_and_rater_ids_are_opaque_random_tokens(store: StudyStore) -> None:
    # The finding: pair ids were sequential integers, made image by image and method by method (odd ids
    # guided-backprop, even ids Grad-CAM); rater ids must not be guessable either.
    pairs = [
        new_pair(f"img{i}.png", method, "A") for i in range(20) for method in ("guided-backprop", "gradcam")
    ]
    study = make_study(store, pairs)
    ids = pair_ids(store, study.id)
    raters = [i.rater for i in store.invite(study.id, 20)]
    for token in [*ids.values(), *raters]:
        assert isinstance(token, str) and len(token) == 16 and re.fullmatch(r"[A-Za-z0-9_-]+", token)
        assert not token.isdigit()
    assert len(set(ids.values())) == 40 and len(set(raters)) == 20
    made_order = [ids[(f"img{i}.png", m)] for i in range(20) for m in ("guided-backprop", "gradcam")]
    assert made_order != sorted(made_order)  # sorting the ids does not give back the order they were made
    methods_in_id_order = [m for (_, m), _ in sorted(ids.items(), key=lambda item: item[1])]
    alternations = sum(a != b for a, b in zip(methods_in_id_order, methods_in_id_order[1:], strict=False))
    assert alternations < 39  # not the strict alternation sequential ids would give


def test_invitation_tokens_are_stored_only_as_hashes(store: StudyStore) -> None:
    study = make_study(store)
    made = store.invite(study.id, 3)
    assert [store.rater_of(study.id, i.token) for i in made] == [i.rater for i in made]
    assert made[0].link(study.id) == f"/studies/{study.id}#{made[0].token}"
    with Session(store.engine) as session:
        stored = session.scalars(select(RaterRow.token_hash)).all()
        dump = "\n".join(str(row) for row in session.execute(text("SELECT * FROM study_rater")))
    assert len(stored) == 3 and all(i.token not in dump for i in made)
    with pytest.raises(NotARater):
        store.rater_of(study.id, "not-a-token")
    other = make_study(store, PAIRS[:1], name="other")
    with pytest.raises(NotARater):
        store.rater_of(other.id, made[0].token)  # a link of another study
    with pytest.raises(StudyError, match="count"):
        store.invite(study.id, 0)


@pytest.mark.parametrize("answer", [3, -3, True, 1.0, "1", None])
def test_answers_off_the_scale_are_refused(store: StudyStore, answer: object) -> None:
    study = make_study(store)
    rater = invite(store, study.id)
    pair = store.next_pair(study.id, rater).id
    with pytest.raises(StudyError, match="answer"):
        store.record_rating(study.id, rater, pair, answer)
    assert count_ratings(store) == 0


def test_the_database_itself_refuses_a_bad_answer_and_a_second_rating(store: StudyStore) -> None:
    study = make_study(store)
    rater = invite(store, study.id)
    pair = next(iter(pair_ids(store, study.id).values()))

    def insert(answer: int) -> None:
        with Session(store.engine) as session:
            session.add(RatingRow(study_id=study.id, pair_id=pair, rater_id=rater, answer=answer))
            session.commit()

    with pytest.raises(IntegrityError, match="CHECK"):
        insert(5)
    insert(1)
    with pytest.raises(IntegrityError, match="UNIQUE"):
        insert(-1)
    assert count_ratings(store) == 1


def test_a_duplicate_rating_is_refused_and_not_stored(store: StudyStore) -> None:
    study = make_study(store)
    rater = invite(store, study.id)
    pair = pair_ids(store, study.id)[("coffee.png", "guided-gradcam")]
    rate(store, study.id, rater, pair, 2)
    serve(store, rater, pair)  # even served again, the first answer stands
    with pytest.raises(DuplicateRating, match="already rated"):
        store.record_rating(study.id, rater, pair, -2)
    [stored] = store.ratings(study.id)
    assert (stored.pair, stored.rater, stored.answer) == (pair, rater, 2)  # the first answer stands


def _together(count: int, work) -> list[object]:
    """Run work(i) for i < count in as many threads, released at once; each outcome (or exception)."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = work(i)
        except Exception as error:  # noqa: BLE001  (collected for the assertions)
            outcomes[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def test_fifty_parallel_ratings_give_exactly_fifty_rows(store: StudyStore) -> None:
    study = make_study(store)
    pairs = list(pair_ids(store, study.id).values())
    raters = [i.rater for i in store.invite(study.id, 50)]
    for i, rater in enumerate(raters):
        serve(store, rater, pairs[i % 4])
    outcomes = _together(50, lambda i: store.record_rating(study.id, raters[i], pairs[i % 4], i % 5 - 2))
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    stored = store.ratings(study.id)
    assert len(stored) == 50 == count_ratings(store)
    assert sorted((r.rater, r.pair, r.answer) for r in stored) == sorted(
        (raters[i], pairs[i % 4], i % 5 - 2) for i in range(50)
    )


def test_one_pair_submitted_many_times_at_once_is_stored_once(store: StudyStore) -> None:
    pairs = [new_pair(f"img{i}.png", "gradcam", "A") for i in range(50)]
    study = make_study(store, pairs)
    rater = invite(store, study.id)
    served = store.next_pair(study.id, rater).id
    others = [p for p in pair_ids(store, study.id).values() if p != served]
    # 20 submissions of the served pair and 20 of pairs never served, all at once: one row
    outcomes = _together(
        40, lambda i: store.record_rating(study.id, rater, served if i < 20 else others[i], 2)
    )
    assert sum(isinstance(o, DuplicateRating | NotServed) for o in outcomes[:20]) == 19
    assert all(isinstance(o, NotServed | DuplicateRating) for o in outcomes[20:])
    assert [
        type(o).__name__
        for o in outcomes
        if isinstance(o, Exception) and not isinstance(o, DuplicateRating | NotServed)
    ] == []
    assert count_ratings(store) == 1 and store.ratings(study.id)[0].pair == served


def test_ratings_and_raters_survive_closing_and_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with StudyStore(url) as store:
        study = make_study(store)
        rater = invite(store, study.id)
        first = store.next_pair(study.id, rater)
        store.record_rating(study.id, rater, first.id, -1)
        second = store.next_pair(study.id, rater)
    with StudyStore(url) as store:
        [stored] = store.ratings(study.id)
        assert (stored.pair, stored.rater, stored.answer) == (first.id, rater, -1)
        assert store.next_pair(study.id, rater).id == second.id  # the rater continues where they were
        assert store.progress(study.id, rater).rated == 1
        with pytest.raises(DuplicateRating):
            store.record_rating(study.id, rater, first.id, 2)


def test_in_memory_database_works_for_single_threaded_use() -> None:
    with StudyStore("sqlite://") as store:
        study = make_study(store)
        rater = invite(store, study.id)
        store.record_rating(study.id, rater, store.next_pair(study.id, rater).id, 0)
        assert len(store.ratings(study.id)) == 1


# ----------------------------------------------------------------------------------- randomisation


def test_sides_are_balanced_random_and_reproducible() -> None:
    for count in range(0, 41):
        sides = assign_sides(count, random.Random(5))
        assert len(sides) == count and abs(sides.count("A") - sides.count("B")) <= 1
        assert sides == assign_sides(count, random.Random(5))
    draws = [tuple(assign_sides(20, random.Random(seed))) for seed in range(50)]
    assert len(set(draws)) == 50  # C(20, 10) = 184756 orders: seeds give different ones
    first_is_a = sum(draw[0] == "A" for draw in draws)
    assert 12 <= first_is_a <= 38  # no side is favoured in any position (binomial(50, 0.5): 25 +- 13)
    odd = [assign_sides(1, random.Random(seed))[0] for seed in range(200)]
    assert 70 <= odd.count("A") <= 130


# ------------------------------------------------------------------------------------- statistics


def rated(store: StudyStore, answers: dict[tuple[str, str], list[int]]) -> str:
    """A study where raters gave ``answers[(image, method)][k]`` (rater k); its id."""
    study = make_study(store)
    ids = pair_ids(store, study.id)
    raters = [invite(store, study.id) for _ in range(max(len(a) for a in answers.values()))]
    for key, given in answers.items():
        for rater, answer in zip(raters, given, strict=False):
            rate(store, study.id, rater, ids[key], answer)
    return study.id


def test_scores_are_seen_from_the_stronger_side(store: StudyStore) -> None:
    # Stronger model: Robot A on cat pairs, Robot B on coffee pairs (PAIRS).
    study_id = rated(
        store,
        {
            ("cat.png", "guided-backprop"): [2, 1],  # scores +2 +1
            ("coffee.png", "guided-backprop"): [
                2,
                -1,
            ],  # scores -2 +1: "A (the weaker) is better" counts against
            ("cat.png", "guided-gradcam"): [1],  # +1
            ("coffee.png", "guided-gradcam"): [-2],  # +2
        },
    )
    study = store.study(study_id)
    ratings = store.ratings(study_id)
    assert {(r.image, r.method, r.answer): r.score for r in ratings} == {
        ("cat.png", "guided-backprop", 2): 2,
        ("cat.png", "guided-backprop", 1): 1,
        ("coffee.png", "guided-backprop", 2): -2,
        ("coffee.png", "guided-backprop", -1): 1,
        ("cat.png", "guided-gradcam", 1): 1,
        ("coffee.png", "guided-gradcam", -2): 2,
    }
    summary = summarise(study, ratings, store.pair_methods(study_id))
    backprop, guided = summary.methods
    assert backprop.method == "guided-backprop" and backprop.interval.mean == pytest.approx(
        (2 + 1 - 2 + 1) / 4
    )
    assert (backprop.ratings, backprop.raters, backprop.pairs) == (4, 2, 2)
    assert backprop.counts == {-2: 1, -1: 0, 0: 0, 1: 2, 2: 1}
    assert guided.interval.mean == pytest.approx(1.5) and (guided.ratings, guided.raters) == (2, 1)
    assert (summary.ratings, summary.raters) == (6, 2)


def numpy_bootstrap(scores: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """An independent percentile bootstrap: means of resamples drawn with replacement."""
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_bootstrap_interval_matches_an_independent_bootstrap_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(11)
    scores = rng.choice([-2, -1, 0, 1, 2], size=120, p=[0.05, 0.1, 0.2, 0.35, 0.3])
    got = mean_interval(scores.tolist())
    assert got.mean == pytest.approx(scores.mean()) and got.note is None
    low, high = numpy_bootstrap(scores.astype(float), 40000, 99)
    assert got.low == pytest.approx(low, abs=0.03) and got.high == pytest.approx(high, abs=0.03)
    half = 1.959964 * scores.std() / np.sqrt(len(scores))  # the bootstrap's spread is the ddof=0 one
    assert got.low == pytest.approx(scores.mean() - half, abs=0.04)
    assert got.high == pytest.approx(scores.mean() + half, abs=0.04)
    assert mean_interval(scores.tolist()) == got  # a fixed seed: the same ratings, the same interval


def test_bootstrap_of_two_values_spans_them() -> None:
    # Resampling [-1, 1]: the mean is -1, 0 or +1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # percentiles are the extremes.
    got = mean_interval([-1, 1])
    assert (got.mean, got.low, got.high) == (0.0, -1.0, 1.0)


def test_percentile_interval_of_a_skewed_sample_in_closed_form() -> None:
    # 18 scores of +2 and 2 of -2: a resample's mean is 2 - 0.2 k, k ~ Binomial(20, 0.1) the number of -2
    # drawn. The percentile interval is the mean's 2.5% and 97.5% quantiles, i.e. k's 97.5% and 2.5%
    # quantiles (5 and 0: far from any jump, so resampling noise cannot move them). A "basic" interval
    # would be [1.2, 2.2] here, past the largest possible score.
    k_high, k_low = stats.binom.ppf([0.975, 0.025], 20, 0.1)
    got = mean_interval([2] * 18 + [-2] * 2)
    assert got.mean == pytest.approx(1.6)
    assert (got.low, got.high) == (pytest.approx(2 - 0.2 * k_high), pytest.approx(2 - 0.2 * k_low))
    assert (got.low, got.high) == (pytest.approx(1.0), pytest.approx(2.0))


def test_small_and_degenerate_samples_do_not_crash() -> None:
    none = mean_interval([])
    assert (none.mean, none.low, none.high) == (None, None, None) and "no ratings" in none.note
    one = mean_interval([2])
    assert (one.mean, one.low, one.high) == (2.0, None, None) and "one rating" in one.note
    same = mean_interval([1, 1, 1, 1])
    assert (same.mean, same.low, same.high) == (1.0, 1.0, 1.0) and "equal" in same.note


def test_a_method_without_ratings_reports_nothing(store: StudyStore) -> None:
    study_id = rated(store, {("cat.png", "guided-gradcam"): [2]})
    summary = summarise(store.study(study_id), store.ratings(study_id), store.pair_methods(study_id))
    backprop = summary.methods[0]
    assert (backprop.ratings, backprop.raters, backprop.interval.mean) == (0, 0, None)


def test_csv_has_one_row_per_rating_with_the_score(store: StudyStore) -> None:
    study_id = rated(store, {("cat.png", "guided-backprop"): [2, 0], ("coffee.png", "guided-gradcam"): [1]})
    study = store.study(study_id)
    rows = list(csv.DictReader(io.StringIO(ratings_csv(study, store.ratings(study_id)))))
    assert len(rows) == 3 and tuple(rows[0]) == CSV_COLUMNS
    ids = pair_ids(store, study_id)
    coffee = next(r for r in rows if r["image"] == "coffee.png")
    assert coffee == {
        "study": study_id, "pair": ids[("coffee.png", "guided-gradcam")], "image": "coffee.png",
        "class_index": "967", "class": "espresso", "method": "guided-gradcam",
        "stronger_model": "efficientnet-lite1", "weaker_model": "efficientnet-lite0", "stronger_side": "B",
        "rater": coffee["rater"], "answer": "1", "score": "-1", "time": coffee["time"],
    }  # fmt: skip
    stamp = datetime.fromisoformat(coffee["time"])
    assert stamp.tzinfo is not None and abs((datetime.now(UTC) - stamp).total_seconds()) < 600
    assert sorted(int(r["score"]) for r in rows if r["image"] == "cat.png") == [0, 2]
    assert len({r["rater"] for r in rows}) == 2
