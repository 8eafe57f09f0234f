"""Wire fidelity: streamed envelopes, headers and cookies, schema checking, the CLI commands."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import requests
from ews_client import StreamReader, account, message, open_streams, wait_for
from exchangelib.util import DocumentYielder

from emulators.ews import validation
from emulators.ews.soap import M, S, T
from emulators.services import Emulator

ALICE = "alice@example.com"
AUTH = ("svc", "svc-password")


def _soap(body: str, impersonate: str = ALICE) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{S}" xmlns:m="{M}" xmlns:t="{T}">'
            f'<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
            f"<t:PrimarySmtpAddress>{impersonate}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"
            f"</s:Header><s:Body>{body}</s:Body></s:Envelope>").encode()


@pytest.mark.slow
def test_stream_is_one_complete_envelope_per_chunk_with_heartbeats(emulator):
    sub = account(emulator, ALICE).inbox.subscribe_to_streaming()
    body = (f"<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub}</t:SubscriptionId>"
            "</m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>")
    with requests.post(emulator.ews_url, data=_soap(body), auth=AUTH, stream=True, timeout=30,
                       headers={"Content-Type": "text/xml; charset=utf-8"}) as resp:
        assert resp.status_code == 200 and resp.headers["Transfer-Encoding"] == "chunked"
        chunks = []
        for chunk in resp.iter_content(chunk_size=None):
            chunks.append(chunk)
            if len(chunks) == 2:
                emulator.deliver(ALICE, message("<wire@customer.example>"))
            if len(chunks) == 4:
                break
    for chunk in chunks:
        assert chunk.startswith(b"<s:Envelope ") and chunk.endswith(b"</s:Envelope>")
        assert validation.violations(chunk) == []
    assert b"<m:ConnectionStatus>OK</m:ConnectionStatus>" in chunks[0]
    assert any(b"<m:Notification><t:SubscriptionId>" in c and b"NewMailEvent" in c for c in chunks)
    docs = list(DocumentYielder(iter(bytes([b]) for b in b"".join(chunks))))
    assert len(docs) == len(chunks)


def test_at_most_50_events_per_notification(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    for n in range(20):  # 60 events queue up while no stream is attached
        emulator.deliver(ALICE, message(f"<bulk-{n}@customer.example>"))
    reader = StreamReader(acc.inbox, [sub]).start()
    wait_for(lambda: len(reader.events()) == 60)
    assert max(len(n.events) for n in reader.notifications) == 50
    assert reader.notifications[0].more_events is True


def test_every_non_streaming_response_carries_server_version_info(emulator):
    body = ('<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds>'
            '<t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>')
    resp = requests.post(emulator.ews_url, data=_soap(body), auth=AUTH, timeout=10)
    assert resp.status_code == 200
    assert b'ServerVersionInfo MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507"' in resp.content
    assert validation.violations(resp.content) == []


def test_unknown_operation_and_missing_credentials(emulator):
    resp = requests.post(emulator.ews_url, data=_soap("<m:Frobnicate/>"), auth=AUTH, timeout=10)
    assert resp.status_code == 500 and b"<faultcode" in resp.content and b"ErrorInvalidOperation" in resp.content
    resp = requests.post(emulator.ews_url, data=_soap("<m:Frobnicate/>"), timeout=10)
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")


def test_affinity_cookie_only_when_asked(emulator):
    body = ('<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders="true"><t:EventTypes>'
            "<t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>")
    asked = requests.post(emulator.ews_url, data=_soap(body), auth=AUTH, timeout=10,
                          headers={"X-PreferServerAffinity": "true", "X-AnchorMailbox": ALICE})
    assert asked.status_code == 200 and "X-BackEndOverrideCookie" in asked.cookies
    plain = requests.post(emulator.ews_url, data=_soap(body), auth=AUTH, timeout=10)
    assert plain.status_code == 200 and "X-BackEndOverrideCookie" not in plain.cookies


def test_validator_rejects_schema_order_and_accepts_only_documented_deviations(tmp_path):
    def env(inner):
        return (f'<s:Envelope xmlns:s="{S}"><s:Body><m:GetStreamingEventsResponse xmlns:m="{M}" xmlns:t="{T}">'
                f"<m:ResponseMessages>{inner}</m:ResponseMessages></m:GetStreamingEventsResponse></s:Body>"
                "</s:Envelope>").encode()
    wire_form = env('<m:GetStreamingEventsResponseMessage ResponseClass="Error"><m:MessageText>x</m:MessageText>'
                    "<m:ResponseCode>ErrorSubscriptionNotFound</m:ResponseCode><m:ErrorSubscriptionIds>"
                    "<m:SubscriptionId>abc</m:SubscriptionId></m:ErrorSubscriptionIds>"
                    "</m:GetStreamingEventsResponseMessage>")
    assert validation.violations(wire_form) == []
    out_of_order = env('<m:GetStreamingEventsResponseMessage ResponseClass="Error">'
                       "<m:ResponseCode>ErrorSubscriptionNotFound</m:ResponseCode><m:MessageText>x</m:MessageText>"
                       "</m:GetStreamingEventsResponseMessage>")
    assert validation.violations(out_of_order)
    misplaced = env('<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError'
                    "</m:ResponseCode><m:SubscriptionId>abc</m:SubscriptionId></m:GetStreamingEventsResponseMessage>")
    assert validation.violations(misplaced)
    log = validation.ViolationLog(str(tmp_path / "violations.log"))
    log.check(wire_form)
    assert not (tmp_path / "violations.log").exists()  # nothing to record for a valid response
    log.check(out_of_order)
    assert len((tmp_path / "violations.log").read_text().splitlines()) == len(validation.violations(out_of_order))


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], check=False, capture_output=True, text=True,
                          timeout=30, **kwargs)


def test_emulator_deliver_command(emulator, tmp_path):
    eml = tmp_path / "reply.eml"
    eml.write_bytes(message("<cli@customer.example>"))
    done = _cli("emulator-deliver", "--url", emulator.base_url, "--mailbox", "new.person@example.com", str(eml))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["folder"] == "inbox"
    found = list(account(emulator, "new.person@example.com").inbox.filter(message_id="<cli@customer.example>"))
    assert [m.id for m in found] == [result["item_id"]]
    missing = _cli("emulator-deliver", "--url", emulator.base_url, "--mailbox", ALICE, str(tmp_path / "nope.eml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_hooks_reject_bad_input(emulator):
    for url, data in ((f"{emulator.base_url}/emulator/mailboxes/{ALICE}/messages", b""),
                      (f"{emulator.base_url}/emulator/faults", b'{"kind": "meteor"}'),
                      (f"{emulator.base_url}/emulator/faults", b"not json")):
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=5)
            raise AssertionError(f"{url} accepted {data!r}")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400


def test_emulator_exits_zero_on_sigterm_and_sigint():
    for sig in (signal.SIGTERM, signal.SIGINT):
        emu = Emulator(heartbeat_seconds=1).start()
        sub = account(emu, ALICE).inbox.subscribe_to_streaming()
        reader = StreamReader(account(emu, ALICE).inbox, [sub]).start()
        wait_for(lambda emu=emu: open_streams(emu) == 1)
        emu.proc.send_signal(sig)
        assert emu.proc.wait(10) == 0
        reader.join()


def test_client_hanging_up_frees_its_stream_at_once():
    with Emulator(heartbeat_seconds=60) as emu:
        sub = account(emu, ALICE).inbox.subscribe_to_streaming()
        body = (f"<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub}</t:SubscriptionId>"
                "</m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>")
        resp = requests.post(emu.ews_url, data=_soap(body), auth=AUTH, stream=True, timeout=30)
        wait_for(lambda: open_streams(emu) == 1)
        resp.close()  # hang up mid-stream, no heartbeat due for a minute
        wait_for(lambda: open_streams(emu) == 0, timeout=5)
        emu.deliver(ALICE, message("<after-hangup@customer.example>"))
        reader = StreamReader(account(emu, ALICE).inbox, [sub]).start()  # the events waited for a new stream
        wait_for(lambda: reader.events("NewMailEvent"))


def test_emulator_on_a_busy_port_exits_with_a_clear_error(emulator):
    done = _cli("emulator", "--port", str(emulator.port), "--account", "svc:svc-password")
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{emulator.port}" in done.stderr
