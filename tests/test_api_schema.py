"""The HTTP API does what its OpenAPI document says: schemathesis drives the real ``exchange-listener
api`` process (real Redis) from the committed document, and the server serves exactly that document.

Checks: every response conforms to the documented schema, status code, content type and headers,
no 5xx, data outside the schema is refused, and a request without the token is refused. The
response schemas are strict (no undeclared field, every field the server always writes required),
so a field the server starts to send, or stops sending, without the document saying so fails
here: real answers of every kind are validated and then altered by one field.
Not checked here: ``positive_data_acceptance`` (a schema-valid string is not always a Message-ID
or an email address; the server's own 400 names the field, tests/test_api.py covers those), and
the open-ended event stream (an endless response; tests/test_api.py reads it).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from emulators.services import CliProcess, free_port, service_env, wait_for
from exchange_listener.api.access import hash_token
from exchange_listener.core import keys
from workers.state.enrollments import EnrollmentStore

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
    assert requests.get(f"{api_url}/v1/openapi.json", timeout=10).status_code == 401  # the token is needed
    served = requests.get(f"{api_url}/v1/openapi.json", headers=AUTH, timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.content == COMMITTED.read_bytes()
    document = json.loads(COMMITTED.read_text())
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == {("POST", "/v1/sends"), ("GET", "/v1/sends/{message_id}"),
                          ("GET", "/v1/enrollments/{enrollment_id}"), ("POST", "/v1/enrollments/{enrollment_id}/resume"),
                          ("GET", "/v1/transitions"), ("GET", "/v1/transitions/stream"), ("GET", "/healthz"),
                          ("GET", "/metrics"), ("GET", "/v1/openapi.json")}


def altered(response: requests.Response, change) -> requests.Response:
    """The same answer with its JSON body changed by ``change(body)``."""
    body = response.json()
    change(body)
    other = copy.copy(response)
    other._content = json.dumps(body).encode()
    other.headers = requests.structures.CaseInsensitiveDict(
        {k: v for k, v in response.headers.items() if k.lower() != "content-length"})
    return other


def test_real_answers_keep_to_the_strict_document_and_a_drifted_one_does_not(api_url, redis_client):
    document = schemathesis.openapi.from_path(COMMITTED)
    given = {"message_id": "<id-1@mail.example>", "enrollment": "e-42", "sequence": "q3", "mailbox": "rep@us.example",
             "to": ["pat@prospect.example"], "cc": "cc@us.example"}
    recorded = requests.post(f"{api_url}/v1/sends", json=given, headers=AUTH, timeout=10)
    store = EnrollmentStore(redis_client)
    store.transition("e-42", "paused", "out_of_office", event_key="ooo:1", until="2099-01-01",
                     message_id="<r1@prospect.example>")
    store.resume("e-42", "ops:kim")
    store.transition("e-42", "stopped", "replied", event_key="reply:1", message_id="<r2@prospect.example>")
    sent = requests.get(f"{api_url}/v1/sends/%3Cid-1%40mail.example%3E", headers=AUTH, timeout=10)
    enrollment = requests.get(f"{api_url}/v1/enrollments/e-42", headers=AUTH, timeout=10)
    assert enrollment.json()["prospect"] == "pat@prospect.example" and len(enrollment.json()["history"]) == 3
    page = requests.get(f"{api_url}/v1/transitions", headers=AUTH, timeout=10)
    redis_client.xtrim(keys.TRANSITIONS, maxlen=1, approximate=False)
    expired = requests.get(f"{api_url}/v1/transitions", params={"after": "0-0"}, headers=AUTH, timeout=10)
    resumed = requests.post(f"{api_url}/v1/enrollments/e-42/resume", json={"force": True}, headers=AUTH, timeout=10)
    conflict = requests.post(f"{api_url}/v1/sends", json={**given, "enrollment": "e-7"}, headers=AUTH, timeout=10)
    health = requests.get(f"{api_url}/healthz", timeout=10)
    answers = {("POST", "/v1/sends"): (recorded, 201), ("GET", "/v1/sends/{message_id}"): (sent, 200),
               ("GET", "/v1/enrollments/{enrollment_id}"): (enrollment, 200),
               ("GET", "/v1/transitions"): (page, 200), ("POST", "/v1/enrollments/{enrollment_id}/resume"): (resumed, 200),
               ("GET", "/healthz"): (health, 200)}
    for (method, path), (response, status) in answers.items():
        assert response.status_code == status, (path, response.text)
        operation = document[path][method]
        assert operation.is_valid_response(response), (path, response.text)
        assert not operation.is_valid_response(altered(response, lambda body: body.update(undeclared=1))), path
    assert expired.status_code == 410 and conflict.status_code == 400
    for response in (expired, conflict):
        assert document["/v1/transitions" if response is expired else "/v1/sends"][
            response.request.method].is_valid_response(response), response.text
    transitions = document["/v1/transitions"]["GET"]
    assert not transitions.is_valid_response(altered(expired, lambda body: body.update(hint="x")))
    assert not transitions.is_valid_response(altered(page, lambda body: body["transitions"][0].update(extra=1)))
    enrollments = document["/v1/enrollments/{enrollment_id}"]["GET"]
    assert not enrollments.is_valid_response(altered(enrollment, lambda body: body.pop("prospect")))
    assert not enrollments.is_valid_response(altered(enrollment, lambda body: body["history"][0].update(extra=1)))
    assert not document["/v1/enrollments/{enrollment_id}/resume"]["POST"].is_valid_response(
        altered(resumed, lambda body: body.update(history=[])))
