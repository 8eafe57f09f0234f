"""One IMAP connection logged in as a rep's mailbox, however the installation grants access.

No password per rep: the service logs in *as* each rep with one credential —

- ``master``: Dovecot's master user, ``LOGIN "rep@x*master" <master password>``;
- ``plain``: SASL PLAIN with the rep as authorization id and the service account as
  authentication id (Dovecot master users, Cyrus and Zimbra admins);
- ``xoauth2-google``: XOAUTH2 with a token minted per rep from a Google service account with
  domain-wide delegation (scope ``https://mail.google.com/``), cached until shortly before it
  expires.

Every connection a listener or worker opens counts against ``imap_max_connections_per_account``
for its mailbox, across all processes (``Budget``, slots in Redis): Gmail allows 15 per account,
shared with the rep's own clients, and answers more with a terse error; we refuse first, with a
clear message.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import socket
import ssl
import threading
import time
from typing import Any

import imapclient
import redis
from imapclient.exceptions import IMAPClientError, LoginError

from exchange_listener.core import keys
from exchange_listener.core.config import Settings, scrub
from exchange_listener.core.lua import Script

GOOGLE_SCOPE = "https://mail.google.com/"
MASTER_SEPARATOR = "*"  # Dovecot's auth_master_user_separator as documented; the common choice
TOKEN_MARGIN = 300.0  # a cached token is renewed this many seconds before it expires
SLOT_TTL = 60.0  # seconds a connection slot lives unless renewed; holders renew it every third of that
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)
_SLOT = Script("imap_slot")
# what servers say when an account has too many connections (Gmail; Dovecot's mail_max_userip_connections)
_LIMIT_WORDS = ("too many simultaneous connections", "maximum number of connections", "[limit]",
                "exceeded command or bandwidth limits")  # Gmail's daily bandwidth limit


class ImapError(Exception):
    """The server could not be reached or answered in a way we cannot use; retry later."""


class LoginRefused(ImapError):
    """The server refused to log in as the rep (wrong credential, no such user, login disabled)."""


class LimitReached(ImapError):
    """The account has as many connections as it may have (ours or the server's limit)."""


class Budget:
    """Connections open per mailbox, never more than ``limit``: counted in this process, and, with
    Redis, across every process (listeners and workers alike) by a slot per connection in
    ``el:imap:slots:<mailbox>`` that lapses ``SLOT_TTL`` seconds after its holder last renewed it
    (a crashed process's slots free themselves)."""

    def __init__(self, limit: int, conn: redis.Redis | None = None, ttl: float = SLOT_TTL):
        self.limit = limit
        self.conn = conn
        self.ttl = ttl
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def take(self, mailbox: str) -> str:
        """A token for one more connection to ``mailbox``; ``LimitReached`` when there is no room."""
        with self._lock:
            used = self._open.get(mailbox, 0)
            if used >= self.limit:
                raise LimitReached(f"{mailbox}: already {used} IMAP connections from this process "
                                   f"(imap_max_connections_per_account = {self.limit})")
            self._open[mailbox] = used + 1
        token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        try:
            if not self.renew(mailbox, token):
                raise LimitReached(f"{mailbox}: {self.limit} IMAP connections are open already, from every "
                                   "listener and worker together (imap_max_connections_per_account)")
        except BaseException:
            self._count_down(mailbox)
            raise
        return token

    def renew(self, mailbox: str, token: str) -> bool:
        """Keep ``token``'s slot another ``ttl``; False when it lapsed and every slot is taken."""
        if self.conn is None:
            return True
        return bool(_SLOT(self.conn, slots=keys.imap_slots(mailbox), token=token, ttl_ms=int(self.ttl * 1000),
                          limit=self.limit))

    def give_back(self, mailbox: str, token: str) -> None:
        self._count_down(mailbox)
        if self.conn is not None:
            with contextlib.suppress(*REDIS_ERRORS):  # the slot lapses on its own
                self.conn.zrem(keys.imap_slots(mailbox), token)

    def _count_down(self, mailbox: str) -> None:
        with self._lock:
            left = self._open.get(mailbox, 0) - 1
            if left > 0:
                self._open[mailbox] = left
            else:
                self._open.pop(mailbox, None)


class GoogleTokens:
    """Access tokens per rep from a Google service account (domain-wide delegation), cached."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._credentials: dict[str, Any] = {}

    def token(self, mailbox: str) -> str:
        import google.auth.exceptions
        import google.auth.transport.requests
        from google.oauth2 import service_account

        with self._lock:
            creds = self._credentials.get(mailbox)
            if creds is None:
                try:
                    creds = service_account.Credentials.from_service_account_file(
                        self.settings.google_service_account_file, scopes=[GOOGLE_SCOPE], subject=mailbox)
                except (OSError, ValueError, KeyError) as exc:
                    raise LoginRefused(f"google_service_account_file cannot be used: {type(exc).__name__}: "
                                       f"{_safe(str(exc), self.settings)}") from None
                self._credentials[mailbox] = creds
        # google-auth keeps expiry as a naive datetime in UTC: read as local time it would be hours off
        expiry = creds.expiry.replace(tzinfo=dt.UTC).timestamp() if creds.expiry else 0.0
        if creds.token and expiry and expiry - time.time() > TOKEN_MARGIN:
            return str(creds.token)
        try:
            creds.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.RefreshError as exc:
            raise LoginRefused(f"Google refused a token for {mailbox} (is the service account delegated "
                               f"{GOOGLE_SCOPE} for this domain?): {_safe(str(exc), self.settings)}") from None
        except google.auth.exceptions.TransportError as exc:
            raise ImapError(f"Google's token endpoint unreachable: {_safe(str(exc), self.settings)}") from None
        return str(creds.token)

    def forget(self, mailbox: str) -> None:
        """Drop the rep's cached token (the server refused it: revoked, or delegation changed)."""
        with self._lock:
            self._credentials.pop(mailbox, None)


def _safe(text: str, settings: Settings) -> str:
    return scrub(text, settings)[:300]


def ssl_context(settings: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=settings.ca_file or None)


def describe(exc: BaseException, settings: Settings) -> str:
    """One line for logs and job errors, secrets scrubbed."""
    return _safe(f"{type(exc).__name__}: {exc}", settings)


def connect(settings: Settings, mailbox: str, tokens: GoogleTokens | None = None) -> imapclient.IMAPClient:
    """A connection logged in as ``mailbox``. Raises ``LoginRefused``, ``LimitReached`` or
    ``ImapError``; the caller owns the connection (``close`` it)."""
    tls = settings.imap_security == "tls"
    try:
        client = imapclient.IMAPClient(settings.imap_host, port=settings.imap_port, ssl=tls,
                                       ssl_context=ssl_context(settings) if tls else None,
                                       timeout=settings.imap_timeout_seconds)
    except (OSError, IMAPClientError) as exc:
        raise ImapError(f"cannot reach IMAP server {settings.imap_host}:{settings.imap_port}: "
                        f"{describe(exc, settings)}") from None
    try:
        if settings.imap_security == "starttls":
            client.starttls(ssl_context(settings))
        _login(client, settings, mailbox, tokens)
    except BaseException:
        close(client)
        raise
    return client


def _login(client: imapclient.IMAPClient, settings: Settings, mailbox: str, tokens: GoogleTokens | None) -> None:
    how = settings.imap_auth
    try:
        if how == "master":
            client.login(f"{mailbox}{MASTER_SEPARATOR}{settings.imap_username}", settings.imap_password)
        elif how == "plain":
            client.plain_login(settings.imap_username, settings.imap_password, authorization_identity=mailbox)
        else:
            token = (tokens or GoogleTokens(settings)).token(mailbox)
            client.oauth2_login(mailbox, token)
    except UnicodeEncodeError:  # imaplib sends LOGIN's arguments as ASCII
        raise LoginRefused(f"cannot log in as {mailbox!r} ({how}): the address or the credential has "
                           "characters IMAP LOGIN cannot carry (use imap_auth = plain, which sends UTF-8)") from None
    except (LoginError, OSError, IMAPClientError) as exc:
        text = str(exc)
        if any(word in text.lower() for word in _LIMIT_WORDS):
            raise LimitReached(f"{mailbox}: the IMAP server refuses more connections for this account: "
                               f"{_safe(text, settings)}") from None
        if not isinstance(exc, LoginError):
            raise ImapError(f"IMAP login as {mailbox} failed: {describe(exc, settings)}") from None
        if tokens is not None:  # refused: a revoked or changed token must not be offered again
            tokens.forget(mailbox)
        raise LoginRefused(f"the IMAP server refused to log in as {mailbox} ({how}): {_safe(text, settings)}") from None


def close(client: imapclient.IMAPClient) -> None:
    """Log out if the server still listens; always release the socket. Never raises."""
    with contextlib.suppress(Exception):
        sock = client.socket()
        sock.settimeout(2.0)
        client.logout()
    with contextlib.suppress(Exception):
        client.shutdown()


def interrupt(client: imapclient.IMAPClient) -> None:
    """Break a thread blocked on ``client`` (in IDLE or a read) from another thread."""
    with contextlib.suppress(Exception):
        client.socket().shutdown(socket.SHUT_RDWR)


def special_folder(client: imapclient.IMAPClient, name: str) -> str | None:
    """The folder for ``name``: a special-use flag (``\\Junk``, ``\\Sent``; RFC 6154, also Gmail's
    ``[Gmail]/Spam``) found by LIST, or a folder name as given."""
    if not name.startswith("\\"):
        return name
    found = client.find_special_folder(name.encode("ascii"))
    return str(found) if found else None
