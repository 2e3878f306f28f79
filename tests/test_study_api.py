"""The study's HTTP API (the service's routers, as create_app assembles them) with the real
EfficientNet-Lite1 (stronger) and Lite0 (weaker): admin calls, creation as a bounded background job, the
rater's walk through the pairs, every documented error, results."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import html5lib
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from gradcam.models.pool import ModelPool
from gradcam.serve.app import ServeSettings, create_app
from gradcam.study.scale import SCALE
from gradcam.study.store import PairRow, StudyStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STATIC = Path(__file__).resolve().parent.parent / "src" / "gradcam" / "serve" / "static"
STRONGER, WEAKER = "efficientnet-lite1", "efficientnet-lite0"
TOKEN = "admin-secret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def app_for(
    store: StudyStore, pool: ModelPool, root: Path | None, token: str = TOKEN, *, queue: int = 4
) -> TestClient:
    """The service on ``store``'s database, serving ``pool``'s models (loaded once for the module)."""
    settings = ServeSettings(
        models=pool.names,
        loader=lambda name, device=None: pool.get(name),
        db_url=store.url,
        admin_token=token,
        study_images=root,
        study_queue=queue,
    )
    return TestClient(create_app(settings))


def wait_until(client: TestClient, study_id: str, states=("ready", "failed"), timeout: float = 300) -> dict:
    """The admin's view of the study once its state is one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/admin/studies/{study_id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        if response.json()["state"] in states:
            return response.json()
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.05)


def create(client: TestClient, body: dict) -> dict:
    """POST a study (answered at once: 202, queued) and wait for its rendering to end."""
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued"
    assert response.headers["location"] == f"/v1/admin/studies/{response.json()['id']}"
    return wait_until(client, response.json()["id"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """set1: cat and coffee (kept), red (the models disagree), broken.png (unreadable), labels.json;
    empty/: no image; .private/: hidden, never listed."""
    base = tmp_path_factory.mktemp("study-images")
    set1 = base / "set1"
    set1.mkdir()
    for name in ("cat.png", "coffee.png"):
        (set1 / name).write_bytes((EXAMPLES / name).read_bytes())
    Image.new("RGB", (64, 64), (255, 0, 0)).save(set1 / "red.png")
    (set1 / "broken.png").write_bytes(b"not a png")
    (set1 / "labels.json").write_text(json.dumps({"cat.png": "Egyptian cat", "coffee.png": "tabby"}))
    (base / "empty").mkdir()
    (base / ".private").mkdir()
    (base / ".private" / "cat.png").write_bytes((EXAMPLES / "cat.png").read_bytes())
    (base / "outside.json").write_text("{}")
    return base


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool([STRONGER, WEAKER])


@pytest.fixture(scope="module")
def db_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'study.db'}"


@pytest.fixture(scope="module")
def store(db_url: str) -> StudyStore:
    with StudyStore(db_url) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(store: StudyStore, pool: ModelPool, root: Path) -> TestClient:
    return app_for(store, pool, root)


BODY = {
    "name": "Trust",
    "stronger_model": STRONGER,
    "weaker_model": WEAKER,
    "methods": ["gradcam", "guided-backprop"],
    "folder": "set1",
    "seed": 7,
}


@pytest.fixture(scope="module")
def study(client: TestClient) -> dict:
    return create(client, BODY)


def sides(store: StudyStore, study_id: str) -> dict[str, str]:
    query = select(PairRow.id, PairRow.stronger_side).where(PairRow.study_id == study_id)
    with Session(store.engine) as session:
        return {pair: side for pair, side in session.execute(query)}


def invited(client: TestClient, study_id: str, count: int = 1) -> list[str]:
    """Tokens of ``count`` new invitations (the fragments of their links)."""
    response = client.post(f"/v1/admin/studies/{study_id}/invitations", json={"count": count}, headers=ADMIN)
    assert response.status_code == 201, response.text
    links = [made["link"] for made in response.json()["invitations"]]
    assert all(link.startswith(f"/studies/{study_id}#") for link in links)
    return [link.split("#", 1)[1] for link in links]


def new_rater(client: TestClient, study_id: str) -> str:
    """One invited rater's token."""
    return invited(client, study_id)[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------------------ admin


ADMIN_CALLS = [
    ("GET", "/v1/admin/folders"),
    ("POST", "/v1/studies"),
    ("GET", "/v1/studies"),
    ("GET", "/v1/admin/studies/{id}"),
    ("GET", "/v1/studies/{id}/results"),
    ("GET", "/v1/studies/{id}/ratings.csv"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_admin_calls_need_the_token(client: TestClient, study: dict, method: str, path: str) -> None:
    url = path.format(id=study["id"])
    missing = client.request(method, url, json=BODY)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "admin token" in missing.json()["detail"]
    for header in (
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer \u00e9t\u00e9".encode("latin-1"),
    ):
        assert client.request(method, url, json=BODY, headers={"Authorization": header}).status_code == 403
    assert (
        client.request(method, url, json=BODY, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    )


def test_without_an_admin_token_admin_calls_are_off(store: StudyStore, pool: ModelPool, root: Path) -> None:
    client = app_for(store, pool, root, token="")
    assert client.get("/v1/studies", headers={"Authorization": "Bearer anything"}).status_code == 403


def test_folders_are_the_roots_visible_subfolders(client: TestClient) -> None:
    response = client.get("/v1/admin/folders", headers=ADMIN)
    assert response.status_code == 200
    assert response.json() == {
        "folders": [
            {"name": "empty", "images": 0, "annotations": []},
            {"name": "set1", "images": 4, "annotations": ["labels.json"]},
        ]
    }


def test_a_root_with_images_of_its_own_is_listed_as_dot(
    store: StudyStore, pool: ModelPool, tmp_path: Path
) -> None:
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "cat.png").read_bytes())
    client = app_for(store, pool, tmp_path)
    assert client.get("/v1/admin/folders", headers=ADMIN).json()["folders"] == [
        {"name": ".", "images": 1, "annotations": []}
    ]


def test_without_an_image_root_no_study_can_be_created(store: StudyStore, pool: ModelPool) -> None:
    client = app_for(store, pool, None)
    for response in (
        client.get("/v1/admin/folders", headers=ADMIN),
        client.post("/v1/studies", json=BODY, headers=ADMIN),
    ):
        assert response.status_code == 404 and "--study-images" in response.json()["detail"]


def test_creating_a_study_keeps_only_images_both_models_agree_on(study: dict) -> None:
    assert (study["state"], study["done"], study["total"], study["error"]) == ("ready", 4, 4, None)
    assert study["pairs"] == 4 and study["kept"] == 2  # cat and coffee, two methods each
    assert {s["image"]: s["reason"].split(":")[0] for s in study["skipped"]} == {
        "broken.png": "unreadable",
        "red.png": "the models disagree",
    }
    assert study["methods"] == ["gradcam", "guided-backprop"] and study["seed"] == 7
    assert (study["stronger_model"], study["weaker_model"], study["folder"]) == (STRONGER, WEAKER, "set1")
    assert study["rater_path"] == f"/studies/{study['id']}"
    assert study["results_path"] == f"/studies/{study['id']}/results"
    assert re.fullmatch(r"[A-Za-z0-9_-]{12}", study["id"])


def test_studies_are_listed_for_the_admin(client: TestClient, study: dict) -> None:
    listed = client.get("/v1/studies", headers=ADMIN).json()["studies"]
    assert study["id"] in [s["id"] for s in listed]


def test_annotations_filter_the_images(client: TestClient) -> None:
    created = create(client, {**BODY, "methods": ["gradcam"], "annotations": "labels.json"})
    assert (created["pairs"], created["kept"], created["annotations"]) == (1, 1, "labels.json")
    reasons = {s["image"]: s["reason"] for s in created["skipped"]}
    assert reasons["coffee.png"] == "both models say 'espresso', annotated 'tabby'"


@pytest.mark.parametrize(
    ("change", "status", "detail"),
    [
        ({"folder": "../set1"}, 404, "folder '../set1' not found; choose from empty, set1"),
        ({"folder": "set1/../set1"}, 404, "not found"),
        ({"folder": ".private"}, 404, "not found"),
        ({"folder": "/etc"}, 404, "not found"),
        ({"annotations": "../outside.json"}, 404, "annotations '../outside.json' not found in folder 'set1'"),
        ({"annotations": "cat.png"}, 404, "not found"),
        ({"weaker_model": STRONGER}, 422, "a study compares two models"),
        ({"weaker_model": "resnet18"}, 422, "not served"),
        ({"methods": ["gradcam", "nonesuch"]}, 422, "method 'nonesuch' not found"),
        ({"folder": "empty"}, 422, "folder 'empty': no images found"),
    ],
)
def test_bad_creations_are_refused(client: TestClient, change: dict, status: int, detail: str) -> None:
    response = client.post("/v1/studies", json={**BODY, **change}, headers=ADMIN)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


@pytest.mark.parametrize(
    "change",
    [
        {"methods": []},
        {"name": ""},
        {"seed": -1},
        {"max_images": 0},
        {"colour": "red"},
        {"methods": "gradcam"},
    ],
)
def test_malformed_bodies_are_422(client: TestClient, change: dict) -> None:
    assert client.post("/v1/studies", json={**BODY, **change}, headers=ADMIN).status_code == 422


def test_a_study_where_no_image_is_kept_is_not_stored(client: TestClient, store: StudyStore) -> None:
    before = len(store.list_studies())
    client.post("/v1/studies", json={**BODY, "folder": "empty"}, headers=ADMIN)
    assert len(store.list_studies()) == before


# ------------------------------------------------------------------------------------------ raters


def test_public_info_names_no_model(client: TestClient, study: dict) -> None:
    response = client.get(f"/v1/studies/{study['id']}")
    assert response.status_code == 200
    info = response.json()
    assert (info["name"], info["pairs"]) == ("Trust", 4)
    assert [(s["answer"], s["text"]) for s in info["scale"]] == [
        (2, "Robot A is clearly more reliable than Robot B"),
        (1, "Robot A is slightly more reliable than Robot B"),
        (0, "Robot A and Robot B are equally reliable"),
        (-1, "Robot A is slightly less reliable than Robot B"),
        (-2, "Robot A is clearly less reliable than Robot B"),
    ]
    assert "efficientnet" not in response.text and "lite" not in response.text


def test_a_rater_sees_every_pair_once_then_done(client: TestClient, store: StudyStore, study: dict) -> None:
    study_id = study["id"]
    rater = new_rater(client, study_id)
    seen = []
    while True:
        response = client.get(f"/v1/studies/{study_id}/next", headers=bearer(rater))
        assert response.status_code == 200
        shown = response.json()
        assert (shown["total"], shown["rated"], shown["remaining"]) == (4, len(seen), 4 - len(seen))
        if shown["done"]:
            break
        assert set(shown) == {
            "done",
            "total",
            "rated",
            "remaining",
            "pair",
            "class_index",
            "class",
            "robot_a",
            "robot_b",
        }
        assert (shown["class_index"], shown["class"]) in {(285, "Egyptian cat"), (967, "espresso")}
        for side in ("robot_a", "robot_b"):
            picture = Image.open(io.BytesIO(base64.b64decode(shown[side], validate=True)))
            assert picture.format == "PNG" and min(picture.size) >= 200
        assert shown["robot_a"] != shown["robot_b"]
        again = client.get(f"/v1/studies/{study_id}/next", headers=bearer(rater)).json()
        assert again["pair"] == shown["pair"]  # a reload shows the same pair
        stored = client.post(
            f"/v1/studies/{study_id}/ratings",
            json={"pair": shown["pair"], "answer": 1},
            headers=bearer(rater),
        )
        assert stored.status_code == 201
        assert stored.json() == {
            "pair": shown["pair"],
            "answer": 1,
            "total": 4,
            "rated": len(seen) + 1,
            "remaining": 3 - len(seen),
        }
        seen.append(shown["pair"])
    assert shown == {"done": True, "total": 4, "rated": 4, "remaining": 0, "pair": None, "class_index": None,
                     "class": None, "robot_a": None, "robot_b": None}  # fmt: skip
    assert sorted(seen) == sorted(sides(store, study_id))
    again = client.post(
        f"/v1/studies/{study_id}/ratings", json={"pair": seen[0], "answer": -2}, headers=bearer(rater)
    )
    assert again.status_code == 409 and "already rated" in again.json()["detail"]
    mine = [r for r in store.ratings(study_id) if r.rater == store.rater_of(study_id, rater)]
    assert len(mine) == 4 and {r.answer for r in mine} == {1}  # the refused answer was not stored


def test_rater_errors(client: TestClient, study: dict) -> None:
    study_id = study["id"]
    other = create(client, {**BODY, "methods": ["gradcam"], "max_images": 1})
    stranger = new_rater(client, other["id"])
    rater = new_rater(client, study_id)
    pair = client.get(f"/v1/studies/{study_id}/next", headers=bearer(rater)).json()["pair"]
    foreign_pair = client.get(f"/v1/studies/{other['id']}/next", headers=bearer(stranger)).json()["pair"]
    not_found = [
        client.get("/v1/studies/nope"),
        client.post("/v1/studies/nope/raters"),
        client.get("/v1/studies/nope/next", headers=bearer(rater)),
        client.post("/v1/studies/nope/ratings", json={"pair": pair, "answer": 0}, headers=bearer(rater)),
    ]
    assert [r.status_code for r in not_found] == [404] * len(not_found)
    not_a_rater = [
        client.get(f"/v1/studies/{study_id}/next"),
        client.get(f"/v1/studies/{study_id}/next", headers=bearer("nobody")),
        client.get(f"/v1/studies/{study_id}/next", headers=bearer(stranger)),  # a link of another study
        client.post(f"/v1/studies/{study_id}/ratings", json={"pair": pair, "answer": 0}),
        client.post(f"/v1/studies/{study_id}/ratings", json={"pair": pair, "answer": 0}, headers=bearer("x")),
        client.post(
            f"/v1/studies/{study_id}/ratings", json={"pair": pair, "answer": 0}, headers=bearer(stranger)
        ),
    ]
    assert [r.status_code for r in not_a_rater] == [401] * len(not_a_rater)
    assert all(r.headers["www-authenticate"] == "Bearer" for r in not_a_rater)
    not_served = [
        client.post(
            f"/v1/studies/{study_id}/ratings", json={"pair": foreign_pair, "answer": 0}, headers=bearer(rater)
        ),
        client.post(
            f"/v1/studies/{study_id}/ratings", json={"pair": "x" * 16, "answer": 0}, headers=bearer(rater)
        ),
    ]
    assert [r.status_code for r in not_served] == [409] * 2
    assert all("not the pair served" in r.json()["detail"] for r in not_served)
    for response in not_found + not_a_rater + not_served:
        assert isinstance(response.json()["detail"], str) and "\n" not in response.json()["detail"]
    for answer in (3, -3, 1.5, "1", True, None):
        body = {"pair": pair, "answer": answer}
        assert (
            client.post(f"/v1/studies/{study_id}/ratings", json=body, headers=bearer(rater)).status_code
            == 422
        )
    for body in ({"pair": pair}, {"pair": 7, "answer": 0}, {"rater": rater, "pair": pair, "answer": 0}):
        assert (
            client.post(f"/v1/studies/{study_id}/ratings", json=body, headers=bearer(rater)).status_code
            == 422
        )
    assert client.get(f"/v1/studies/{study_id}/next", headers=bearer(rater)).json()["rated"] == 0


def test_a_rater_credential_in_a_query_string_is_refused_not_read(client: TestClient, study: dict) -> None:
    # The finding: rater ids travelled in the query string, into access logs, and could be replayed.
    rater = new_rater(client, study["id"])
    for name in ("rater", "token", "access_token"):
        refused = client.get(f"/v1/studies/{study['id']}/next", params={name: rater})
        assert refused.status_code == 400 and "Authorization: Bearer" in refused.json()["detail"]
        alongside = client.get(f"/v1/studies/{study['id']}/next", params={name: rater}, headers=bearer(rater))
        assert alongside.status_code == 400  # refused even with the header: the URL already leaked it
    assert client.get(f"/v1/studies/{study['id']}/next", headers=bearer(rater)).status_code == 200


def test_an_invite_only_study_refuses_self_service_raters(client: TestClient, study: dict) -> None:
    # The finding: POST .../raters issued any number of rater ids, with no invitation and no limit.
    assert client.get(f"/v1/studies/{study['id']}").json()["open"] is False
    refused = client.post(f"/v1/studies/{study['id']}/raters")
    assert refused.status_code == 403 and "invitation only" in refused.json()["detail"]
    tokens = invited(client, study["id"], 3)
    assert len(set(tokens)) == 3 and all(len(t) >= 32 for t in tokens)
    for token in tokens:
        assert client.get(f"/v1/studies/{study['id']}/next", headers=bearer(token)).status_code == 200
    assert client.post(f"/v1/admin/studies/{study['id']}/invitations", json={"count": 3}).status_code == 401
    for count in (0, 10_001, "3", 2.5):
        body = {"count": count}
        response = client.post(f"/v1/admin/studies/{study['id']}/invitations", json=body, headers=ADMIN)
        assert response.status_code == 422, count
    assert (
        client.post("/v1/admin/studies/nope/invitations", json={"count": 1}, headers=ADMIN).status_code == 404
    )


def test_an_open_study_lets_a_client_join_a_few_times(store: StudyStore, pool: ModelPool, root: Path) -> None:
    settings = ServeSettings(
        models=pool.names, loader=lambda name, device=None: pool.get(name), db_url=store.url,
        admin_token=TOKEN, study_images=root, raters_per_client=3, rater_window_s=600,
    )  # fmt: skip
    client = TestClient(create_app(settings))
    opened = create(client, {**BODY, "methods": ["gradcam"], "max_images": 1, "open": True})
    assert opened["open"] is True and client.get(f"/v1/studies/{opened['id']}").json()["open"] is True
    joined = [client.post(f"/v1/studies/{opened['id']}/raters") for _ in range(3)]
    assert [r.status_code for r in joined] == [201] * 3
    tokens = [r.json()["token"] for r in joined]
    assert [r.json()["link"] for r in joined] == [f"/studies/{opened['id']}#{t}" for t in tokens]
    assert client.get(f"/v1/studies/{opened['id']}/next", headers=bearer(tokens[0])).status_code == 200
    limited = client.post(f"/v1/studies/{opened['id']}/raters")
    assert limited.status_code == 429 and 0 < int(limited.headers["retry-after"]) <= 600
    assert "3 raters" in limited.json()["detail"]
    # Other clients have their own allowance (TestClient's address is "testclient"; another one here).
    other = TestClient(create_app(settings), client=("192.0.2.7", 50000))
    assert other.post(f"/v1/studies/{opened['id']}/raters").status_code == 201
    assert store.study(opened["id"]).raters == 4


def test_concurrent_http_ratings_store_each_once(client: TestClient, store: StudyStore, study: dict) -> None:
    study_id = study["id"]
    raters = invited(client, study_id, 20)
    served = [client.get(f"/v1/studies/{study_id}/next", headers=bearer(r)).json()["pair"] for r in raters]
    before = len(store.ratings(study_id))
    barrier = threading.Barrier(30)

    def rate(i: int) -> int:
        k = i if i < 20 else 0  # ten more submissions from the first rater
        barrier.wait()
        body = {"pair": served[k], "answer": 0}
        return client.post(
            f"/v1/studies/{study_id}/ratings", json=body, headers=bearer(raters[k])
        ).status_code

    with ThreadPoolExecutor(30) as threads:
        codes = list(threads.map(rate, range(30)))
    assert sorted(codes) == [201] * 20 + [409] * 10
    assert len(store.ratings(study_id)) == before + 20


# --------------------------------------------------------------------------- creation as a background job


@pytest.fixture
def gate(pool: ModelPool) -> Iterator[threading.Event]:
    """While the event is clear, every forward of the two models waits for it (so rendering waits)."""
    event = threading.Event()

    def wait(module, args) -> None:  # a pre-hook that returns None leaves the inputs alone
        event.wait(120)

    handles = [pool.get(name).module.register_forward_pre_hook(wait) for name in pool.names]
    try:
        yield event
    finally:
        event.set()
        for handle in handles:
            handle.remove()


def test_creation_answers_at_once_and_the_state_progresses_to_ready(
    store: StudyStore, pool: ModelPool, root: Path, gate: threading.Event
) -> None:
    client = app_for(store, pool, root)
    body = {**BODY, "methods": ["gradcam"], "max_images": 1}
    started = time.perf_counter()
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 202 and time.perf_counter() - started < 30  # the models are held
    queued = response.json()
    assert (queued["state"], queued["pairs"], queued["total"]) == ("queued", 0, 4)
    rendering = wait_until(client, queued["id"], states=("rendering",))
    assert (rendering["done"], rendering["total"], rendering["pairs"]) == (0, 4, 0)
    assert queued["id"] in [s["id"] for s in client.get("/v1/studies", headers=ADMIN).json()["studies"]]
    # Raters cannot use a study that is not ready.
    for refused in (
        client.get(f"/v1/studies/{queued['id']}"),
        client.post(f"/v1/studies/{queued['id']}/raters"),
    ):
        assert refused.status_code == 409 and "rendering, 0 of 4 images" in refused.json()["detail"]
    gate.set()
    ready = wait_until(client, queued["id"])
    assert (ready["state"], ready["pairs"], ready["kept"], ready["error"]) == ("ready", 1, 1, None)
    assert ready["done"] == ready["total"] == 4
    assert client.get(f"/v1/studies/{queued['id']}").json()["pairs"] == 1


def test_the_queue_is_bounded(store: StudyStore, pool: ModelPool, root: Path, gate: threading.Event) -> None:
    client = app_for(store, pool, root, queue=1)
    body = {**BODY, "methods": ["gradcam"], "max_images": 1}
    running = client.post("/v1/studies", json=body, headers=ADMIN).json()
    wait_until(client, running["id"], states=("rendering",))  # the worker has taken it off the queue
    waiting = client.post("/v1/studies", json=body, headers=ADMIN)
    assert waiting.status_code == 202 and waiting.json()["state"] == "queued"
    before = len(store.list_studies())
    refused = client.post("/v1/studies", json=body, headers=ADMIN)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert "waiting to be rendered" in refused.json()["detail"]
    assert len(store.list_studies()) == before  # a refused study is not stored
    gate.set()
    assert wait_until(client, running["id"])["state"] == "ready"
    assert wait_until(client, waiting.json()["id"])["state"] == "ready"


def test_a_failed_rendering_shows_its_error(store: StudyStore, pool: ModelPool, tmp_path: Path) -> None:
    (tmp_path / "disagree").mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "disagree" / "red.png")
    client = app_for(store, pool, tmp_path)
    response = client.post("/v1/studies", json={**BODY, "folder": "disagree"}, headers=ADMIN)
    assert response.status_code == 202
    failed = wait_until(client, response.json()["id"])
    assert failed["state"] == "failed" and failed["pairs"] == 0
    assert failed["error"].startswith("folder 'disagree': no image is classified alike by both models")
    assert "red.png: the models disagree" in failed["error"] and "\n" not in failed["error"]
    refused = client.get(f"/v1/studies/{failed['id']}")
    assert refused.status_code == 409 and refused.json()["detail"].endswith(failed["error"])


def test_a_restart_fails_the_studies_left_unfinished(store: StudyStore, pool: ModelPool, root: Path) -> None:
    left = store.create_study(
        name="left", stronger_model=STRONGER, weaker_model=WEAKER, methods=["gradcam"], folder="set1",
        seed=1, state="rendering", total=4,
    )  # fmt: skip
    with app_for(store, pool, root) as restarted:  # runs the lifespan: the server starting again
        view = restarted.get(f"/v1/admin/studies/{left.id}", headers=ADMIN).json()
    assert view["state"] == "failed" and "restarted" in view["error"]


# ----------------------------------------------------------------------------------------- results


def test_results_score_from_the_stronger_side(
    client: TestClient, store: StudyStore, pool: ModelPool, root: Path
) -> None:
    created = create(client, {**BODY, "methods": ["gradcam"], "seed": 3})
    study_id = created["id"]
    side = sides(store, study_id)
    answers = [2, 1, -1]  # three raters, each gives the same answer to both pairs
    for answer in answers:
        rater = new_rater(client, study_id)
        while not (shown := client.get(f"/v1/studies/{study_id}/next", headers=bearer(rater)).json())["done"]:
            body = {"pair": shown["pair"], "answer": answer}
            assert (
                client.post(f"/v1/studies/{study_id}/ratings", json=body, headers=bearer(rater)).status_code
                == 201
            )
    scores = [a if side[p] == "A" else -a for a in answers for p in side]  # by hand, from the stored sides
    results = client.get(f"/v1/studies/{study_id}/results", headers=ADMIN)
    assert results.status_code == 200
    body = results.json()
    [method] = body["methods"]
    assert (body["ratings"], body["raters"], body["stronger_model"]) == (6, 3, STRONGER)
    assert (method["method"], method["ratings"], method["raters"], method["pairs"]) == ("gradcam", 6, 3, 2)
    assert method["mean"] == pytest.approx(sum(scores) / 6)
    assert method["ci_low"] <= method["mean"] <= method["ci_high"]
    assert method["counts"] == {str(s): scores.count(s) for s in (-2, -1, 0, 1, 2)}
    csv_response = client.get(f"/v1/studies/{study_id}/ratings.csv", headers=ADMIN)
    assert csv_response.status_code == 200 and csv_response.headers["content-type"].startswith("text/csv")
    assert f'filename="study-{study_id}-ratings.csv"' in csv_response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert len(rows) == 6
    assert sorted(int(r["score"]) for r in rows) == sorted(scores)
    assert all(int(r["score"]) == (1 if r["stronger_side"] == "A" else -1) * int(r["answer"]) for r in rows)
    # A restart: a new store and app on the same database file still has every rating.
    with StudyStore(store.url) as reopened:
        restarted = app_for(reopened, pool, root)
        assert restarted.get(f"/v1/studies/{study_id}/results", headers=ADMIN).json() == body


def test_results_of_a_study_without_ratings(client: TestClient, study: dict) -> None:
    fresh = create(client, {**BODY, "methods": ["gradcam"], "max_images": 1})
    body = client.get(f"/v1/studies/{fresh['id']}/results", headers=ADMIN).json()
    assert body["methods"][0] | {"counts": None} == {
        "method": "gradcam", "pairs": 1, "ratings": 0, "raters": 0, "mean": None, "ci_low": None,
        "ci_high": None, "ci_note": "no ratings yet", "counts": None,
    }  # fmt: skip
    assert client.get("/v1/studies/nope/results", headers=ADMIN).status_code == 404
    assert client.get("/v1/studies/nope/ratings.csv", headers=ADMIN).status_code == 404


# ------------------------------------------------------------------------------------ documentation


def test_openapi_documents_every_route_and_error(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    expected = {
        ("/v1/admin/folders", "get"): {"200", "401", "403", "404", "422", "503"},
        ("/v1/studies", "post"): {"202", "401", "403", "404", "422", "503"},
        ("/v1/studies", "get"): {"200", "401", "403", "422", "503"},
        ("/v1/admin/studies/{study_id}", "get"): {"200", "401", "403", "404", "422", "503"},
        ("/v1/admin/studies/{study_id}/invitations", "post"): {
            "201",
            "401",
            "403",
            "404",
            "409",
            "422",
            "503",
        },
        ("/v1/studies/{study_id}", "get"): {"200", "404", "409", "422", "503"},
        ("/v1/studies/{study_id}/raters", "post"): {"201", "403", "404", "409", "422", "429", "503"},
        ("/v1/studies/{study_id}/next", "get"): {"200", "400", "401", "404", "409", "422", "503"},
        ("/v1/studies/{study_id}/ratings", "post"): {"201", "400", "401", "404", "409", "422", "503"},
        ("/v1/studies/{study_id}/results", "get"): {"200", "401", "403", "404", "422", "503"},
        ("/v1/studies/{study_id}/ratings.csv", "get"): {"200", "401", "403", "404", "422", "503"},
    }
    for (path, method), codes in expected.items():
        assert set(paths[path][method]["responses"]) == codes, (path, method)
    assert "text/csv" in paths["/v1/studies/{study_id}/ratings.csv"]["get"]["responses"]["200"]["content"]
    assert paths["/v1/studies/{study_id}/ratings"]["post"]["responses"]["409"]["content"]["application/json"]
    components = schema["components"]["schemas"]
    assert {"class", "robot_a", "robot_b", "done", "remaining"} <= set(components["NextPair"]["properties"])
    assert components["RatingIn"]["properties"]["answer"]["minimum"] == -2
    assert components["RatingIn"]["properties"]["answer"]["maximum"] == 2
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_the_rater_page_takes_its_scale_from_the_api() -> None:
    # The scale is written once (gradcam.study.scale): the page has no copy, its script builds one
    # button per step of the API's `scale` (driven in a real browser by test_web_e2e.py).
    page = (STATIC / "study.html").read_text(encoding="utf-8")
    script = (STATIC / "study.js").read_text(encoding="utf-8")
    assert "data-answer=" not in page and 'data-testid="answers"' in page
    for _, text in SCALE:
        assert text not in page and text not in script
    assert "info.scale" in script and "dataset.answer" in script


@pytest.mark.parametrize(
    ("page", "script", "ids"),
    [
        (
            "study.html",
            "study.js",
            {"robot-a", "robot-b", "class-name", "answers", "done", "progress"},
        ),
        (
            "results.html",
            "results.js",
            {"results-table", "token-input", "token-submit", "csv-download", "error", "state"},
        ),
    ],
)
def test_pages_are_valid_html_and_self_contained(page: str, script: str, ids: set[str]) -> None:
    text = (STATIC / page).read_text(encoding="utf-8")
    parser = html5lib.HTMLParser(
        strict=True, tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False
    )
    tree = parser.parse(text)  # raises on any HTML5 parse error
    assert ids <= {e.get("data-testid") for e in tree.iter() if e.get("data-testid")}
    static = f"../{'../' * (page == 'results.html')}static/"
    assert [e.get("src") for e in tree.iter("script")] == [f"{static}studypage.js", f"{static}{script}"]
    for name in (page, "studypage.js", script):  # no external URLs: the server may have no network
        assert not re.search(r"https?://", (STATIC / name).read_text(encoding="utf-8"))
