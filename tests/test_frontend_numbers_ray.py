"""``gradcam explain FOLDER --engine ray``: the maps the Ray actors write, against Grad-CAM derived in the
test (hook + autograd, float64), not against the local engine (which shares the engine's code). One small
run on the Ray instance of test_ray_engine.py; model, pictures and oracle from test_frontend_numbers.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_frontend_numbers import (  # noqa: F401 (tiny and folder are fixtures)
    KEYS,
    LABELS,
    LAYER,
    assert_discriminating,
    assert_map,
    by_key,
    check_summary,
    cli,
    errors_of,
    folder,
    inputs_of,
    logits_of,
    manifest,
    oracle,
    tiny,
)
from test_ray_engine import ray_instance  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


def test_ray_engine_writes_the_hand_derived_maps(ray_instance, tiny, folder, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "out"
    result = cli(
        "explain", folder, "-m", tiny[0], "--layer", LAYER, "--engine", "ray", "--topk", "2",
        "--batch-size", "2", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the corrupt file, listed; every other image explained
    summary, records = json.loads(result.stdout), manifest(out)
    check_summary(summary, records, out)
    assert summary["errors"] == 1 and [e["key"] for e in errors_of(out)] == ["sub/broken.png"]
    keys = sorted(KEYS)
    x = inputs_of([KEYS[k] for k in keys])
    logits = logits_of(tiny[1], x)
    ranking = logits.argsort(dim=1, descending=True)[:, :2].tolist()
    grouped = by_key(records)
    assert set(grouped) == set(KEYS)
    written = [r for k in keys for r in grouped[k]]
    for row, key in enumerate(keys):
        assert [r["target"] for r in grouped[key]] == ranking[row]
    for r in written:
        row = keys.index(r["key"])
        assert r["class"] == LABELS[r["target"]]
        assert r["probability"] == pytest.approx(float(logits[row].softmax(dim=0)[r["target"]]), abs=2e-6)
    expected = oracle(tiny[1], x[[keys.index(r["key"]) for r in written]], [r["target"] for r in written])
    assert_discriminating(expected)
    for r, wanted in zip(written, expected, strict=True):
        raw = np.load(out / r["files"]["map"])
        assert raw.dtype == np.float32
        assert_map(raw, wanted, f"ray: {r['key']} class {r['target']}")
