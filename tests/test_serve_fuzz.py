"""Property-based fuzzing of `calm serve` from its own OpenAPI schema (schemathesis) over a real
socket: no 5xx but the documented 503s, status codes and content types as the schema declares.
Bounded (a few dozen cases per operation) so that it runs in seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from calm.serve.app import ServeConfig, create_app  # noqa: E402
from tests.helpers.serve_app import LiveServer, tiny_predictor  # noqa: E402

MAX_EXAMPLES = 40
# raw audio bodies are bytes, as for application/octet-stream
schemathesis.serializer.alias("audio/*", "application/octet-stream")
APP = create_app(tiny_predictor(), ServeConfig(max_upload_mb=1, body_timeout_s=5, request_timeout_s=20))
schema = schemathesis.openapi.from_dict(APP.openapi())  # no request: the lifespan runs once, in live


@pytest.fixture(scope="module")
def live():
    with LiveServer(APP) as server:
        yield server


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_documented_answers(case, live):
    response = case.call(base_url=live.url, timeout=30)
    status = response.status_code
    assert status < 500 or status == 503, (status, response.text[:500])
    if status >= 400:
        assert response.json().get("error", {}).get("status") == status, response.text
    case.validate_response(
        response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance]
    )
