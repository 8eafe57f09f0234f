"""``exchange-listener sends import``: JSON lines checked as ``sends record`` checks its flags,
rejected lines named by line number and storing nothing, the others stored exactly as ``sends
record`` stores them, in batches that are each one transaction (a killed import leaves no send
half-written) and that merge across batches as one ``record`` after another would."""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import random
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.services import wait_for
from exchange_listener.commands import sends as sends_command
from workers.state import sends as sends_state
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import BATCH_LIMIT, SendRegistry

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
RETENTION = 180 * 86400


def at(hours_ago: float) -> str:
    return (NOW - dt.timedelta(hours=hours_ago)).isoformat().replace("+00:00", "Z")


def line(**fields) -> str:
    base = {"enrollment": "e1", "sequence": "seq-1", "mailbox": "rep@us.example", "to": ["pat@prospect.example"]}
    return json.dumps({**base, **fields})


def cli(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env["EXCHANGE_LISTENER_REDIS_URL"] = url
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def other_db(url: str) -> str:
    """The same server's database 1 (the fixture flushes every database before each test)."""
    return url.rsplit("/", 1)[0] + "/1"


def snapshot(client) -> dict:
    """Every key: its type, value and expiry. Sends expire at an exact moment (sent_at +
    retention); the domain indexes and enrollments a retention after the write, so their TTL is
    only checked to be that retention, and an enrollment's creation times are left out."""
    out = {}
    for key in sorted(client.scan_iter("*")):
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = {k: v for k, v in client.hgetall(key).items() if k not in (b"created_at", b"updated_at")}
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        ttl = client.ttl(key)
        expiry = client.pexpiretime(key) if kind == "string" else ("retention" if RETENTION - 60 < ttl <= RETENTION
                                                                   else ttl)
        out[key.decode()] = (kind, value, expiry)
    return out


def run_import(capsys, client, path: str) -> tuple[int, dict]:
    """The command's import in this process, with its output (``cli`` runs the whole command;
    calling cli.main here would point the process's logging at pytest's captured stdout)."""
    code = sends_command._import(SendRegistry(client), path)
    return code, json.loads(capsys.readouterr().out)


# -- the contract, through the real command ------------------------------------------------------
def test_a_mixed_file_records_the_good_lines_and_names_each_bad_one(redis_server, redis_client, tmp_path):
    lines = [
        line(message_id="<good1@us.example>", cc=["Boss <boss@prospect.example>"], sent_at=at(5)),  # 1
        '{"message_id": "<broken@us.example>", "enrollment": ',                                     # 2: bad JSON
        "",                                                                                          # 3: blank
        json.dumps({"message_id": "<nomailbox@us.example>", "enrollment": "e2", "sequence": "s",     # 4: no mailbox
                    "to": ["a@b.example"]}),
        line(message_id="no-at-sign", enrollment="e3"),                                              # 5: bad id
        line(message_id="<badtime@us.example>", enrollment="e4", sent_at="last tuesday"),           # 6: bad sent_at
        line(message_ids=["<good2@us.example>", "0100018c-ses@email.amazonses.com"], enrollment="e5",  # 7
             to=["Lee <lee@other.example>", "kim@prospect.example"], sent_at=at(2)),
        "   ",                                                                                       # 8: blank
        "[1, 2, 3]",                                                                                 # 9: not an object
        line(message_id="<good1@us.example>", enrollment="someone-else"),                            # 10: taken id
        line(message_id="<good3@us.example>", enrollment="e6", to="solo@third.example"),             # 11
    ]
    path = tmp_path / "sends.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = cli(redis_server.url, "sends", "import", str(path))
    assert done.returncode == 2, done.stderr
    out = json.loads(done.stdout)
    assert out["recorded"] == 3
    errors = {r["line"]: r["error"] for r in out["rejected"]}
    assert sorted(errors) == [2, 4, 5, 6, 9, 10]
    assert errors[2].startswith("not valid JSON")
    assert errors[4] == "mailbox: required"
    assert errors[5].startswith("message id: not a Message-ID") and "no-at-sign" in errors[5]
    assert errors[6].startswith("sent_at: not an ISO 8601") and "last tuesday" in errors[6]
    assert errors[9] == "not a JSON object"
    assert errors[10] == "message id already recorded for enrollment 'e1'"
    registry = SendRegistry(redis_client)
    for rejected in ("<broken@us.example>", "<nomailbox@us.example>", "<badtime@us.example>"):
        assert registry.get(rejected) is None
    assert redis_client.keys("el:enrollment:e[234]*") == []
    assert redis_client.keys("el:enrollment:someone-else*") == []
    assert registry.get("<good1@us.example>").enrollment_id == "e1"  # the taken id kept its owner
    assert registry.get("0100018c-ses@email.amazonses.com").message_ids == (
        "<good2@us.example>", "<0100018c-ses@email.amazonses.com>")
    assert registry.get("<good3@us.example>").to == ("solo@third.example",)
    assert sorted(registry.enrollments_for_domain("prospect.example")) == ["e1", "e5"]

    # the same sends through `sends record`, into another database: the stored state is the same
    for args in (["--message-id", "<good1@us.example>", "--enrollment", "e1", "--to", "pat@prospect.example",
                  "--cc", "Boss <boss@prospect.example>", "--sent-at", at(5)],
                 ["--message-id", "<good2@us.example>", "--message-id", "0100018c-ses@email.amazonses.com",
                  "--enrollment", "e5", "--to", "Lee <lee@other.example>", "--to", "kim@prospect.example",
                  "--sent-at", at(2)]):
        recorded = cli(other_db(redis_server.url), "sends", "record", "--sequence", "seq-1", "--mailbox",
                       "rep@us.example", *args)
        assert recorded.returncode == 0, recorded.stderr
    imported = {k: v for k, v in snapshot(redis_client).items() if "good3" not in k and ":e6" not in k
                and "third.example" not in k}
    redis_client.execute_command("SELECT", 1)
    assert imported == snapshot(redis_client)


def test_stdin_all_good_exits_0_and_a_second_import_changes_nothing(redis_server, redis_client):
    text = "\n".join(line(message_id=f"<m{i}@us.example>", enrollment=f"e{i % 3}", sent_at=at(i)) for i in range(7))
    first = cli(redis_server.url, "sends", "import", "-", stdin=text)
    assert (first.returncode, json.loads(first.stdout)) == (0, {"recorded": 7, "rejected": []}), first.stderr
    before = snapshot(redis_client)
    again = cli(redis_server.url, "sends", "import", "-", stdin=text)
    assert (again.returncode, json.loads(again.stdout)) == (0, {"recorded": 7, "rejected": []})
    assert snapshot(redis_client) == before
    assert EnrollmentStore(redis_client).get("e1")["status"] == "active"


def test_unreachable_redis_is_the_usual_error_and_exit_3(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(line(message_id="<m@us.example>") + "\n")
    done = cli("redis://127.0.0.1:1/0", "sends", "import", str(path))
    assert done.returncode == 3
    assert "cannot reach Redis" in done.stderr and "importing the file again is safe" in done.stderr
    assert done.stdout == ""


def test_a_missing_file_is_a_clear_error(redis_server, tmp_path):
    done = cli(redis_server.url, "sends", "import", str(tmp_path / "nope.jsonl"))
    assert done.returncode == 2 and "cannot read" in done.stderr


# -- each line checked on its own, never a crash ------------------------------------------------
@pytest.mark.parametrize("raw, error", [
    ('"just a string"', "not a JSON object"),
    ("null", "not a JSON object"),
    (line(message_id="<a@b.example>", sned_at="x"), "unknown field 'sned_at'"),
    (json.dumps({"enrollment": "e", "sequence": "s", "mailbox": "m", "to": ["a@b.example"]}),
     "message_id (or message_ids): required"),
    (json.dumps({"message_id": "<a@b.example>", "sequence": "s", "mailbox": "m", "to": ["a@b.example"]}),
     "enrollment: required"),
    (json.dumps({"message_id": "<a@b.example>", "enrollment": "e", "mailbox": "m", "to": ["a@b.example"]}),
     "sequence: required"),
    (json.dumps({"message_id": "<a@b.example>", "enrollment": "e", "sequence": "s", "mailbox": "m"}),
     "to: required"),
    (line(message_id="<a@b.example>", to=[]), "to: at least one recipient"),
    (line(message_id="<a@b.example>", to=5), "to: must be a list of strings"),
    (line(message_id="<a@b.example>", to=["a@b.example", 7]), "to: must be a list of strings"),
    (line(message_id="<a@b.example>", to=["not an address"]), "to: not an email address"),
    (line(message_id="<a@b.example>", cc=["nobody"]), "cc: not an email address"),
    (line(message_id="<a@b.example>", enrollment=7), "enrollment: must be a string"),
    (line(message_id="<a@b.example>", enrollment=" "), "enrollment: required"),
    (line(message_id=["<a@b.example>"]), "message_id: must be a string"),
    (line(message_ids=[]), "message id: at least one is required"),
    (line(message_ids={"a": 1}), "message_ids: must be a list of strings"),
    (line(message_id="<a@b.example>", sent_at=1700000000), "sent_at: must be a string"),
    (line(message_id="<a@b.example>", sent_at="2020-01-01T00:00:00Z"), "older than the retention"),
    (line(message_id="<a@b.example>", enrollment="e\ud800"), "lone surrogate"),
])
def test_a_bad_line_is_rejected_with_the_field_named(capsys, redis_client, tmp_path, raw, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(raw + "\n" + line(message_id="<fine@us.example>", enrollment="ok") + "\n")
    code, out = run_import(capsys, redis_client, str(path))
    assert code == 2 and out["recorded"] == 1
    ((rejected),) = out["rejected"]
    assert rejected["line"] == 1 and error in rejected["error"], rejected
    assert {k.decode() for k in redis_client.keys("el:send:*")} == {"el:send:<fine@us.example>"}
    assert redis_client.keys("el:enrollment:*") == [b"el:enrollment:ok"]


def test_bytes_that_are_not_utf8_are_a_rejected_line(capsys, redis_client, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'\xef\xbb\xbf' + line(message_id="<bom@us.example>").encode() + b"\r\n"
                     + line(message_id="<x@us.example>").encode().replace(b"rep@", b"caf\xe9@") + b"\n")
    code, out = run_import(capsys, redis_client, str(path))
    assert code == 2 and out["recorded"] == 1  # a BOM and CRLF line ends are fine
    assert out["rejected"][0]["line"] == 2 and out["rejected"][0]["error"].startswith("not UTF-8")


def test_message_id_and_message_ids_together_make_one_send(capsys, redis_client, tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(line(message_id="<ours@us.example>", message_ids=["srv@mx.us.example", "<ours@us.example>"]))
    code, out = run_import(capsys, redis_client, str(path))
    assert (code, out) == (0, {"recorded": 1, "rejected": []})
    send = SendRegistry(redis_client).get("srv@mx.us.example")
    assert send.message_ids == ("<ours@us.example>", "<srv@mx.us.example>")


def test_an_empty_file_records_nothing(capsys, redis_client, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert run_import(capsys, redis_client, str(path)) == (0, {"recorded": 0, "rejected": []})
    assert redis_client.dbsize() == 0


# -- batches behave as one record after another ---------------------------------------------------
def test_batches_store_what_one_record_after_another_stores(capsys, redis_client, tmp_path):
    """Lines that share ids within a batch and across batches (merges, later sent_at, ids of
    another enrollment): the import and a `record` per line leave the same keys, values and
    expiries, and reject the same lines."""
    rng = random.Random(13)
    lines = []
    for _ in range(3 * BATCH_LIMIT + 17):
        ids = [f"<m{rng.randrange(400)}@us.example>" for _ in range(rng.choice((1, 1, 2)))]
        lines.append(line(message_ids=ids, enrollment=f"e{rng.randrange(40)}", sequence=f"s{rng.randrange(3)}",
                          mailbox=rng.choice(("rep@us.example", "")), sent_at=at(rng.randrange(1, 2000)),
                          to=[f"p@d{rng.randrange(30)}.example", f"q@d{rng.randrange(30)}.example"]))
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines))
    code, out = run_import(capsys, redis_client, str(path))
    assert out["recorded"] > len(lines) / 4 and out["rejected"], "the data should mix merges and refusals"
    assert code == 2
    imported = snapshot(redis_client)

    redis_client.flushall()
    registry, refused = SendRegistry(redis_client), []
    for number, raw in enumerate(lines, 1):
        data = json.loads(raw)
        try:
            registry.record(data["message_ids"], data["enrollment"], data["sequence"], data["mailbox"], data["to"],
                            sent_at=data["sent_at"])
        except ValueError as exc:
            refused.append({"line": number, "error": str(exc)})
    assert out["rejected"] == refused
    assert imported == snapshot(redis_client)


def test_a_killed_import_leaves_every_send_whole_and_importing_again_finishes_it(redis_server, redis_client,
                                                                                tmp_path):
    lines = [line(message_ids=[f"<k{i}@us.example>", f"k{i}@ses.example"], enrollment=f"e{i}",
                  to=[f"p{i}@d{i % 50}.example"], sent_at=at(i % 100)) for i in range(40_000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env["EXCHANGE_LISTENER_REDIS_URL"] = redis_server.url
    child = subprocess.Popen([sys.executable, "-m", "exchange_listener.cli", "sends", "import", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis_client.dbsize() > 0 or child.poll() is not None, timeout=60)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    sends = {k.decode() for k in redis_client.scan_iter("el:send:*")}
    enrollments = {k.decode() for k in redis_client.scan_iter("el:enrollment:*")}
    assert 0 < len(sends) < 2 * len(lines), "killed mid-import"
    written = {i for i in range(len(lines)) if f"el:send:<k{i}@us.example>" in sends}
    for i in written:  # every send whole: both ids, its domain index entries, its enrollment
        assert f"el:send:<k{i}@ses.example>" in sends
        assert redis_client.zscore(f"el:domain:d{i % 50}.example", f"e{i}") is not None
        assert redis_client.zscore(f"el:domain:d{i % 50}.example:first", f"e{i}") is not None
    assert len(sends) == 2 * len(written)
    assert enrollments == {f"el:enrollment:e{i}" for i in written}
    done = cli(redis_server.url, "sends", "import", str(path))
    assert (done.returncode, json.loads(done.stdout)) == (0, {"recorded": len(lines), "rejected": []})
    assert redis_client.dbsize() == 2 * len(lines) + len(lines) + 2 * 50


def test_the_bulk_write_creates_an_enrollment_as_ensure_does(redis_client):
    """send_batch.lua creates a missing enrollment field for field as
    EnrollmentStore.ensure_commands: the two must not drift apart."""
    EnrollmentStore(redis_client).ensure("by-ensure", "séq-1", "rep@us.example", "a@b.example")
    SendRegistry(redis_client).record(["<m@us.example>"], "by-record", "séq-1", "rep@us.example", ["a@b.example"])
    made = [{k: v for k, v in redis_client.hgetall(f"el:enrollment:{e}").items()
             if k not in (b"created_at", b"updated_at")} for e in ("by-ensure", "by-record")]
    assert made[0] == made[1] and made[1][b"sequence_id"] == "séq-1".encode()
    assert set(redis_client.hgetall("el:enrollment:by-record")) == set(redis_client.hgetall("el:enrollment:by-ensure"))
    assert abs(redis_client.ttl("el:enrollment:by-record") - redis_client.ttl("el:enrollment:by-ensure")) <= 2
    # an existing enrollment only gains the fields it lacks
    redis_client.hset("el:enrollment:partial", mapping={"status": "stopped", "reason": "replied"})
    SendRegistry(redis_client).record(["<p@us.example>"], "partial", "seq-2", "", ["a@b.example"])
    partial = redis_client.hgetall("el:enrollment:partial")
    assert partial[b"status"] == b"stopped" and partial[b"reason"] == b"replied"
    assert partial[b"sequence_id"] == b"seq-2" and b"mailbox" not in partial and partial[b"version"] == b"0"


@settings(max_examples=300, deadline=None)
@given(st.from_regex(sends_state._PLAIN_ADDRESS, fullmatch=True))
def test_an_address_taken_without_parseaddr_is_one_parseaddr_leaves_as_it_is(address):
    assert (email.utils.parseaddr(address)[1] or address) == address


# -- the pipelined batches: a concurrent change, an error on either side ------------------------
def drafts(registry, *specs):
    return [registry.validate([mid], enrollment, "s", "rep@us.example", ["pat@prospect.example"])
            for mid, enrollment in specs]


def test_an_id_recorded_elsewhere_between_read_and_write_reruns_the_batch(redis_client, redis_server):
    """Another writer records an id after the batch read it and before EXEC: the batch is
    planned again (WATCH), so that line is refused instead of overwriting the other send."""
    import redis as redis_lib

    other = SendRegistry(redis_lib.Redis.from_url(redis_server.url))
    planned = []

    class Interleaved(SendRegistry):
        def _plan(self, *args):
            if not planned:  # the first plan only: a platform records <x> meanwhile
                other.record(["<x@us.example>"], "e-other", "s", "rep@us.example", ["lee@prospect.example"])
            planned.append(args[0])
            return super()._plan(*args)

    registry = Interleaved(redis_client)
    (results,) = registry.record_batches([drafts(registry, ("<x@us.example>", "e1"), ("<y@us.example>", "e1"))])
    assert len(planned) == 2
    assert isinstance(results[0], ValueError) and "'e-other'" in str(results[0])
    assert results[1].message_ids == ("<y@us.example>",)
    assert registry.get("<x@us.example>").enrollment_id == "e-other"


def test_an_error_in_the_callers_batches_leaves_the_batch_in_flight_whole(redis_client):
    registry = SendRegistry(redis_client)

    def batches():
        yield drafts(registry, ("<a@us.example>", "e1"), ("<b@us.example>", "e2"))
        raise OSError("the file went away")

    with pytest.raises(OSError, match="went away"):
        for _ in registry.record_batches(batches()):
            pass
    assert {s.enrollment_id for s in registry.lookup_many(["<a@us.example>", "<b@us.example>"])} == {"e1", "e2"}
    assert registry.enrollments.get("e2")["status"] == "active"
    assert list(registry.record_batches([])) == []
    empty, one = registry.record_batches([[], drafts(registry, ("<c@us.example>", "e3"))])
    assert empty == [] and one[0].enrollment_id == "e3"
    assert redis_client.ping()  # the pool still serves


def test_redis_refusing_a_batch_is_a_clear_error_not_a_traceback(redis_server, redis_client, tmp_path):
    redis_client.set("el:domain:prospect.example", "not a sorted set")
    path = tmp_path / "one.jsonl"
    path.write_text(line(message_id="<m@us.example>") + "\n")
    done = cli(redis_server.url, "sends", "import", str(path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Redis refused a batch" in done.stderr and "WRONGTYPE" in done.stderr
