"""POX autodiscover (issue 15): with ``ews_url`` empty, ``autodiscover_email`` and
``autodiscover_url`` find the EWS URL through the emulator's ``/autodiscover/autodiscover.xml``
(same auth as EWS); the answer is cached in Redis for every listener and worker (asked once, not
again on restart); a redirecting autodiscover server is followed, and a cached URL that has moved
is discovered again at start."""
from __future__ import annotations

import json

import mail_samples as mail
import pytest
from conftest import SERVICE_ACCOUNT

from emulators.services import CliProcess, Emulator, service_env, wait_for
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
    redis_client.hset(keys.EWS_AUTODISCOVER, MAILBOX, json.dumps({"ews_url": moved}))
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
