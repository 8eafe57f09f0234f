"""A TCP proxy in front of a real Dovecot that makes it speak Gmail's X-GM-EXT-1 for X-GM-MSGID,
so the IMAP source's Gmail handling is tested against a real server rather than a mock.

Dovecot keeps a message's X-GUID across COPY/MOVE (maildir), which is what Gmail's X-GM-MSGID
means: one message seen under several labels (folders). The proxy therefore
- appends ``X-GM-EXT-1`` to every capability list the server sends (``* CAPABILITY`` lines and
  ``[CAPABILITY ...]`` response codes);
- rewrites the FETCH item ``X-GM-MSGID`` in client FETCH / UID FETCH commands to ``X-GUID``;
- rewrites ``X-GUID <guid>`` in server FETCH responses to ``X-GM-MSGID <n>``, n a stable 63-bit
  unsigned integer derived from the GUID (:func:`msgid_for_guid`).

Both directions are literal-aware: a line ending in ``{N}`` / ``{N+}`` is followed by N raw bytes
(bodies, headers, passwords) that pass through untouched and are never searched. Quoted strings
in line text are never rewritten either. X-GM-LABELS is emulated on Dovecot's flags: the FETCH
item becomes FLAGS and the answer's FLAGS become X-GM-LABELS, the keyword ``GmSent`` shown as
``\\Sent`` (so a client must not ask for FLAGS and X-GM-LABELS at once). Not emulated: X-GM-THRID,
X-GM-RAW, SEARCH by X-GM-MSGID; a client must not turn on COMPRESS or STARTTLS through it (the stream would no
longer be readable)."""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from typing import BinaryIO, Self

from emulators.services import free_port

_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r?\n\Z")
# every pattern below matches a whole quoted string first (group "q", left as it is), so a token
# inside a quoted string (a subject in an ENVELOPE, a folder name) is never rewritten
_Q = rb'(?P<q>"(?:[^"\\\r\n]|\\.)*")'
_CLIENT_FETCH = re.compile(rb"\A\S+ (?:UID )?FETCH ", re.IGNORECASE)
_CLIENT_MSGID = re.compile(_Q + rb"|(?<=[ (])X-GM-MSGID(?=[ )\r\n])", re.IGNORECASE)
_CLIENT_LABELS = re.compile(_Q + rb"|(?<=[ (])X-GM-LABELS(?=[ )\r\n])", re.IGNORECASE)
# labels stand on Dovecot's flags: the keyword GmSent is Gmail's \Sent label, \Draft is \Draft
_SERVER_FLAGS = re.compile(_Q + rb"|(?<=[ (])FLAGS \((?P<flags>[^)\r\n]*)\)", re.IGNORECASE)
SENT_KEYWORD = "GmSent"  # APPEND a message with this flag to give it Gmail's \Sent label
_SERVER_FETCH = re.compile(rb"\A\* \d+ FETCH ", re.IGNORECASE)
# Dovecot's X-GUID: a quoted string in maildir (the file's base name), an atom elsewhere
_SERVER_GUID = re.compile(_Q + rb'|(?<=[ (])X-GUID (?:"(?P<gq>(?:[^"\\\r\n]|\\.)*)"|(?P<ga>[^ ()\r\n"{]+))'
                          rb"(?=[ )\r\n])", re.IGNORECASE)
_CAPABILITY_LINE = re.compile(rb"\A(\* CAPABILITY [^\r\n]*?)(\r?\n)\Z", re.IGNORECASE)
_CAPABILITY_CODE = re.compile(_Q + rb"|(?P<code>\[CAPABILITY [^\]\r\n]*)\]", re.IGNORECASE)
_CHUNK = 65536


def msgid_for_guid(guid: str | bytes) -> int:
    """The X-GM-MSGID the proxy shows for a Dovecot X-GUID: the first 15 hex digits of its SHA-256
    (60 bits, so it fits Gmail's unsigned 64-bit and any signed 64-bit column)."""
    raw = guid.encode() if isinstance(guid, str) else guid
    return int(hashlib.sha256(raw).hexdigest()[:15], 16)


def _client_msgid(match: re.Match[bytes]) -> bytes:
    return match.group("q") or b"X-GUID"


def _server_guid(match: re.Match[bytes]) -> bytes:
    if match.group("q"):
        return match.group("q")
    guid = match.group("gq")
    guid = re.sub(rb"\\(.)", rb"\1", guid) if guid is not None else match.group("ga")
    return b"X-GM-MSGID %d" % msgid_for_guid(guid)


def _client_labels(match: re.Match[bytes]) -> bytes:
    return match.group("q") or b"FLAGS"


def _server_flags(match: re.Match[bytes]) -> bytes:
    if match.group("q"):
        return match.group("q")
    labels = [b"\\Sent" if f.lower() == SENT_KEYWORD.lower().encode() else f for f in match.group("flags").split()]
    return b"X-GM-LABELS (" + b" ".join(labels) + b")"


def _capability_code(match: re.Match[bytes]) -> bytes:
    return match.group("q") or match.group("code") + b" X-GM-EXT-1]"


class _Connection:
    """One client connection and its server connection, one pump thread per direction."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        # a client's synchronizing literal is sent only after the server's "+"; if the server
        # refuses it with a tagged answer instead, the client sends no literal bytes
        self._literal_wait = threading.Event()
        self._literal_answer = threading.Event()
        self._literal_accepted = False

    def start(self) -> None:
        threading.Thread(target=self._pump_client, daemon=True).start()
        threading.Thread(target=self._pump_server, daemon=True).start()

    def close(self) -> None:
        self._literal_accepted = False
        self._literal_answer.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @staticmethod
    def _copy(src: BinaryIO, dst: socket.socket, size: int) -> bool:
        while size > 0:
            data = src.read(min(size, _CHUNK))
            if not data:
                return False
            dst.sendall(data)
            size -= len(data)
        return True

    def _pump_client(self) -> None:
        reader = self.client.makefile("rb")
        try:
            fetch = None  # within one logical command (line segments between literals)
            while True:
                line = reader.readline()
                if not line:
                    break
                if fetch is None:
                    fetch = bool(_CLIENT_FETCH.match(line))
                if fetch:
                    line = _CLIENT_LABELS.sub(_client_labels, _CLIENT_MSGID.sub(_client_msgid, line))
                literal = _LITERAL.search(line)
                if literal is None:
                    self.server.sendall(line)
                    fetch = None
                    continue
                size, non_sync = int(literal.group(1)), literal.group(2) == b"+"
                if not non_sync:
                    self._literal_accepted = False
                    self._literal_answer.clear()
                    self._literal_wait.set()
                self.server.sendall(line)
                if not non_sync:
                    self._literal_answer.wait()
                    self._literal_wait.clear()
                    if not self._literal_accepted:
                        fetch = None  # refused: the client drops the command, no literal follows
                        continue
                if not self._copy(reader, self.server, size):
                    break
        except (OSError, ValueError):
            pass
        self.close()

    def _pump_server(self) -> None:
        reader = self.server.makefile("rb")
        try:
            fetch = None
            while True:
                line = reader.readline()
                if not line:
                    break
                if fetch is None:
                    fetch = bool(_SERVER_FETCH.match(line))
                    if self._literal_wait.is_set() and not line.startswith(b"*"):
                        self._literal_accepted = line.startswith(b"+")
                        self._literal_answer.set()
                    line = _CAPABILITY_LINE.sub(rb"\1 X-GM-EXT-1\2", line)
                if fetch:
                    line = _SERVER_FLAGS.sub(_server_flags, _SERVER_GUID.sub(_server_guid, line))
                else:
                    line = _CAPABILITY_CODE.sub(_capability_code, line)
                literal = _LITERAL.search(line)
                self.client.sendall(line)
                if literal is None:
                    fetch = None
                    continue
                if not self._copy(reader, self.client, int(literal.group(1))):
                    break
        except (OSError, ValueError):
            pass
        self.close()


class GmailProxy:
    """``GmailProxy(dovecot.host, dovecot.port)``; clients connect to ``127.0.0.1:.port``."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = free_port()
        self._listener = socket.create_server((self.host, self.port))
        self._lock = threading.Lock()
        self._live: list[_Connection] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = _Connection(client, server)
            with self._lock:
                self._live.append(conn)
                self.accepted += 1
            conn.start()

    def close(self) -> None:
        """Stops accepting and drops every open connection."""
        self._listener.close()
        with self._lock:
            live, self._live = self._live, []
        for conn in live:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
