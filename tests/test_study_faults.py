"""The study under database faults: a database that cannot be written, a folder removed under the server,
an old schema, and ``gradcam serve`` killed with SIGKILL in the middle of a burst of ratings.

What must hold: a database error is a one-line JSON 503 (never a 201, never a traceback); a rating is
acknowledged only once committed to the file the server will read again; ``/healthz`` answers 503 when
the database cannot be reached; after kill -9, every acknowledged rating is stored and the file is intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, text
from torch import nn

from gradcam.models import LoadedModel
from gradcam.models.base import Preprocess
from gradcam.serve.app import ServeSettings, create_app
from gradcam.study.store import DatabaseUnavailable, PairRow, StudyError, StudyStore

TOKEN = "admin-secret-token"


def fake_png(tag: int) -> bytes:
    return b"\x89PNG fake " + bytes([tag % 256])


def make_study(store: StudyStore, pairs: int = 6) -> str:
    rows = [
        PairRow(
            f"img{i}.png",
            1,
            "cat",
            "gradcam" if i % 2 else "guided-backprop",
            "AB"[i % 2],
            fake_png(i),
            fake_png(i + 1),
        )
        for i in range(pairs)
    ]
    study = store.create_study(
        name="faults", stronger_model="a", weaker_model="b", methods=["gradcam", "guided-backprop"],
        folder="set", seed=1, pairs=rows,
    )  # fmt: skip
    return study.id


def tiny_model(name: str, device: str | None = None) -> LoadedModel:
    """A stand-in served model (these tests need the study only)."""
    module = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return LoadedModel(name, module, Preprocess(8, None, (0.5,) * 3, (0.5,) * 3), ["a", "b"])


def app_on(url: str) -> TestClient:
    settings = ServeSettings(models=["tiny"], loader=tiny_model, db_url=url, admin_token=TOKEN)
    return TestClient(create_app(settings))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_one_line_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) > 0
    detail = response.json()["detail"]
    assert "\n" not in detail and "Traceback" not in detail and "unavailable" in detail


# ------------------------------------------------------------------------------ in-process faults


def test_a_read_only_database_is_a_one_line_503_and_healthz_says_so(tmp_path: Path) -> None:
    # The finding: with the database read-only at runtime, ratings got 500 text/plain and tracebacks.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with StudyStore(url) as store:
        study_id = make_study(store)
        [invitation] = store.invite(study_id)
    client = app_on(url)
    with client:
        shown = client.get(f"/v1/studies/{study_id}/next", headers=bearer(invitation.token)).json()
        engine = client.app.state.study_store.engine
        # SQLite's own read-only mode on every connection from now on (root ignores file permissions, so
        # a chmod would prove nothing here): every write fails as it does on a read-only file.
        event.listen(engine, "connect", lambda connection, _: connection.execute("PRAGMA query_only = ON"))
        engine.dispose()
        refused = client.post(
            f"/v1/studies/{study_id}/ratings",
            json={"pair": shown["pair"], "answer": 1},
            headers=bearer(invitation.token),
        )
        assert_one_line_503(refused)
        assert client.get("/healthz").status_code == 200  # reads still work: the database is reachable
        invite = client.post(
            f"/v1/admin/studies/{study_id}/invitations", json={"count": 1}, headers=bearer(TOKEN)
        )
        assert_one_line_503(invite)
    with StudyStore(url) as store:
        assert store.ratings(study_id) == []


def test_a_removed_database_folder_acknowledges_nothing(tmp_path: Path) -> None:
    # The finding: with its folder removed, the server answered 201 to ratings that were lost on
    # restart, and /healthz kept saying ok.
    folder = tmp_path / "db"
    folder.mkdir()
    url = f"sqlite:///{folder / 'study.db'}"
    with StudyStore(url) as store:
        study_id = make_study(store)
        [invitation] = store.invite(study_id)
    saved = tmp_path / "saved"
    with app_on(url) as client:
        auth = bearer(invitation.token)
        first = client.get(f"/v1/studies/{study_id}/next", headers=auth).json()
        assert (
            client.post(
                f"/v1/studies/{study_id}/ratings", json={"pair": first["pair"], "answer": 2}, headers=auth
            ).status_code
            == 201
        )
        second = client.get(f"/v1/studies/{study_id}/next", headers=auth).json()
        shutil.copytree(folder, saved)  # what a backup taken now holds (the first rating)
        shutil.rmtree(folder)
        for answer in (1, -1):
            refused = client.post(
                f"/v1/studies/{study_id}/ratings",
                json={"pair": second["pair"], "answer": answer},
                headers=auth,
            )
            assert_one_line_503(refused)
        assert_one_line_503(client.get("/healthz"))
        assert_one_line_503(client.get(f"/v1/studies/{study_id}/next", headers=auth))
        assert not folder.exists()  # nothing was made in its place
    # Put back, the database holds exactly what was acknowledged.
    shutil.move(saved, folder)
    with StudyStore(url) as store:
        assert [(r.pair, r.answer) for r in store.ratings(study_id)] == [(first["pair"], 2)]


def test_a_replaced_database_file_fails_the_call_that_noticed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = StudyStore(url)
    try:
        study_id = make_study(store)
        [invitation] = store.invite(study_id)
        pair = store.next_pair(study_id, invitation.rater)
        shutil.copy(tmp_path / "study.db", tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", tmp_path / "study.db")  # a restore under a running server
        with pytest.raises(DatabaseUnavailable, match="replaced"):
            store.record_rating(study_id, invitation.rater, pair.id, 1)
        store.health()  # then the store reads the file at the path
    finally:
        store.close()


def test_an_old_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:  # the study_rater table of the version before invitations
        columns = "id VARCHAR(64) PRIMARY KEY, study_id VARCHAR(32), created DATETIME"
        connection.execute(text(f"CREATE TABLE study_rater ({columns})"))
    engine.dispose()
    with pytest.raises(StudyError) as refused:
        StudyStore(f"sqlite:///{path}")
    message = str(refused.value)
    assert "older gradcam" in message and "token_hash" in message and "\n" not in message


def test_a_database_that_cannot_be_reached_is_503_at_healthz(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with app_on(url) as client:
        assert client.get("/healthz").json()["database"] == "ok"
        client.app.state.study_store.engine.dispose()
        (tmp_path / "study.db").unlink()
        (tmp_path / "study.db-wal").unlink(missing_ok=True)
        assert_one_line_503(client.get("/healthz"))


# ----------------------------------------------------------------------------- kill -9 mid-burst


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(url: str, *, workers: int = 1) -> Iterator[tuple[subprocess.Popen, str]]:
    """``gradcam serve`` on ``url`` in a process of its own (one small model; the study needs none),
    killed at the end if it still runs."""
    port = free_port()
    command = [
        sys.executable, "-m", "gradcam", "serve", "--db", url, "--port", str(port),
        "-m", "efficientnet-lite0", "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, "GRADCAM_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode(errors="replace")[-2000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


class Burst:
    """Raters rating as fast as they can through one server, each acknowledged rating kept."""

    def __init__(self, base: str, study_id: str, tokens: list[str]) -> None:
        self.base, self.study_id, self.tokens = base, study_id, tokens
        self.acknowledged: list[tuple[str, str, int]] = []  # (token, pair, answer) answered 201
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def rater(self, token: str) -> None:
        auth = bearer(token)
        api = f"{self.base}/v1/studies/{self.study_id}"
        with httpx.Client(timeout=30) as client:
            try:
                while not (shown := client.get(f"{api}/next", headers=auth).json())["done"]:
                    answer = len(shown["pair"]) % 5 - 2
                    response = client.post(
                        f"{api}/ratings", json={"pair": shown["pair"], "answer": answer}, headers=auth
                    )
                    if response.status_code == 201:
                        with self._lock:
                            self.acknowledged.append((token, shown["pair"], answer))
                    else:
                        self.failures.append(f"{response.status_code} {response.text}")
                        return
            except httpx.HTTPError as error:  # the server died under us
                self.failures.append(type(error).__name__)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.rater, args=(t,)) for t in self.tokens]
        for thread in threads:
            thread.start()
        return threads


def stored(url: str, study_id: str, tokens: list[str]) -> tuple[set[tuple[str, str, int]], int]:
    """The ratings in the database as (token, pair, answer), and how many rows there are."""
    with StudyStore(url) as store:
        raters = {store.rater_of(study_id, t): t for t in tokens}
        rows = store.ratings(study_id)
    return {(raters[r.rater], r.pair, r.answer) for r in rows}, len(rows)


def test_kill_9_mid_burst_loses_no_acknowledged_rating(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with StudyStore(url) as store:
        study_id = make_study(store, pairs=20)
        tokens = [i.token for i in store.invite(study_id, 12)]
    with served(url) as (process, base):
        # The admin token came from GRADCAM_ADMIN_TOKEN: it works, and `ps` does not show it.
        assert httpx.get(f"{base}/v1/studies", headers=bearer(TOKEN)).status_code == 200
        assert TOKEN.encode() not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        burst = Burst(base, study_id, tokens)
        threads = burst.start()
        deadline = time.monotonic() + 60
        while len(burst.acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(60)
        acknowledged = set(burst.acknowledged)
    assert len(acknowledged) >= 60 and len(acknowledged) < 12 * 20, "the kill came mid-burst"
    found, rows = stored(url, study_id, tokens)
    assert acknowledged <= found, f"{len(acknowledged - found)} acknowledged ratings were lost"
    assert rows == len(found)  # no rater has two rows for one pair
    print(f"kill -9 mid-burst: {len(acknowledged)} ratings acknowledged, {rows} stored")
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    engine.dispose()
    # Started again, the server goes on where the raters were.
    with served(url) as (_, base):
        again = Burst(base, study_id, tokens[:3])
        for thread in again.start():
            thread.join(120)
        assert again.failures == []
    found, rows = stored(url, study_id, tokens)
    assert {t for t, _, _ in found if t in tokens[:3]} == set(tokens[:3])
    assert sum(1 for t, _, _ in found if t in tokens[:3]) == 3 * 20


def test_two_replicas_on_one_postgresql_survive_one_killed_mid_burst(postgres_url: str) -> None:
    # Two `gradcam serve` processes share one real PostgreSQL database; 60 raters are split across them
    # and one replica is killed with SIGKILL mid-burst.
    with StudyStore(postgres_url) as store:
        study_id = make_study(store, pairs=5)
        tokens = [i.token for i in store.invite(study_id, 60)]
    doomed_tokens, survivor_tokens = tokens[:30], tokens[30:]
    with served(postgres_url) as (doomed, doomed_base), served(postgres_url) as (_, survivor_base):
        on_doomed = Burst(doomed_base, study_id, doomed_tokens)
        on_survivor = Burst(survivor_base, study_id, survivor_tokens)
        threads = on_doomed.start() + on_survivor.start()
        deadline = time.monotonic() + 60
        while len(on_doomed.acknowledged) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(doomed.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        assert on_survivor.failures == [], on_survivor.failures[:3]  # the survivor kept serving
        assert len(on_survivor.acknowledged) == 30 * 5
        assert 30 <= len(on_doomed.acknowledged) < 30 * 5, "the kill came mid-burst"
        # The killed replica's raters go on at the survivor, where they left off.
        moved = Burst(survivor_base, study_id, doomed_tokens)
        for thread in moved.start():
            thread.join(120)
        assert moved.failures == []
    acknowledged = set(on_doomed.acknowledged) | set(on_survivor.acknowledged) | set(moved.acknowledged)
    found, rows = stored(postgres_url, study_id, tokens)
    assert acknowledged <= found, f"{len(acknowledged - found)} acknowledged ratings were lost"
    assert rows == len(found) == 60 * 5  # every pair rated once by every rater, no rater twice
    print(
        f"replicas: {len(on_doomed.acknowledged)} acknowledged by the killed one, "
        f"{len(on_survivor.acknowledged) + len(moved.acknowledged)} by the survivor, {rows} stored"
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_joins_of_one_client_stop_at_its_limit(backend: str, tmp_path: Path, request) -> None:
    # The per-client limit of an open study holds when one client asks many times at once (joins of a
    # study are serialised by a write to its row, on both databases).
    url = (
        f"sqlite:///{tmp_path / 'study.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    with StudyStore(url) as store:
        rows = [PairRow("a.png", 1, "cat", "gradcam", "A", fake_png(1), fake_png(2))]
        study = store.create_study(
            name="open", stronger_model="a", weaker_model="b", methods=["gradcam"], folder="set", seed=1,
            pairs=rows, open=True,
        )  # fmt: skip
        barrier = threading.Barrier(12)
        outcomes: list[object] = [None] * 12

        def join(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = store.join(study.id, "192.0.2.1", limit=3, window_s=600)
            except StudyError as error:
                outcomes[i] = error

        threads = [threading.Thread(target=join, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        joined = [o for o in outcomes if not isinstance(o, Exception)]
        refused = [o for o in outcomes if isinstance(o, Exception)]
        assert len(joined) == 3, [type(o).__name__ for o in outcomes]
        assert [type(o).__name__ for o in refused] == ["TooManyRaters"] * 9
        assert store.study(study.id).raters == 3
        assert store.join(study.id, "192.0.2.2", limit=3, window_s=600).token  # another client


def test_a_nul_character_is_bad_input_not_an_outage_on_postgresql(postgres_url: str) -> None:
    # PostgreSQL refuses NUL characters in text; that must not read as "the database is unavailable".
    with StudyStore(postgres_url) as store:
        study_id = make_study(store)
        [invitation] = store.invite(study_id)
        with pytest.raises(StudyError) as refused:
            store.study("ab\x00cd")
        assert not isinstance(refused.value, DatabaseUnavailable) and "cannot store" in str(refused.value)
    with app_on(postgres_url) as client:
        assert client.get("/v1/studies/ab%00cd").status_code == 422
        auth = bearer(invitation.token)
        body = {"pair": "ab\x00cd", "answer": 1}
        assert client.post(f"/v1/studies/{study_id}/ratings", json=body, headers=auth).status_code == 422
        assert client.get("/healthz").status_code == 200
