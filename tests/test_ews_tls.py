"""EWS over HTTPS with a private CA (issue 15): the emulator serves a certificate from a test CA
made here (trustme, on cryptography; no key is committed); ``ca_file`` makes the listener and the
worker trust it; a certificate from another CA, or for another host name, stops ``listen`` at
start with one line that says which and what to set (``work`` logs it and serves the other
sources' jobs). With ``ca_file`` empty the check trusts what requests trusts (REQUESTS_CA_BUNDLE).
A guessed autodiscover host's certificate or 401 does not stop the search; https never
redirects to http."""
from __future__ import annotations

import datetime
import json
import ssl
import urllib.request

import mail_samples as mail
import pytest
import trustme
from conftest import SERVICE_ACCOUNT
from test_ews_autodiscover import PATH, Scripted, redirect_url_answer

from emulators.services import CliProcess, Emulator, service_env, wait_for
from exchange_listener.core import config
from exchange_listener.listener import mailboxes
from exchange_listener.sources.ews import account, discovery
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"


class TlsEmulator(Emulator):
    """The EWS emulator serving HTTPS; its test hooks trust ``ca_file``."""

    def __init__(self, cert_file: str, ca_file: str, **kwargs):
        super().__init__(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                         extra_args=["--tls-cert", cert_file], **kwargs)
        self.context = ssl.create_default_context(cafile=ca_file)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _post(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method="POST",
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files = {"ca": root / "ca.pem", "other_ca": root / "other-ca.pem", "server": root / "server.pem",
             "wrong_host": root / "wrong-host.pem", "expired": root / "expired.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["other_ca"]))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    ca.issue_cert("mail.elsewhere.example").private_key_and_cert_chain_pem.write_to_path(str(files["wrong_host"]))
    ca.issue_cert("127.0.0.1", not_before=datetime.datetime(2000, 1, 1), not_after=datetime.datetime(2001, 1, 1)) \
        .private_key_and_cert_chain_pem.write_to_path(str(files["expired"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def https_emulator(pki):
    with TlsEmulator(pki["server"], pki["ca"]) as emu:
        yield emu


@pytest.fixture(scope="module")
def wrong_host_emulator(pki):
    with TlsEmulator(pki["wrong_host"], pki["ca"]) as emu:
        yield emu


def test_listener_and_worker_over_https_with_ca_file_stop_a_reply(https_emulator, pki, redis_server, redis_client,
                                                                    tmp_path):
    https_emulator.reset()
    assert https_emulator.ews_url.startswith("https://")
    env = service_env(redis_server.url, https_emulator.ews_url, ca_file=pki["ca"], heartbeat_seconds=1,
                      lease_seconds=3, listener_id="l1")
    mailboxes.add(redis_client, [MAILBOX])
    procs = [CliProcess(["listen"], env, tmp_path / "listener.log"),
             CliProcess(["work", "--name", "tls-worker"], env, tmp_path / "worker.log")]
    try:
        wait_for(lambda: streaming(redis_client), timeout=20, message="the mailbox streaming over HTTPS")
        sent = mail.new_id("ours.example")
        SendRegistry(redis_client).record([sent], "e-tls", "seq-tls", MAILBOX, to=[PROSPECT])
        https_emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent))
        enrollments = EnrollmentStore(redis_client)
        wait_for(lambda: (enrollments.get("e-tls") or {}).get("status") == "stopped", timeout=20,
                 message="the reply stopping the enrollment")
        assert all(p.alive() for p in procs)
    finally:
        for p in procs:
            p.stop()


def streaming(conn) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == 1


def _start_failure(emulator, ca_file: str, redis_server, tmp_path) -> list[str]:
    env = service_env(redis_server.url, emulator.ews_url, ca_file=ca_file)
    proc = CliProcess(["listen"], env, tmp_path / "listener.log")
    try:
        status = proc.proc.wait(15)
    finally:
        proc.stop()
    assert status != 0
    return [line["event"] if isinstance(line.get("event"), str) else str(line) for line in proc.lines()]


def test_untrusted_ca_fails_at_start_with_one_line(https_emulator, pki, redis_server, tmp_path):
    lines = _start_failure(https_emulator, pki["other_ca"], redis_server, tmp_path)
    assert len(lines) == 1, lines
    assert "untrusted CA" in lines[0] and "set ca_file" in lines[0], lines[0]
    assert f"127.0.0.1:{https_emulator.port}" in lines[0]


def test_wrong_host_fails_at_start_with_one_line(wrong_host_emulator, pki, redis_server, tmp_path):
    lines = _start_failure(wrong_host_emulator, pki["ca"], redis_server, tmp_path)
    assert len(lines) == 1, lines
    assert "name mismatch" in lines[0] and "host name" in lines[0], lines[0]


def test_verify_tls_false_still_turns_checking_off(wrong_host_emulator, pki, redis_server):
    settings = config.load(env={}, overrides={
        "redis_url": redis_server.url, "ews_url": wrong_host_emulator.ews_url, "verify_tls": False,
        "ews_username": SERVICE_ACCOUNT[0], "ews_password": SERVICE_ACCOUNT[1]})
    assert account.check_at_start(settings).ews_url == wrong_host_emulator.ews_url
    acct = account.make_account(settings, MAILBOX, account.make_configuration(settings, pool="tls-off"))
    assert acct.inbox.name == "Inbox"  # a real GetFolder over HTTPS with an unverifiable certificate
    with pytest.raises(config.ConfigError, match="name mismatch"):
        account.check_at_start(settings.replace(verify_tls=True, ca_file=pki["ca"]))


def test_work_with_an_unusable_ews_refuses_to_start_in_one_line(https_emulator, pki, redis_server, tmp_path):
    """EWS configured but its certificate untrusted: the worker does not start (its EWS jobs would
    each fail into the failed registry; queued, they wait for a worker that can read them)."""
    env = service_env(redis_server.url, https_emulator.ews_url, ca_file=pki["other_ca"])
    proc = CliProcess(["work", "--burst", "--name", "tls-burst"], env, tmp_path / "worker.log")
    try:
        assert proc.proc.wait(20) == 2
    finally:
        proc.stop()
    errors = [line for line in proc.lines() if line.get("level") == "error"]
    assert len(errors) == 1 and "untrusted CA" in errors[0]["error"], proc.lines()
    assert not any(line.get("event") == "worker starting" for line in proc.lines())


def _settings(redis_server, **overrides) -> config.Settings:
    return config.load(env={}, overrides={
        "redis_url": redis_server.url, "ews_url": "", "autodiscover_email": MAILBOX, "autodiscover_url": "",
        "ews_username": SERVICE_ACCOUNT[0], "ews_password": SERVICE_ACCOUNT[1], **overrides})


def test_guessed_candidates_problems_are_noted_and_the_next_tried(https_emulator, wrong_host_emulator, pki,
                                                                    redis_server):
    settings = _settings(redis_server, ca_file=pki["ca"])

    def creds():
        return account.make_credentials(settings)

    with Scripted(401, {"WWW-Authenticate": 'Basic realm="x"'}) as refusing:
        guesses = [refusing.url(), wrong_host_emulator.base_url + PATH, https_emulator.base_url + PATH]
        assert discovery.discover(settings, creds, guesses=guesses)[0] == https_emulator.ews_url
        with pytest.raises(discovery.AutodiscoverFailed) as failed:
            discovery.discover(settings, creds, guesses=guesses[:2])
    assert "refused the credentials" in str(failed.value) and "name mismatch" in str(failed.value)
    assert "set autodiscover_url" in str(failed.value)
    # the operator's own autodiscover_url: its certificate problem is the answer
    explicit = settings.replace(autodiscover_url=wrong_host_emulator.base_url + PATH)
    with pytest.raises(config.ConfigError, match="name mismatch"):
        discovery.discover(explicit, creds, guesses=guesses)


def test_https_autodiscover_never_redirects_to_http(pki, redis_server):
    """redirectUrl or HTTP 302 from https to http: not followed, nothing POSTed in clear text."""
    settings = _settings(redis_server, ca_file=pki["ca"])
    with Scripted(200) as clear_text:
        target = clear_text.url()
        with Scripted(200, {"Content-Type": "text/xml"}, redirect_url_answer(target), tls_cert=pki["server"]) as by_answer, \
                Scripted(302, {"Location": target}, tls_cert=pki["server"]) as by_302:
            for server in (by_answer, by_302):
                explicit = settings.replace(autodiscover_url=server.url())
                with pytest.raises(discovery.AutodiscoverFailed, match="from https to http"):
                    discovery.discover(explicit, lambda s=explicit: account.make_credentials(s))
                assert server.asked == [("POST", PATH)]
        assert clear_text.asked == []


def test_check_trusts_what_requests_trusts_and_names_an_expired_certificate(https_emulator, pki, monkeypatch):
    settings = config.load(env={}, overrides={"ews_url": https_emulator.ews_url, "ews_username": "svc",
                                              "ews_password": "x"})  # ca_file empty
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["ca"])  # what requests (and so exchangelib) would trust
    discovery.check_tls(settings, https_emulator.ews_url)
    with Scripted(200, tls_cert=pki["expired"]) as expired, \
            pytest.raises(config.ConfigError, match="certificate expired") as failed:
        discovery.check_tls(settings, expired.url())
    assert "untrusted CA" not in str(failed.value)
