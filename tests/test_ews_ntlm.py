"""NTLM as on-premises Exchange (IIS) runs it: the emulator with ``--auth ntlm`` (Basic refused)
accepts a real NTLMv2 handshake (raw NTLM and SPNEGO-wrapped, pyspnego on both sides) per TCP
connection; real ``exchange-listener listen`` and ``work`` processes with ``auth_type = "ntlm"``
stream and stop a reply's enrollment with either user-name form, survive a connection reset in
the middle of the handshake, and report a wrong password clearly without ever logging it."""
from __future__ import annotations

import base64
import functools
import http.client
import json

import mail_samples as mail
import pytest
import spnego

from emulators.services import CliProcess, Emulator, service_env, wait_for
from exchange_listener.listener import mailboxes
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

PASSWORD = "ntlm-Pa55-good"
ACCOUNT = f"svc@ours.example:{PASSWORD}"  # answers to svc@ours.example and OURS\svc
MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
wait_for = functools.partial(wait_for, timeout=45.0, interval=0.1)
GET_INBOX = (b'<?xml version="1.0" encoding="utf-8"?>'
             b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
             b'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
             b'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Header>'
             b'<t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
             b'<t:PrimarySmtpAddress>rep@ours.example</t:PrimarySmtpAddress></t:ConnectingSID>'
             b'</t:ExchangeImpersonation></s:Header><s:Body><m:GetFolder><m:FolderShape><t:BaseShape>IdOnly'
             b'</t:BaseShape></m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds>'
             b'</m:GetFolder></s:Body></s:Envelope>')


@pytest.fixture(scope="module")
def ntlm_emulator():
    with Emulator(accounts=[ACCOUNT], mailboxes=[MAILBOX], heartbeat_seconds=1.0,
                  extra_args=["--auth", "ntlm"]) as emu:
        yield emu


@pytest.fixture
def emu(ntlm_emulator):
    ntlm_emulator.reset()
    return ntlm_emulator


def post(conn: http.client.HTTPConnection, authorization: str | None = None) -> http.client.HTTPResponse:
    headers = {"Content-Type": "text/xml; charset=utf-8"}
    if authorization:
        headers["Authorization"] = authorization
    conn.request("POST", "/EWS/Exchange.asmx", body=GET_INBOX, headers=headers)
    response = conn.getresponse()
    response.read()
    return response


def handshake(conn, scheme: str, user: str, password: str, protocol: str) -> http.client.HTTPResponse:
    """The three legs on one connection; the answer to the type-3."""
    client = spnego.client(user, password, hostname="127.0.0.1", service="http", protocol=protocol)
    offer = post(conn)
    assert offer.status == 401 and scheme in (offer.headers.get_all("WWW-Authenticate") or [])
    challenge = post(conn, f"{scheme} {base64.b64encode(client.step() or b'').decode()}")
    assert challenge.status == 401
    token = challenge.headers["WWW-Authenticate"].split(" ", 1)[1]
    return post(conn, f"{scheme} {base64.b64encode(client.step(base64.b64decode(token)) or b'').decode()}")


@pytest.mark.parametrize("scheme,protocol,user", [
    ("NTLM", "ntlm", "OURS\\svc"),
    ("NTLM", "ntlm", "svc@ours.example"),
    ("Negotiate", "negotiate", "OURS\\svc"),  # SPNEGO NegTokenInit/NegTokenResp around NTLM
    ("Negotiate", "ntlm", "svc@ours.example"),  # raw NTLM under the Negotiate scheme, as requests_ntlm sends it
])
def test_the_handshake_authenticates_the_connection_and_only_it(emu, scheme, protocol, user):
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    offer = post(conn)
    assert offer.status == 401
    assert offer.headers.get_all("WWW-Authenticate") == ["Negotiate", "NTLM"]  # --auth ntlm: no Basic, no Bearer
    done = handshake(conn, scheme, user, PASSWORD, protocol)
    assert done.status == 200
    assert post(conn).status == 200  # no Authorization: the connection stays authenticated (IIS)
    other = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    assert post(other).status == 401  # but no other connection
    basic = base64.b64encode(f"svc@ours.example:{PASSWORD}".encode()).decode()
    assert post(other, f"Basic {basic}").status == 401  # Basic is not offered, so it is refused
    conn.close()
    other.close()


def test_a_wrong_password_or_an_unknown_user_is_refused(emu):
    for user, password in (("OURS\\svc", "wrong"), ("svc@ours.example", "wrong"), ("OTHER\\svc", PASSWORD),
                           ("nobody@ours.example", PASSWORD)):
        conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
        refused = handshake(conn, "NTLM", user, password, "ntlm")
        assert refused.status == 401, user
        assert refused.headers.get_all("WWW-Authenticate") == ["Negotiate", "NTLM"]  # start over
        assert post(conn).status == 401, user  # and the connection is not authenticated
        conn.close()


def test_ntlm_reset_cuts_the_connection_after_the_type_1(emu):
    emu.fault(kind="ntlm_reset", count=1)
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    client = spnego.client("OURS\\svc", PASSWORD, hostname="127.0.0.1", service="http", protocol="ntlm")
    assert post(conn).status == 401
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        post(conn, f"NTLM {base64.b64encode(client.step() or b'').decode()}")
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)  # one reset only: the next one works
    assert handshake(conn, "NTLM", "OURS\\svc", PASSWORD, "ntlm").status == 200
    conn.close()


def _streaming(conn, count: int) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == count


@pytest.mark.slow
@pytest.mark.parametrize("user", ["OURS\\svc", "svc@ours.example"])
def test_listener_and_worker_over_ntlm_stop_a_reply_through_a_reset_mid_handshake(redis_server, redis_client, emu,
                                                                                  tmp_path, user):
    env = service_env(redis_server.url, emu.ews_url, username=user, password=PASSWORD, auth_type="ntlm",
                      heartbeat_seconds=1, lease_seconds=3, listener_id="l1")
    mailboxes.add(redis_client, [MAILBOX])
    procs = [CliProcess(["listen"], env, tmp_path / "listener.log"),
             CliProcess(["work", "--name", "ntlm-worker"], env, tmp_path / "worker.log")]
    listener, worker = procs
    try:
        wait_for(lambda: _streaming(redis_client, 1), message="the mailbox streaming over NTLM")
        # every new connection's handshake is cut after its type-1 twice; the stream's reconnect
        # meets the resets, retries, and carries the reply
        emu.fault(kind="ntlm_reset", count=2)
        emu.fault(kind="reset_streams")
        message_id = mail.new_id("ours.example")
        SendRegistry(redis_client).record([message_id], "e-ntlm", "seq-ntlm", MAILBOX, to=[PROSPECT])
        emu.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=message_id, references=message_id))
        enrollments = EnrollmentStore(redis_client)
        wait_for(lambda: (enrollments.get("e-ntlm") or {}).get("status") == "stopped", message="the reply stopped it")
        assert (enrollments.get("e-ntlm") or {}).get("reason") == "replied"
        # met by the listener's stream or catch-up, or by the worker if its connection was the new one
        assert any("Connection reset by peer" in json.dumps(line) for proc in procs for line in proc.lines()), \
            "no connection was reset mid-handshake"
        assert listener.alive() and worker.alive()
        for proc in procs:
            assert PASSWORD not in proc.log_path.read_text()
    finally:
        for proc in procs:
            proc.stop()
            for line in proc.lines():  # shown by pytest only if the test failed
                if line.get("level") not in ("info", "debug"):
                    print(proc.args[0], json.dumps(line)[:400])


def test_a_wrong_password_is_a_clear_error_in_the_listeners_log_and_never_logged(redis_server, redis_client, emu,
                                                                                tmp_path):
    secret = "wrong-Pa55word-ntlm"
    env = service_env(redis_server.url, emu.ews_url, username="OURS\\svc", password=secret, auth_type="ntlm",
                      heartbeat_seconds=1, lease_seconds=3, listener_id="l1")
    mailboxes.add(redis_client, ["tina@ours.example"])
    listener = CliProcess(["listen"], env, tmp_path / "listener.log")
    try:
        failure = wait_for(lambda: [line for line in listener.lines() if "authentication" in line.get("event", "")],
                           message="the failed authentication logged")[0]
        assert "UnauthorizedError" in failure["event"] and "ews_password" in failure["event"], failure
        assert listener.alive()
        assert secret not in listener.log_path.read_text()
    finally:
        listener.stop()
