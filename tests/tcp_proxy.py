"""A TCP forwarder the tests put between a client and a real server, to make a connection go
silent the way a dead NAT entry or a pulled cable does: nothing arrives, nothing is refused,
the socket stays open. Connections made after ``freeze`` are forwarded normally."""
from __future__ import annotations

import socket
import threading

from emulators.services import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._live: list[tuple[socket.socket, socket.socket, threading.Event]] = []
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
            except OSError:
                client.close()
                continue
            frozen = threading.Event()
            with self._lock:
                self._live.append((client, server, frozen))
                self.accepted += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, frozen), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, frozen: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if frozen.is_set():
                    continue  # swallowed: the other side hears nothing, forever
                dst.sendall(data)
        except OSError:
            pass
        if not frozen.is_set():
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self) -> int:
        """Every connection open now goes silent both ways; returns how many."""
        with self._lock:
            for _c, _s, frozen in self._live:
                frozen.set()
            count, self._live = len(self._live), []
        return count

    def close(self) -> None:
        self._listener.close()
