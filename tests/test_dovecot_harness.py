"""The IMAP test harness itself: a real Dovecot (emulators.dovecot) and the Google OAuth emulator
(emulators.google_oauth) do what the IMAP source's tests will rely on."""
from __future__ import annotations

import imaplib
import socket

import google.auth.transport.requests
import pytest
from google.oauth2 import service_account
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from emulators.dovecot import Dovecot
from emulators.google_oauth import GoogleOAuth
from emulators.services import wait_for

REP, OTHER, LOCKED, OAUTH = "rep@x.test", "other@x.test", "locked@x.test", "oauth@x.test"
RAW = (b"From: Buyer <buyer@customer.test>\r\nTo: rep@x.test\r\nSubject: Re: our offer\r\n"
       b"Message-ID: <reply-1@customer.test>\r\nIn-Reply-To: <offer-1@x.test>\r\n\r\nSounds good.\r\n")


@pytest.fixture(scope="module", autouse=True)
def users(dovecot_process: Dovecot) -> None:
    """Every user of the module at once (each change of the user file costs Dovecot a second)."""
    dovecot_process.add_users([REP, OTHER, LOCKED, OAUTH])


def client(dovecot: Dovecot) -> IMAPClient:
    return IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=5)


def test_master_user_login_and_sasl_plain_authzid_act_as_the_rep(dovecot: Dovecot) -> None:
    uid = dovecot.append(REP, RAW)
    with client(dovecot) as imap:
        imap.login(f"{REP}*{dovecot.master_user}", dovecot.master_password)
        imap.select_folder("INBOX", readonly=True)
        assert uid in imap.search(["HEADER", "Message-ID", "<reply-1@customer.test>"])
    with client(dovecot) as imap:
        imap.plain_login(dovecot.master_user, dovecot.master_password, authorization_identity=REP)
        imap.select_folder("INBOX", readonly=True)
        assert uid in imap.search("ALL")
    with client(dovecot) as imap:  # the other user's mailbox does not have it
        imap.plain_login(dovecot.master_user, dovecot.master_password, authorization_identity=OTHER)
        assert imap.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    with client(dovecot) as imap, pytest.raises(LoginError):
        imap.login(f"{REP}*{dovecot.master_user}", "wrong")


def test_append_move_expunge_as_a_client_sees_them(dovecot: Dovecot) -> None:
    with client(dovecot) as imap:
        imap.login(REP, "pw")
        folders = {name: flags for flags, _, name in imap.list_folders()}
        assert b"\\Junk" in folders["Junk"] and b"\\Sent" in folders["Sent"] and b"\\Trash" in folders["Trash"]
        imap.select_folder("INBOX")
        first = dovecot.append(REP, RAW)
        second = dovecot.append(REP, RAW)
        assert second == first + 1
        imap.noop()  # a selected session learns of new mail at its next command
        assert {first, second} <= set(imap.search("ALL"))
        moved = dovecot.move(REP, first, "INBOX", "Deals/Won")  # made on demand
        dovecot.expunge(REP, second)
        imap.noop()
        assert not {first, second} & set(imap.search("ALL"))
        imap.select_folder("Deals/Won")
        assert moved in imap.search("ALL")
        assert imap.fetch([moved], ["BODY.PEEK[]"])[moved][b"BODY[]"] == RAW


def test_recreate_folder_changes_uidvalidity_and_keeps_the_mail(dovecot: Dovecot) -> None:
    for folder in ("INBOX", "Junk"):
        dovecot.append(OTHER, RAW, folder)
        dovecot.append(OTHER, RAW.replace(b"reply-1", b"reply-2"), folder)
        before = dovecot.uidvalidity(OTHER, folder)
        dovecot.recreate_folder(OTHER, folder)
        assert dovecot.uidvalidity(OTHER, folder) != before
        with client(dovecot) as imap:
            imap.login(OTHER, "pw")
            status = imap.select_folder(folder, readonly=True)
            assert status[b"UIDVALIDITY"] == dovecot.uidvalidity(OTHER, folder)
            uids = imap.search("ALL")
            assert len(uids) >= 2 and min(uids) == 1  # UIDs start again
            ids = {data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].strip()
                   for data in imap.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values()}
            assert {b"Message-ID: <reply-1@customer.test>", b"Message-ID: <reply-2@customer.test>"} <= ids


def test_kick_cuts_a_connection_in_idle(dovecot: Dovecot) -> None:
    imap = client(dovecot)
    imap.login(REP, "pw")
    imap.select_folder("INBOX")
    imap.idle()
    dovecot.append(REP, RAW)
    assert any(b"EXISTS" in response for response in imap.idle_check(timeout=3))  # IDLE is live
    assert dovecot.connections(REP) == 1
    assert dovecot.kick(REP) == 1
    responses = imap.idle_check(timeout=3)
    assert responses == [] or any(b"BYE" in response for response in responses), responses
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        imap.idle_done()
        imap.noop()
    wait_for(lambda: dovecot.connections(REP) == 0, timeout=5, message="the kicked session gone")
    imap.socket().close()


def test_refuse_login_blocks_every_way_in_until_allowed(dovecot: Dovecot, google_oauth: GoogleOAuth) -> None:
    token = mint(google_oauth, LOCKED)
    dovecot.refuse_login(LOCKED)
    try:
        dovecot.append(LOCKED, RAW)  # mail still arrives (the harness has its own way in)
        for login in (lambda imap: imap.login(LOCKED, "pw"),
                      lambda imap: imap.login(f"{LOCKED}*{dovecot.master_user}", dovecot.master_password),
                      lambda imap: imap.oauth2_login(LOCKED, token)):
            with client(dovecot) as imap, pytest.raises(LoginError):
                login(imap)
    finally:
        dovecot.allow_login(LOCKED)
    with client(dovecot) as imap:
        imap.login(LOCKED, "pw")
        assert imap.select_folder("INBOX", readonly=True)[b"EXISTS"] == 1
    with client(dovecot) as imap:
        imap.oauth2_login(LOCKED, token)


def test_kill_and_restart_keep_the_port_and_the_mail(fresh_dovecot: Dovecot) -> None:
    fresh_dovecot.add_user(REP)
    uid = fresh_dovecot.append(REP, RAW)
    port = fresh_dovecot.port
    fresh_dovecot.kill()
    with pytest.raises(OSError):
        socket.create_connection((fresh_dovecot.host, port), timeout=1).close()
    fresh_dovecot.start()
    assert fresh_dovecot.port == port
    fresh_dovecot.restart()
    with client(fresh_dovecot) as imap:
        imap.login(REP, "pw")
        imap.select_folder("INBOX", readonly=True)
        assert imap.search("ALL") == [uid]


def mint(google_oauth: GoogleOAuth, subject: str) -> str:
    """An access token for ``subject`` the way the IMAP source gets one: google-auth, the
    service-account key file, domain-wide delegation."""
    path = google_oauth.write_service_account_file(f"{google_oauth.workdir}/sa-{subject}.json")
    credentials = service_account.Credentials.from_service_account_file(
        path, scopes=["https://mail.google.com/"], subject=subject)
    credentials.refresh(google.auth.transport.requests.Request())
    return credentials.token


def test_xoauth2_through_dovecot_with_a_delegated_service_account_token(dovecot: Dovecot, google_oauth: GoogleOAuth) -> None:
    token = mint(google_oauth, OAUTH)
    uid = dovecot.append(OAUTH, RAW)
    with client(dovecot) as imap:
        imap.oauth2_login(OAUTH, token)
        imap.select_folder("INBOX", readonly=True)
        assert imap.search("ALL") == [uid]
    with client(dovecot) as imap, pytest.raises(LoginError):  # a token is good for its own mailbox only
        imap.oauth2_login(REP, token)
    google_oauth.revoke(OAUTH)
    with client(dovecot) as imap, pytest.raises(LoginError):
        imap.oauth2_login(OAUTH, token)
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_scope|unauthorized_client"):
        path = google_oauth.write_service_account_file(f"{google_oauth.workdir}/sa-scope.json")
        service_account.Credentials.from_service_account_file(
            path, scopes=["https://www.googleapis.com/auth/gmail.readonly"], subject=OAUTH,
        ).refresh(google.auth.transport.requests.Request())
