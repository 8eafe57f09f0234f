"""The Salesforce channel of the Notifier against the emulator (a real process verifying real RS256
signatures) and a real Redis: the activity lands on the prospect's Contact or Lead, found by the
send's ``to`` even when a colleague replied, once per transition however often it is delivered;
an expired session is renewed; limits and outages are handed back without spending an attempt
(never given up); a delivery keeps to its deadline; two deliveries of one transition at once
make one activity; an unknown prospect is noted (for ``retention_days``) and done; only
configured events are logged; neither the key nor the access token leaks."""
from __future__ import annotations

import io
import json
import threading
import time

import pytest
from test_salesforce_emulator import CLIENT_ID, USER, make_key_and_cert

from emulators.services import SalesforceEmulator
from exchange_listener.core import config, keys, logs
from workers.sinks import salesforce
from workers.sinks.salesforce import load_private_key
from workers.sinks.webhooks import Notifier
from workers.state.enrollments import OUTBOX_KEY, EnrollmentStore
from workers.state.sends import SendRegistry

PROSPECT = "pat@prospect.example"
COLLEAGUE = "sam@prospect.example"
MAILBOX = "rep@ours.example"


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    return make_key_and_cert(tmp_path_factory.mktemp("sf-sink-keys"))


@pytest.fixture(scope="module")
def sf_process(key_files):
    with SalesforceEmulator(jwt_cert=key_files[2], client_ids=[CLIENT_ID]) as emu:
        yield emu


@pytest.fixture
def sf(sf_process):
    sf_process.reset()
    salesforce._TOKENS.clear()  # a fresh process's token cache: each test starts without a session
    # set up as docs/salesforce.md says, with "Update Email Messages" for email_message mode
    sf_process.seed("User", Username=USER, LastName="Integration", PermissionsUpdateEmailMessages=True)
    return sf_process


def settings_for(sf, key_files, **values):
    return config.load(env={}, overrides={
        "salesforce_login_url": sf.login_url, "salesforce_client_id": CLIENT_ID, "salesforce_username": USER,
        "salesforce_private_key_file": key_files[1], **values})


def notifier_for(redis_client, sf, key_files, **values) -> Notifier:
    notifier = Notifier.from_settings(redis_client, settings_for(sf, key_files, **values))
    notifier.backoff_base = 0.05
    return notifier


def enroll(redis_client, enrollment: str, to=(PROSPECT,)) -> None:
    SendRegistry(redis_client).record([f"<{enrollment}@ours.example>"], enrollment, "seq-1", MAILBOX, list(to))


def reply(redis_client, enrollment: str, by=PROSPECT, status="stopped", reason="replied", n=1):
    return EnrollmentStore(redis_client).transition(enrollment, status, reason, event_key=f"{reason}:{enrollment}:{n}",
                                                    by=by, item_id=f"item-{n}", message_id=f"<reply-{n}@prospect.example>",
                                                    mailbox=MAILBOX)


def drain_all(notifier: Notifier):
    results = [notifier.drain()]
    while results[-1].more:
        results.append(notifier.drain())
    return results


def make_due(redis_client) -> None:
    for tid in redis_client.zrange(OUTBOX_KEY, 0, -1):
        redis_client.zadd(OUTBOX_KEY, {tid: 0})


def test_a_colleagues_reply_is_logged_as_a_task_on_the_prospects_contact(redis_client, sf, key_files):
    contact = sf.seed("Contact", Email="Pat@Prospect.example", LastName="Pat")
    sf.seed("Lead", Email=PROSPECT, LastName="Pat", Company="Prospect")  # the Contact wins
    sf.seed("Contact", Email=COLLEAGUE, LastName="Sam")
    enroll(redis_client, "e1", to=(PROSPECT, "cc-ish@prospect.example"))
    transition = reply(redis_client, "e1", by=COLLEAGUE)
    result = notifier_for(redis_client, sf, key_files).drain()
    assert (result.delivered, result.retrying, result.failed) == (1, 0, 0)
    [task] = sf.records("Task")
    assert task["WhoId"] == contact
    assert (task["Status"], task["TaskSubtype"], task["ActivityDate"]) == ("Completed", "Email", transition.at[:10])
    assert task["ExchangeListener_Transition_Id__c"] == transition.id
    assert PROSPECT in task["Subject"]
    for text in ("<reply-1@prospect.example>", "reason replied", f"From: {COLLEAGUE}", transition.id):
        assert text in task["Description"]
    assert redis_client.zcard(OUTBOX_KEY) == 0


def test_without_a_contact_the_unconverted_lead_gets_it(redis_client, sf, key_files):
    sf.seed("Lead", Email=PROSPECT, LastName="Old", Company="P", IsConverted=True)
    lead = sf.seed("Lead", Email=PROSPECT, LastName="Pat", Company="Prospect")
    enroll(redis_client, "e1")
    reply(redis_client, "e1")
    assert notifier_for(redis_client, sf, key_files).drain().delivered == 1
    assert [t["WhoId"] for t in sf.records("Task")] == [lead]


def test_the_same_transition_delivered_twice_makes_one_task(redis_client, sf, key_files):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files)
    assert notifier.drain().delivered == 1
    redis_client.zadd(OUTBOX_KEY, {transition.id: 0})  # delivered again (a crash before the bookkeeping)
    assert notifier.drain().delivered == 1
    assert notifier.salesforce.deliver(transition) == "already_logged"
    assert len(sf.records("Task")) == 1


def test_an_expired_session_gets_a_new_token_once_and_the_delivery_succeeds(redis_client, sf, key_files):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    for enrollment in ("e1", "e2"):
        enroll(redis_client, enrollment)
    notifier = notifier_for(redis_client, sf, key_files)
    reply(redis_client, "e1")
    assert notifier.drain().delivered == 1
    assert sf.stats()["token_grants"] == 1
    reply(redis_client, "e2")
    assert notifier.drain().delivered == 1
    assert sf.stats()["token_grants"] == 1  # cached across deliveries
    sf.fault("expire_sessions")
    enroll(redis_client, "e3")
    reply(redis_client, "e3")
    result = notifier.drain()
    assert (result.delivered, result.retrying) == (1, 0)
    assert sf.stats()["token_grants"] == 2 and len(sf.records("Task")) == 3


def attempts_of(redis_client, *transitions) -> list:
    return [redis_client.hget(keys.outbox_state(t.id), "attempts") for t in transitions]


@pytest.mark.parametrize("fault, at_least, at_most", [
    ({"kind": "request_limit", "count": 1}, 300, 330),  # a rolling 24-hour limit: minutes, not seconds
    ({"kind": "http_503", "count": 1}, 0, 5),
    ({"kind": "http_503", "count": 1, "retry_after": 120}, 115, 125),  # Salesforce's Retry-After
])
def test_limits_and_outages_back_off_without_giving_up_then_deliver(redis_client, sf, key_files, fault, at_least,
                                                                      at_most):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    enroll(redis_client, "e2")
    notifier = notifier_for(redis_client, sf, key_files, webhook_timeout=2.0)
    notifier.max_attempts = 1  # one spent attempt would give up
    first, second = reply(redis_client, "e1"), reply(redis_client, "e2")
    notifier.salesforce._token(time.monotonic() + 5)  # the session exists: the fault hits the REST calls
    sf.fault(**fault)
    before = time.time()
    result = notifier.drain()
    assert (result.delivered, result.failed, result.retrying) == (0, 0, 2)
    assert notifier.failed() == [] and redis_client.zcard(OUTBOX_KEY) == 2
    assert attempts_of(redis_client, first, second) == [None, None]  # neither entry spent an attempt
    due = [score / 1000 - before for _, score in redis_client.zrange(OUTBOX_KEY, 0, -1, withscores=True)]
    assert all(at_least <= d <= at_most for d in due), due
    assert all("not counted as an attempt" in p["last_error"] for p in notifier.pending()) and not sf.records("Task")
    make_due(redis_client)
    assert sum(r.delivered for r in drain_all(notifier)) == 2
    assert len(sf.records("Task")) == 2 and notifier.failed() == [] and notifier.stats().get("gave_up") is None


def test_a_long_outage_gives_nothing_up_and_the_back_off_grows(redis_client, sf, key_files):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    enroll(redis_client, "e2")
    notifier = notifier_for(redis_client, sf, key_files)
    notifier.max_attempts, notifier.backoff_base = 1, 1.0
    made = reply(redis_client, "e1"), reply(redis_client, "e2")
    sf.fault("http_503", count=1000)
    waits = []
    for _ in range(6):  # a day of drains, compressed: each finds Salesforce down
        make_due(redis_client)
        before = time.time()
        result = notifier.drain()
        assert (result.delivered, result.failed) == (0, 0)
        waits.append(min(score for _, score in redis_client.zrange(OUTBOX_KEY, 0, -1, withscores=True)) / 1000 - before)
    assert waits == sorted(waits) and waits[-1] > 4 * waits[0]  # doubling per drain that found it down
    assert attempts_of(redis_client, *made) == [None, None] and notifier.failed() == []
    sf.fault("http_503", count=0)
    make_due(redis_client)
    assert sum(r.delivered for r in drain_all(notifier)) == 2 and len(sf.records("Task")) == 2
    enroll(redis_client, "e3")
    reply(redis_client, "e3", n=3)
    sf.fault("http_503", count=1)
    before = time.time()
    notifier.drain()
    [(_, score)] = redis_client.zrange(OUTBOX_KEY, 0, -1, withscores=True)
    assert score / 1000 - before < waits[2]  # the success reset the back-off


def test_a_delivery_stops_at_its_deadline_and_its_retry_completes_it(redis_client, sf, key_files):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files, webhook_timeout=5.0)
    notifier.max_attempts = 1
    sink = notifier.salesforce
    sink._token(time.monotonic() + 5)  # a session, so only the REST calls are slow
    sf.fault("latency", seconds=0.5, count=2)  # the Contact query and the read: each alone within timeout
    began = time.monotonic()
    with pytest.raises(salesforce.Down) as caught:
        sink.deliver(transition, deadline=began + 0.6)
    assert caught.value.out_of_time and time.monotonic() - began < 1.2
    assert sf.records("Task") == []
    # through the Notifier: a budget of 2 x 0.4 s against 0.3 s per request: the upsert is cut short
    # (Salesforce may still make the Task), handed back, no attempt spent
    short = notifier_for(redis_client, sf, key_files, webhook_timeout=0.4)
    short.max_attempts = 1
    sf.fault("latency", seconds=0.3, count=3)
    began = time.monotonic()
    result = short.drain()
    assert (result.delivered, result.failed, result.retrying) == (0, 0, 1) and time.monotonic() - began < 1.5
    assert attempts_of(redis_client, transition) == [None]
    time.sleep(0.6)  # whatever the server still had in hand is done
    make_due(redis_client)
    assert notifier.drain().delivered == 1 and short.failed() == []
    assert [t["ExchangeListener_Transition_Id__c"] for t in sf.records("Task")] == [transition.id]


def race(redis_client, sf, notifiers, transition_id):
    """Two drainers deliver one entry at once: the first one's lease is made to run out while it
    is still delivering (every request is slow), and the second claims the entry too."""
    sf.fault("latency", seconds=0.3, count=200)
    results = []
    first = threading.Thread(target=lambda: results.append(notifiers[0].drain()))
    first.start()
    deadline = time.monotonic() + 5
    while (redis_client.zscore(OUTBOX_KEY, transition_id) or 0) <= time.time() * 1000:
        assert time.monotonic() < deadline, "the first drainer never claimed the entry"
        time.sleep(0.005)
    redis_client.zadd(OUTBOX_KEY, {transition_id: 0})  # its lease ran out
    results.append(notifiers[1].drain())
    first.join(15)
    sf.fault("latency", seconds=0, count=0)
    return results


def test_two_drainers_delivering_one_transition_at_once_make_one_task(redis_client, sf, key_files):
    contact = sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifiers = [notifier_for(redis_client, sf, key_files), notifier_for(redis_client, sf, key_files)]
    for notifier in notifiers:
        notifier.max_attempts = 1  # a refusal would give up at once
    results = race(redis_client, sf, notifiers, transition.id)
    assert [(r.delivered, r.failed) for r in results] == [(1, 0), (1, 0)]
    assert notifiers[0].failed() == [] and redis_client.zcard(OUTBOX_KEY) == 0
    [task] = sf.records("Task")
    assert (task["WhoId"], task["ExchangeListener_Transition_Id__c"]) == (contact, transition.id)
    assert notifiers[1].salesforce.deliver(transition) == "already_logged"


def test_two_drainers_in_email_message_mode_make_one_message_and_one_relation(redis_client, sf, key_files):
    contact = sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    enroll(redis_client, "e2")
    notifiers = [notifier_for(redis_client, sf, key_files, salesforce_activity="email_message") for _ in range(2)]
    for notifier in notifiers:
        notifier.max_attempts = 1
    fresh = reply(redis_client, "e1")  # both upsert the message
    assert [(r.delivered, r.failed) for r in race(redis_client, sf, notifiers, fresh.id)] == [(1, 0), (1, 0)]
    # a delivery that stopped after the message: both find it and both query for its relation at once
    healing = reply(redis_client, "e2", n=2)
    sf.seed("EmailMessage", Subject="x", Status="0", Incoming=True, ExchangeListener_Transition_Id__c=healing.id)
    assert [(r.delivered, r.failed) for r in race(redis_client, sf, notifiers, healing.id)] == [(1, 0), (1, 0)]
    messages = {m["ExchangeListener_Transition_Id__c"]: m["Id"] for m in sf.records("EmailMessage")}
    assert set(messages) == {fresh.id, healing.id} and len(sf.records("EmailMessage")) == 2
    relations = sorted((r["EmailMessageId"], r["RelationId"]) for r in sf.records("EmailMessageRelation"))
    assert relations == sorted([(messages[fresh.id], contact), (messages[healing.id], contact)])
    assert notifiers[0].failed() == [] and redis_client.zcard(OUTBOX_KEY) == 0


def test_without_update_email_messages_the_relation_is_refused_and_said_so(redis_client, sf, key_files):
    sf.reset()
    salesforce._TOKENS.clear()
    sf.seed("User", Username=USER, LastName="Integration")  # no "Update Email Messages"
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files, salesforce_activity="email_message")
    assert notifier.drain().retrying == 1
    assert attempts_of(redis_client, transition) == [b"1"]  # a refusal, not an outage: an attempt spent
    [pending] = notifier.pending()
    assert "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY" in pending["last_error"]
    assert sf.records("EmailMessageRelation") == []


def test_the_sinks_soql_escaping_finds_odd_addresses_and_stops_injection(redis_client, sf, key_files):
    odd = "o'brien\\x@prospect.example"
    contact = sf.seed("Contact", Email=odd, LastName="O'Brien")
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")  # what an injected OR would match
    enroll(redis_client, "e-odd", to=(odd,))
    injection = "x' OR Email != '@p.example"  # unescaped, the WHERE would match every Contact
    enroll(redis_client, "e-inject", to=(injection,))
    sink = notifier_for(redis_client, sf, key_files).salesforce
    assert sink.deliver(reply(redis_client, "e-odd")) == "logged"
    assert [t["WhoId"] for t in sf.records("Task")] == [contact]
    assert sink.deliver(reply(redis_client, "e-inject", n=2)) == "unmatched"
    assert len(sf.records("Task")) == 1
    assert sink.unmatched()[injection.lower()]["reason"] == salesforce.NO_RECORD


def test_a_prospect_without_a_record_is_noted_unmatched_and_done(redis_client, sf, key_files):
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files, retention_days=30)
    assert notifier.drain().delivered == 1
    assert redis_client.zcard(OUTBOX_KEY) == 0 and notifier.failed() == []
    noted = json.loads(redis_client.hget(keys.SALESFORCE_UNMATCHED, PROSPECT))
    assert (noted["transition_id"], noted["enrollment_id"], noted["event"]) == (transition.id, "e1", "replied")
    assert noted["reason"] == "no Contact or Lead with this email"
    requests_made = sf.stats()["api_requests"]
    assert notifier.drain().delivered == 0 and sf.stats()["api_requests"] == requests_made  # no retry loop
    assert sf.records("Task") == []
    store = EnrollmentStore(redis_client)
    for enrollment in ("old-1", "old-2"):  # no prospect known: each noted under its enrollment, not under ""
        store.transition(enrollment, "stopped", "replied", event_key=f"r:{enrollment}")
    assert notifier.drain().delivered == 2
    notes = notifier.salesforce.unmatched()
    assert "" not in notes and {"enrollment:old-1", "enrollment:old-2"} <= set(notes)
    assert notes["enrollment:old-2"]["reason"] == "no prospect on record (enrolled before this version)"
    assert 29 * 86400 < redis_client.ttl(keys.SALESFORCE_UNMATCHED) <= 30 * 86400


def test_unmatched_notes_older_than_the_retention_are_dropped_when_one_is_written(redis_client, sf, key_files):
    redis_client.hset(keys.SALESFORCE_UNMATCHED, mapping={
        "old@prospect.example": json.dumps({"transition_id": "t-old", "noted_at": "2020-01-01T00:00:00Z"}),
        "recent@prospect.example": json.dumps({"transition_id": "t-new",
                                               "noted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})})
    enroll(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files, retention_days=30)
    assert notifier.salesforce.deliver(reply(redis_client, "e1")) == "unmatched"
    assert set(notifier.salesforce.unmatched()) == {"recent@prospect.example", PROSPECT}
    assert redis_client.ttl(keys.SALESFORCE_UNMATCHED) > 29 * 86400


def test_events_not_configured_are_not_logged(redis_client, sf, key_files):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    for enrollment in ("e1", "e2", "e3", "e4"):
        enroll(redis_client, enrollment)
    notifier = notifier_for(redis_client, sf, key_files, salesforce_events="bounced")
    reply(redis_client, "e1")  # replied: not configured
    reply(redis_client, "e2", status="paused", reason="auto_reply")  # paused: not configured
    reply(redis_client, "e3", status="stopped", reason="domain_replied")  # never an event
    assert notifier.drain().delivered == 3
    assert sf.stats()["api_requests"] == 0 and sf.stats()["token_grants"] == 0
    bounce = reply(redis_client, "e4", by="mailer-daemon@ours.example", reason="bounced")
    assert notifier.drain().delivered == 1
    [task] = sf.records("Task")
    assert task["ExchangeListener_Transition_Id__c"] == bounce.id and task["Subject"].startswith("Email bounced")


def test_email_message_mode_links_the_message_to_the_record_once(redis_client, sf, key_files):
    contact = sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    enroll(redis_client, "e2")
    notifier = notifier_for(redis_client, sf, key_files, salesforce_activity="email_message")
    own, colleague = reply(redis_client, "e1"), reply(redis_client, "e2", by=COLLEAGUE)
    assert notifier.drain().delivered == 2
    for transition in (own, colleague):  # delivered again: nothing new
        assert notifier.salesforce.deliver(transition) == "already_logged"
    messages = {m["ExchangeListener_Transition_Id__c"]: m for m in sf.records("EmailMessage")}
    assert set(messages) == {own.id, colleague.id} and sf.records("Task") == []
    assert messages[own.id]["MessageIdentifier"] == "<reply-1@prospect.example>"
    assert messages[colleague.id]["FromAddress"] == COLLEAGUE and messages[own.id]["Incoming"] is True
    relations = {(r["EmailMessageId"], r["RelationId"], r["RelationType"]) for r in sf.records("EmailMessageRelation")}
    assert relations == {(messages[own.id]["Id"], contact, "FromAddress"),
                         (messages[colleague.id]["Id"], contact, "CcAddress")}
    assert len(sf.records("EmailMessageRelation")) == 2


def test_a_refusal_spends_attempts_and_is_given_up_like_a_webhook(redis_client, key_files):
    """The external-id field was never created in the org: Salesforce answers 404 NOT_FOUND."""
    with SalesforceEmulator(jwt_cert=key_files[2], extra_args=["--external-id", "Task.Other__c"]) as emu:
        emu.seed("User", Username=USER)
        emu.seed("Contact", Email=PROSPECT, LastName="Pat")
        enroll(redis_client, "e1")
        transition = reply(redis_client, "e1")
        notifier = notifier_for(redis_client, emu, key_files)
        notifier.max_attempts = 2
        assert notifier.drain().retrying == 1
        assert redis_client.hget(keys.outbox_state(transition.id), "attempts") == b"1"
        make_due(redis_client)
        assert notifier.drain().failed == 1
        [failed] = notifier.failed()
        assert failed["id"] == transition.id and "ExchangeListener_Transition_Id__c" in failed["last_error"]


def test_end_to_end_reply_bounce_and_pause_from_the_store_through_the_notifier(redis_client, sf, key_files):
    contact = sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    lead = sf.seed("Lead", Email="lee@lead.example", LastName="Lee", Company="Lead Co")
    enroll(redis_client, "e-reply")
    enroll(redis_client, "e-bounce", to=("lee@lead.example",))
    enroll(redis_client, "e-ooo")
    store = EnrollmentStore(redis_client)
    assert store.get("e-reply")["prospect"] == PROSPECT
    made = [store.transition("e-reply", "stopped", "replied", event_key="replied:1", by=COLLEAGUE,
                             message_id="<r@prospect.example>", mailbox=MAILBOX),
            store.transition("e-bounce", "stopped", "bounced", event_key="bounced:1", by="mailer-daemon@x.example"),
            store.transition("e-ooo", "paused", "auto_reply", event_key="ooo:1", by=PROSPECT, until="2030-01-02")]
    notifier = notifier_for(redis_client, sf, key_files)
    assert notifier.channels == ["salesforce"]
    assert sum(r.delivered for r in drain_all(notifier)) == 3
    tasks = {t["ExchangeListener_Transition_Id__c"]: t for t in sf.records("Task")}
    assert {tid: tasks[tid]["WhoId"] for tid in tasks} == {made[0].id: contact, made[1].id: lead, made[2].id: contact}
    assert "Paused until: 2030-01-02" in tasks[made[2].id]["Description"]
    assert notifier.stats()["delivered"] == 3


def redis_values(redis_client) -> list[str]:
    """Every key's name and value as stored, read by its type (not DUMP, which compresses)."""
    out = []
    for key in redis_client.scan_iter():
        kind = redis_client.type(key)
        if kind == b"string":
            values = [redis_client.get(key)]
        elif kind == b"hash":
            values = [f + b"=" + v for f, v in redis_client.hgetall(key).items()]
        elif kind == b"list":
            values = redis_client.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(redis_client.smembers(key))
        elif kind == b"zset":
            values = redis_client.zrange(key, 0, -1)
        elif kind == b"stream":
            values = [f + b"=" + v for _, fields in redis_client.xrange(key) for f, v in fields.items()]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {key!r}")
        out += [key.decode()] + [v.decode("utf-8", "replace") for v in values if v is not None]
    return out


def test_the_private_key_and_the_token_never_appear_in_logs_errors_or_redis(redis_client, sf, key_files, tmp_path):
    with open(key_files[1]) as fh:
        key_text = fh.read()
    body = "".join(key_text.strip().splitlines()[1:-1])  # the base64 body, without the PEM armour
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    tokens = []
    try:
        sf.seed("Contact", Email=PROSPECT, LastName="Pat")
        for enrollment in ("e1", "e2", "e3"):
            enroll(redis_client, enrollment)
        notifier = notifier_for(redis_client, sf, key_files)
        notifier.max_attempts = 1
        reply(redis_client, "e1")
        notifier.drain()
        tokens += [t.access_token for t in salesforce._TOKENS.values()]
        sf.fault("http_503", count=1)
        reply(redis_client, "e2")
        notifier.drain()
        sf.fault("expire_sessions")  # a second token, fetched after INVALID_SESSION_ID
        make_due(redis_client)
        notifier.drain()
        tokens += [t.access_token for t in salesforce._TOKENS.values()]
        sf.reset()  # the integration user is gone: the token is refused, and given up
        salesforce._TOKENS.clear()
        reply(redis_client, "e3")
        make_due(redis_client)
        notifier.drain()
        errors = [json.dumps(notifier.failed()), json.dumps(notifier.pending())]
        assert "token refused" in errors[0], errors
        bad = tmp_path / "bad.key"
        bad.write_text(key_text[:200])
        with pytest.raises(config.ConfigError) as caught:
            load_private_key(str(bad))
        errors.append(str(caught.value))
        errors += [repr(notifier), repr(notifier.salesforce), repr(list(salesforce._TOKENS.values()))]
    finally:
        logs.configure("info", "json")
    assert len(set(tokens)) == 2 and all(len(t) > 40 for t in tokens)
    stored = redis_values(redis_client)
    assert any(PROSPECT in v for v in stored)  # the reader sees the values themselves
    secrets = [body[:40], body[-40:], key_text[100:160]] + tokens + [t.split("!")[-1][:24] for t in tokens]
    for where, texts in (("logs", [out.getvalue()]), ("errors", errors), ("redis", stored)):
        for text in texts:
            for secret in secrets:
                assert secret not in text, where
    assert "salesforce token obtained" in out.getvalue()


def test_a_missing_key_file_is_a_configuration_error_at_start(redis_client, sf, tmp_path):
    with pytest.raises(config.ConfigError, match="salesforce_private_key_file"):
        Notifier.from_settings(redis_client, config.load(env={}, overrides={
            "salesforce_login_url": sf.login_url, "salesforce_client_id": CLIENT_ID, "salesforce_username": USER,
            "salesforce_private_key_file": str(tmp_path / "nope.key")}))


def test_the_audience_is_the_login_host_salesforce_expects():
    assert salesforce.audience("https://acme--dev.sandbox.my.salesforce.com") == "https://test.salesforce.com"
    assert salesforce.audience("https://test.salesforce.com") == "https://test.salesforce.com"
    assert salesforce.audience("https://acme.my.salesforce.com") == "https://login.salesforce.com"
    assert salesforce.ASSERTION_SECONDS <= 180
