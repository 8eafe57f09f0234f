"""POX autodiscover (issue 15): with ``ews_url`` empty, ``autodiscover_email`` and
``autodiscover_url`` find the EWS URL through the emulator's ``/autodiscover/autodiscover.xml``
(same auth as EWS); the answer is cached in Redis for every listener and worker (asked once, not
again on restart); a redirecting autodiscover server is followed, and a cached URL that has moved
is discovered again at start. Where the credentials may go: never outside the address's domain
(or the autodiscover host's) because an answer said so, never to http from https, never to a URL
a Redis writer chose."""
from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mail_samples as mail
import pytest
from conftest import SERVICE_ACCOUNT

from emulators.services import CliProcess, Emulator, free_port, service_env, wait_for
from exchange_listener.core import config, keys
from exchange_listener.listener import mailboxes
from exchange_listener.sources.ews import account, discovery
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
PATH = "/autodiscover/autodiscover.xml"


@pytest.fixture(scope="module")
def ews_server():
    """The Exchange server autodiscover should lead to."""
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0) as emu:
        yield emu


@pytest.fixture(scope="module")
def redirecting(ews_server):
    """An autodiscover server that sends every request on to ``ews_server``'s autodiscover."""
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], extra_args=[
            "--autodiscover-redirect", ews_server.base_url + PATH]) as emu:
        yield emu


class Scripted(ThreadingHTTPServer):
    """A real HTTP(S) server answering every request with one canned response and recording what
    it was asked: a redirect, a 401, a sign-in page, where the emulator has no such answer."""

    daemon_threads = True

    def __init__(self, status: int, headers: dict | None = None, body: bytes = b"", tls_cert: str = ""):
        self.answer = (status, headers or {}, body)
        self.asked: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert)
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls_cert else "http"

    def url(self, path: str = PATH) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}{path}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _ScriptedHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.asked.append((self.command, self.path))
        status, headers, body = self.server.answer
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def redirect_url_answer(url: str) -> bytes:
    """A POX redirectUrl answer (the emulator's shape)."""
    from emulators.ews import autodiscover

    return autodiscover.answer(MAILBOX, "", url)


def operations(emu, name: str) -> int:
    return emu.stats()["operations"].get(name, 0)


def settings_for(redis_url: str, autodiscover_url: str) -> config.Settings:
    return config.load(env={}, overrides={
        "redis_url": redis_url, "ews_url": "", "autodiscover_email": MAILBOX, "autodiscover_url": autodiscover_url,
        "ews_username": SERVICE_ACCOUNT[0], "ews_password": SERVICE_ACCOUNT[1]})


def cached(conn) -> dict:
    raw = conn.hget(keys.EWS_AUTODISCOVER, MAILBOX)
    return json.loads(raw) if raw else {}


def streaming(conn, name: str) -> bool:
    raw = conn.hget(f"el:listener:{name}", "groups")
    return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == 1


@pytest.mark.slow  # a listener, a worker, a restarted listener: ~6 s
def test_url_found_by_autodiscover_cached_and_shared(ews_server, redis_server, redis_client, tmp_path):
    ews_server.reset()
    env = service_env(redis_server.url, "", autodiscover_email=MAILBOX, autodiscover_url=ews_server.base_url + PATH,
                      heartbeat_seconds=1, lease_seconds=3, listener_id="l1")
    mailboxes.add(redis_client, [MAILBOX])
    procs = [CliProcess(["listen"], env, tmp_path / "listener.log")]
    try:
        wait_for(lambda: streaming(redis_client, "l1"), timeout=20, message="the mailbox streaming")
        assert cached(redis_client)["ews_url"] == ews_server.ews_url
        assert operations(ews_server, "Autodiscover") == 1
        # the worker takes the cached URL: the reply is fetched and acted on, autodiscover not asked again
        procs.append(CliProcess(["work", "--name", "ad-worker"], env, tmp_path / "worker.log"))
        sent = mail.new_id("ours.example")
        SendRegistry(redis_client).record([sent], "e-ad", "seq-ad", MAILBOX, to=[PROSPECT])
        ews_server.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent))
        enrollments = EnrollmentStore(redis_client)
        wait_for(lambda: (enrollments.get("e-ad") or {}).get("status") == "stopped", timeout=20,
                 message="the reply stopping the enrollment")
        assert operations(ews_server, "Autodiscover") == 1
        # a restart does not ask again either
        assert procs[0].terminate() == 0
        procs.append(CliProcess(["listen"], {**env, "EXCHANGE_LISTENER_LISTENER_ID": "l2"}, tmp_path / "l2.log"))
        wait_for(lambda: streaming(redis_client, "l2"), timeout=20, message="the restarted listener streaming")
        assert operations(ews_server, "Autodiscover") == 1
    finally:
        for p in procs:
            p.stop()


def test_redirect_followed_and_moved_url_rediscovered(ews_server, redirecting, redis_server, redis_client):
    ews_server.reset()
    redirecting.reset()
    settings = settings_for(redis_server.url, redirecting.base_url + PATH)
    # the first server answers redirectUrl; the one it names answers with its EWS URL
    assert account.check_at_start(settings).ews_url == ews_server.ews_url
    assert operations(redirecting, "Autodiscover") == 1 and operations(ews_server, "Autodiscover") == 1
    assert cached(redis_client)["autodiscover_url"] == ews_server.base_url + PATH
    # the cached endpoint has moved away (this one answers 404): discovered again at start
    moved = ews_server.base_url + "/EWS/Retired.asmx"
    redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps({"ews_url": moved, "asked": redirecting.base_url + PATH}))
    assert account.check_at_start(settings).ews_url == ews_server.ews_url
    assert cached(redis_client)["ews_url"] == ews_server.ews_url
    assert operations(ews_server, "Autodiscover") == 2
    # a cached URL that still answers is used as it is
    assert account.check_at_start(settings).ews_url == ews_server.ews_url
    assert operations(ews_server, "Autodiscover") == 2


def test_redirect_to_another_address_and_wrong_credentials(ews_server, redis_server, redis_client, tmp_path):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], extra_args=["--autodiscover-redirect", "svc@ours.example"]) as emu:
        settings = settings_for(redis_server.url, emu.base_url + PATH)
        assert account.check_at_start(settings).ews_url == emu.ews_url
        assert operations(emu, "Autodiscover") == 2  # rep@ -> redirectAddr svc@ -> settings
        with pytest.raises(discovery.AutodiscoverFailed, match="refused the credentials"):
            bad = settings.replace(ews_password="not-the-password")
            discovery.discover(bad, lambda: account.make_credentials(bad))


def test_redirect_outside_the_domain_is_not_followed(ews_server, redis_server, redis_client):
    """redirectUrl and HTTP 302 to a host outside ours.example (and the autodiscover host's own):
    nothing is POSTed there, and the error says what to set."""
    ews_server.reset()
    foreign = f"http://localhost:{ews_server.port}{PATH}"  # another host name: not 127.0.0.1, not ours.example
    with Scripted(200, {"Content-Type": "text/xml"}, redirect_url_answer(foreign)) as by_answer, \
            Scripted(302, {"Location": foreign}) as by_302:
        for server, how in ((by_answer, "redirectUrl"), (by_302, "HTTP 302")):
            settings = settings_for(redis_server.url, server.url())
            with pytest.raises(discovery.AutodiscoverFailed, match="set autodiscover_url") as failed:
                discovery.discover(settings, lambda s=settings: account.make_credentials(s))
            assert how in str(failed.value) and "localhost is outside" in str(failed.value)
            assert server.asked == [("POST", PATH)]
    assert operations(ews_server, "Autodiscover") == 0


def test_http_guess_followed_only_within_the_domain():
    """The unauthenticated http://autodiscover.DOMAIN redirect names a host: only DOMAIN's own."""
    inside = "https://mail.ours.example/autodiscover/autodiscover.xml"
    outside = "https://autodiscover.attacker.example/autodiscover/autodiscover.xml"
    with Scripted(302, {"Location": inside}) as good, Scripted(302, {"Location": outside}) as bad:
        assert discovery.http_redirect_guess("ours.example", good.url()) == (inside, "")
        candidate, skipped = discovery.http_redirect_guess("ours.example", bad.url())
        assert candidate == "" and outside in skipped and "outside ours.example" in skipped
    assert discovery.within("a.b.ours.example", "ours.example") and not discovery.within("evilours.example",
                                                                                           "ours.example")


def test_cache_must_be_https_and_found_for_this_autodiscover_url(redis_server, redis_client):
    """A Redis writer cannot send the credentials somewhere by editing el:ews:autodiscover."""
    https_endpoint = "https://autodiscover.ours.example" + PATH
    settings = settings_for(redis_server.url, https_endpoint)

    def cache(url: str, asked: str) -> str | None:
        redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps({"ews_url": url, "asked": asked}))
        return discovery.cached(settings)

    assert cache("https://mail.ours.example/EWS/Exchange.asmx", https_endpoint) == \
        "https://mail.ours.example/EWS/Exchange.asmx"
    assert cache("http://mail.ours.example/EWS/Exchange.asmx", https_endpoint) is None  # clear text: no
    assert cache("https://mail.ours.example/EWS/Exchange.asmx", "http://old.example" + PATH) is None  # other config
    plain = settings_for(redis_server.url, "http://127.0.0.1:1" + PATH)  # the emulator's http: allowed
    redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps(
        {"ews_url": "http://127.0.0.1:1/EWS/Exchange.asmx", "asked": plain.autodiscover_url}))
    assert discovery.cached(plain) == "http://127.0.0.1:1/EWS/Exchange.asmx"


def test_cached_url_kept_when_not_moved_or_rediscovery_fails(ews_server, redis_server, redis_client):
    ews_server.reset()
    settings = settings_for(redis_server.url, ews_server.base_url + PATH)
    # an unauthenticated 302 to a sign-in page is not a move: the cached URL stays, autodiscover not asked
    with Scripted(302, {"Location": "/owa/auth/logon.aspx"}) as sign_in:
        redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps(
            {"ews_url": sign_in.url("/EWS/Exchange.asmx"), "asked": settings.autodiscover_url}))
        assert account.check_at_start(settings).ews_url == sign_in.url("/EWS/Exchange.asmx")
    assert operations(ews_server, "Autodiscover") == 0
    # gone (404) but autodiscover is down: keep the cached URL (a warning), do not refuse to start
    dead = settings_for(redis_server.url, f"http://127.0.0.1:{free_port()}{PATH}")
    retired = ews_server.base_url + "/EWS/Retired.asmx"
    redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps({"ews_url": retired, "asked": dead.autodiscover_url}))
    assert account.check_at_start(dead).ews_url == retired
