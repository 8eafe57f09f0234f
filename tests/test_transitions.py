"""One transition schema (``workers.state.transitions.Transition``) for the store, the sinks and the CLI.

Real redis-server, a real HTTP receiver for the webhook, the real CLI in a subprocess.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exchange_listener.core import keys
from workers.sinks.webhooks import Notifier
from workers.state.enrollments import EnrollmentStore
from workers.state.transitions import STREAM_FIELD, Transition

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in dataclasses.fields(Transition)]
FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


@pytest.fixture
def receiver():
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.bodies = bodies
    server.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield server
    server.shutdown()


def documented_webhook_fields() -> set[str]:
    """The field names in the table of docs/webhooks.md's "The request" section."""
    section = (ROOT / "docs" / "webhooks.md").read_text().split("## The request", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([a-z_]+)`", cell)}


def test_the_three_stored_copies_are_one_transition_with_the_schema_fields(redis_client):
    store = EnrollmentStore(redis_client)
    store.ensure("e1", sequence_id="seq-9", mailbox="rep@us.example")
    paused = store.transition("e1", "paused", "auto_reply", event_key="ooo:1", until=FUTURE, by="pat@x.example")
    # values a JSON round trip through Redis's Lua could bend: slashes, non-ASCII, an astral character
    stopped = store.transition("e1", "stopped", "replied", event_key="r/1", by="zoë/🙂@x.example",
                               message_id="<a/b@x.example>")
    history = [json.loads(raw) for raw in redis_client.lrange(keys.enrollment_history("e1"), 0, -1)]
    notifier_copy = json.loads(redis_client.get(keys.transition(stopped.id)))
    stream = [json.loads(fields[STREAM_FIELD.encode()]) for _, fields in redis_client.xrange(keys.TRANSITIONS)]
    assert history == stream and history[-1] == notifier_copy
    assert [sorted(h) for h in history] == [sorted(FIELDS)] * 2
    assert [Transition.from_fields(h) for h in history] == [paused, stopped] == store.transitions("e1")
    assert stopped.to_fields() == notifier_copy
    # what the script fills in from the enrollment's state
    assert (paused.previous_status, paused.version, paused.mailbox, paused.sequence_id) == (
        "active", 1, "rep@us.example", "seq-9")
    assert (stopped.previous_status, stopped.version, stopped.paused_until) == ("paused", 2, None)
    assert paused.paused_until == FUTURE.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert stopped.by == "zoë/🙂@x.example" and stopped.message_id == "<a/b@x.example>" and stopped.item_id is None


def test_the_webhook_body_is_the_transition_plus_type_with_the_documented_fields(redis_client, receiver):
    store = EnrollmentStore(redis_client)
    transition = store.transition("e1", "stopped", "bounced", event_key="b:1", by="pat@x.example", item_id="i-1",
                                  mailbox="rep@us.example")
    called = []
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret="t-secret", callback=called.append)
    assert notifier.drain().delivered == 1
    assert receiver.bodies == [transition.webhook_body()]
    body = json.loads(receiver.bodies[0])
    assert body == {"type": "enrollment.transition", **transition.to_fields()}
    assert set(body) == documented_webhook_fields()  # docs/webhooks.md names every field, and no other
    assert called == [transition.to_fields()]  # the callable gets the fields, without "type"


def test_cli_history_prints_the_schema_fields(redis_server, redis_client):
    store = EnrollmentStore(redis_client)
    first = store.transition("e-7", "paused", "auto_reply", event_key="ooo:1", until=FUTURE)
    second = store.transition("e-7", "stopped", "replied", event_key="r:1", by="pat@x.example")
    env = {**os.environ, "EXCHANGE_LISTENER_REDIS_URL": redis_server.url}
    env.pop("EXCHANGE_LISTENER_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "enrollments", "show", "e-7", "--history"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["history"] == [first.to_fields(), second.to_fields()]


def test_a_stored_transition_with_a_field_this_version_does_not_know_still_reads():
    fields = {name: None for name in FIELDS} | {"id": "t", "enrollment_id": "e", "status": "stopped",
                                                  "previous_status": "active", "reason": "replied", "at": "x",
                                                  "event_key": "k", "version": 1}
    assert Transition.from_json(json.dumps({**fields, "added_later": 1})).to_fields() == fields


def test_every_field_survives_the_scripts_json_round_trip():
    """The transition script re-encodes the draft with Redis's cjson, which turns lists into
    objects and big numbers into exponent form: fields must be strings, small ints or None."""
    import typing

    hints = typing.get_type_hints(Transition)
    allowed = {str, int, str | None, int | None}
    assert {name: hints[name] for name in hints if name != "FROM_STATE" and hints[name] not in allowed} == {}
