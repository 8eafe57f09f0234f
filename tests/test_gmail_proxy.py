"""tests/gmail_proxy.py in front of a real Dovecot looks like Gmail's X-GM-EXT-1 for X-GM-MSGID,
and leaves literals (headers, bodies, passwords) byte for byte alone."""
from __future__ import annotations

import collections.abc

import pytest
from gmail_proxy import GmailProxy, msgid_for_guid
from imapclient import IMAPClient

from emulators.dovecot import Dovecot

REP = "gm-rep@x.test"
# the header and the body carry the proxy's own tokens, some on lines that look like a FETCH
# command or response: literals must never be rewritten
BODY = (b"Body X-GUID 123 and X-GM-MSGID 7.\r\n* 1 FETCH (X-GUID 123 UID 1)\r\n"
        b"a1 UID FETCH 1 (X-GM-MSGID)\r\n* CAPABILITY IMAP4rev1\r\n")
RAW = (b"From: Buyer <buyer@customer.test>\r\nTo: gm-rep@x.test\r\nSubject: Re: X-GUID 123 (X-GM-MSGID 5)\r\n"
       b"X-GUID: abc\r\nMessage-ID: <gm-1@customer.test>\r\n\r\n" + BODY)
OTHER_RAW = (b"From: Buyer <buyer@customer.test>\r\nTo: gm-rep@x.test\r\nSubject: another\r\n"
             b"Message-ID: <gm-2@customer.test>\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module", autouse=True)
def users(dovecot_process: Dovecot) -> None:
    dovecot_process.add_users([REP])


@pytest.fixture
def proxy(dovecot: Dovecot) -> collections.abc.Iterator[GmailProxy]:
    with GmailProxy(dovecot.host, dovecot.port) as running:
        yield running


def login(proxy: GmailProxy, dovecot: Dovecot) -> IMAPClient:
    client = IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=5)
    client.login(f"{REP}*{dovecot.master_user}", dovecot.master_password)
    return client


def test_capabilities_announce_x_gm_ext_1(proxy: GmailProxy, dovecot: Dovecot) -> None:
    client = IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=5)
    try:
        assert b"X-GM-EXT-1" in client.capabilities()  # from the greeting's [CAPABILITY ...]
        client.login(f"{REP}*{dovecot.master_user}", dovecot.master_password)
        assert b"X-GM-EXT-1" in client.capabilities()  # from the LOGIN OK's [CAPABILITY ...]
        assert b"X-GM-EXT-1" in client.capabilities()
        client._cached_capabilities = None  # ask with CAPABILITY: the untagged line
        assert client.has_capability("X-GM-EXT-1")
        assert b"IMAP4REV1" in client.capabilities()
    finally:
        client.logout()
    with IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=5) as direct:
        assert b"X-GM-EXT-1" not in direct.capabilities()  # the proxy added it


def test_x_gm_msgid_follows_the_message_across_folders(proxy: GmailProxy, dovecot: Dovecot) -> None:
    uid = dovecot.append(REP, RAW)
    other = dovecot.append(REP, OTHER_RAW)
    client = login(proxy, dovecot)
    try:
        client.select_folder("INBOX")
        fetched = client.fetch([uid, other], ["X-GM-MSGID", "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]"])
        msgid = fetched[uid][b"X-GM-MSGID"]
        assert isinstance(msgid, int) and 0 < msgid < 2 ** 63
        assert fetched[uid][b"BODY[HEADER]"] == RAW.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        assert fetched[uid][b"BODY[TEXT]"] == BODY
        assert fetched[other][b"X-GM-MSGID"] != msgid

        # the envelope's subject is a quoted string: not rewritten either
        envelope = client.fetch([uid], ["ENVELOPE", "X-GM-MSGID"])[uid]
        assert envelope[b"ENVELOPE"].subject == b"Re: X-GUID 123 (X-GM-MSGID 5)"
        assert envelope[b"X-GM-MSGID"] == msgid

        client.create_folder("Label")
        client.copy([uid], "Label")
        client.select_folder("Label")
        [copied] = client.search("ALL")
        assert client.fetch([copied], ["X-GM-MSGID"])[copied][b"X-GM-MSGID"] == msgid
    finally:
        client.logout()

    moved = dovecot.move(REP, uid, "INBOX", "Archive")
    with IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=5) as direct:
        direct.login(f"{REP}*{dovecot.master_user}", dovecot.master_password)
        direct.select_folder("Archive")
        guid = direct.fetch([moved], ["X-GUID"])[moved][b"X-GUID"]
    assert msgid_for_guid(guid) == msgid  # the documented derivation, after a MOVE as well
    client = login(proxy, dovecot)
    try:
        client.select_folder("Archive")
        assert client.fetch([moved], ["X-GM-MSGID"])[moved][b"X-GM-MSGID"] == msgid
    finally:
        client.logout()


def test_client_literals_pass_through(proxy: GmailProxy, dovecot: Dovecot) -> None:
    """APPEND's synchronizing literal and a password literal go through the proxy untouched."""
    client = IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=5)
    try:
        client.login(f"{REP}*{dovecot.master_user}", dovecot.master_password + "")
        client.select_folder("INBOX")
        client.append("INBOX", RAW.replace(b"gm-1@", b"gm-3@"))
        [uid] = client.search(["HEADER", "Message-ID", "<gm-3@customer.test>"])
        assert client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"] == RAW.replace(b"gm-1@", b"gm-3@")
        assert isinstance(client.fetch([uid], ["X-GM-MSGID"])[uid][b"X-GM-MSGID"], int)
    finally:
        client.logout()
