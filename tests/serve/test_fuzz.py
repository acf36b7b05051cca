"""Property-based fuzzing of the HTTP API from its own OpenAPI schema: whatever the body, valid
or not, the server answers without a 5xx, and every error is in the OpenAI shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir, start_server):
    srv = start_server(tiny_model_dir, "--max-model-len", "128", "--served-model-name", "tiny")
    return schemathesis.openapi.from_url(srv.base_url + "/openapi.json")


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_covers_the_api(api_schema):
    paths = {(op.method.upper(), op.path) for op in _operations(api_schema)}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= paths


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/models/{model_id}"])
def test_no_server_errors(api_schema, path):
    (operation,) = [op for op in _operations(api_schema) if op.path == path]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        response = case.call(timeout=120)
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
