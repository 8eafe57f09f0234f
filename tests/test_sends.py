"""The send registry: every id form finds its send in one round trip, several ids per send,
conflicts refused, retention by TTL, domain index; and the ``sends`` CLI contract."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def registry(redis_client):
    return SendRegistry(redis_client)


def test_record_and_find_by_any_spelling_of_each_id(registry):
    send = registry.record(["<Ours.1@Us.Example>", "0100018c-ses@email.amazonses.com"], "e1", "seq", "rep@us.example",
                           ["pat@prospect.example"], cc=["boss@prospect.example"], sent_at=NOW)
    assert send.message_ids == ("<Ours.1@us.example>", "<0100018c-ses@email.amazonses.com>")
    for spelling in ("<Ours.1@us.example>", " Ours.1@US.EXAMPLE ", "<0100018c-ses@email.amazonses.com>"):
        found = registry.get(spelling)
        assert found == send, spelling
    assert found.to == ("pat@prospect.example",) and found.cc == ("boss@prospect.example",)
    assert found.sent_at == NOW.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert registry.get("<ours.1@us.example>") is None  # the local part is case-sensitive


def test_lookup_many_is_one_round_trip_and_returns_distinct_sends(registry, redis_client):
    a = registry.record(["<a1@us.example>", "<a2@us.example>"], "ea", "seq", "rep@us.example", ["x@p.example"])
    b = registry.record(["<b1@us.example>"], "eb", "seq", "rep@us.example", ["y@p.example"])
    references = [f"<thread-{n}@elsewhere.example>" for n in range(5000)] + ["<a2@us.example>", "a1@us.example",
                                                                           "<b1@us.example>", "", "garbage"]
    redis_client.config_resetstat()
    assert registry.lookup_many(references) == [a, b]
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert {k: v["calls"] for k, v in stats.items() if k.split("|")[0] not in ("cmdstat_mget", "cmdstat_info", "cmdstat_config")} == {}
    assert registry.lookup_many([]) == [] and registry.lookup_many(["not an id"]) == []


def test_recording_again_merges_ids_and_another_enrollment_is_refused(registry, redis_client):
    registry.record(["<ours@us.example>"], "e1", "seq", "rep@us.example", ["pat@prospect.example"])
    merged = registry.record(["<ours@us.example>", "<server@mx.us.example>"], "e1", "seq", "rep@us.example",
                             ["pat@prospect.example"])
    assert merged.message_ids == ("<ours@us.example>", "<server@mx.us.example>")
    assert registry.get("<server@mx.us.example>").enrollment_id == "e1"
    before = sorted(redis_client.keys("*"))
    with pytest.raises(ValueError, match="already recorded for enrollment 'e1'"):
        registry.record(["<new@us.example>", "<server@mx.us.example>"], "e2", "seq", "rep@us.example", ["q@p.example"])
    assert sorted(redis_client.keys("*")) == before  # nothing of the refused send was stored


@pytest.mark.parametrize("kwargs, message", [
    ({"message_ids": ["no-at-sign"]}, "not a Message-ID"),
    ({"message_ids": []}, "at least one"),
    ({"to": []}, "at least one recipient"),
    ({"to": ["pat@prospect.example\r\nBcc: evil@x.example"]}, "not an email address"),
    ({"cc": ["nobody"]}, "not an email address"),
    ({"enrollment_id": " "}, "enrollment"),
    ({"sent_at": "yesterday"}, "ISO 8601"),
    ({"sent_at": NOW - dt.timedelta(days=181)}, "older than the retention"),
])
def test_bad_input_is_refused_with_a_clear_error_and_stores_nothing(registry, redis_client, kwargs, message):
    args = {"message_ids": ["<m@us.example>"], "enrollment_id": "e1", "sequence_id": "s", "mailbox": "rep@us.example",
            "to": ["pat@prospect.example"], **kwargs}
    with pytest.raises(ValueError, match=message):
        registry.record(**args)
    assert redis_client.dbsize() == 0


def test_recording_creates_the_enrollment_but_never_revives_it(registry, redis_client):
    registry.record(["<m1@us.example>"], "e1", "seq", "rep@us.example", ["pat@prospect.example"])
    store = EnrollmentStore(redis_client)
    assert store.get("e1")["status"] == "active"
    store.transition("e1", "stopped", "replied", event_key="r1")
    registry.record(["<m2@us.example>"], "e1", "seq", "rep@us.example", ["pat@prospect.example"])
    assert store.get("e1")["status"] == "stopped"


def test_sends_expire_at_sent_at_plus_retention(registry, redis_client):
    # from the clock now, not at import: the suite may have run for minutes since
    almost_expired = dt.datetime.now(dt.UTC) - dt.timedelta(days=180) + dt.timedelta(seconds=1.5)
    registry.record(["<old@us.example>"], "e1", "seq", "rep@us.example", ["pat@prospect.example"], sent_at=almost_expired)
    registry.record(["<new@us.example>"], "e2", "seq", "rep@us.example", ["pat@prospect.example"])
    assert 179 * 86400 < redis_client.ttl("el:send:<new@us.example>") <= 180 * 86400
    # the key expires at sent_at + retention exactly (to the millisecond), not "about then"
    expires_ms = int((almost_expired + dt.timedelta(days=180)).timestamp() * 1000)
    assert redis_client.execute_command("PEXPIRETIME", "el:send:<old@us.example>") == expires_ms
    assert registry.get("<old@us.example>") is not None
    deadline = time.monotonic() + 30
    while registry.get("<old@us.example>") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.get("<old@us.example>") is None
    assert registry.get("<new@us.example>") is not None
    assert registry.enrollments_for_domain("prospect.example") == ["e2"]  # the expired send's entry is out too


def test_enrollments_for_domain_uses_to_recipients_case_insensitively(registry):
    registry.record(["<m1@us.example>"], "e1", "s", "rep@us.example", ["Pat@Prospect.Example"], cc=["c@other.example"])
    registry.record(["<m2@us.example>"], "e2", "s", "rep@us.example", ["lee@prospect.example"])
    registry.record(["<m3@us.example>"], "e3", "s", "rep@us.example", ["kim@elsewhere.example"])
    assert sorted(registry.enrollments_for_domain("PROSPECT.example")) == ["e1", "e2"]
    assert registry.enrollments_for_domain("other.example") == []  # cc is not the prospect
    assert registry.enrollments_for_domain("nothing.example") == []


# -- CLI contract ----------------------------------------------------------------------------
def cli(redis_server, *args):
    env = {**os.environ, "EXCHANGE_LISTENER_REDIS_URL": redis_server.url}
    env.pop("EXCHANGE_LISTENER_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)


def test_cli_record_and_show(redis_server, redis_client):
    done = cli(redis_server, "sends", "record", "--message-id", "<ours@us.example>", "--message-id", "srv@mx.us.example",
               "--enrollment", "e7", "--sequence", "seq-3", "--mailbox", "rep@us.example", "--to", "pat@prospect.example",
               "--to", "lee@prospect.example", "--cc", "boss@prospect.example", "--sent-at", "2026-11-20T10:00:00Z")
    assert done.returncode == 0, done.stderr
    send = json.loads(done.stdout)
    assert send == {"message_ids": ["<ours@us.example>", "<srv@mx.us.example>"], "enrollment_id": "e7",
                    "sequence_id": "seq-3", "mailbox": "rep@us.example",
                    "to": ["pat@prospect.example", "lee@prospect.example"], "cc": ["boss@prospect.example"],
                    "sent_at": "2026-11-20T10:00:00Z"}
    shown = cli(redis_server, "sends", "show", "srv@mx.us.example")
    assert shown.returncode == 0 and json.loads(shown.stdout) == send
    assert SendRegistry(redis_client).get("<ours@us.example>").enrollment_id == "e7"
    missing = cli(redis_server, "sends", "show", "<nope@us.example>")
    assert missing.returncode == 1 and "no recorded send" in missing.stderr


def test_cli_record_bad_input_exits_2_and_stores_nothing(redis_server, redis_client):
    done = cli(redis_server, "sends", "record", "--message-id", "not-an-id", "--enrollment", "e1", "--sequence", "s",
               "--mailbox", "rep@us.example", "--to", "pat@prospect.example")
    assert done.returncode == 2 and "not a Message-ID" in done.stderr
    assert redis_client.dbsize() == 0
    missing_to = cli(redis_server, "sends", "record", "--message-id", "<a@b.example>", "--enrollment", "e1",
                     "--sequence", "s", "--mailbox", "rep@us.example")
    assert missing_to.returncode == 2 and "--to" in missing_to.stderr


def test_cli_new_id_is_unique_valid_and_recordable(redis_server, redis_client):
    ids = {cli(redis_server, "sends", "new-id", "--domain", "Us.Example").stdout.strip() for _ in range(3)}
    assert len(ids) == 3
    for mid in ids:
        assert re.fullmatch(r"<[A-Za-z0-9_-]{20,}@us\.example>", mid)
    bad = cli(redis_server, "sends", "new-id", "--domain", "not a domain")
    assert bad.returncode == 2 and "not a valid domain" in bad.stderr


def test_a_new_send_keeps_the_audit_trail_alive_as_long_as_the_state(redis_client):
    store = EnrollmentStore(redis_client, retention_days=30)
    store.transition("e1", "paused", "auto_reply", event_key="ooo:1", until="2030-01-01")
    for key in ("el:enrollment:e1", "el:enrollment:e1:events", "el:enrollment:e1:history"):
        redis_client.expire(key, 100)  # as if the pause happened long ago
    SendRegistry(redis_client, retention_days=30).record(["<m@us.example>"], "e1", "s", "rep@us.example",
                                                         ["pat@prospect.example"])
    for key in ("el:enrollment:e1", "el:enrollment:e1:events", "el:enrollment:e1:history"):
        assert redis_client.ttl(key) > 29 * 86400, key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_ids=st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=3),
       address=st.text(min_size=0, max_size=30))
def test_any_input_is_stored_findable_or_refused_cleanly(redis_client, raw_ids, address):
    redis_client.flushall()
    registry = SendRegistry(redis_client)
    try:
        send = registry.record(raw_ids, "e1", "s", "rep@us.example", [address])
    except ValueError:
        assert redis_client.dbsize() == 0
        return
    assert all(registry.get(mid) == send for mid in send.message_ids)
    assert all(registry.get(raw) == send for raw in raw_ids)


def test_recipients_with_display_names_are_stored_as_bare_addresses(registry):
    """A bounce names the bare failed address; stored "Name <addr>" forms would never match it."""
    send = registry.record(["<dn@us.example>"], "e-dn", "s", "rep@us.example", ["Jane Doe <jane@prospect.example>"],
                           cc=['"Boss, The" <boss@prospect.example>'])
    assert send.to == ("jane@prospect.example",) and send.cc == ("boss@prospect.example",)
    assert registry.enrollments_for_domain("prospect.example") == ["e-dn"]


def test_domain_enrollments_give_each_enrollments_first_and_latest_send(registry):
    """The domain rule asks "did this enrollment write to the domain before the reply?": that
    is its first send there, which later steps must not move."""
    first = NOW - dt.timedelta(days=3)
    registry.record(["<s1@us.example>"], "e1", "s", "rep@us.example", ["pat@prospect.example"], sent_at=first)
    registry.record(["<s2@us.example>"], "e1", "s", "rep@us.example", ["lee@prospect.example"],
                    sent_at=NOW - dt.timedelta(days=1))
    registry.record(["<s0@us.example>"], "e1", "s", "rep@us.example", ["kim@prospect.example"],
                    sent_at=NOW - dt.timedelta(days=5))  # recorded late, sent earliest
    registry.record(["<t1@us.example>"], "e2", "s", "rep@us.example", ["pat@prospect.example"], sent_at=NOW)
    got = {e.enrollment_id: (e.first_sent_at, e.last_sent_at) for e in registry.domain_enrollments("Prospect.Example")}
    assert got == {"e1": (NOW - dt.timedelta(days=5), NOW - dt.timedelta(days=1)), "e2": (NOW, NOW)}
    assert registry.domain_enrollments("nothing.example") == []


def test_recording_a_send_again_never_moves_it_later(registry):
    """Adding the id the mail server assigned, minutes later and without --sent-at, must not make
    the send look newer than the replies that already answer it."""
    sent = NOW - dt.timedelta(hours=2)
    registry.record(["<ours2@us.example>"], "e1", "s", "rep@us.example", ["pat@prospect.example"], sent_at=sent)
    merged = registry.record(["<ours2@us.example>", "<ses2@amazonses.example>"], "e1", "s", "rep@us.example",
                             ["pat@prospect.example"])
    iso_sent = sent.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert merged.sent_at == iso_sent
    assert registry.get("<ses2@amazonses.example>").sent_at == iso_sent
    assert registry.get("<ours2@us.example>").message_ids == merged.message_ids  # every id sees the merged send
    (entry,) = registry.domain_enrollments("prospect.example")
    assert entry.first_sent_at.timestamp() == pytest.approx(sent.timestamp(), abs=1)


def test_an_enrollment_past_the_retention_leaves_both_domain_indexes(registry, redis_client):
    registry.record(["<r1@us.example>"], "e-old", "s", "rep@us.example", ["pat@prospect.example"],
                    sent_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=180) + dt.timedelta(seconds=2))
    deadline = time.monotonic() + 30
    while registry.get("<r1@us.example>") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    registry.record(["<r2@us.example>"], "e-new", "s", "rep@us.example", ["lee@prospect.example"])
    assert [e.enrollment_id for e in registry.domain_enrollments("prospect.example")] == ["e-new"]
    assert redis_client.zrange("el:domain:prospect.example:first", 0, -1) == [b"e-new"]


def test_the_bulk_path_packs_commands_exactly_as_redis_py_does():
    """``record_batches`` writes its commands itself (a third of redis-py's packing cost): byte for
    byte what redis-py's own ``pack_command`` sends, for the values it packs."""
    from redis.connection import Connection

    from workers.state.sends import _resp

    samples = [["EVAL", "return 1", 0], ["MGET", "el:send:<ü@x.example>", "el:send:<a@b>"],
               ["SET", "k", "\u65e5\u672c\u8a9e \u00e9\u00e8 \U0001f600", 7, -3, 0, 10**12],
               ["WATCH", *[f"el:send:<{i}@x>" for i in range(300)]], ["EXEC"]]
    for args in samples:
        assert _resp(args) == b"".join(Connection().pack_command(*args)), args
    with pytest.raises(TypeError):
        _resp(["SET", "k", 1.5])
    with pytest.raises(TypeError):
        _resp(["SET", "k", True])
