"""The Salesforce emulator as a real process: the JWT bearer flow with real RS256 signatures
checked against a certificate, the SOQL subset with its escapes, create / upsert / get, and the
errors Salesforce sends (invalid_grant, INVALID_SESSION_ID, REQUEST_LIMIT_EXCEEDED, 503)."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from emulators.salesforce import soql
from emulators.salesforce.server import case_safe
from emulators.services import SalesforceEmulator, free_port

GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
USER = "integration@acme.example"
CLIENT_ID = "3MVG9-consumer-key"


def make_key_and_cert(directory) -> tuple[rsa.RSAPrivateKey, str, str]:
    """A fresh RSA key, its PEM file and a self-signed certificate file (what the connected app holds)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange-listener test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "server.key", directory / "server.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, str(key_path), str(cert_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_key_and_cert(tmp_path_factory.mktemp("sf-keys"))


@pytest.fixture(scope="module")
def sf_process(keys):
    with SalesforceEmulator(jwt_cert=keys[2], client_ids=[CLIENT_ID]) as emu:
        yield emu


@pytest.fixture
def sf(sf_process):
    sf_process.reset()
    sf_process.seed("User", Username=USER, Email=USER, LastName="Integration")
    return sf_process


def assertion(key, **claims) -> str:
    body = {"iss": CLIENT_ID, "sub": USER, "aud": "https://login.salesforce.com", "exp": int(time.time()) + 170}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="RS256")


def token_response(sf, text: str) -> requests.Response:
    return requests.post(f"{sf.login_url}/services/oauth2/token", data={"grant_type": GRANT, "assertion": text},
                         timeout=10)


def token(sf, key) -> dict:
    response = token_response(sf, assertion(key))
    assert response.status_code == 200, response.text
    return response.json()


def api(sf, method, path, access_token, **kwargs) -> requests.Response:
    return requests.request(method, f"{sf.login_url}/services/data/v59.0/{path}", timeout=10,
                            headers={"Authorization": f"Bearer {access_token}"}, **kwargs)


# -- the token endpoint -----------------------------------------------------------------------
def test_a_signed_assertion_for_a_seeded_user_gets_a_token(sf, keys):
    body = token(sf, keys[0])
    assert set(body) == {"access_token", "instance_url", "token_type", "scope", "id", "issued_at"}
    assert body["token_type"] == "Bearer" and body["instance_url"] == sf.login_url
    assert api(sf, "GET", "query", body["access_token"], params={"q": "SELECT Id FROM Lead"}).status_code == 200


@pytest.mark.parametrize("case, claims, error, description", [
    ("unknown user", {"sub": "nobody@acme.example"}, "invalid_grant", "user hasn't approved this consumer"),
    ("expired", {"exp": int(time.time()) - 5}, "invalid_grant", "expired authorization code"),
    ("too far ahead", {"exp": int(time.time()) + 3600}, "invalid_grant", "invalid assertion"),
    ("wrong audience", {"aud": "https://example.com"}, "invalid_grant", "audience is invalid"),
    ("unknown app", {"iss": "someone-else"}, "invalid_client_id", "client identifier invalid"),
])
def test_assertions_salesforce_refuses(sf, keys, case, claims, error, description):
    response = token_response(sf, assertion(keys[0], **claims))
    assert (response.status_code, response.json()) == (400, {"error": error, "error_description": description}), case


def test_an_assertion_signed_with_another_key_is_refused(sf, keys):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    response = token_response(sf, assertion(other))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    unsigned = jwt.encode({"iss": CLIENT_ID, "sub": USER, "aud": "https://login.salesforce.com",
                           "exp": int(time.time()) + 60}, "a-shared-secret-of-thirty-two-bytes!", algorithm="HS256")
    assert token_response(sf, unsigned).status_code == 400
    assert token_response(sf, "not-a-jwt").json()["error"] == "invalid_grant"
    wrong_grant = requests.post(f"{sf.login_url}/services/oauth2/token", timeout=10,
                                data={"grant_type": "password", "assertion": assertion(keys[0])})
    assert wrong_grant.json()["error"] == "unsupported_grant_type"


def test_without_a_certificate_any_well_formed_assertion_for_a_seeded_user_is_accepted(keys):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with SalesforceEmulator() as emu:
        emu.seed("User", Username=USER)
        assert token_response(emu, assertion(other)).status_code == 200
        assert token_response(emu, assertion(other, sub="x@y.example")).status_code == 400


# -- SOQL ---------------------------------------------------------------------------------------
def test_soql_by_email_is_case_insensitive_and_filters_converted_leads(sf, keys):
    access = token(sf, keys[0])["access_token"]
    lead = sf.seed("Lead", Email="Pat@Prospect.example", LastName="Pat", Company="Prospect")
    sf.seed("Lead", Email="pat@prospect.example", LastName="Pat", Company="Prospect", IsConverted=True)
    q = "select Id, Email from LEAD where email = 'pat@PROSPECT.example' and IsConverted = false limit 5"
    body = api(sf, "GET", "query", access, params={"q": q}).json()
    assert body["totalSize"] == 1 and body["done"] is True
    assert body["records"][0]["Id"] == lead and body["records"][0]["attributes"]["type"] == "Lead"
    assert api(sf, "GET", "query", access, params={"q": "SELECT Id FROM Lead LIMIT 1"}).json()["totalSize"] == 1


def test_soql_string_escapes(sf, keys):
    access = token(sf, keys[0])["access_token"]
    odd = "o'brien\\x@prospect.example"
    contact = sf.seed("Contact", Email=odd, LastName="O'Brien")
    assert soql.quote(odd) == "'o\\'brien\\\\x@prospect.example'"
    found = api(sf, "GET", "query", access, params={"q": f"SELECT Id FROM Contact WHERE Email = {soql.quote(odd)}"})
    assert [r["Id"] for r in found.json()["records"]] == [contact]
    for bad in ("SELECT Id FROM Contact WHERE Email = 'o'brien'", "SELECT Id FROM Contact WHERE Email = 'a\\qb'",
                "SELECT Id FROM Contact WHERE Email LIKE 'a%'", "DELETE FROM Contact", "SELECT FROM Contact",
                "SELECT Id FROM Contact WHERE Email = 'a' OR Email = 'b'", "SELECT Id FROM Contact LIMIT x"):
        response = api(sf, "GET", "query", access, params={"q": bad})
        assert response.status_code == 400 and response.json()[0]["errorCode"] == "MALFORMED_QUERY", bad
    unknown = api(sf, "GET", "query", access, params={"q": "SELECT Nope FROM Contact"})
    assert (unknown.status_code, unknown.json()[0]["errorCode"]) == (400, "INVALID_FIELD")


# -- sObjects -----------------------------------------------------------------------------------
def test_create_upsert_and_get(sf, keys):
    access = token(sf, keys[0])["access_token"]
    contact = sf.seed("Contact", Email="pat@prospect.example", LastName="Pat")
    path = "sobjects/Task/ExchangeListener_Transition_Id__c/t-1"
    task = {"Subject": "Reply", "WhoId": contact, "Status": "Completed", "TaskSubtype": "Email",
            "ActivityDate": "2025-03-04"}
    made = api(sf, "PATCH", path, access, json=task)
    assert made.status_code == 201 and made.json()["created"] is True and made.json()["success"] is True
    again = api(sf, "PATCH", path, access, json={"Subject": "Reply (2)"})
    assert (again.status_code, again.json()["created"], again.json()["id"]) == (200, False, made.json()["id"])
    subtype = api(sf, "PATCH", path, access, json={"TaskSubtype": "Call"})  # create-only field
    assert (subtype.status_code, subtype.json()[0]["errorCode"]) == (400, "INVALID_FIELD_FOR_INSERT_UPDATE")
    row = api(sf, "GET", f"sobjects/Task/{made.json()['id']}", access).json()
    assert (row["Subject"], row["WhoId"], row["TaskSubtype"]) == ("Reply (2)", contact, "Email")
    assert api(sf, "GET", path, access).json()["Id"] == made.json()["id"]
    assert len(sf.records("Task")) == 1
    created = api(sf, "POST", "sobjects/Contact", access, json={"LastName": "Lee", "Email": "lee@x.example"})
    assert created.status_code == 201 and created.json()["id"].startswith("003")
    missing = api(sf, "POST", "sobjects/Contact", access, json={"Email": "x@x.example"})
    assert missing.json()[0]["errorCode"] == "REQUIRED_FIELD_MISSING"
    bad_ref = api(sf, "PATCH", "sobjects/Task/ExchangeListener_Transition_Id__c/t-2", access,
                  json={"WhoId": "00Q000000000000AAA"})
    assert bad_ref.json()[0]["errorCode"] == "INVALID_CROSS_REFERENCE_KEY"
    not_external = api(sf, "PATCH", "sobjects/Task/Subject/x", access, json={})
    assert (not_external.status_code, not_external.json()[0]["errorCode"]) == (404, "NOT_FOUND")
    assert api(sf, "GET", "sobjects/Task/00T000000000000AAA", access).status_code == 404
    assert api(sf, "GET", "sobjects/Widget/00T000000000000AAA", access).status_code == 404


def test_case_safe_ids_follow_salesforces_suffix():
    assert case_safe("001A0000006Vm9r") == "001A0000006Vm9rIAC"


# -- errors and faults ------------------------------------------------------------------------
def test_sessions_limits_and_outages_answer_as_salesforce_does(sf, keys):
    access = token(sf, keys[0])["access_token"]
    q = {"params": {"q": "SELECT Id FROM Lead"}}
    assert api(sf, "GET", "query", "bogus", **q).json() == [
        {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    sf.fault("request_limit", count=1)
    limited = api(sf, "GET", "query", access, **q)
    assert (limited.status_code, limited.json()[0]["errorCode"]) == (403, "REQUEST_LIMIT_EXCEEDED")
    sf.fault("http_503", count=2)
    assert [api(sf, "GET", "query", access, **q).status_code for _ in range(3)] == [503, 503, 200]
    sf.fault("expire_sessions")
    expired = api(sf, "GET", "query", access, **q)
    assert (expired.status_code, expired.json()[0]["errorCode"]) == (401, "INVALID_SESSION_ID")
    assert api(sf, "GET", "query", token(sf, keys[0])["access_token"], **q).status_code == 200


def test_the_command_says_where_it_listens_and_refuses_a_missing_certificate(tmp_path):
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "salesforce-emulator", "--port",
                           str(free_port()), "--jwt-cert", str(tmp_path / "missing.crt")],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--jwt-cert" in done.stderr


# -- external ids, deletes and EmailMessage rules -------------------------------------------------
def test_create_refuses_a_second_row_with_the_same_external_id_and_get_honours_fields(sf, keys):
    access = token(sf, keys[0])["access_token"]
    contact = sf.seed("Contact", Email="pat@prospect.example", LastName="Pat")
    task = {"Subject": "Reply", "WhoId": contact, "ExchangeListener_Transition_Id__c": "t-1"}
    made = api(sf, "POST", "sobjects/Task", access, json=task)
    assert made.status_code == 201
    again = api(sf, "POST", "sobjects/Task", access, json={**task, "Subject": "Again"})
    assert (again.status_code, again.json()[0]["errorCode"]) == (400, "DUPLICATE_VALUE")
    assert made.json()["id"] in again.json()[0]["message"] and len(sf.records("Task")) == 1
    other = api(sf, "PATCH", "sobjects/Task/ExchangeListener_Transition_Id__c/t-2", access, json={"Subject": "B"})
    moved = api(sf, "PATCH", "sobjects/Task/ExchangeListener_Transition_Id__c/t-2", access,
                json={"ExchangeListener_Transition_Id__c": "t-1"})  # an update onto another row's value
    assert other.status_code == 201 and moved.json()[0]["errorCode"] == "DUPLICATE_VALUE"
    only_id = api(sf, "GET", "sobjects/Task/ExchangeListener_Transition_Id__c/t-1", access, params={"fields": "Id"})
    assert set(only_id.json()) == {"attributes", "Id"} and only_id.json()["Id"] == made.json()["id"]
    two = api(sf, "GET", f"sobjects/Task/{made.json()['id']}", access, params={"fields": "Subject,WhoId"}).json()
    assert (set(two), two["Subject"]) == ({"attributes", "Subject", "WhoId"}, "Reply")
    unknown = api(sf, "GET", "sobjects/Task/ExchangeListener_Transition_Id__c/t-1", access, params={"fields": "Nope"})
    assert (unknown.status_code, unknown.json()[0]["errorCode"]) == (400, "INVALID_FIELD")


def test_relations_of_a_received_message_need_update_email_messages(sf, keys):
    contact = sf.seed("Contact", Email="pat@prospect.example", LastName="Pat")
    received = sf.seed("EmailMessage", Subject="Re: hi", Status="0", Incoming=True)
    draft = sf.seed("EmailMessage", Subject="Draft", Status="5")
    access = token(sf, keys[0])["access_token"]  # the fixture's user has no such permission

    def relate(message):
        return api(sf, "POST", "sobjects/EmailMessageRelation", access, json={
            "EmailMessageId": message, "RelationId": contact, "RelationType": "FromAddress"})

    refused = relate(received)
    assert (refused.status_code, refused.json()[0]["errorCode"]) == (400, "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY")
    assert relate(draft).status_code == 201  # a draft's relations need no permission
    edit = api(sf, "PATCH", "sobjects/EmailMessage/ExchangeListener_Transition_Id__c/t-9", access,
               json={"Subject": "m", "Status": "0"})
    assert edit.status_code == 201
    standard = api(sf, "PATCH", "sobjects/EmailMessage/ExchangeListener_Transition_Id__c/t-9", access,
                   json={"Subject": "changed"})  # a received message: custom fields only
    assert (standard.status_code, standard.json()[0]["errorCode"]) == (400, "INVALID_FIELD_FOR_INSERT_UPDATE")
    sf.seed("User", Username="admin@acme.example", LastName="Admin", PermissionsUpdateEmailMessages=True)
    allowed = token_response(sf, assertion(keys[0], sub="admin@acme.example")).json()["access_token"]
    made = api(sf, "POST", "sobjects/EmailMessageRelation", allowed, json={
        "EmailMessageId": received, "RelationId": contact, "RelationType": "FromAddress"})
    assert made.status_code == 201
    path = f"sobjects/EmailMessageRelation/{made.json()['id']}"
    assert api(sf, "DELETE", path, access).json()[0]["errorCode"] == "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY"
    assert api(sf, "DELETE", path, allowed).status_code == 204
    gone = api(sf, "DELETE", path, allowed)
    assert (gone.status_code, gone.json()[0]["errorCode"]) == (404, "ENTITY_IS_DELETED")
    assert [r["EmailMessageId"] for r in sf.records("EmailMessageRelation")] == [draft]


def test_limit_and_outage_answers_carry_retry_after_when_asked_and_latency_delays(sf, keys):
    access = token(sf, keys[0])["access_token"]
    q = {"params": {"q": "SELECT Id FROM Lead"}}
    sf.fault("request_limit", count=1, retry_after=90)
    limited = api(sf, "GET", "query", access, **q)
    assert (limited.status_code, limited.headers.get("Retry-After")) == (403, "90")
    sf.fault("http_503", count=1)
    assert "Retry-After" not in api(sf, "GET", "query", access, **q).headers
    sf.fault("latency", seconds=0.3, count=1)
    began = time.monotonic()
    assert api(sf, "GET", "query", access, **q).status_code == 200 and time.monotonic() - began >= 0.3
