"""The HTTP API (``exchange-listener api``) over real HTTP, against a real redis-server.

Most tests serve the real application in this process (aiohttp on a free port, in a thread of its
own) and call it with ``requests``; the process tests run the real ``exchange-listener api`` command
with its settings in the environment and a token hashed by ``exchange-listener api hash-token``.
Enrollment state is made by ``EnrollmentStore.transition``, as workers make it.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests
from aiohttp import web

from emulators.services import CliProcess, free_port, service_env, wait_for
from exchange_listener.api.access import RateLimiter, hash_token
from exchange_listener.api.server import create_app
from exchange_listener.core import config, keys
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

TOKEN = "test-token-6f1d0c2e9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"


def send(message_id: str, enrollment: str = "e1", **more) -> dict:
    return {"message_id": message_id, "enrollment": enrollment, "sequence": "seq-1", "mailbox": "rep@us.example",
            "to": ["pat@prospect.example"], **more}


class Api:
    """The real application served by aiohttp on a free port, in a thread with its own loop."""

    def __init__(self, redis_url: str, **settings):
        self.port = free_port()
        env = {config.env_name(k): str(v) for k, v in {
            "redis_url": redis_url, "api_listen": f"127.0.0.1:{self.port}", "api_tokens": hash_token(TOKEN),
            "api_rate_per_second": 1000, **settings}.items()}
        self.settings = config.load(env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the API did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(create_app(self.settings), access_log=None, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=kw.pop("timeout", 10),
                            **kw)

    def post(self, path: str, body=None, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, headers={**AUTH, **kw.pop("headers", {})},
                             timeout=kw.pop("timeout", 10), **kw)


@pytest.fixture
def start_api(redis_server, redis_client):
    started: list[Api] = []

    def start(**settings) -> Api:
        started.append(Api(redis_server.url, **settings))
        return started[-1]

    yield start
    for api in started:
        api.stop()


@pytest.fixture
def api(start_api) -> Api:
    return start_api()


def stored(conn) -> list[bytes]:
    """Every key but the API processes' own heartbeat."""
    return sorted(k for k in conn.keys("*") if k != keys.API_PROCESSES.encode())


def problem(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:exchange-listener:problem:")
    assert body["title"] and body["detail"]
    return body


# -- auth ----------------------------------------------------------------------------------------
def test_every_request_but_health_needs_a_known_token(api):
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/sends/a@b.example"), ("GET", "/metrics"), ("POST", "/v1/sends"),
                             ("GET", "/v1/transitions"), ("GET", "/v1/openapi.json"), ("GET", "/nowhere")):
            response = requests.request(method, api.url + path, headers=headers, timeout=10)
            body = problem(response, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in response.text and "wrong-token" not in response.text
    health = requests.get(api.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "redis": "ok"}
    assert api.get("/v1/openapi.json").json()["openapi"].startswith("3.1")  # with the token, as every request
    assert body["type"].endswith(":unauthorized")


def test_metrics_count_requests_by_route(api):
    api.get("/v1/sends/nobody@us.example")
    text = api.get("/metrics").text
    assert 'el_api_requests_total{method="GET",route="/v1/sends/{message_id}",status="404"}' in text


# -- sends ---------------------------------------------------------------------------------------
def test_record_one_send_and_read_it_back_by_its_encoded_id(api, redis_client):
    response = api.post("/v1/sends", send("<a/b+c@US.example>", cc="cc@us.example"))
    assert response.status_code == 201 and response.json() == {"recorded": 1}
    for given in ("<a/b+c@US.example>", "a/b+c@us.example", "<a/b+c@us.example>"):
        found = api.get("/v1/sends/" + urllib.parse.quote(given, safe=""))
        assert found.status_code == 200, (given, found.text)
        assert found.json()["message_ids"] == ["<a/b+c@us.example>"]
        assert found.json()["enrollment_id"] == "e1" and found.json()["cc"] == ["cc@us.example"]
    assert EnrollmentStore(redis_client).get("e1")["status"] == "active"
    problem(api.get("/v1/sends/" + urllib.parse.quote("<nobody@us.example>", safe="")), 404)
    assert problem(api.get("/v1/sends/not-an-id"), 400)["field"] == "message_id"


def test_record_a_batch(api, redis_client):
    batch = [send(f"<m{i}@us.example>", f"e{i % 3}") for i in range(10)]
    batch[4]["message_ids"] = ["<server-assigned-4@ses.example>"]
    response = api.post("/v1/sends", batch)
    assert response.status_code == 201 and response.json() == {"recorded": 10}
    registry = SendRegistry(redis_client)
    assert registry.get("<server-assigned-4@ses.example>").message_ids == ("<m4@us.example>",
                                                                            "<server-assigned-4@ses.example>")
    assert {registry.get(f"<m{i}@us.example>").enrollment_id for i in range(10)} == {"e0", "e1", "e2"}
    assert api.post("/v1/sends", batch).json() == {"recorded": 10}  # the same again changes nothing
    assert len(redis_client.keys(keys.send("*"))) == 11


@pytest.mark.parametrize("bad, field", [
    ({"to": ["not an address"]}, "to"),
    ({"enrollment": 7}, "enrollment"),
    ({"message_id": "no-at-sign"}, "message_id"),
    ({"sent_at": "yesterday"}, "sent_at"),
    ({"sned_at": "2026-01-01"}, "sned_at"),
])
def test_a_bad_item_in_a_batch_stores_nothing_and_names_field_and_index(api, redis_client, bad, field):
    batch = [send("<ok1@us.example>"), send("<ok2@us.example>", "e2"), {**send("<bad@us.example>", "e3"), **bad}]
    body = problem(api.post("/v1/sends", batch), 400)
    assert body["field"] == field and body["index"] == 2, body
    assert stored(redis_client) == []
    single = problem(api.post("/v1/sends", {**send("<bad@us.example>"), **bad}), 400)
    assert single["field"] == field and "index" not in single


def test_a_message_id_of_another_enrollment_is_a_400_naming_the_field_and_stores_nothing(api, redis_client):
    assert api.post("/v1/sends", send("<taken@us.example>", "e1")).status_code == 201
    before = stored(redis_client)
    body = problem(api.post("/v1/sends", [send("<new@us.example>", "e2"), send("<taken@us.example>", "e3")]), 400)
    assert body["type"].endswith(":send-conflict")
    assert body["index"] == 1 and body["field"] == "message_id" and "'e1'" in body["detail"]
    assert "<taken@us.example>" in body["detail"]
    assert stored(redis_client) == before  # e2's send and enrollment were not written
    # the taken id given as a further id of the send: message_ids is the field at fault
    extra = send("<fresh@us.example>", "e4", message_ids=["<other@ses.example>", "<taken@US.example>"])
    body = problem(api.post("/v1/sends", extra), 400)
    assert body["field"] == "message_ids" and "index" not in body and "'e1'" in body["detail"]
    # two items of one request claiming one id for different enrollments: nothing of either is stored
    body = problem(api.post("/v1/sends", [send("<dup@us.example>", "e5"), send("<dup@us.example>", "e6")]), 400)
    assert body["index"] == 1 and body["field"] == "message_id" and "'e5'" in body["detail"]
    assert stored(redis_client) == before


def test_at_most_250_sends_a_request(api, redis_client):
    too_many = [send(f"<m{i}@us.example>", f"e{i}") for i in range(251)]
    body = problem(api.post("/v1/sends", too_many), 400)
    assert body["type"].endswith(":too-many-sends") and "251" in body["detail"] and "250" in body["detail"]
    assert stored(redis_client) == []
    assert api.post("/v1/sends", too_many[:250]).json() == {"recorded": 250}


def test_malformed_bodies_are_problems(api, redis_client):
    for raw in (b"{not json", b"\xff\xfe", b"", b"[]"):
        body = problem(requests.post(api.url + "/v1/sends", data=raw, headers=AUTH, timeout=10), 400)
        assert body["type"].endswith(":invalid-json") or raw == b"[]"
    assert problem(api.post("/v1/sends", ["a string"]), 400)["index"] == 0
    assert stored(redis_client) == []


def test_a_body_over_the_limit_is_413(start_api, redis_client):
    api = start_api(api_max_body_bytes=2048)
    big = [send(f"<m{i}@us.example>") for i in range(40)]
    assert len(json.dumps(big)) > 2048
    problem(api.post("/v1/sends", big), 413)
    assert stored(redis_client) == []
    assert api.post("/v1/sends", big[:3]).status_code == 201


def test_a_chunked_body_over_the_limit_is_413(start_api, redis_client):
    """No Content-Length to refuse up front: the limit holds while the body is read."""
    api = start_api(api_max_body_bytes=2048)
    raw = json.dumps([send(f"<m{i}@us.example>") for i in range(40)]).encode()
    assert len(raw) > 2048

    def chunks(data: bytes):
        for start in range(0, len(data), 512):
            yield data[start:start + 512]

    response = requests.post(api.url + "/v1/sends", data=chunks(raw), timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request.headers
    assert problem(response, 413)["type"].endswith(":body-too-large")
    assert stored(redis_client) == []
    small = json.dumps([send("<ok@us.example>")]).encode()
    response = requests.post(api.url + "/v1/sends", data=chunks(small), timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 201, response.text


def test_unknown_route_and_wrong_method_are_problems(api):
    problem(api.get("/v1/nothing-here"), 404)
    wrong = problem(requests.delete(api.url + "/v1/transitions", headers=AUTH, timeout=10), 405)
    assert "GET" in wrong["detail"]
    assert problem(api.get("/v1/sends"), 405)


def test_rate_limit_per_token_is_429_with_retry_after(start_api):
    api = start_api(api_rate_per_second=1)
    codes = [api.get("/v1/transitions").status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[-1] == 429  # a burst of two, then refused
    refused = api.get("/v1/transitions")
    problem(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert requests.get(api.url + "/healthz", timeout=10).status_code == 200  # not limited
    time.sleep(1.1)
    assert api.get("/v1/transitions").status_code == 200


def test_a_rate_below_one_every_two_seconds_still_lets_requests_through(start_api):
    """A bucket of 2 * 0.4 = 0.8 tokens never held the one a request spends: the burst is at least one."""
    api = start_api(api_rate_per_second=0.4)
    assert api.get("/v1/transitions").status_code == 200
    refused = api.get("/v1/transitions")
    problem(refused, 429)
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 3  # 1 / 0.4 = 2.5 s until the next token
    time.sleep(wait)
    assert api.get("/v1/transitions").status_code == 200


def test_the_token_bucket_at_low_rates():
    now = [100.0]
    limiter = RateLimiter(0.4, clock=lambda: now[0])
    assert limiter.take("t") == 0
    assert limiter.take("t") == pytest.approx(2.5)
    now[0] += 2.5
    assert limiter.take("t") == 0
    now[0] += 3600  # an idle hour refills to the burst of one, not more
    assert limiter.take("t") == 0 and limiter.take("t") > 0


# -- enrollments -----------------------------------------------------------------------------------
def test_enrollment_with_history(api, redis_client):
    api.post("/v1/sends", send("<m@us.example>", "e1"))
    store = EnrollmentStore(redis_client)
    store.transition("e1", "paused", "out_of_office", event_key="ooo:1", until="2099-01-01")
    store.transition("e1", "stopped", "replied", event_key="reply:1", message_id="<r@prospect.example>")
    body = api.get("/v1/enrollments/e1").json()
    assert body["status"] == "stopped" and body["reason"] == "replied" and body["version"] == 2
    assert [(t["status"], t["reason"]) for t in body["history"]] == [("paused", "out_of_office"), ("stopped", "replied")]
    problem(api.get("/v1/enrollments/nobody"), 404)
    store.ensure("team/a b")  # ids with a slash and a space, percent-encoded
    assert api.get("/v1/enrollments/" + urllib.parse.quote("team/a b", safe="")).json()["enrollment_id"] == "team/a b"


def test_resume(api, redis_client):
    store = EnrollmentStore(redis_client)
    store.transition("paused-one", "paused", "out_of_office", event_key="ooo:1", until="2099-01-01")
    store.transition("stopped-one", "stopped", "replied", event_key="reply:1")
    resumed = api.post("/v1/enrollments/paused-one/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    assert resumed.json()["reason"] == "resumed" and resumed.json()["by"] == "api"
    again = problem(api.post("/v1/enrollments/paused-one/resume"), 409)
    assert again["enrollment_status"] == "active" and "already active" in again["detail"]
    stopped = problem(api.post("/v1/enrollments/stopped-one/resume"), 409)
    assert stopped["enrollment_status"] == "stopped" and "force" in stopped["detail"]
    assert store.get("stopped-one")["status"] == "stopped"
    forced = api.post("/v1/enrollments/stopped-one/resume", {"force": True, "by": "ops:kim"})
    assert forced.status_code == 200 and forced.json()["status"] == "active" and forced.json()["by"] == "ops:kim"
    problem(api.post("/v1/enrollments/nobody/resume"), 404)
    assert problem(api.post("/v1/enrollments/stopped-one/resume", {"forse": True}), 400)["field"] == "forse"
    assert redis_client.exists(keys.enrollment("nobody")) == 0


# -- transitions -----------------------------------------------------------------------------------
def make_transitions(store: EnrollmentStore, count: int, prefix: str = "t") -> None:
    for i in range(count):
        store.transition(f"{prefix}{i}", "stopped", "replied", event_key=f"reply:{i}")


def test_cursor_pages_continue_exactly(api, redis_client):
    store = EnrollmentStore(redis_client)
    first = api.get("/v1/transitions").json()
    assert first == {"transitions": [], "next": "0-0"}
    make_transitions(store, 23)
    seen, cursor = [], None
    while True:
        page = api.get("/v1/transitions", params={"limit": 5, **({"after": cursor} if cursor else {})}).json()
        if not page["transitions"]:
            assert page["next"] == cursor
            break
        assert len(page["transitions"]) <= 5 and page["next"] == page["transitions"][-1]["cursor"]
        seen += page["transitions"]
        cursor = page["next"]
    stream_ids = [i.decode() for i, _ in redis_client.xrange(keys.TRANSITIONS)]
    assert [t["cursor"] for t in seen] == stream_ids and len(seen) == 23
    assert [t["enrollment_id"] for t in seen] == [f"t{i}" for i in range(23)]
    make_transitions(store, 2, prefix="later")
    more = api.get("/v1/transitions", params={"after": cursor}).json()
    assert [t["enrollment_id"] for t in more["transitions"]] == ["later0", "later1"]
    for bad, field in (({"after": "yesterday"}, "after"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
                       ({"wait": -1}, "wait")):
        assert problem(api.get("/v1/transitions", params=bad), 400)["field"] == field


def trimmed_stream(redis_client, made: int = 10, kept: int = 4) -> list[str]:
    """``made`` transitions, then the stream trimmed (exactly) to its newest ``kept``: every id made."""
    make_transitions(EnrollmentStore(redis_client), made)
    ids = [i.decode() for i, _ in redis_client.xrange(keys.TRANSITIONS)]
    redis_client.xtrim(keys.TRANSITIONS, maxlen=kept, approximate=False)
    assert redis_client.xinfo_stream(keys.TRANSITIONS)["first-entry"][0].decode() == ids[made - kept]
    return ids


def cursors(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [t["cursor"] for t in response.json()["transitions"]]


def test_a_cursor_behind_the_trim_is_410_saying_where_the_stream_starts(api, redis_client):
    assert len(cursors(api.get("/v1/transitions", params={"after": "0-0"}))) == 0  # nothing trimmed: whole
    ids = trimmed_stream(redis_client)
    for cursor in ("0-0", ids[2], ids[4]):
        body = problem(api.get("/v1/transitions", params={"after": cursor}), 410)
        assert body["type"].endswith(":cursor-expired") and body["field"] == "after"
        assert body["oldest_cursor"] == ids[6] and ids[6] in body["detail"] and cursor in body["detail"]
    # resume_after continues from the oldest kept, when the client chooses to
    assert cursors(api.get("/v1/transitions", params={"after": body["resume_after"]})) == ids[6:]
    # no cursor starts at the oldest kept; a cursor within what is kept continues as before
    assert cursors(api.get("/v1/transitions")) == ids[6:]
    assert cursors(api.get("/v1/transitions", params={"after": ids[7]})) == ids[8:]
    assert cursors(api.get("/v1/transitions", params={"after": ids[6], "wait": 0.2})) == ids[7:]
    # everything trimmed: no entry kept, the newest id resumes
    redis_client.xtrim(keys.TRANSITIONS, maxlen=0, approximate=False)
    body = problem(api.get("/v1/transitions", params={"after": ids[8]}), 410)
    assert "oldest_cursor" not in body and body["resume_after"] == ids[-1]
    assert api.get("/v1/transitions").json() == {"transitions": [], "next": ids[-1]}
    assert api.get("/v1/transitions", params={"after": ids[-1]}).json() == {"transitions": [], "next": ids[-1]}


def test_a_cursor_beyond_the_stream_is_400_naming_after(api, redis_client):
    beyond = ("9999999999999-0", f"{2**64 - 1}-{2**64 - 1}")
    for cursor in (*beyond, "1-0"):  # no stream yet: nothing was generated
        body = problem(api.get("/v1/transitions", params={"after": cursor}), 400)
        assert body["field"] == "after" and cursor in body["detail"]
    make_transitions(EnrollmentStore(redis_client), 2)
    newest = redis_client.xinfo_stream(keys.TRANSITIONS)["last-generated-id"].decode()
    for cursor in beyond:
        assert problem(api.get("/v1/transitions", params={"after": cursor, "wait": 1}), 400)["field"] == "after"
    assert api.get("/v1/transitions", params={"after": newest}).json() == {"transitions": [], "next": newest}


def test_event_stream_cursors_behind_the_trim_or_beyond_the_stream(api, redis_client):
    ids = trimmed_stream(redis_client)
    url = api.url + "/v1/transitions/stream"
    behind = problem(requests.get(url, params={"after": ids[1]}, headers=AUTH, timeout=10), 410)
    assert behind["field"] == "after" and behind["oldest_cursor"] == ids[6]
    headers = {**AUTH, "Last-Event-ID": ids[1]}
    behind = problem(requests.get(url, params={"after": ids[8]}, headers=headers, timeout=10), 410)
    assert behind["field"] == "Last-Event-ID" and behind["type"].endswith(":cursor-expired")
    ahead = requests.get(url, headers={**AUTH, "Last-Event-ID": "9999999999999-0"}, timeout=10)
    assert problem(ahead, 400)["field"] == "Last-Event-ID"
    assert problem(requests.get(url, params={"after": "9999999999999-0"}, headers=AUTH, timeout=10), 400)["field"] \
        == "after"
    headers = {**AUTH, "Last-Event-ID": behind["resume_after"]}
    with requests.get(url, headers=headers, stream=True, timeout=10) as response:
        events = read_events(response.iter_lines(chunk_size=1, decode_unicode=True), 4)
    assert [e["id"] for e in events] == ids[6:]


def test_long_poll_returns_when_a_transition_arrives(api, redis_client):
    store = EnrollmentStore(redis_client)
    make_transitions(store, 1)
    cursor = api.get("/v1/transitions").json()["next"]
    started = time.monotonic()
    empty = api.get("/v1/transitions", params={"after": cursor, "wait": 0.5}).json()
    assert empty == {"transitions": [], "next": cursor} and 0.45 < time.monotonic() - started < 3
    result = {}

    def poll():
        result["response"] = api.get("/v1/transitions", params={"after": cursor, "wait": 20}, timeout=30)
        result["at"] = time.monotonic()

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.5)
    made = time.monotonic()
    store.transition("late", "paused", "out_of_office", event_key="ooo:late")
    waiter.join(25)
    body = result["response"].json()
    assert [t["enrollment_id"] for t in body["transitions"]] == ["late"]
    assert result["at"] - made < 3  # woken by the transition, not by the 20 s timeout


def read_events(lines, count: int) -> list[dict]:
    """The next ``count`` events from an event stream's lines."""
    events, current = [], {}
    for line in lines:
        if line == "":
            if "data" in current:
                events.append(current)
                if len(events) == count:
                    return events
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.lstrip(" ")
    return events


def test_server_sent_events_deliver_and_resume_from_last_event_id(api, redis_client):
    store = EnrollmentStore(redis_client)
    make_transitions(store, 3)
    with requests.get(api.url + "/v1/transitions/stream", headers=AUTH, stream=True, timeout=10) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.iter_lines(chunk_size=1, decode_unicode=True)  # each byte as it comes
        first = read_events(lines, 3)
        threading.Timer(0.3, lambda: store.transition("live", "stopped", "bounced", event_key="b:1")).start()
        (live,) = read_events(lines, 1)
    assert [json.loads(e["data"])["enrollment_id"] for e in first] == ["t0", "t1", "t2"]
    assert all(e["event"] == "transition" and e["id"] == json.loads(e["data"])["cursor"] for e in first)
    assert json.loads(live["data"])["enrollment_id"] == "live"
    # a reconnecting client sends the last id it saw; it wins over ?after=
    headers = {**AUTH, "Last-Event-ID": first[1]["id"]}
    with requests.get(api.url + "/v1/transitions/stream", params={"after": "0-0"}, headers=headers, stream=True,
                      timeout=10) as response:
        resumed = read_events(response.iter_lines(chunk_size=1, decode_unicode=True), 2)
    assert [json.loads(e["data"])["enrollment_id"] for e in resumed] == ["t2", "live"]
    bad = requests.get(api.url + "/v1/transitions/stream", headers={**AUTH, "Last-Event-ID": "x"}, timeout=10)
    assert problem(bad, 400)["field"] == "Last-Event-ID"


# -- Redis away --------------------------------------------------------------------------------------
def test_redis_down_is_503_never_a_trace(api, redis_server, redis_client):
    redis_server.stop()
    try:
        health = requests.get(api.url + "/healthz", timeout=15)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        for response in (api.post("/v1/sends", send("<m@us.example>")), api.get("/v1/enrollments/e1"),
                         api.get("/v1/transitions")):
            body = problem(response, 503)
            assert "Traceback" not in response.text and response.headers["Retry-After"]
            assert body["type"].endswith(":redis-unavailable")
    finally:
        redis_server.start()
    wait_for(lambda: requests.get(api.url + "/healthz", timeout=15).status_code == 200, timeout=20,
             message="healthy again")
    assert api.post("/v1/sends", send("<m@us.example>")).status_code == 201


# -- the real process --------------------------------------------------------------------------------
def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def status(env: dict) -> tuple[int, dict]:
    done = cli(env, "status", "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def status_when(env: dict, condition) -> tuple[int, dict] | None:
    """status --json's (exit code, facts) when ``condition(code, facts)`` holds, else None."""
    code, snap = status(env)
    return (code, snap) if condition(code, snap) else None


LEASE_SECONDS = 2


def test_the_real_process_serves_and_shows_in_status(redis_server, redis_client, tmp_path):
    env = service_env(redis_server.url, "", lease_seconds=LEASE_SECONDS, allow_volatile_redis="true")
    hashed = cli(env, "api", "hash-token", TOKEN)
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_token(TOKEN) and len(hashed.stdout.strip()) == 64
    piped = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "api", "hash-token", "-"], env=env,
                           input=TOKEN + "\n", capture_output=True, text=True, timeout=60, check=False)
    assert piped.stdout.strip() == hash_token(TOKEN)
    port = free_port()
    env.update({config.env_name("api_listen"): f"127.0.0.1:{port}", config.env_name("api_tokens"): hashed.stdout.strip()})
    proc = CliProcess(["api"], env, tmp_path / "api.log")
    try:
        wait_for(lambda: any(f"API serving http://127.0.0.1:{port}" in line.get("event", "") for line in proc.lines())
                 or not proc.alive(), timeout=20, message="the serving line")
        assert proc.alive(), proc.lines()
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/v1/transitions", timeout=10).status_code == 401
        assert requests.get(url + "/v1/transitions", headers={"Authorization": "Bearer not-it"}, timeout=10).status_code == 401
        recorded = requests.post(url + "/v1/sends", json=send("<p@us.example>"), headers=AUTH, timeout=10)
        assert recorded.status_code == 201
        # fresh means a heartbeat younger than lease_seconds (2 here); status must show the process so,
        # and healthy, at some reading (one reading on a loaded machine may catch a late beat)
        _, snap = wait_for(lambda: status_when(env, lambda code, snap: code == 0 and snap["api"] and
                                               snap["api"][0]["last_heartbeat_age_s"] < LEASE_SECONDS),
                           timeout=20, message="the API in a healthy status, its heartbeat fresh")
        (shown,) = snap["api"]
        assert shown["address"] == url and shown["pid"] == proc.pid
        assert not any("API process" in p for p in snap["problems"])
        text = cli(env, "status").stdout
        assert "API processes (1)" in text and url in text
        proc.kill9()
        _, snap = wait_for(lambda: status_when(env, lambda code, snap: code == 1), timeout=20,
                           message="status to flag the killed API")
        assert any(p.startswith(f"API process {shown['id']}") and "stale" in p for p in snap["problems"])
    finally:
        proc.stop()
    log = (tmp_path / "api.log").read_text()
    assert TOKEN not in log and "not-it" not in log and hashed.stdout.strip() not in log
