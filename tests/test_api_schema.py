"""The HTTP API does what its OpenAPI document says: schemathesis drives the real ``exchange-listener
api`` process (real Redis) from the committed document, and the server serves exactly that document.

Checks: every response conforms to the documented schema, status code, content type and headers,
no 5xx, data outside the schema is refused, and a request without the token is refused.
Not checked here: ``positive_data_acceptance`` (a schema-valid string is not always a Message-ID
or an email address; the server's own 400 names the field, tests/test_api.py covers those), and
the open-ended event stream (an endless response; tests/test_api.py reads it).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from emulators.services import CliProcess, free_port, service_env, wait_for
from exchange_listener.api.access import hash_token

COMMITTED = Path(__file__).resolve().parents[1] / "exchange_listener" / "api" / "openapi.json"
TOKEN = "schema-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_url(redis_server, tmp_path_factory):
    port = free_port()
    env = service_env(redis_server.url, "", api_listen=f"127.0.0.1:{port}", api_tokens=hash_token(TOKEN),
                      api_rate_per_second=10_000, log_level="warning")
    proc = CliProcess(["api"], env, tmp_path_factory.mktemp("api") / "api.log")
    try:
        wait_for(lambda: any("API serving" in line.get("event", "") for line in proc.lines()) or not proc.alive(),
                 timeout=20, message="the API serving")
        assert proc.alive(), proc.lines()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


# loaded at import (schemathesis's fixture-based lazy schema does not run under pytest 9); the
# server's address is given per call
schema = schemathesis.openapi.from_path(COMMITTED).exclude(path="/v1/transitions/stream")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_to_the_document(case, api_url):
    wait = (case.query or {}).get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0.2:
        case.query["wait"] = 0.2  # a valid long-poll, shortened to keep this file fast (test_api.py waits)
    case.call_and_validate(base_url=api_url, headers=AUTH, excluded_checks=[positive_data_acceptance], timeout=10)


def test_the_served_document_is_the_committed_one(api_url):
    served = requests.get(f"{api_url}/v1/openapi.json", timeout=10)  # no token needed
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.content == COMMITTED.read_bytes()
    document = json.loads(COMMITTED.read_text())
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == {("POST", "/v1/sends"), ("GET", "/v1/sends/{message_id}"),
                          ("GET", "/v1/enrollments/{enrollment_id}"), ("POST", "/v1/enrollments/{enrollment_id}/resume"),
                          ("GET", "/v1/transitions"), ("GET", "/v1/transitions/stream"), ("GET", "/healthz"),
                          ("GET", "/metrics"), ("GET", "/v1/openapi.json")}
