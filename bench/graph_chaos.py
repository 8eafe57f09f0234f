"""The chaos drill against Microsoft Graph (``bench/chaos.py --source graph``; ``make chaos SOURCE=graph``).

The same drill as the EWS one (``bench/chaos.py``: its plan, mail builders, probes, mailbox-behaviour
phase, ground truth and check), with the Graph emulator (``exchange-listener graph-emulator``) as the
mail server and two ``exchange-listener listen`` processes with ``source = graph``, each running its
notification receiver on its own port. In production one public ``notification_url`` (a reverse
proxy) stands in front of every listener's receiver, and any receiver takes any subscription's
notification (it looks the subscription up in Redis): here ``NotificationProxy`` is that proxy, one
port that forwards each POST to a live receiver (the next one when a receiver refuses the
connection: its listener was killed), and both listeners are given its URL.

Faults: a listener killed -9 (the other takes its mailboxes over when the lease runs out), a worker
killed -9 mid-job (Graph slowed down meanwhile by the emulator's ``latency`` fault), Redis restarted
(one redis-server with AOF; ``--redis sentinel`` runs the Sentinel group and its failover too) and
every fault kind of the Graph emulator: ``drop_notifications``, ``duplicate_notifications``,
``delay_notifications``, ``remove_subscriptions``, ``reauthorization_required``, ``throttle``,
``http_503``, ``expire_delta_tokens`` and ``restart``. The mailbox-behaviour phase moves queued
replies to other folders (an existing nested one, a new one, Deleted Items, twice), hard-deletes
(Recoverable Items) and purges them before the workers run, and files some by rule into new folders
while both listeners are down: every reply that still exists must stop its enrollment exactly once.

The report (last line, JSON) has the EWS drill's fields, plus ``graph``: the emulator's counts of
notifications, lifecycle events, subscriptions and requests, and the proxy's forwards.
"""
from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

from chaos import PAUSE_DAYS, PROCESS_FAULTS, Drill, Proc, Stack, retrying

from emulators.services import GraphEmulator, free_port, wait_for
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes as mailbox_registry
from exchange_listener.sources.graph.delta import DeltaStore

GRAPH_FAULTS = ("drop_notifications", "duplicate_notifications", "delay_notifications", "remove_subscriptions",
                "reauthorization_required", "throttle", "http_503", "expire_delta_tokens", "restart")
SUBSCRIPTION_FAULTS = ("remove_subscriptions", "reauthorization_required", "restart")  # hit every mailbox's
CHECKPOINT_SECONDS = {"small": 2, "large": 10}
NOTIFY_PATH = "/graph/notify"  # the receivers serve it and ``/graph/notify/lifecycle``
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "host", "content-length"}


class NotificationProxy(http.server.ThreadingHTTPServer):
    """The public notification URL: forwards each POST (path and query kept) to one of the
    receivers, round robin, trying the next when one refuses the connection. A receiver that
    accepted the connection but failed or did not answer gives 502 (Graph retries, as it would
    behind a real proxy); no receiver up gives 503."""

    daemon_threads = True

    def __init__(self, receivers, port: int | None = None):
        self.receivers = receivers  # callable: the receivers' ports, in order
        # forwarded; refused (a receiver down, the next one tried); failed (a receiver broke off);
        # unavailable (none up); sender_gone (Graph had given up waiting, 3 s, before the answer)
        self.counts = {"forwarded": 0, "refused": 0, "failed": 0, "unavailable": 0, "sender_gone": 0}
        self.lock = threading.Lock()
        self.next = 0
        super().__init__(("127.0.0.1", port or free_port()), _ProxyHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="proxy",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{NOTIFY_PATH}"

    def start(self) -> NotificationProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever: only once it runs
            self.shutdown()
        self.server_close()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def order(self) -> list[int]:
        ports = list(self.receivers())
        with self.lock:
            start = self.next % len(ports) if ports else 0
            self.next += 1
        return ports[start:] + ports[:start]

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        for port in self.order():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.connect()
            except OSError:  # refused (its listener is down): the next receiver
                conn.close()
                self.count("refused")
                continue
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.count("forwarded")
                return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP], data
            except (OSError, http.client.HTTPException) as exc:
                self.count("failed")
                return 502, [("Content-Type", "text/plain")], f"bad gateway: {type(exc).__name__}".encode()
            finally:
                conn.close()
        self.count("unavailable")
        return 503, [("Content-Type", "text/plain"), ("Retry-After", "1")], b"no receiver available"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: NotificationProxy

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        status, out_headers, data = self.server.forward("POST", self.path, headers, body)
        try:
            self.send_response(status)
            for name, value in out_headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the sender timed out: Graph retries it
            self.server.count("sender_gone")
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        pass


class GraphStack(Stack):
    """``chaos.Stack`` with the Graph emulator, the notification proxy and listeners with
    ``source = graph`` (each its own receiver port behind the proxy)."""

    def __init__(self, mailboxes: list[str], **kwargs):
        super().__init__(mailboxes, **kwargs)
        self.receiver_ports: dict[str, int] = {}  # listener name -> its receiver's port
        self.proxy = NotificationProxy(self.live_receivers)

    def _make_emulator(self) -> GraphEmulator:
        return GraphEmulator(mailboxes=self.mailboxes)

    def live_receivers(self) -> list[int]:
        return [self.receiver_ports[p.name] for p in list(self.listeners) if p.name in self.receiver_ports]

    def env(self) -> dict[str, str]:
        settings = {"heartbeat_seconds": self.heartbeat_seconds, "log_level": os.environ.get("CHAOS_LOG_LEVEL", "warning"),
                    "pause_days": PAUSE_DAYS, "redis_url": self.redis_url, "log_format": "json",
                    "notification_url": self.proxy.url, **self.extra}
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        env.update(self.emulator.settings_env())
        env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "bench"), env.get("PYTHONPATH")) if p)
        return env

    def _listener(self, index: int) -> Proc:
        name = f"listener-{index}"
        port = self.receiver_ports.setdefault(name, free_port())
        env = {**self.env(), "EXCHANGE_LISTENER_NOTIFICATION_LISTEN": f"127.0.0.1:{port}"}
        return Proc(name, self.listener_cmd, env, self.log_dir)

    def start_services(self) -> GraphStack:
        super().start_services()
        self.proxy.start()
        return self

    def add_mailboxes(self, mailboxes: list[str] | None = None) -> None:
        mailbox_registry.add(self.redis, mailboxes or self.mailboxes, source="graph")

    def start_processes(self) -> GraphStack:
        env = self.env()
        self.listeners = [self._listener(i).start() for i in range(self.n_listeners)]
        self.workers = [Proc(f"worker-{i}", self.worker_cmd, env, self.log_dir).start() for i in range(self.n_workers)]
        return self

    def start_listeners(self, count: int | None = None) -> None:
        for _ in range(count if count is not None else self.n_listeners):
            self.listeners.append(self._listener(len(self.listeners)).start())

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.proxy.stop()
            shutil.rmtree(self.emulator.workdir, ignore_errors=True)


class GraphDrill(Drill):
    """``chaos.Drill`` against Graph: its faults are the Graph emulator's, and a mailbox is caught
    up when its delta links were (``el:graph:delta:<mailbox>`` ``@caught_up``)."""

    source = "graph"
    base_fault_kinds = GRAPH_FAULTS + PROCESS_FAULTS

    def __init__(self, size: str, seed: int, log_dir: str, plumbing: str = "ours", sentinel: bool | None = None,
                 phase: bool = True):
        # one redis-server with AOF unless asked for the Sentinel group
        super().__init__(size, seed, log_dir, plumbing, sentinel=bool(sentinel), phase=phase)

    def make_stack(self, log_dir: str, commands: dict) -> Stack:
        return GraphStack(self.mailboxes, listeners=2, workers=2, log_dir=log_dir, sentinel=self.sentinel, settings={
            "queue_name": "drill", "lease_seconds": self.cfg["lease"], "worker_ttl": 10, "job_timeout": 30,
            "job_retries": 8,
            # a mailbox with notifications is read by delta this much later; every held mailbox is
            # swept by delta every 3 x checkpoint, and the app's subscriptions are listed as often.
            # Small: 2 s (sweeps every 6 s); large: 10 s, or the sweeps of 200 mailboxes' folders
            # (hundreds of Graph requests a second) starve the workers on two cores
            "checkpoint_seconds": CHECKPOINT_SECONDS.get(self.size, 2),
        })

    def inject(self, kind: str) -> dict:
        if kind == "kill_listener":
            return self.kill_listener()
        if kind not in GRAPH_FAULTS:
            return super().inject(kind)
        fault = {"kind": kind, "at": time.time(), "probes": [], "job_id": None}
        if kind in SUBSCRIPTION_FAULTS:  # so that it hits every mailbox, not what an earlier fault left
            self.wait_subscribed(fault)
            fault["at"] = time.time()
        params = {"drop_notifications": {"count": 20}, "duplicate_notifications": {"count": 20},
                  "delay_notifications": {"seconds": 3, "count": 20}, "throttle": {"count": 20, "retry_after": 1},
                  "http_503": {"count": 20, "retry_after": 1}}.get(kind, {})
        answer = self.emulator_fault(kind=kind, **params)
        fault["note"] = f"affected {answer.get('affected')}" + (f" ({fault['note']})" if fault.get("note") else "")
        self.send_probes(fault)
        return fault

    def kill_listener(self) -> dict:
        """kill -9 of a listener, kept down until the other one took over every mailbox it held
        (their leases ran out: ``lease_seconds``), then started again (bounded: lease + 10 s).
        Meanwhile the proxy sends its mailboxes' notifications to the other receiver."""
        stack = self.stack
        fault = {"kind": "kill_listener", "at": time.time(), "probes": [], "job_id": None}
        victim = self.rng.choice([p for p in stack.listeners if p.alive()] or stack.listeners)
        survivors = [p for p in stack.listeners if p is not victim and p.alive()]
        held = self.lease_holders()
        mine = [m for m, holder in held.items() if holder.endswith(f"-{victim.pid}")]
        self.supervisor.hold(victim)
        victim.kill()
        fault.update(at=time.time(), victim=victim.name, victim_mailboxes=len(mine))
        self.send_probes(fault)

        def take_over_then_restart() -> None:
            t0, deadline = time.monotonic(), time.monotonic() + self.cfg["lease"] + 10
            pids = tuple(f"-{p.pid}" for p in survivors)
            try:
                while time.monotonic() < deadline:
                    now = self.lease_holders()
                    if pids and all((now.get(m) or "").endswith(pids) for m in mine):
                        fault["taken_over_s"] = round(time.monotonic() - t0, 2)
                        break
                    time.sleep(0.25)
                else:
                    fault["note"] = f"the other listener had not taken over {len(mine)} mailboxes in time"
            except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
                fault["note"] = f"takeover not observed: {type(exc).__name__}"
            finally:
                self.supervisor.release(victim)

        threading.Thread(target=take_over_then_restart, daemon=True).start()
        return fault

    def lease_holders(self) -> dict[str, str]:
        """mailbox -> the id of the listener holding its lease (``host-pid``)."""
        values = retrying(lambda: self.stack.redis.mget([keys.lease(m) for m in self.mailboxes]))
        return {m: v.decode() for m, v in zip(self.mailboxes, values) if v}

    def emulator_fault(self, **body) -> dict:
        """POST /emulator/faults; the emulator's answer (``affected``: subscriptions, tokens or requests)."""
        req = urllib.request.Request(f"{self.stack.emulator.base_url}/emulator/faults", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def wait_subscribed(self, fault: dict, timeout: float = 20.0) -> None:
        """Before a fault on subscriptions: every mailbox has its subscription again (after a
        ``restart`` the listeners find theirs gone only at their next listing of them)."""
        t0 = time.monotonic()
        want = len(self.mailboxes)
        try:
            wait_for(lambda: self.stack.emulator.stats()["subscriptions_total"] >= want, timeout=timeout,
                     interval=0.25, message="every mailbox subscribed")
        except AssertionError:
            fault["note"] = f"not every mailbox subscribed after {timeout:.0f}s"
        fault["waited_subscribed_s"] = round(time.monotonic() - t0, 2)

    def slow_down(self, on: bool) -> None:
        self.stack.emulator.fault(kind="latency", seconds=0.4, count=100_000 if on else 0)

    def caught_up_at(self, mailbox: str) -> float | None:
        return DeltaStore(self.stack.redis).caught_up_at(mailbox)

    def run(self) -> dict:
        report = super().run()
        stack: GraphStack = self.stack  # type: ignore[assignment]
        try:
            stats = stack.emulator.stats()
            report["graph"] = {
                "notifications": stats.get("notifications"), "lifecycle": stats.get("lifecycle"),
                "subscriptions_created": stats.get("subscriptions_created"),
                "subscriptions_total": stats.get("subscriptions_total"), "requests": stats.get("requests"),
                "throttled": stats.get("throttled"), "concurrency_throttled": stats.get("concurrency_throttled"),
                "http_503": stats.get("http_503"), "restarts": stats.get("restarts"),
                "proxy": dict(stack.proxy.counts),
            }
        except Exception as exc:  # noqa: BLE001 - informational only
            report["graph"] = {"error": f"{type(exc).__name__}: {exc}", "proxy": dict(stack.proxy.counts)}
        return report
