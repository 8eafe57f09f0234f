"""NTLM and Negotiate (SPNEGO-wrapped or raw NTLM) for the EWS emulator, accepted by pyspnego.

IIS authenticates the *connection* with NTLM: the three legs (offer, type-1 -> challenge, type-3)
run on one TCP connection, and once it succeeds later requests on that connection are served
without an ``Authorization`` header (requests_ntlm, which exchangelib uses, sends each request
bare first and only answers a 401, so it relies on that). Here a context lives per aiohttp
transport (one per TCP connection), in a WeakKeyDictionary that forgets it with the connection.

Which account a user name reaches (``--account``/``--plain-account`` names, case-insensitive):

- an account ``user@example.com`` answers to ``user@example.com`` (UPN form, no NTLM domain) and to
  ``EXAMPLE\\user`` (the first label of the DNS domain: Active Directory's default NetBIOS name);
- an account ``EXAMPLE\\user`` answers to ``EXAMPLE\\user``;
- an account ``user`` answers to ``user`` with no domain.

pyspnego's acceptor reads its users from the file named by ``NTLM_USER_FILE``; the emulator
writes one (smbpasswd format: NT hashes, never the passwords) readable only by its own user,
and removes it when the acceptor goes away.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
import socket
import struct
import tempfile
import weakref
from dataclasses import dataclass

import spnego

# pyspnego's NT hash (MD4 of UTF-16-LE): hashlib has no MD4 on OpenSSL 3
from spnego._ntlm_raw.crypto import ntowfv1
from spnego.exceptions import SpnegoError

NTLMSSP = b"NTLMSSP\x00"
SCHEMES = ("NTLM", "Negotiate")


@dataclass
class Account:
    name: str  # as given to the emulator
    may_impersonate: bool


@dataclass
class Outcome:
    """What one Authorization header led to: an account, a challenge to send, or a refusal."""

    account: Account | None = None
    challenge: str | None = None  # the WWW-Authenticate value of a 401 that continues the handshake
    refused: str = ""  # why (for the log; never carries a secret)
    user: str = ""  # the user name the client presented, if it got that far
    type_1: bool = False  # the header opened a handshake (ntlm_reset cuts the connection here)


class _Connection:
    def __init__(self) -> None:
        self.context: spnego.ContextProxy | None = None  # a handshake between its legs
        self.scheme = ""
        self.account: Account | None = None  # once authenticated, for every later request


def _ntlm_names(name: str) -> list[tuple[str, str]]:
    """(NTLM domain, NTLM user) pairs an emulator account name answers to (see the module docstring)."""
    if "\\" in name:
        domain, user = name.split("\\", 1)
        return [(domain, user)]
    if "@" in name:
        netbios = name.rsplit("@", 1)[1].split(".", 1)[0]
        return [("", name), (netbios, name.rsplit("@", 1)[0])]
    return [("", name)]


class NtlmAcceptor:
    def __init__(self, accounts: dict[str, str], plain_accounts: dict[str, str]):
        self._accounts: dict[tuple[str, str], Account] = {}
        lines = []
        for table, may in ((plain_accounts, False), (accounts, True)):  # an impersonating entry wins a clash
            for name, password in table.items():
                nt_hash = ntowfv1(password).hex().upper()
                for domain, user in _ntlm_names(name):
                    self._accounts[(domain.upper(), user.upper())] = Account(name, may)
                    principal = f"{domain}\\{user}" if domain else user
                    lines.append(f"{principal}:0:{'0' * 32}:{nt_hash}:[U]:LCT-0\n")
        fd, self.user_file = tempfile.mkstemp(prefix="ews-emulator-ntlm-", suffix=".smbpasswd")
        with os.fdopen(fd, "w") as fh:  # mkstemp made it 0600
            fh.writelines(lines)
        self._finalizer = weakref.finalize(self, _unlink, self.user_file)
        self._connections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def close(self) -> None:
        self._finalizer()

    def connection_account(self, transport: asyncio.BaseTransport | None) -> Account | None:
        """The account this connection authenticated as with NTLM earlier, if any."""
        state = self._connections.get(transport) if transport is not None else None
        return state.account if state is not None else None

    def reset(self, transport: asyncio.BaseTransport | None) -> None:
        """Cut the connection with a TCP reset (SO_LINGER 0), its handshake forgotten."""
        if transport is None:
            return
        self._connections.pop(transport, None)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            transport.close()

    def step(self, transport: asyncio.BaseTransport | None, scheme: str, value: str) -> Outcome:
        """Run one leg of the handshake on ``transport`` for ``Authorization: <scheme> <value>``."""
        scheme = next((s for s in SCHEMES if s.lower() == scheme.lower()), "")
        try:
            token = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return Outcome(refused=f"{scheme} token is not base64")
        if transport is None:
            return Outcome(refused="connection already closed")
        state = self._connections.get(transport)
        if state is None:
            state = self._connections[transport] = _Connection()
        os.environ["NTLM_USER_FILE"] = self.user_file  # pyspnego reads it when a context starts and at type-3
        opening = state.context is None or state.scheme != scheme or _is_ntlm_type(token, 1) or token[:1] == b"\x60"
        if opening:  # a type-1 (raw, or in SPNEGO's NegTokenInit): a new handshake, even on an authenticated connection
            state.account = None
            state.scheme = scheme
            try:
                state.context = spnego.server(protocol="ntlm" if scheme == "NTLM" else "negotiate")
                out = state.context.step(token)
            except SpnegoError as exc:
                state.context = None
                return Outcome(refused=f"bad {scheme} negotiate message ({_reason(exc)})", type_1=True)
            return Outcome(challenge=f"{scheme} {base64.b64encode(out or b'').decode()}", type_1=True)
        context = state.context
        assert context is not None
        state.context = None
        user = _user_of(token)
        try:
            context.step(token)
        except SpnegoError as exc:
            return Outcome(refused=_reason(exc), user=user)
        if not context.complete:
            return Outcome(refused=f"{scheme} handshake did not complete", user=user)
        domain, _, name = (context.client_principal or "").rpartition("\\")
        account = self._accounts.get((domain.upper(), name.upper()))
        if account is None:
            return Outcome(refused="no such account", user=user)
        state.account = account
        return Outcome(account=account, user=user)


def _is_ntlm_type(token: bytes, kind: int) -> bool:
    return token[:8] == NTLMSSP and token[8:12] == kind.to_bytes(4, "little")


def _user_of(token: bytes) -> str:
    """DOMAIN\\user or user from an NTLM type-3 (raw or inside SPNEGO), for the log; "" if unreadable."""
    at = token.find(NTLMSSP)
    if at < 0 or not _is_ntlm_type(token[at:], 3):
        return ""
    msg = token[at:]

    def field(offset: int) -> str:
        length = int.from_bytes(msg[offset:offset + 2], "little")
        start = int.from_bytes(msg[offset + 4:offset + 8], "little")
        return msg[start:start + length].decode("utf-16-le", errors="replace")

    domain, user = field(28), field(36)  # MS-NLMP 2.2.1.3: DomainNameFields, UserNameFields
    return f"{domain}\\{user}" if domain else user


def _reason(exc: SpnegoError) -> str:
    return getattr(exc, "message", "") or type(exc).__name__


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
