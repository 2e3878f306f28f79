"""Schema-driven fuzzing of the whole OpenAPI spec (schemathesis): no input gives a 500, every status and
body is the one the schema documents."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gradcam import models
from gradcam.serve.app import ServeSettings, create_app

TOKEN = "fuzz-admin-token-0123456789"


def random_weights(name: str, device: str | None = None) -> models.LoadedModel:
    return models.load(name, pretrained=False, device=device)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    images = tmp_path_factory.mktemp("study-images")
    (images / "empty").mkdir()
    app = create_app(
        ServeSettings(
            models=["efficientnet-lite0"],
            loader=random_weights,
            db_url=f"sqlite:///{tmp_path_factory.mktemp('db') / 'study.db'}",
            admin_token=TOKEN,
            study_images=images,
            max_upload=1024 * 1024,
        )
    )
    with TestClient(app):  # runs the lifespan: models loaded, worker pool up
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_input_breaks_the_service(api_schema):
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.
    labels = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            # Every check but "schema-valid data is accepted": no schema can say that bytes must decode as
            # an image, so random uploads are rightly refused (415/422, which are documented).
            case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=[positive_data_acceptance]
            )

        fuzz()
    assert "POST /v1/explain" in labels and "POST /v1/compare" in labels and len(labels) >= 8
