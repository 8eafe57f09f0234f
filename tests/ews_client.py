"""Unmodified exchangelib pointed at an emulator: Accounts and a background stream reader for tests."""
from __future__ import annotations

import functools
import itertools
import json
import threading
import urllib.parse
import urllib.request

from exchangelib import Account

from emulators import services as local_services
from exchange_listener.core import config
from exchange_listener.sources.ews import account as ews_account

_pools = itertools.count()


def _settings(emu, **values):
    return config.load(env={}, overrides={"ews_url": emu.ews_url, **values})


def account(emu, address, user="svc", password="svc-password", max_connections=2) -> Account:
    """An impersonating Account with Basic auth and its own Protocol; sends no request."""
    settings = _settings(emu, ews_username=user, ews_password=password)
    pool = ews_account.make_configuration(settings, pool=f"test-{next(_pools)}", max_connections=max_connections)
    return ews_account.make_account(settings, address, pool)


def oauth_account(emu, address, client_id, client_secret) -> Account:
    """The same with OAuth2 client credentials from the emulator's token endpoint."""
    settings = _settings(emu, auth_type="oauth2", client_id=client_id, client_secret=client_secret,
                         tenant_id="emulator-tenant", token_url=f"{emu.base_url}/emulator-tenant/oauth2/v2.0/token")
    pool = ews_account.make_configuration(settings, pool=f"test-{next(_pools)}", max_connections=2)
    return ews_account.make_account(settings, address, pool)


wait_for = functools.partial(local_services.wait_for, timeout=10.0, interval=0.02)


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


def hook(emu, method: str, path: str, body: dict | None = None) -> dict:
    """Call one of the emulator's test hooks (``/emulator/...``) and return its JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{emu.base_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def hard_delete(emu, item_id: str, purge: bool = False) -> dict:
    """DELETE an item: to Recoverable Items (new id), or with ``purge`` out of the mailbox."""
    query = "?purge=true" if purge else ""
    return hook(emu, "DELETE", f"/emulator/items/{urllib.parse.quote(item_id, safe='')}{query}")


def create_folder(emu, mailbox: str, path: str, folder_class: str | None = None) -> dict:
    body = {"path": path} if folder_class is None else {"path": path, "folder_class": folder_class}
    return hook(emu, "POST", f"/emulator/mailboxes/{urllib.parse.quote(mailbox, safe='@')}/folders", body)


def open_streams(emu) -> int:
    """How many GetStreamingEvents connections the emulator holds (its /emulator/stats hook)."""
    return emu.stats()["streams"]


def message(message_id: str, subject: str = "Re: Quarterly numbers", extra: str = "") -> bytes:
    return (f"From: Bob Buyer <bob@customer.example>\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n{extra}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThanks, sounds good.\r\n").encode()
