"""Unmodified exchangelib pointed at an emulator: Accounts and a background stream reader for tests."""
from __future__ import annotations

import itertools
import threading
import time

from exchangelib import (
    IMPERSONATION,
    Account,
    Build,
    Configuration,
    Credentials,
    Version,
)
from exchangelib.credentials import OAuth2Credentials
from exchangelib.transport import BASIC, OAUTH2

VERSION = Version(build=Build(15, 1, 2507, 6))
_pools = itertools.count()


class TaggedCredentials(Credentials):
    """Credentials that differ only by tag, so each gets its own exchangelib Protocol (sessions, cookies)."""

    def __init__(self, username, password, tag):
        super().__init__(username, password)
        self.tag = tag


class TokenUrlCredentials(OAuth2Credentials):
    """Client-credentials OAuth2 against the emulator's token endpoint instead of Microsoft's."""

    def __init__(self, *, client_id, client_secret, token_url, tag):
        super().__init__(client_id=client_id, client_secret=client_secret, tenant_id="emulator-tenant")
        self._url = token_url
        self.tag = tag

    @property
    def token_url(self):
        return self._url


def account(emu, address, user="svc", password="svc-password", max_connections=2) -> Account:
    """An impersonating Account with Basic auth and its own Protocol; sends no request."""
    config = Configuration(service_endpoint=emu.ews_url, credentials=TaggedCredentials(user, password, next(_pools)),
                           auth_type=BASIC, version=VERSION, max_connections=max_connections)
    return Account(address, config=config, autodiscover=False, access_type=IMPERSONATION)


def oauth_account(emu, address, client_id, client_secret) -> Account:
    creds = TokenUrlCredentials(client_id=client_id, client_secret=client_secret,
                                token_url=f"{emu.base_url}/emulator-tenant/oauth2/v2.0/token", tag=next(_pools))
    config = Configuration(service_endpoint=emu.ews_url, credentials=creds, auth_type=OAUTH2, version=VERSION,
                           max_connections=2)
    return Account(address, config=config, autodiscover=False, access_type=IMPERSONATION)


def wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


class StreamReader:
    """Runs ``folder.get_streaming_events`` in a thread; records notifications, the error and the end."""

    def __init__(self, folder, subscription_ids, connection_timeout=1):
        self.notifications = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._args = (folder, list(subscription_ids), connection_timeout)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamReader:
        self._thread.start()
        return self

    def _run(self):
        folder, ids, timeout = self._args
        try:
            for notification in folder.get_streaming_events(ids, connection_timeout=timeout):
                self.notifications.append(notification)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to assert on
            self.error = exc
        finally:
            self.finished.set()

    def events(self, kind=None):
        found = [e for n in self.notifications for e in n.events]
        return [e for e in found if kind is None or type(e).__name__ == kind]

    def join(self, timeout=15.0):
        assert self.finished.wait(timeout), "stream did not end"


def open_streams(emu) -> int:
    """How many GetStreamingEvents connections the emulator holds (its /emulator/stats hook)."""
    return emu.stats()["streams"]


def message(message_id: str, subject: str = "Re: Quarterly numbers", extra: str = "") -> bytes:
    return (f"From: Bob Buyer <bob@customer.example>\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n{extra}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThanks, sounds good.\r\n").encode()
