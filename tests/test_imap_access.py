"""How the IMAP listener gets in and stays in, against a real Dovecot: SASL PLAIN with the rep as
authorization id, XOAUTH2 with tokens minted from a Google service account (Dovecot's oauth2
passdb checks them at the Google OAuth emulator's introspection endpoint), a wrong credential
(a clear error, never the secret), a connection that goes silent mid-IDLE (the watchdog), and a
connection budget below the folders to watch (refused at start)."""
from __future__ import annotations

import json
import time

import pytest
from tcp_proxy import TcpProxy
from test_imap_listener import REP, System, wait_for

from exchange_listener.core import config
from exchange_listener.core.config import Settings
from exchange_listener.listener import mailboxes
from exchange_listener.sources.imap.session import GoogleTokens


@pytest.fixture
def system(redis_server, redis_client, dovecot, tmp_path):
    dovecot.add_users([REP])
    sys_ = System(redis_server, redis_client, dovecot, tmp_path)
    yield sys_
    for proc in sys_.procs:
        proc.stop()


@pytest.mark.parametrize("auth", ["plain", "xoauth2-google"])
def test_a_reply_is_acted_on_with_each_way_in(system, google_oauth, tmp_path, auth):
    settings = {"imap_auth": auth}
    if auth == "xoauth2-google":
        key_file = google_oauth.write_service_account_file(tmp_path / "service-account.json")
        settings = {"imap_auth": auth, "google_service_account_file": key_file, "imap_username": "",
                    "imap_password": ""}
    system.run(**settings)
    system.reply(f"e-{auth}")
    wait_for(lambda: system.stopped(f"e-{auth}"), message="reply stopped its enrollment")
    assert system.once(f"e-{auth}")
    if auth == "xoauth2-google":
        stats = google_oauth.stats()
        assert stats["grants"] >= 1 and stats["introspections"] >= 1, stats  # the real chain, not a shortcut
        logs = "".join(p.log_path.read_text() for p in system.procs)
        assert "PRIVATE KEY" not in logs and google_oauth.private_key_pem[40:80] not in logs


def test_a_wrong_credential_is_a_clear_error_that_never_shows_the_secret(system):
    secret = "not-the-master-secret-9f2"
    mailboxes.add(system.redis, [REP], source="imap")
    listener = system.start("listen", name="listener", imap_password=secret)
    wait_for(lambda: system.imap_info().get("failing_count") == 2, message="both folders failing")
    errors = {f["error"] for f in system.imap_info()["failing"]}
    assert all("refused to log in as rep@ours.example" in e for e in errors), errors
    wait_for(lambda: any(line.get("event") == "IMAP folder cannot be watched; retrying" for line in listener.lines()),
             message="the refusal logged")
    assert listener.proc.poll() is None  # it keeps trying (the password may be fixed), it does not die
    assert secret not in listener.log_path.read_text()
    assert secret not in json.dumps(system.imap_info())


def test_a_connection_gone_silent_mid_idle_is_noticed_and_nothing_is_lost(system):
    """A dead NAT entry: the socket stays open and nothing arrives. The IDLE is ended on time
    (``imap_idle_seconds``), DONE goes unanswered within ``imap_timeout_seconds``, and a new
    connection reads the mail that came meanwhile."""
    proxy = TcpProxy(system.dovecot.host, system.dovecot.port)
    try:
        mailboxes.add(system.redis, [REP], source="imap")
        system.start("listen", name="listener", imap_port=proxy.port, imap_idle_seconds=2, imap_timeout_seconds=2)
        system.start("work", "--name", "imap-worker", name="worker")
        wait_for(lambda: system.watching(2), message="watching through the proxy")
        assert proxy.freeze() >= 2
        frozen_at = time.monotonic()
        system.reply("e-silent")  # straight into Dovecot; the frozen IDLE hears nothing of it
        wait_for(lambda: system.stopped("e-silent"), message="the reply, read after reconnecting, stopped")
        assert time.monotonic() - frozen_at < 20
        # both folders' watches made new connections (the Junk one may still be in its backoff)
        wait_for(lambda: proxy.accepted >= 4, timeout=10.0, message="both watches connected again")
        assert system.once("e-silent")
    finally:
        proxy.close()


def test_fewer_connections_allowed_than_folders_to_watch_is_refused_at_start(system):
    proc = system.start("listen", name="listener", imap_max_connections_per_account=1)
    assert proc.proc.wait(timeout=20) == 2
    text = proc.log_path.read_text()
    assert "imap_max_connections_per_account (1)" in text and "IDLE connection" in text


def test_an_address_login_cannot_carry_is_reported_and_the_watch_stays_alive(system):
    """imaplib sends LOGIN as ASCII: a mailbox whose address is not is a clear, reported refusal
    (status names it), never a watch thread that died without a word."""
    mailboxes.add(system.redis, [REP, "rené@ours.example"], source="imap")
    system.start("listen", name="listener")
    wait_for(lambda: system.imap_info().get("connected") == 2 and system.imap_info().get("failing_count") == 2,
             message="the good mailbox watched, the other reported")
    assert {f["mailbox"] for f in system.imap_info()["failing"]} == {"rené@ours.example"}
    errors = {f["error"] for f in system.imap_info()["failing"]}
    assert all("characters IMAP LOGIN cannot carry" in e for e in errors), errors


def test_google_tokens_are_reused_until_they_expire_whatever_the_local_time_zone(google_oauth, tmp_path,
                                                                                  monkeypatch):
    """google-auth keeps expiry as naive UTC; read as local time east of UTC every token would
    look expired (a new grant per connection), west of it an expired one would look fresh."""
    key_file = google_oauth.write_service_account_file(tmp_path / "service-account.json")
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        settings = Settings({**{f.key: f.default for f in config.FIELDS}, "google_service_account_file": key_file,
                             "imap_auth": "xoauth2-google"})
        tokens = GoogleTokens(settings)
        before = google_oauth.stats()["grants"]
        first, second = tokens.token(REP), tokens.token(REP)
        assert first == second and google_oauth.stats()["grants"] == before + 1
        tokens.forget(REP)  # a refused login drops it: the next connection asks for a new one
        assert tokens.token(REP) != first and google_oauth.stats()["grants"] == before + 2
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
