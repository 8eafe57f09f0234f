"""The Salesforce channel of the Notifier against the emulator (a real process verifying real RS256
signatures) and a real Redis: the activity lands on the prospect's Contact or Lead, found by the
send's ``to`` even when a colleague replied, once per transition however often it is delivered;
an expired session is renewed; limits and outages back off without giving up; an unknown
prospect is noted and done; only configured events are logged; the key never leaks."""
from __future__ import annotations

import io
import json

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
    sf_process.seed("User", Username=USER, LastName="Integration")
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


@pytest.mark.parametrize("fault", [{"kind": "request_limit", "count": 1}, {"kind": "http_503", "count": 1}])
def test_limits_and_outages_back_off_without_giving_up_then_deliver(redis_client, sf, key_files, fault):
    sf.seed("Contact", Email=PROSPECT, LastName="Pat")
    enroll(redis_client, "e1")
    enroll(redis_client, "e2")
    sf.stats()
    notifier = notifier_for(redis_client, sf, key_files, webhook_timeout=2.0)
    notifier.max_attempts = 2
    first, second = reply(redis_client, "e1"), reply(redis_client, "e2")
    notifier.salesforce._token(5.0)  # the session exists: the fault hits the REST call
    sf.fault(**fault)
    result = notifier.drain()
    assert (result.delivered, result.failed) == (0, 0) and result.retrying == 2
    assert notifier.failed() == [] and redis_client.zcard(OUTBOX_KEY) == 2
    attempts = {t.id: redis_client.hget(keys.outbox_state(t.id), "attempts") for t in (first, second)}
    # the Notifier's rule: the delivery that found Salesforce down is one attempt, the rest of the
    # drain is handed back without spending one (entries of two enrollments come in either order)
    assert sorted(attempts.values(), key=str) == [None, b"1"]
    tried = next(tid for tid, n in attempts.items() if n == b"1")
    pending = {p["id"]: p for p in notifier.pending()}
    assert pending[tried]["next_attempt_at"] and not sf.records("Task")
    make_due(redis_client)
    assert sum(r.delivered for r in drain_all(notifier)) == 2
    assert len(sf.records("Task")) == 2 and notifier.failed() == []


def test_a_prospect_without_a_record_is_noted_unmatched_and_done(redis_client, sf, key_files):
    enroll(redis_client, "e1")
    transition = reply(redis_client, "e1")
    notifier = notifier_for(redis_client, sf, key_files)
    assert notifier.drain().delivered == 1
    assert redis_client.zcard(OUTBOX_KEY) == 0 and notifier.failed() == []
    noted = json.loads(redis_client.hget(keys.SALESFORCE_UNMATCHED, PROSPECT))
    assert (noted["transition_id"], noted["enrollment_id"], noted["event"]) == (transition.id, "e1", "replied")
    requests_made = sf.stats()["api_requests"]
    assert notifier.drain().delivered == 0 and sf.stats()["api_requests"] == requests_made  # no retry loop
    assert sf.records("Task") == []
    EnrollmentStore(redis_client).transition("no-send", "stopped", "replied", event_key="r:x")  # no prospect known
    assert notifier.drain().delivered == 1 and redis_client.hexists(keys.SALESFORCE_UNMATCHED, "")


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


def test_the_private_key_never_appears_in_logs_errors_or_redis(redis_client, sf, key_files, tmp_path):
    with open(key_files[1]) as fh:
        key_text = fh.read()
    body = "".join(key_text.strip().splitlines()[1:-1])  # the base64 body, without the PEM armour
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    try:
        sf.seed("Contact", Email=PROSPECT, LastName="Pat")
        enroll(redis_client, "e1")
        enroll(redis_client, "e2")
        enroll(redis_client, "e3")
        notifier = notifier_for(redis_client, sf, key_files)
        reply(redis_client, "e1")
        notifier.drain()
        sf.fault("http_503", count=1)
        reply(redis_client, "e2")
        notifier.drain()
        sf.reset()  # the integration user is gone: the token is refused
        salesforce._TOKENS.clear()
        reply(redis_client, "e3")
        make_due(redis_client)
        notifier.drain()
        errors = [str(p["last_error"]) for p in notifier.pending()]
        assert any("token refused" in e for e in errors), errors
        bad = tmp_path / "bad.key"
        bad.write_text(key_text[:200])
        with pytest.raises(config.ConfigError) as caught:
            load_private_key(str(bad))
        errors.append(str(caught.value))
        errors += [repr(notifier), repr(notifier.salesforce)]
    finally:
        logs.configure("info", "json")
    stored = [str(redis_client.dump(k)) for k in redis_client.scan_iter()]
    stored += [str(v) for k in redis_client.scan_iter() if redis_client.type(k) == b"hash"
               for v in redis_client.hgetall(k).values()]
    for where, texts in (("logs", [out.getvalue()]), ("errors", errors), ("redis", stored)):
        for text in texts:
            for secret in (body[:40], body[-40:], key_text[100:160]):
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
