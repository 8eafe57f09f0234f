"""EWS over HTTPS with a private CA (issue 15): the emulator serves a certificate from a test CA
made here (trustme, on cryptography; no key is committed); ``ca_file`` makes the listener and the
worker trust it; a certificate from another CA, or for another host name, stops ``listen`` at
start with one line that says which and what to set."""
from __future__ import annotations

import json
import ssl
import urllib.request

import mail_samples as mail
import pytest
import trustme
from conftest import SERVICE_ACCOUNT

from emulators.services import CliProcess, Emulator, service_env, wait_for
from exchange_listener.core import config
from exchange_listener.listener import mailboxes
from exchange_listener.sources.ews import account
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
             "wrong_host": root / "wrong-host.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["other_ca"]))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    ca.issue_cert("mail.elsewhere.example").private_key_and_cert_chain_pem.write_to_path(str(files["wrong_host"]))
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
