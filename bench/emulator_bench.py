"""Emulator capacity: open streaming connections held by one process (RSS), delivery-to-event
latency p50/p99, deliveries/s.

    python bench/emulator_bench.py [--quick] [--streams N] [--out bench-results/emulator.json]

One emulator child process; this process is the client. It subscribes N mailboxes and holds one
GetStreamingEvents connection per mailbox (raw HTTP/1.1 with aiohttp: exchangelib needs a thread
per stream, which would measure the client, not the emulator). The emulator's RSS comes from
/proc. Latency = time from the delivery POST to the NewMailEvent envelope arriving on that
mailbox's stream. Goals (issue 2): >= 5,000 streams under 500 MB RSS, p99 < 50 ms when idle.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp

from emulators.ews.soap import M, S, T
from emulators.ews.validation import ENV_VAR
from emulators.services import Emulator

HEADERS = {"Content-Type": "text/xml; charset=utf-8",
           "Authorization": "Basic " + base64.b64encode(b"svc:svc-password").decode()}


def soap(mailbox: str, body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{S}" xmlns:m="{M}" xmlns:t="{T}">'
            f"<s:Header><t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{mailbox}"
            f"</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></s:Header>"
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


SUBSCRIBE = ('<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/>'
             "</t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes>"
             "</m:StreamingSubscriptionRequest></m:Subscribe>")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def message(n: int) -> bytes:
    return (f"From: bench@customer.example\r\nTo: someone@example.com\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench-{n}@customer.example>\r\n\r\nbody {n}\r\n").encode()


class Streams:
    """N mailboxes, each with a subscription and one open stream; records NewMailEvent arrivals."""

    def __init__(self, emu: Emulator, count: int):
        self.emu = emu
        self.mailboxes = [f"bench{n:05d}@example.com" for n in range(count)]
        self.sent: dict[str, float] = {}  # mailbox -> delivery start time
        self.latencies: list[float] = []
        self.events = 0
        self.tasks: list[asyncio.Task] = []

    async def subscribe(self, session: aiohttp.ClientSession, mailbox: str) -> str:
        async with session.post(self.emu.ews_url, data=soap(mailbox, SUBSCRIBE), headers=HEADERS) as r:
            text = await r.text()
        return text.split("<m:SubscriptionId>")[1].split("</m:SubscriptionId>")[0]

    async def hold(self, session: aiohttp.ClientSession, mailbox: str, sub_id: str) -> None:
        body = (f"<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub_id}</t:SubscriptionId>"
                "</m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>")
        async with session.post(self.emu.ews_url, data=soap(mailbox, body), headers=HEADERS,
                                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
            async for chunk in r.content.iter_any():
                if b"NewMailEvent" in chunk:
                    now = time.perf_counter()
                    self.events += chunk.count(b"<t:NewMailEvent>")
                    started = self.sent.pop(mailbox, None)
                    if started is not None:
                        self.latencies.append((now - started) * 1000)

    async def open(self, session: aiohttp.ClientSession) -> float:
        started = time.perf_counter()
        sem = asyncio.Semaphore(64)

        async def one(mailbox):
            async with sem:
                sub_id = await self.subscribe(session, mailbox)
            self.tasks.append(asyncio.create_task(self.hold(session, mailbox, sub_id)))

        await asyncio.gather(*(one(m) for m in self.mailboxes))
        while (await stats(session, self.emu))["streams"] < len(self.mailboxes):
            await asyncio.sleep(0.2)
        return time.perf_counter() - started


async def stats(session, emu) -> dict:
    async with session.get(f"{emu.base_url}/emulator/stats") as r:
        return await r.json()


async def deliver(session, emu, mailbox: str, n: int) -> None:
    async with session.post(f"{emu.base_url}/emulator/mailboxes/{mailbox}/messages", data=message(n)) as r:
        assert r.status == 201, await r.text()


async def run(args) -> dict:
    emu = Emulator(heartbeat_seconds=args.heartbeat).start()
    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            rss_idle = rss_mb(emu.proc.pid)
            streams = Streams(emu, args.streams)
            open_s = await streams.open(session)
            await asyncio.sleep(1.0)
            rss_streams = rss_mb(emu.proc.pid)

            # latency: one delivery at a time to a random mailbox, with the stream already open
            for n in range(args.latency_samples):
                mailbox = random.choice(streams.mailboxes)
                streams.sent[mailbox] = time.perf_counter()
                await deliver(session, emu, mailbox, n)
                deadline = time.perf_counter() + 5
                while mailbox in streams.sent and time.perf_counter() < deadline:
                    await asyncio.sleep(0.0005)
                streams.sent.pop(mailbox, None)
            lat = sorted(streams.latencies)

            # throughput: concurrent deliveries, every one fanning out to an open stream
            before = streams.events
            sem = asyncio.Semaphore(args.concurrency)

            async def one(n):
                async with sem:
                    await deliver(session, emu, streams.mailboxes[n % len(streams.mailboxes)], 100_000 + n)

            started = time.perf_counter()
            await asyncio.gather(*(one(n) for n in range(args.deliveries)))
            elapsed = time.perf_counter() - started
            deadline = time.perf_counter() + 30
            while streams.events - before < args.deliveries and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            events_received = streams.events - before
            rss_end = rss_mb(emu.proc.pid)
            for task in streams.tasks:
                task.cancel()
            await asyncio.gather(*streams.tasks, return_exceptions=True)
    finally:
        emu.stop()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(len(lat) * p))], 2) if lat else None

    return {
        "benchmark": "emulator",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "streams_open": args.streams,
        "seconds_to_open_streams": round(open_s, 2),
        "rss_mb_idle": round(rss_idle, 1),
        "rss_mb_with_streams": round(rss_streams, 1),
        "rss_kb_per_stream": round((rss_streams - rss_idle) * 1024 / args.streams, 1),
        "rss_mb_end": round(rss_end, 1),
        "latency_samples": len(lat),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "latency_ms_max": round(lat[-1], 2) if lat else None,
        "latency_ms_mean": round(statistics.mean(lat), 2) if lat else None,
        "deliveries": args.deliveries,
        "delivery_concurrency": args.concurrency,
        "deliveries_per_s": round(args.deliveries / elapsed, 1),
        "events_received": events_received,
        "goals": {"streams_ge_5000_under_500mb": args.streams >= 5000 and rss_streams < 500,
                  "p99_lt_50ms": (pct(0.99) or 1e9) < 50},
    }


def table(result: dict) -> str:
    rows = [("open streams", result["streams_open"]), ("time to open (s)", result["seconds_to_open_streams"]),
            ("RSS idle (MB)", result["rss_mb_idle"]), ("RSS with streams (MB)", result["rss_mb_with_streams"]),
            ("RSS per stream (KB)", result["rss_kb_per_stream"]),
            ("delivery->event p50 (ms)", result["latency_ms_p50"]),
            ("delivery->event p99 (ms)", result["latency_ms_p99"]),
            ("deliveries/s", result["deliveries_per_s"]),
            ("events received / deliveries", f'{result["events_received"]} / {result["deliveries"]}')]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (<20 s)")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--latency-samples", type=int)
    parser.add_argument("--deliveries", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--heartbeat", type=float, default=45.0)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "emulator.json"))
    args = parser.parse_args()
    args.streams = args.streams or (500 if args.quick else 5000)
    args.latency_samples = args.latency_samples or (100 if args.quick else 500)
    args.deliveries = args.deliveries or (500 if args.quick else 3000)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.streams * 2 + 1024)), hard))
    except (ImportError, ValueError, OSError):
        pass
    os.environ.pop(ENV_VAR, None)  # schema validation is for the test suite; it costs CPU
    result = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
