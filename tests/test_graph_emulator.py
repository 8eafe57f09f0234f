"""The Microsoft Graph emulator as a real process, over real HTTP: tokens from its HTTPS token host
through msal (secret, certificate, refusals), Graph reads with $select and both kinds of ids,
/$value, $batch, delta rounds and their 410s, subscriptions with the validation handshake against a
real receiver, notification delivery with retries and the slow-endpoint rules, and every fault."""
from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from emulators.services import GraphEmulator, free_port, wait_for

REP = "rep@contoso.example"
OTHER = "other@contoso.example"
SCOPE = ["https://graph.microsoft.com/.default"]
IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}
# small timing knobs so retries, windows and expiries happen within a test
TIMING = ["--notification-timeout", "0.5", "--retry-base-seconds", "0.2", "--retry-cap-seconds", "0.5",
          "--retry-window-seconds", "2.5", "--slow-window-seconds", "60", "--slow-min-count", "10",
          "--slow-delay-seconds", "1.5", "--validation-timeout", "1", "--max-subscriptions-per-mailbox", "3",
          "--restart-seconds", "0.6"]


def mail(n: int = 1, subject: str = "Pricing", extra: str = "") -> bytes:
    return (f"From: Pat Prospect <pat@prospect.example>\r\nTo: Rep <{REP}>\r\nSubject: {subject} {n}\r\n"
            f"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nMessage-ID: <m{n}-{time.monotonic_ns()}@prospect.example>\r\n"
            f"In-Reply-To: <sent-{n}@contoso.example>\r\nReferences: <sent-{n}@contoso.example>\r\n{extra}"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\nThanks, tell me more ({n}).\r\n").encode()


@pytest.fixture(autouse=True)
def _requests_trusts_given_ca(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE win over a session's ``verify`` (which is
    how msal passes ``verify=ca_file``); this machine sets both, so they go for these tests."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory):
    """An app certificate: one PEM with certificate and key (what the client holds), its parts."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graph-app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    path = tmp_path_factory.mktemp("graph-cert") / "app.pem"
    path.write_text(cert_pem + key_pem)
    return {"path": str(path), "key": key_pem, "cert": cert_pem, "sha1": cert.fingerprint(hashes.SHA1()).hex()}


@pytest.fixture(scope="module")
def graph_process(cert_files):
    with GraphEmulator(mailboxes=[REP, OTHER], client_certificate=cert_files["path"], extra_args=TIMING) as emu:
        yield emu


@pytest.fixture(scope="module")
def access_token(graph_process):
    with pytest.MonkeyPatch.context() as mp:  # see _requests_trusts_given_ca
        mp.delenv("REQUESTS_CA_BUNDLE", raising=False)
        mp.delenv("CURL_CA_BUNDLE", raising=False)
        result = app(graph_process).acquire_token_for_client(SCOPE)
    assert "access_token" in result, result
    return result["access_token"]


@pytest.fixture
def graph(graph_process):
    graph_process.reset()
    return graph_process


def app(emu, credential=None) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(emu.client_id, client_credential=credential or emu.client_secret,
                                              authority=emu.authority, verify=emu.ca_file, instance_discovery=False)


class Client:
    """requests against the emulator's /v1.0 with a bearer token."""

    def __init__(self, emu, token):
        self.emu, self.token = emu, token

    def call(self, method: str, path: str, *, headers=None, **kwargs) -> requests.Response:
        url = path if path.startswith("http") else f"{self.emu.graph_url}/{path.lstrip('/')}"
        return requests.request(method, url, headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
                                timeout=15, **kwargs)

    def get(self, path, **kwargs):
        return self.call("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.call("POST", path, **kwargs)


@pytest.fixture
def client(graph, access_token):
    return Client(graph, access_token)


class Receiver:
    """A notification receiver on a free port (a real HTTP server in a thread). It answers the
    validation handshake as told and records every notification POST (path, body, time)."""

    def __init__(self):
        self.validation = "echo"  # echo | wrong | fail | slow
        self.status = 202
        self.delay = 0.0
        self.plan: list[tuple[int, float]] = []  # per POST (status, delay), consumed first
        self.posts: list[tuple[str, dict, float]] = []
        self.validations: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = parse_qs(parts.query).get("validationToken")
                if token:
                    receiver.validations.append((parts.path, token[0]))
                    mode = receiver.validation
                    if mode == "slow":
                        time.sleep(1.5)
                    answer = {"echo": token[0], "wrong": token[0] + "x", "fail": "", "slow": token[0]}[mode]
                    self._answer(500 if mode == "fail" else 200, answer.encode(), "text/plain")
                    return
                with receiver.lock:
                    status, delay = receiver.plan.pop(0) if receiver.plan else (receiver.status, receiver.delay)
                if delay:
                    time.sleep(delay)
                with receiver.lock:
                    receiver.posts.append((parts.path, json.loads(body), time.monotonic()))
                self._answer(status, b"", "text/plain")

            def _answer(self, status, data, kind):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the emulator gave up waiting

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def items(self, path: str = "/notify") -> list[dict]:
        with self.lock:
            return [item for p, body, _ in self.posts if p == path for item in body["value"]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def subscribe(client, receiver, resource=f"users/{REP}/mailFolders('Inbox')/messages", minutes=60.0, *,
              headers=IMMUTABLE, lifecycle=True, **fields) -> requests.Response:
    body = {"changeType": "created", "notificationUrl": f"{receiver.url}/notify", "resource": resource,
            "expirationDateTime": (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)).isoformat(),
            "clientState": "s3cret-state"}
    if lifecycle:
        body["lifecycleNotificationUrl"] = f"{receiver.url}/lifecycle"
    body.update(fields)
    return client.post("subscriptions", json=body, headers=headers)


def created(client, receiver, **kwargs) -> dict:
    response = subscribe(client, receiver, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


# -- the command and the token host ----------------------------------------------------------

def test_banner_lines_name_graph_and_token_urls(tmp_path):
    port, token_port, ca = free_port(), free_port(), tmp_path / "ca.pem"
    proc = subprocess.Popen([sys.executable, "-m", "exchange_listener.cli", "graph-emulator", "--host", "127.0.0.1",
                             "--port", str(port), "--token-port", str(token_port), "--tenant", "t1", "--client-id",
                             "id1", "--client-secret", "s1", "--mailbox", REP, "--ca-file", str(ca)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1.0" in first
        assert f"token URL: https://127.0.0.1:{token_port}/t1/oauth2/v2.0/token (CA certificate: {ca})" in second
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
        doc = requests.get(f"https://127.0.0.1:{token_port}/t1/v2.0/.well-known/openid-configuration",
                           verify=str(ca), timeout=10).json()
        assert doc["token_endpoint"] == f"https://127.0.0.1:{token_port}/t1/oauth2/v2.0/token"
        assert doc["issuer"] and doc["authorization_endpoint"]
        other = requests.get(f"https://127.0.0.1:{token_port}/nope/v2.0/.well-known/openid-configuration",
                             verify=str(ca), timeout=10)
        assert other.status_code == 400 and "AADSTS90002" in other.json()["error_description"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_tokens_by_secret_and_certificate_and_refusals(graph, cert_files):
    assert "access_token" in app(graph).acquire_token_for_client(SCOPE)
    # a certificate the app has: msal signs PS256 with x5t#S256 given the certificate ...
    by_cert = app(graph, {"private_key": cert_files["key"], "public_certificate": cert_files["cert"]})
    assert "access_token" in by_cert.acquire_token_for_client(SCOPE)
    # ... and RS256 with x5t given only a SHA-1 thumbprint
    by_thumbprint = app(graph, {"private_key": cert_files["key"], "thumbprint": cert_files["sha1"]})
    assert "access_token" in by_thumbprint.acquire_token_for_client(SCOPE)
    wrong = app(graph, "not-the-secret").acquire_token_for_client(SCOPE)
    assert wrong["error"] == "invalid_client" and "AADSTS7000215" in wrong["error_description"]
    raw = requests.post(graph.token_url, verify=graph.ca_file, timeout=10, data={
        "grant_type": "client_credentials", "client_id": graph.client_id, "client_secret": "nope", "scope": SCOPE[0]})
    assert raw.status_code == 401 and raw.json()["error"] == "invalid_client"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    forged = app(graph, {"private_key": stranger, "public_certificate": cert_files["cert"]})
    refused = forged.acquire_token_for_client(SCOPE)
    assert refused["error"] == "invalid_client" and "AADSTS700027" in refused["error_description"]
    bad_scope = requests.post(graph.token_url, verify=graph.ca_file, timeout=10, data={
        "grant_type": "client_credentials", "client_id": graph.client_id, "client_secret": graph.client_secret,
        "scope": "https://graph.microsoft.com/Mail.Read"})
    assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_scope"
    assert graph.stats()["token_grants"] == 3


def test_client_assertions_checked_like_entra(graph, cert_files):
    key = serialization.load_pem_private_key(cert_files["key"].encode(), None)
    cert = x509.load_pem_x509_certificate(cert_files["cert"].encode())

    def thumbprint(algorithm) -> str:
        return base64.urlsafe_b64encode(cert.fingerprint(algorithm)).decode()

    def grant(algorithm="PS256", header=None, **claims) -> requests.Response:
        now = int(time.time())
        body = {"iss": graph.client_id, "sub": graph.client_id, "aud": graph.token_url, "exp": now + 600,
                "nbf": now, "jti": str(now)}
        body.update(claims)
        signing_key = key if algorithm != "HS256" else "a-shared-secret-of-at-least-32-bytes!"
        assertion = jwt.encode(body, signing_key, algorithm=algorithm,
                               headers=header or {"x5t#S256": thumbprint(hashes.SHA256())})
        return requests.post(graph.token_url, verify=graph.ca_file, timeout=10, data={
            "grant_type": "client_credentials", "client_id": graph.client_id, "scope": SCOPE[0],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion})

    assert grant().status_code == 200
    assert grant("RS256", {"x5t": thumbprint(hashes.SHA1())}).status_code == 200
    for refused in (grant("HS256"), grant(aud="https://login.microsoftonline.com/other/oauth2/v2.0/token"),
                    grant(exp=int(time.time()) - 3600), grant(iss="someone-else"),
                    grant(header={"x5t#S256": base64.urlsafe_b64encode(b"0" * 32).decode()})):
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client", refused.text


def test_graph_requires_a_valid_token(client):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Bearer a.b.c"}):
        response = requests.get(f"{client.emu.graph_url}/users/{REP}", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "InvalidAuthenticationToken"
        assert "WWW-Authenticate" in response.headers
    assert client.get(f"users/{REP}").status_code == 200


def test_tokens_expire_after_their_lifetime():
    with GraphEmulator(mailboxes=[REP], extra_args=["--token-lifetime", "1"]) as emu:
        result = app(emu).acquire_token_for_client(SCOPE)
        assert result["expires_in"] == 1
        client = Client(emu, result["access_token"])
        assert client.get(f"users/{REP}").status_code == 200
        time.sleep(2.1)
        expired = client.get(f"users/{REP}")
        assert expired.status_code == 401
        assert expired.json()["error"]["message"] == "Lifetime validation failed, the token is expired."


# -- reading mail ----------------------------------------------------------------------------

def test_users_by_address_or_object_id(client):
    user = client.get(f"users/{REP.upper()}").json()
    assert user["mail"] == REP and user["id"]
    assert client.get(f"users/{user['id']}").json()["id"] == user["id"]
    assert client.get("users/nobody@contoso.example").status_code == 404
    missing = client.get("users/nobody@contoso.example/messages")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ErrorInvalidUser"


def test_headers_only_when_selected_and_never_in_sent_items(client):
    graph = client.emu
    inbox = graph.deliver(REP, mail(1))
    sent = graph.deliver(REP, mail(2), folder="sentitems")
    full = client.get(f"users/{REP}/messages/{inbox['item_id']}").json()
    assert "internetMessageHeaders" not in full and full["subject"] == "Pricing 1"
    assert full["from"]["emailAddress"]["address"] == "pat@prospect.example"
    selected = client.get(f"users/{REP}/messages/{inbox['item_id']}",
                          params={"$select": "internetMessageId,internetMessageHeaders,from,subject"}).json()
    names = {h["name"].lower(): h["value"] for h in selected["internetMessageHeaders"]}
    assert names["in-reply-to"] == "<sent-1@contoso.example>" and names["references"] == "<sent-1@contoso.example>"
    assert set(selected) == {"@odata.context", "@odata.etag", "id", "internetMessageId", "internetMessageHeaders",
                             "from", "subject"}
    in_sent = client.get(f"users/{REP}/messages/{sent['item_id']}",
                         params={"$select": "internetMessageHeaders,subject"}).json()
    assert "internetMessageHeaders" not in in_sent and in_sent["subject"] == "Pricing 2"
    unknown = client.get(f"users/{REP}/messages/{inbox['item_id']}", params={"$select": "nonsense"})
    assert unknown.status_code == 400
    gone = client.get(f"users/{REP}/messages/{inbox['item_id'][:-8]}AAAAAAA=")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "ErrorItemNotFound"
    assert client.get(f"users/{REP}/messages/not-an-id!").json()["error"]["code"] == "ErrorInvalidIdMalformed"
    assert client.get(f"users/{OTHER}/messages/{inbox['item_id']}").status_code == 404


def test_immutable_ids_survive_a_move_and_regular_ids_do_not(client):
    graph = client.emu
    delivered = graph.deliver(REP, mail(1))
    immutable = client.get(f"users/{REP}/messages/{delivered['item_id']}", headers=IMMUTABLE)
    assert immutable.json()["id"] == delivered["item_id"]
    assert immutable.headers["Preference-Applied"] == 'IdType="ImmutableId"'
    regular = client.get(f"users/{REP}/messages/{delivered['item_id']}").json()
    assert regular["id"] == delivered["regular_id"] != delivered["item_id"]
    moved = graph.move(delivered["item_id"], "Inbox/Replies")
    assert moved["folder"] == "Inbox/Replies" and moved["regular_id"] != delivered["regular_id"]
    old = client.get(f"users/{REP}/messages/{delivered['regular_id']}")
    assert old.status_code == 404 and old.json()["error"]["code"] == "ErrorItemNotFound"
    after = client.get(f"users/{REP}/messages/{delivered['item_id']}", headers=IMMUTABLE).json()
    assert after["id"] == delivered["item_id"] and after["parentFolderId"] == moved["folder_id"]
    assert client.get(f"users/{REP}/messages/{moved['regular_id']}").json()["id"] == moved["regular_id"]
    deleted = graph.delete(delivered["item_id"])  # hard delete: to Recoverable Items\Deletions, as Exchange does
    assert deleted["folder"] == "Recoverable Items/Deletions" and deleted["item_id"] == delivered["item_id"]
    deletions = client.get(f"users/{REP}/mailFolders/recoverableitemsdeletions").json()
    assert client.get(f"users/{REP}/messages/{delivered['item_id']}").json()["parentFolderId"] == deletions["id"]
    assert client.get(f"users/{REP}/messages", params={"$select": "id"}).json()["value"] == []  # not under the root
    graph.delete(delivered["item_id"], purge=True)
    assert client.get(f"users/{REP}/messages/{delivered['item_id']}").status_code == 404


def test_value_is_the_mime(client):
    raw = mail(7)
    delivered = client.emu.deliver(REP, raw, received="2024-03-04T10:00:05+00:00")
    assert client.get(f"users/{REP}/messages/{delivered['item_id']}").json()["receivedDateTime"] == \
        "2024-03-04T10:00:05Z"
    response = client.get(f"users/{REP}/mailFolders/inbox/messages/{delivered['item_id']}/$value")
    assert response.status_code == 200 and response.content == raw
    assert response.headers["Content-Type"].startswith("text/plain")


def test_unique_body_is_what_the_reply_added(client):
    raw = (f"From: pat@prospect.example\r\nTo: {REP}\r\nSubject: Re: Pricing\r\n\r\nTuesday works.\r\n\r\n"
           f"On Mon, 4 Mar 2024 at 10:00, Rep <{REP}> wrote:\r\n> Would Tuesday work?\r\n").encode()
    delivered = client.emu.deliver(REP, raw)
    texts = client.get(f"users/{REP}/messages/{delivered['item_id']}", params={"$select": "uniqueBody,body"},
                       headers={"Prefer": 'outlook.body-content-type="text"'})
    assert texts.headers["Preference-Applied"] == 'outlook.body-content-type="text"'
    assert texts.json()["uniqueBody"] == {"contentType": "text", "content": "Tuesday works."}
    assert "Would Tuesday work?" in texts.json()["body"]["content"]
    html_form = client.get(f"users/{REP}/messages/{delivered['item_id']}", params={"$select": "uniqueBody"}).json()
    assert html_form["uniqueBody"]["contentType"] == "html" and "Tuesday works." in html_form["uniqueBody"]["content"]


def test_mail_folders_paging_children_and_well_known_names(client):
    graph = client.emu
    sales = graph.create_folder(REP, "Inbox/Sales")
    assert sales["created"] and sales["path"] == "Inbox/Sales"
    assert graph.create_folder(REP, "Inbox/Sales")["created"] is False
    graph.create_folder(REP, "Projects")
    first = client.get(f"users/{REP}/mailFolders", params={"$top": "4"}).json()
    names = [f["displayName"] for f in first["value"]]
    while "@odata.nextLink" in first:
        first = client.get(first["@odata.nextLink"]).json()
        names += [f["displayName"] for f in first["value"]]
    assert "Projects" in names and "Inbox" in names and "Conversation Action Settings" not in names
    hidden = client.get(f"users/{REP}/mailFolders", params={"includeHiddenFolders": "true", "$top": "50"}).json()
    assert "Conversation Action Settings" in [f["displayName"] for f in hidden["value"]]
    inbox = client.get(f"users/{REP}/mailFolders/Inbox").json()
    assert inbox["displayName"] == "Inbox" and inbox["childFolderCount"] == 1
    children = client.get(f"users/{REP}/mailFolders/{inbox['id']}/childFolders").json()["value"]
    assert [c["id"] for c in children] == [sales["id"]] and children[0]["parentFolderId"] == inbox["id"]
    assert client.get(f"users/{REP}/mailFolders('sentitems')").json()["displayName"] == "Sent Items"
    selected = client.get(f"users/{REP}/mailFolders/inbox", params={"$select": "displayName,parentFolderId"}).json()
    assert set(selected) == {"@odata.context", "id", "displayName", "parentFolderId"}
    assert client.get(f"users/{REP}/mailFolders/inbox", params={"$select": "wellKnownName"}).status_code == 400
    deletions = client.get(f"users/{REP}/mailFolders/RecoverableItemsDeletions")
    assert deletions.status_code == 200 and deletions.json()["displayName"] == "Deletions"
    assert deletions.json()["id"] not in {f["id"] for f in hidden["value"]}  # outside msgfolderroot: never listed
    assert client.get(f"users/{REP}/mailFolders/clutter").status_code == 404  # well-known, not in this mailbox
    malformed = client.get(f"users/{REP}/mailFolders/Projects")  # a display name is not an id
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "ErrorInvalidIdMalformed"


# -- $batch ----------------------------------------------------------------------------------

def test_batch_answers_each_request_on_its_own(client):
    graph = client.emu
    raw = mail(3)
    delivered = graph.deliver(REP, raw)
    requests_ = [
        {"id": "1", "method": "GET", "url": f"/users/{REP}/messages/{delivered['item_id']}?$select=subject"},
        {"id": "2", "method": "GET", "url": f"users/{REP}/messages/{delivered['item_id']}/$value"},
        {"id": "3", "method": "GET", "url": f"/users/{REP}/messages/{delivered['regular_id']}"},
        {"id": "4", "method": "GET", "url": "/users/nobody@contoso.example/messages/x"},
    ]
    response = client.post("$batch", json={"requests": requests_}, headers=IMMUTABLE)
    assert response.status_code == 200
    answers = {r["id"]: r for r in response.json()["responses"]}
    assert answers["1"]["status"] == 200 and answers["1"]["body"]["subject"] == "Pricing 3"
    assert answers["1"]["body"]["id"] == delivered["item_id"]  # the outer Prefer applies
    assert answers["2"]["status"] == 200 and base64.b64decode(answers["2"]["body"]) == raw
    assert answers["2"]["headers"]["Content-Type"].startswith("text/plain")
    assert answers["3"]["status"] == 200 and answers["4"]["status"] == 404
    too_many = [{"id": str(i), "method": "GET", "url": f"/users/{REP}"} for i in range(21)]
    assert client.post("$batch", json={"requests": too_many}).status_code == 400
    graph.fault(kind="throttle", count=1, retry_after=2)
    throttled = client.post("$batch", json={"requests": requests_[:2]})
    assert throttled.status_code == 200
    statuses = sorted(r["status"] for r in throttled.json()["responses"])
    assert statuses == [200, 429]
    limited = next(r for r in throttled.json()["responses"] if r["status"] == 429)
    assert limited["headers"]["Retry-After"] == "2"


# -- delta -----------------------------------------------------------------------------------

def follow(client, url, headers=None) -> tuple[list[dict], str]:
    """Every page from ``url`` to the deltaLink: the items and the deltaLink."""
    items = []
    while True:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["value"]
        if "@odata.deltaLink" in page:
            return items, page["@odata.deltaLink"]
        url = page["@odata.nextLink"]


def test_delta_pages_then_changes(client):
    graph = client.emu
    delivered = [graph.deliver(REP, mail(i)) for i in range(5)]
    elsewhere = graph.deliver(REP, mail(9), folder="Archive")
    prefer = {"Prefer": 'IdType="ImmutableId", odata.maxpagesize=2'}
    first = client.get(f"users/{REP}/mailFolders/inbox/messages/delta",
                       params={"$select": "subject,internetMessageId"}, headers=prefer)
    assert "odata.maxpagesize=2" in first.headers["Preference-Applied"]
    page = first.json()
    assert len(page["value"]) == 2 and "@odata.nextLink" in page
    assert page["@odata.nextLink"].startswith(f"{graph.graph_url}/users/")
    rest, delta_link = follow(client, page["@odata.nextLink"], prefer)
    ids = [m["id"] for m in page["value"] + rest]
    assert sorted(ids) == sorted(d["item_id"] for d in delivered)
    assert set(page["value"][0]) >= {"id", "subject", "internetMessageId"} and "from" not in page["value"][0]
    # nothing changed: an empty round and a new deltaLink
    unchanged, delta_link = follow(client, delta_link, prefer)
    assert unchanged == []
    new = graph.deliver(REP, mail(6))
    graph.delete(delivered[0]["item_id"])
    graph.move(delivered[1]["item_id"], "Archive")
    graph.move(elsewhere["item_id"], "inbox")
    changes, delta_link = follow(client, delta_link, prefer)
    present = {c["id"] for c in changes if "@removed" not in c}
    removed = {c["id"]: c["@removed"]["reason"] for c in changes if "@removed" in c}
    assert present == {new["item_id"], elsewhere["item_id"]}
    assert removed == {delivered[0]["item_id"]: "deleted", delivered[1]["item_id"]: "changed"}
    # changeType=created: a new round lists what is in the folder, and never a removal
    created_only, _ = follow(client, f"users/{REP}/mailFolders/inbox/messages/delta?changeType=created")
    assert all("@removed" not in c for c in created_only) and len(created_only) == 5


def test_delta_tokens_expire_with_410(client):
    graph = client.emu
    for i in range(3):
        graph.deliver(REP, mail(i))
    page = client.get(f"users/{REP}/mailFolders/inbox/messages/delta",
                      headers={"Prefer": "odata.maxpagesize=1"}).json()
    _, delta_link = follow(client, page["@odata.nextLink"])
    graph.fault(kind="expire_delta_tokens")
    for link in (delta_link, page["@odata.nextLink"]):
        gone = client.get(link)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "SyncStateNotFound"
    again = client.get(f"users/{REP}/mailFolders/inbox/messages/delta")
    assert again.status_code == 200 and len(again.json()["value"]) == 3


# -- subscriptions ---------------------------------------------------------------------------

def test_subscription_create_validates_both_urls_renew_and_delete(client, receiver):
    sub = created(client, receiver)
    assert [p for p, _ in receiver.validations] == ["/notify", "/lifecycle"]
    assert all(t.startswith("Validation: ") for _, t in receiver.validations)  # the decoded token
    assert sub["changeType"] == "created" and sub["clientState"] == "s3cret-state"
    assert sub["resource"] == f"users/{REP}/mailFolders('Inbox')/messages" and sub["applicationId"]
    assert sub["lifecycleNotificationUrl"] == f"{receiver.url}/lifecycle"
    assert client.get(f"subscriptions/{sub['id']}").json()["id"] == sub["id"]
    assert [s["id"] for s in client.get("subscriptions").json()["value"]] == [sub["id"]]
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4000)).isoformat()
    renewed = client.call("PATCH", f"subscriptions/{sub['id']}", json={"expirationDateTime": later})
    assert renewed.status_code == 200 and renewed.json()["expirationDateTime"] > sub["expirationDateTime"]
    too_far = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4240)).isoformat()
    assert client.call("PATCH", f"subscriptions/{sub['id']}", json={"expirationDateTime": too_far}).status_code == 400
    assert client.post(f"subscriptions/{sub['id']}/reauthorize").status_code == 204
    assert client.call("DELETE", f"subscriptions/{sub['id']}").status_code == 204
    assert client.get(f"subscriptions/{sub['id']}").status_code == 404


def test_subscription_refusals(client, receiver):
    receiver.validation = "wrong"
    mismatch = subscribe(client, receiver)
    assert mismatch.status_code == 400 and mismatch.json()["error"]["code"] == "ValidationError"
    receiver.validation = "fail"
    failed = subscribe(client, receiver)
    assert failed.status_code == 400 and "must respond with 200 OK" in failed.json()["error"]["message"]
    receiver.validation = "slow"  # longer than --validation-timeout 1
    timed_out = subscribe(client, receiver)
    assert timed_out.status_code == 400 and "timed out" in timed_out.json()["error"]["message"]
    receiver.validation = "echo"
    far = subscribe(client, receiver, minutes=4231)
    assert far.status_code == 400
    assert far.json()["error"]["message"] == "Subscription expiration can only be 4230 minutes in the future."
    assert subscribe(client, receiver, minutes=-1).status_code == 400
    assert subscribe(client, receiver, clientState="x" * 129).status_code == 400
    assert subscribe(client, receiver, resource="users/nobody@contoso.example/messages").status_code == 404
    assert subscribe(client, receiver, resource=f"users/{REP}/events").status_code == 400
    for _ in range(3):  # --max-subscriptions-per-mailbox 3
        created(client, receiver, resource=f"users/{REP}/messages")
    full = subscribe(client, receiver)
    assert full.status_code == 403 and "Maximum number of subscriptions" in full.json()["error"]["message"]
    assert created(client, receiver, resource=f"users/{OTHER.replace('@', '%40')}/messages")  # percent-encoded
    stats = client.emu.stats()
    assert stats["subscriptions"] == {REP: 3, OTHER: 1} and stats["validations_failed"] == 3


def test_subscription_past_its_expiry_is_gone(client, receiver):
    sub = created(client, receiver, minutes=2 / 60)
    time.sleep(2.3)
    assert client.get(f"subscriptions/{sub['id']}").status_code == 404
    client.emu.deliver(REP, mail(1))
    time.sleep(0.3)
    assert receiver.items() == [] and client.emu.stats()["subscriptions_expired"] == 1


# -- notifications ---------------------------------------------------------------------------

def test_notifications_carry_client_state_and_the_resource(client, receiver):
    graph = client.emu
    inbox_sub = created(client, receiver)  # immutable ids
    all_sub = created(client, receiver, resource=f"users/{REP}/messages", headers={}, lifecycle=False)
    user_id = client.get(f"users/{REP}").json()["id"]
    first = graph.deliver(REP, mail(1))
    filed = graph.deliver(REP, mail(2), folder="Archive")
    items = wait_for(lambda: len(receiver.items()) >= 3 and receiver.items(), timeout=10)
    by_sub: dict[str, list[dict]] = {}
    for item in items:
        by_sub.setdefault(item["subscriptionId"], []).append(item)
    assert [i["resourceData"]["id"] for i in by_sub[inbox_sub["id"]]] == [first["item_id"]]
    assert sorted(i["resourceData"]["id"] for i in by_sub[all_sub["id"]]) == sorted(
        [first["regular_id"], filed["regular_id"]])
    note = by_sub[inbox_sub["id"]][0]
    assert note["clientState"] == "s3cret-state" and note["changeType"] == "created"
    assert note["resource"] == f"Users/{user_id}/Messages/{first['item_id']}"
    assert note["resourceData"]["@odata.type"] == "#Microsoft.Graph.Message" and note["tenantId"] == graph.tenant
    assert note["subscriptionExpirationDateTime"].endswith("Z")
    # several pending notifications travel in one POST
    receiver.plan = [(202, 0.4)]
    for i in range(4):
        graph.deliver(REP, mail(10 + i))
    wait_for(lambda: len(receiver.items()) >= 11, timeout=10)
    assert max(len(body["value"]) for _, body, _ in receiver.posts) >= 2


def test_failed_and_slow_answers_are_retried(client, receiver):
    graph = client.emu
    created(client, receiver)
    receiver.plan = [(500, 0.0), (503, 0.0), (202, 0.8)]  # two errors, then slower than --notification-timeout
    delivered = graph.deliver(REP, mail(1))
    wait_for(lambda: len(receiver.posts) >= 4, timeout=10)
    assert all(i["resourceData"]["id"] == delivered["item_id"] for i in receiver.items())
    stats = wait_for(lambda: (s := graph.stats())["notifications"]["sent"] == 1 and s, timeout=5)
    assert stats["notifications"]["retried"] >= 3 and stats["notifications"]["failed_attempts"] >= 3


def test_undeliverable_notifications_are_dropped_then_missed(client, receiver):
    graph = client.emu
    created(client, receiver)
    receiver.status = 500
    graph.deliver(REP, mail(1))
    stats = wait_for(lambda: (s := graph.stats())["notifications"]["dropped_expired"] == 1 and s, timeout=10)
    assert stats["notifications"]["sent"] == 0
    receiver.status = 202
    wait_for(lambda: receiver.items("/lifecycle"), timeout=5)
    assert receiver.items("/lifecycle")[0]["lifecycleEvent"] == "missed"


def test_drop_duplicate_and_delay_faults(client, receiver):
    graph = client.emu
    sub = created(client, receiver)
    graph.fault(kind="drop_notifications", count=1)
    graph.deliver(REP, mail(1))
    missed = wait_for(lambda: receiver.items("/lifecycle"), timeout=5)
    assert missed[0]["lifecycleEvent"] == "missed" and missed[0]["subscriptionId"] == sub["id"]
    assert missed[0]["clientState"] == "s3cret-state" and receiver.items() == []
    graph.fault(kind="duplicate_notifications", count=1)
    twice = graph.deliver(REP, mail(2))
    wait_for(lambda: len(receiver.items()) == 2, timeout=5)
    assert {i["resourceData"]["id"] for i in receiver.items()} == {twice["item_id"]}
    graph.fault(kind="delay_notifications", seconds=1.0, count=1)
    started = time.monotonic()
    graph.deliver(REP, mail(3))
    wait_for(lambda: len(receiver.items()) == 3, timeout=5)
    assert receiver.posts[-1][2] - started >= 0.95
    stats = graph.stats()["notifications"]
    assert (stats["dropped_fault"], stats["duplicated"], stats["delayed"]) == (1, 1, 1)


def test_remove_and_reauthorization_faults(client, receiver):
    graph = client.emu
    sub = created(client, receiver)
    graph.fault(kind="reauthorization_required")
    challenge = wait_for(lambda: receiver.items("/lifecycle"), timeout=5)
    assert challenge[0]["lifecycleEvent"] == "reauthorizationRequired"
    held = graph.deliver(REP, mail(1))
    time.sleep(0.4)
    assert receiver.items() == []  # held until reauthorized
    assert client.post(f"subscriptions/{sub['id']}/reauthorize").status_code == 204
    wait_for(lambda: [i["resourceData"]["id"] for i in receiver.items()] == [held["item_id"]], timeout=5)
    graph.fault(kind="reauthorization_required")  # a renewal releases them too
    wait_for(lambda: len(receiver.items("/lifecycle")) == 2, timeout=5)
    again = graph.deliver(REP, mail(2))
    time.sleep(0.3)
    assert len(receiver.items()) == 1
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=90)).isoformat()
    assert client.call("PATCH", f"subscriptions/{sub['id']}", json={"expirationDateTime": later}).status_code == 200
    wait_for(lambda: [i["resourceData"]["id"] for i in receiver.items()] == [held["item_id"], again["item_id"]],
             timeout=5)
    assert graph.stats()["notifications"]["held"] == 2
    graph.fault(kind="remove_subscriptions")
    removed = wait_for(lambda: len(receiver.items("/lifecycle")) == 3 and receiver.items("/lifecycle"), timeout=5)
    assert removed[2]["lifecycleEvent"] == "subscriptionRemoved"
    assert client.get(f"subscriptions/{sub['id']}").status_code == 404
    graph.deliver(REP, mail(3))
    time.sleep(0.3)
    assert len(receiver.items()) == 2
    assert graph.stats()["lifecycle"] == {"reauthorizationRequired": 2, "subscriptionRemoved": 1}


def test_restart_forgets_subscriptions_silently(client, receiver):
    graph = client.emu
    sub = created(client, receiver)
    page = client.get(f"users/{REP}/mailFolders/inbox/messages/delta").json()
    graph.fault(kind="restart")
    down = client.get(f"users/{REP}")
    assert down.status_code == 503 and "Retry-After" in down.headers
    token_host = requests.post(graph.token_url, verify=graph.ca_file, timeout=10, data={})
    assert token_host.status_code == 503
    time.sleep(0.7)
    assert client.get(f"subscriptions/{sub['id']}").status_code == 404
    assert client.get(page["@odata.deltaLink"]).status_code == 410
    graph.deliver(REP, mail(1))
    time.sleep(0.3)
    assert receiver.items() == [] and receiver.items("/lifecycle") == []


def test_slow_endpoint_is_delayed_then_dropped(client, receiver):
    graph = client.emu
    created(client, receiver)
    for i in range(8):  # 8 fast answers ...
        graph.deliver(REP, mail(i))
        wait_for(lambda n=i: len(receiver.items()) == n + 1, timeout=5)
    receiver.plan = [(202, 0.7)]  # ... then one slower than the threshold (counted again when retried): 1 in 10
    graph.deliver(REP, mail(8))
    wait_for(lambda: graph.stats()["notifications"]["sent"] == 9, timeout=5)
    assert graph.stats()["endpoints"][f"{receiver.url}/notify"] == {"total": 10, "slow": 1, "state": "delay"}
    started = time.monotonic()
    graph.deliver(REP, mail(9))
    wait_for(lambda: len(receiver.items()) == 11, timeout=5)  # the slow one arrived twice
    assert receiver.posts[-1][2] - started >= 1.4  # --slow-delay-seconds 1.5
    receiver.plan = [(202, 0.7)] * 2
    graph.deliver(REP, mail(10))  # slow again: 2 (or 3) of 12 or more is over 15%
    wait_for(lambda: graph.stats()["endpoints"][f"{receiver.url}/notify"]["state"] == "drop", timeout=8)
    graph.deliver(REP, mail(11))
    stats = wait_for(lambda: (s := graph.stats())["notifications"]["dropped_slow"] == 1 and s, timeout=5)
    assert stats["notifications"]["slow_responses"] >= 2


# -- throttling and other faults ---------------------------------------------------------------

def test_four_concurrent_requests_per_mailbox(client):
    graph = client.emu
    graph.fault(kind="latency", seconds=0.5, count=7)
    with ThreadPoolExecutor(max_workers=7) as pool:
        rep = [pool.submit(client.get, f"users/{REP}/mailFolders/inbox") for _ in range(6)]
        time.sleep(0.1)
        other = pool.submit(client.get, f"users/{OTHER}/mailFolders/inbox")
        answers = [f.result() for f in rep]
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 200, 200, 429, 429]
    refused = next(a for a in answers if a.status_code == 429).json()["error"]
    assert (refused["code"], refused["message"]) == ("ApplicationThrottled",
                                                     "Application is over its MailboxConcurrency limit.")
    assert next(a for a in answers if a.status_code == 429).headers["Retry-After"] == "1"
    assert other.result().status_code == 200
    assert graph.stats()["concurrency_throttled"] == 2


def test_throttle_and_503_faults_carry_retry_after(client):
    graph = client.emu
    graph.fault(kind="throttle", count=2, retry_after=0.5)
    for _ in range(2):
        limited = client.get(f"users/{REP}")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "0.5"
    graph.fault(kind="http_503", count=1, retry_after=3)
    down = client.get(f"users/{REP}")
    assert down.status_code == 503 and down.headers["Retry-After"] == "3"
    assert client.get(f"users/{REP}").status_code == 200
    stats = graph.stats()
    assert (stats["throttled"], stats["http_503"], stats["requests_per_mailbox"][REP]) == (2, 1, 4)
    graph.fault(kind="throttle", count=5)
    graph.fault(kind="clear")
    assert client.get(f"users/{REP}").status_code == 200
    bad = requests.post(f"{graph.base_url}/emulator/faults", json={"kind": "nonsense"}, timeout=10)
    assert bad.status_code == 400


def test_strip_reply_headers_keeps_them_in_the_mime(client):
    graph = client.emu
    graph.fault(kind="strip_reply_headers", count=1)
    stripped, kept = graph.deliver(REP, mail(1)), graph.deliver(REP, mail(2))

    def header_names(item):
        body = client.get(f"users/{REP}/messages/{item['item_id']}", params={"$select": "internetMessageHeaders"})
        return {h["name"].lower() for h in body.json()["internetMessageHeaders"]}

    assert not {"in-reply-to", "references"} & header_names(stripped)
    assert {"in-reply-to", "references"} <= header_names(kept)
    mime = client.get(f"users/{REP}/messages/{stripped['item_id']}/$value").content
    assert b"In-Reply-To: <sent-1@contoso.example>" in mime


def test_reset_keeps_mailboxes_and_empties_the_rest(client, receiver):
    graph = client.emu
    created(client, receiver)
    graph.deliver(REP, mail(1))
    graph.reset()
    stats = graph.stats()
    assert set(stats["mailboxes"]) == {REP, OTHER} and stats["subscriptions_total"] == 0
    assert stats["mailboxes"][REP]["messages"] == 0 and stats["requests"] == 0
    assert client.get(f"users/{REP}").status_code == 200  # tokens outlive a reset


def test_launcher_settings_env(graph, cert_files):
    env = graph.settings_env()
    assert env["EXCHANGE_LISTENER_SOURCE"] == "graph" and env["EXCHANGE_LISTENER_GRAPH_URL"] == graph.graph_url
    assert env["EXCHANGE_LISTENER_TOKEN_URL"] == graph.token_url and env["EXCHANGE_LISTENER_CA_FILE"] == graph.ca_file
    assert env["EXCHANGE_LISTENER_CLIENT_SECRET"] == graph.client_secret
    certificate = graph.settings_env(credential="certificate")
    assert certificate["EXCHANGE_LISTENER_CLIENT_CERTIFICATE_FILE"] == cert_files["path"]
    assert "EXCHANGE_LISTENER_CLIENT_SECRET" not in certificate
