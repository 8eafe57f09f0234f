"""Issue 15, versions: the emulator answers as Exchange 2016, 2019 or Subscription Edition
(``--server-version``), and exchangelib with no configured version learns the build from its
own probe (a ConvertId whose answer's ServerVersionInfo header names the build); a listener
with an empty ``ews_version`` streams from an SE emulator and a worker stops a reply.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import mail_samples as mail
import pytest
from conftest import SERVICE_ACCOUNT
from exchangelib import Build, Configuration, Credentials, Version
from exchangelib.protocol import Protocol
from exchangelib.transport import BASIC
from lxml import etree

from emulators.ews import soap
from emulators.services import CliProcess, Emulator, service_env, wait_for
from exchange_listener.core import config
from exchange_listener.listener import mailboxes
from exchange_listener.sources.ews.account import make_configuration
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
EXPECTED = {"2016": Build(15, 1, 2507, 6), "2019": Build(15, 2, 1748, 10), "SE": Build(15, 2, 2562, 17)}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def versioned(request):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--server-version", request.param]) as emu:
        yield request.param, emu


def _protocol(url: str) -> Protocol:
    """A Protocol with no version configured, so its first use runs exchangelib's probe."""
    return Protocol(config=Configuration(service_endpoint=url, credentials=Credentials(*SERVICE_ACCOUNT),
                                         auth_type=BASIC))


def test_exchangelib_probe_learns_each_servers_build(versioned):
    name, emu = versioned
    emu.reset()
    version = _protocol(emu.ews_url).version
    assert version.build == EXPECTED[name]
    # "V2017_07_11" is not a request version; exchangelib keeps the one it asked with
    assert version.api_version == "Exchange2016"
    assert emu.stats()["operations"] == {"ConvertId": 1}


def test_an_unknown_request_version_is_refused_as_exchange_does(versioned):
    """The probe walks down its list on ErrorInvalidServerVersion: ask with a version no server
    knows first, and it still ends with the server's build after one more ConvertId."""
    name, emu = versioned
    emu.reset()
    body = (f'<s:Envelope xmlns:s="{soap.S}" xmlns:m="{soap.M}" xmlns:t="{soap.T}"><s:Header>'
            '<t:RequestServerVersion Version="Exchange2007_SP3"/></s:Header><s:Body>'
            '<m:ConvertId DestinationFormat="EntryId"><m:SourceIds><t:AlternateId Format="EwsId" Id="DUMMY" '
            'Mailbox="DUMMY"/></m:SourceIds></m:ConvertId></s:Body></s:Envelope>').encode()
    request = urllib.request.Request(emu.ews_url, body, {"Content-Type": "text/xml; charset=utf-8"})
    request.add_unredirected_header("Authorization", "Basic c3ZjOnN2Yy1wYXNzd29yZA==")  # svc:svc-password
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 500
    fault = etree.fromstring(refused.value.read())
    assert fault.findtext(".//faultcode") == "a:ErrorInvalidServerVersion"
    assert fault.findtext(".//faultstring") == "The specified server version is invalid."

    protocol = _protocol(emu.ews_url.replace("Exchange.asmx", "exchange.asmx"))  # its own Protocol
    guessed = Version.guess(protocol, api_version_hint="Exchange2007_SP3")
    assert (guessed.build, guessed.api_version) == (EXPECTED[name], "Exchange2016")


def test_empty_ews_version_leaves_the_version_to_the_probe(versioned):
    name, emu = versioned
    emu.reset()
    settings = config.load(env={"EXCHANGE_LISTENER_EWS_URL": emu.ews_url, "EXCHANGE_LISTENER_EWS_VERSION": "",
                                "EXCHANGE_LISTENER_EWS_USERNAME": SERVICE_ACCOUNT[0],
                                "EXCHANGE_LISTENER_EWS_PASSWORD": SERVICE_ACCOUNT[1]})
    configuration = make_configuration(settings, pool=f"versions-{name}")
    assert configuration.version is None
    assert Protocol(config=configuration).version.build == EXPECTED[name]


@pytest.mark.slow
def test_listener_without_a_version_streams_from_se_and_a_worker_stops_a_reply(redis_server, redis_client, tmp_path):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--server-version", "SE"]) as emu:
        env = service_env(redis_server.url, emu.ews_url, password=SERVICE_ACCOUNT[1], heartbeat_seconds=1,
                          lease_seconds=3, listener_id="l1", ews_version="")
        sent = mail.new_id("ours.example")
        SendRegistry(redis_client).record([sent], "e-se", "seq-se", MAILBOX, to=[PROSPECT])
        mailboxes.add(redis_client, [MAILBOX])
        procs = [CliProcess(["listen"], env, tmp_path / "listener.log"),
                 CliProcess(["work", "--name", "versions-worker"], env, tmp_path / "worker.log")]
        try:
            def streaming():
                raw = redis_client.hget("el:listener:l1", "groups")
                return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == 1

            wait_for(streaming, timeout=30, interval=0.1, message="the mailbox streaming")
            emu.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent))
            enrollments = EnrollmentStore(redis_client)
            wait_for(lambda: (enrollments.get("e-se") or {}).get("status") == "stopped", timeout=30, interval=0.1,
                     message="the reply stopping the enrollment")
            assert (enrollments.get("e-se") or {}).get("reason") == "replied"
            # no build configured anywhere: each process asked the server (listener and worker pools)
            assert emu.stats()["operations"].get("ConvertId", 0) >= 2
            assert all(proc.alive() for proc in procs)
        finally:
            for proc in procs:
                proc.stop()
