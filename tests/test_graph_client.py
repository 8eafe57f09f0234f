"""GraphClient against the Graph emulator over real HTTP, with tokens from its HTTPS token host
(msal, the emulator's throwaway CA): immutable ids, retries within a budget, typed errors, $batch."""
from __future__ import annotations

import base64
import time
import uuid

import pytest
import trustme

from emulators.services import GraphEmulator, free_port
from exchange_listener.core import config
from exchange_listener.core.config import ConfigError
from exchange_listener.sources.graph.client import (
    AuthenticationFailed,
    GraphClient,
    GraphError,
    GraphUnavailable,
    NotFound,
    body_bytes,
    certificate_credential,
    merge_prefer,
    retry_after,
    user_path,
)

MAILBOX = "sam@example.com"


def mail(subject: str = "hello") -> bytes:
    return (f"From: p@customer.example\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nhi\r\n").encode()


def settings_for(emu: GraphEmulator, credential: str = "secret", **overrides):
    return config.load(env=emu.settings_env(credential), overrides={"graph_poll_seconds": 60, **overrides})


def test_token_from_the_https_host_and_ids_that_survive_a_move(graph):
    client = GraphClient(settings_for(graph))
    item = graph.deliver(MAILBOX, mail())
    resp = client.request("GET", f"{user_path(MAILBOX)}/messages/{item['item_id']}",
                          params={"$select": "subject,parentFolderId"})
    assert 'IdType="ImmutableId"' in resp.headers.get("Preference-Applied", "")
    before = resp.json()
    assert before["id"] == item["item_id"] and before["subject"] == "hello"
    graph.create_folder(MAILBOX, "Projects")
    graph.move(item["item_id"], "Projects")
    after = client.get_json(f"{user_path(MAILBOX)}/messages/{item['item_id']}",
                            params={"$select": "subject,parentFolderId"})
    assert after["id"] == item["item_id"]
    assert after["parentFolderId"] != before["parentFolderId"]
    assert graph.stats()["token_grants"] == 1  # msal's cache: one token for every request


def test_other_preferences_are_merged_with_immutable_ids(graph):
    client = GraphClient(settings_for(graph))
    for n in range(3):
        graph.deliver(MAILBOX, mail(f"m{n}"))
    data = client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox/messages/delta",
                           params={"$select": "subject"}, headers={"Prefer": "odata.maxpagesize=2"})
    assert len(data["value"]) == 2 and "@odata.nextLink" in data
    assert all(v["id"].startswith("AAkA") for v in data["value"])  # the emulator's immutable ids
    rest = client.get_json(data["@odata.nextLink"], headers={"prefer": "odata.maxpagesize=2"})
    assert len(rest["value"]) == 1 and "@odata.deltaLink" in rest


def test_429_waits_for_retry_after(graph):
    client = GraphClient(settings_for(graph))
    client.token()
    graph.fault(kind="throttle", count=1, retry_after=0.6)
    started = time.monotonic()
    data = client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")
    took = time.monotonic() - started
    assert data["id"]
    assert 0.55 <= took < 5
    assert graph.stats()["throttled"] == 1


def test_503_is_retried(graph):
    client = GraphClient(settings_for(graph))
    graph.fault(kind="http_503", count=2, retry_after=0.1)
    assert client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")["id"]
    assert graph.stats()["http_503"] == 2


def test_throttled_past_the_budget_is_unavailable(graph):
    client = GraphClient(settings_for(graph), budget=1.0)
    client.token()
    graph.fault(kind="throttle", count=5, retry_after=3)
    started = time.monotonic()
    with pytest.raises(GraphUnavailable) as caught:
        client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")
    assert time.monotonic() - started < 1.5  # did not sleep a Retry-After it could not afford
    assert caught.value.status == 429 and caught.value.retry_after == 3.0


def test_network_failure_is_unavailable_after_retries(graph):
    dead = f"http://127.0.0.1:{free_port()}/v1.0"
    client = GraphClient(settings_for(graph, graph_url=dead), budget=1.5)
    started = time.monotonic()
    with pytest.raises(GraphUnavailable) as caught:
        client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")
    assert caught.value.status == 0 and "ConnectionError" in str(caught.value)
    assert time.monotonic() - started < 5


def test_typed_errors(graph):
    client = GraphClient(settings_for(graph))
    unknown = base64.urlsafe_b64encode(b"\x00" + uuid.uuid4().bytes * 2).decode()  # well formed, no such folder
    with pytest.raises(NotFound):
        client.get_json(f"{user_path(MAILBOX)}/mailFolders/{unknown}")
    with pytest.raises(GraphError) as malformed:
        client.get_json(f"{user_path(MAILBOX)}/mailFolders/nope")
    assert malformed.value.status == 400
    with pytest.raises(NotFound) as caught:
        client.get_json(f"{user_path('nobody@example.com')}/mailFolders/inbox")
    assert caught.value.code == "ErrorInvalidUser"
    with pytest.raises(GraphError) as bad:
        client.get_json(f"{user_path(MAILBOX)}/messages", params={"$select": "noSuchProperty"})
    assert bad.value.status == 400


def test_a_link_to_another_host_is_refused(graph):
    client = GraphClient(settings_for(graph))
    with pytest.raises(GraphError) as caught:
        client.request("GET", "https://evil.example/v1.0/users")
    assert caught.value.code == "ForeignLink"


def test_batch_of_45_in_three_calls_in_request_order(graph):
    client = GraphClient(settings_for(graph))
    ids = [graph.deliver(MAILBOX, mail(f"n{n}"))["item_id"] for n in range(15)]
    requests_, expected = [], []
    for n in range(45):
        if n % 3 == 2:
            requests_.append({"url": f"{user_path(MAILBOX)}/messages/AAkA{n:04d}gone"})
            expected.append(None)
        else:
            item_id = ids[n % 15]
            requests_.append({"url": f"/{user_path(MAILBOX)}/messages/{item_id}?$select=subject"})
            expected.append(item_id)
    answers = client.batch(requests_)
    assert len(answers) == 45
    for want, answer in zip(expected, answers):
        if want is None:
            assert answer["status"] in (400, 404)
        else:
            assert answer["status"] == 200 and answer["body"]["id"] == want
    stats = graph.stats()
    assert stats["batches"] == 3 and stats["batch_requests"] == 45


def test_batch_retries_only_throttled_items(graph):
    client = GraphClient(settings_for(graph))
    ids = [graph.deliver(MAILBOX, mail(f"t{n}"))["item_id"] for n in range(6)]
    graph.fault(kind="throttle", count=2, retry_after=0.3)
    started = time.monotonic()
    answers = client.batch([{"url": f"{user_path(MAILBOX)}/messages/{i}?$select=subject"} for i in ids])
    assert [a["status"] for a in answers] == [200] * 6
    assert [a["body"]["id"] for a in answers] == ids
    assert time.monotonic() - started >= 0.25
    stats = graph.stats()
    assert stats["batches"] == 2 and stats["batch_requests"] == 8  # 6, then the 2 throttled again


def test_batch_past_the_budget_returns_the_throttled_answers(graph):
    client = GraphClient(settings_for(graph), budget=0.5)
    item_id = graph.deliver(MAILBOX, mail())["item_id"]
    graph.fault(kind="throttle", count=10, retry_after=2)
    (answer,) = client.batch([{"url": f"{user_path(MAILBOX)}/messages/{item_id}"}])
    assert answer["status"] == 429 and retry_after(answer["headers"]) == 2.0


def test_batch_mime_bodies_come_back_as_bytes(graph):
    client = GraphClient(settings_for(graph))
    raw = mail("mime")
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    (answer,) = client.batch([{"url": f"{user_path(MAILBOX)}/messages/{item_id}/$value"}])
    assert answer["status"] == 200
    assert b"Subject: mime" in body_bytes(answer["body"])


def test_secret_never_in_error_text(graph):
    secret = graph.client_secret
    client = GraphClient(settings_for(graph))
    with pytest.raises(NotFound) as caught:  # Graph names the user it could not find
        client.get_json(f"users/{secret}@example.com/mailFolders/inbox")
    assert secret not in str(caught.value) and "***" in str(caught.value)
    wrong = "wrong-" + uuid.uuid4().hex
    refused = GraphClient(settings_for(graph, client_secret=wrong))
    with pytest.raises(AuthenticationFailed) as denied:
        refused.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")
    assert wrong not in str(denied.value) and "invalid_client" in str(denied.value)


def test_expired_token_is_refreshed_once(graph):
    """Tokens do not survive the emulator process: the first call after a restart meets 401
    InvalidAuthenticationToken, takes a fresh token and succeeds."""
    client = GraphClient(settings_for(graph))
    assert client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")["id"]
    graph.stop()
    graph.start()
    assert client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")["id"]
    assert graph.stats()["token_grants"] == 1


def test_certificate_credential(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("graph-app", key_type=trustme.KeyType.RSA)  # Entra takes RSA certificates
    pem = tmp_path / "app.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    with GraphEmulator(mailboxes=[MAILBOX], client_certificate=str(pem)) as emu:
        settings = settings_for(emu, "certificate")
        assert not settings.client_secret
        client = GraphClient(settings)
        assert client.get_json(f"{user_path(MAILBOX)}/mailFolders/inbox")["id"]
        assert emu.stats()["token_grants"] == 1
    other = tmp_path / "other.pem"
    ca.issue_cert("someone-else", key_type=trustme.KeyType.RSA).private_key_and_cert_chain_pem.write_to_path(str(other))
    with GraphEmulator(mailboxes=[MAILBOX], client_certificate=str(pem)) as emu:
        stranger = GraphClient(settings_for(emu, "certificate", client_certificate_file=str(other)))
        with pytest.raises(AuthenticationFailed):
            stranger.token()


def test_certificate_file_must_hold_cert_and_key(tmp_path):
    only_cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("x").cert_chain_pems[0].write_to_path(str(only_cert))
    with pytest.raises(ConfigError):
        certificate_credential(str(only_cert))
    with pytest.raises(ConfigError):
        certificate_credential(str(tmp_path / "missing.pem"))
    ec = tmp_path / "ec.pem"
    trustme.CA().issue_cert("x", key_type=trustme.KeyType.ECDSA).private_key_and_cert_chain_pem.write_to_path(str(ec))
    with pytest.raises(ConfigError, match="RSA"):
        certificate_credential(str(ec))


def test_helpers():
    assert user_path("a+b@example.com") == "users/a%2Bb@example.com"
    assert merge_prefer('IdType="ImmutableId"', "odata.maxpagesize=5, idtype=\"immutableid\"") == \
        'IdType="ImmutableId", odata.maxpagesize=5'
    assert retry_after({"Retry-After": "1.5"}) == 1.5
    assert retry_after({"retry-after": "-3"}) == 0.0
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None
    assert body_bytes("aGk=") == b"hi"
    assert body_bytes("From: a\r\n\r\nx") == b"From: a\r\n\r\nx"
    assert body_bytes({"a": 1}) == b'{"a": 1}'
