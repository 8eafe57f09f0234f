"""EwsFetcher against the emulator over real HTTP through unmodified exchangelib."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from exchange_listener.core import config
from exchange_listener.sources.base import FetchedMessage, ItemGone
from exchange_listener.sources.ews import fetch as fetch_module
from exchange_listener.sources.ews.fetch import EwsFetcher, FetchError

MAILBOX = "rep@ours.example"

RAW = (
    b"Received: from mx1.prospect.de by mx.ours.example; Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"Received: from laptop by mx1.prospect.de; Thu, 26 Nov 2026 09:59:58 +0000\r\n"
    b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@prospect.de>\r\n"
    b"Sender: assistant@prospect.de\r\n"
    b"To: Rep <rep@ours.example>\r\n"
    b"Cc: Bob <bob@prospect.de>, carol@prospect.de\r\n"
    b"Subject: =?utf-8?q?AW=3A_Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <reply-1@prospect.de>\r\n"
    b"In-Reply-To: <send-2@ours.example>\r\n"
    b"References: <send-1@ours.example>\r\n <send-2@ours.example>,\r\n\t<other@x.org>\r\n"
    b"X-Custom: first\r\n"
    b"X-Custom: second\r\n"
    b"Date: Thu, 26 Nov 2026 10:59:58 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Danke, wir melden uns.\r\n"
)


def header_lines(raw: bytes) -> list[tuple[str, str]]:
    """The header section as (name, value) pairs, unfolded: what GetItem should hand back."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    pairs: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = pairs[-1]
            pairs[-1] = (name, value + line)
        else:
            name, _, value = line.partition(":")
            pairs.append((name, value.strip()))
    return pairs


@pytest.fixture
def settings(emulator):
    return config.load(env={}, overrides={"ews_url": emulator.ews_url, "ews_username": "svc",
                                          "ews_password": "svc-password"})


@pytest.fixture
def fetcher(settings):
    f = EwsFetcher(settings)
    yield f
    f.close()


def test_headers_and_participants_exactly_as_delivered(emulator, fetcher):
    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    (msg,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(msg, FetchedMessage)
    assert msg.headers == header_lines(RAW)
    assert msg.internet_message_id == "<reply-1@prospect.de>"
    assert msg.in_reply_to == "<send-2@ours.example>"
    assert "<send-1@ours.example>" in msg.references and "<other@x.org>" in msg.references
    assert msg.subject == "AW: Grüße"
    assert msg.from_address == "juergen@prospect.de"
    assert msg.sender == "assistant@prospect.de"
    assert msg.to == ["rep@ours.example"]
    assert msg.cc == ["bob@prospect.de", "carol@prospect.de"]
    assert msg.conversation_id and msg.received_at is not None
    assert msg.mime is None  # not fetched unless asked


def test_many_items_in_one_round_trip_in_order_with_missing_ones(emulator, fetcher):
    ids = []
    for n in range(20):
        raw = RAW.replace(b"<reply-1@prospect.de>", f"<reply-{n}@prospect.de>".encode())
        ids.append(emulator.deliver(MAILBOX, raw)["item_id"])
    emulator.deliver(MAILBOX, RAW.replace(b"<reply-1@", b"<deleted@"))
    emulator.fault(kind="latency", ms=400)
    try:
        fetcher.fetch(MAILBOX, ids[:1])  # sessions warm, so the timing below is round trips only
        started = time.monotonic()
        asked = ids[:10] + ["AAMkAGdvbmUtaXRlbQ=="] + ids[10:]
        results = fetcher.fetch(MAILBOX, asked)
        elapsed = time.monotonic() - started
    finally:
        emulator.fault(kind="latency", ms=0)
    # 21 items fetched one by one would take 21 x 0.4 s; one GetItem takes one.
    assert elapsed < 2.5, f"{elapsed:.2f}s: more than one round trip"
    assert len(results) == 21
    assert isinstance(results[10], ItemGone)
    fetched_ids = [r.internet_message_id for r in results if isinstance(r, FetchedMessage)]
    assert fetched_ids == [f"<reply-{n}@prospect.de>" for n in range(20)]
    assert "<deleted@prospect.de>" not in fetched_ids  # delivered but never asked for: not in the answer
    assert fetcher.fetch(MAILBOX, []) == []


def test_item_moved_away_or_unknown_is_item_gone(emulator, fetcher):
    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    import urllib.request

    req = urllib.request.Request(f"{emulator.base_url}/emulator/items/{item_id}", method="DELETE")
    urllib.request.urlopen(req, timeout=10).read()
    (gone,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(gone, ItemGone)
    with pytest.raises(ItemGone):
        fetcher.fetch_mime(MAILBOX, item_id)


def test_mime_on_demand_is_the_delivered_source(emulator, fetcher):
    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    assert fetcher.fetch_mime(MAILBOX, item_id) == RAW


def test_server_errors_become_fetch_errors_without_secrets(emulator, settings):
    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    wrong = EwsFetcher(settings.replace(ews_password="Wrong-Secret-123"))
    with pytest.raises(FetchError) as excinfo:
        wrong.fetch(MAILBOX, [item_id])
    assert "Wrong-Secret-123" not in str(excinfo.value) and "svc-password" not in str(excinfo.value)
    assert MAILBOX in str(excinfo.value)

    fetcher = EwsFetcher(settings)
    emulator.fault(kind="server_busy", count=1, back_off_ms=10)
    with pytest.raises(FetchError, match="ErrorServerBusy"):
        fetcher.fetch(MAILBOX, [item_id])
    (msg,) = fetcher.fetch(MAILBOX, [item_id])  # the next attempt (RQ's retry) gets through
    assert msg.internet_message_id == "<reply-1@prospect.de>"

    emulator.fault(kind="http_503", count=1)
    with pytest.raises(FetchError):
        fetcher.fetch(MAILBOX, [item_id])

    unreachable = EwsFetcher(settings.replace(ews_url="http://127.0.0.1:9/EWS/Exchange.asmx"))
    with pytest.raises(FetchError):
        unreachable.fetch(MAILBOX, [item_id])


def _fetch_in_child(fetcher, item_id, out):
    (msg,) = fetcher.fetch(MAILBOX, [item_id])
    protocol = fetcher._account(MAILBOX).protocol
    out.put((os.getpid(), protocol.credentials.pool, msg.internet_message_id))


def test_a_forked_child_builds_its_own_sessions(emulator, fetcher):
    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    fetcher.fetch(MAILBOX, [item_id])  # the parent has a live session now
    parent_protocol = fetcher._account(MAILBOX).protocol
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_fetch_in_child, args=(fetcher, item_id, out))
    child.start()
    pid, pool, message_id = out.get(timeout=30)
    child.join(10)
    assert child.exitcode == 0
    assert pool == f"worker-{pid}" and pid != os.getpid()
    assert message_id == "<reply-1@prospect.de>"
    assert fetcher._account(MAILBOX).protocol is parent_protocol  # the parent's is untouched
    fetcher.fetch(MAILBOX, [item_id])


def test_an_interrupted_request_does_not_starve_later_fetches(emulator, fetcher):
    """Something raised from a signal handler inside the HTTP request that is not an Exception
    (exchangelib retires the session for those): exchangelib would keep that session forever,
    and with every session gone the next fetch would wait forever."""
    import signal

    class Interrupted(BaseException):
        pass

    def interrupt(signum, frame):
        raise Interrupted()

    item_id = emulator.deliver(MAILBOX, RAW)["item_id"]
    previous = signal.signal(signal.SIGALRM, interrupt)
    emulator.fault(kind="latency", ms=3000)
    try:
        for _ in range(fetcher.max_connections + 1):  # more interruptions than the pool has sessions
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                fetcher.fetch(MAILBOX, [item_id])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        emulator.fault(kind="latency", ms=0)
    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 20)  # a starved pool would wait forever: fail instead
    try:
        (msg,) = fetcher.fetch(MAILBOX, [item_id])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert msg.internet_message_id == "<reply-1@prospect.de>"


def by_exchangelib_models(fetcher: EwsFetcher, item_ids: list[str]) -> list[FetchedMessage]:
    """What ``fetch`` gave when it built exchangelib's Message model for each item (the reference)."""
    out = []
    for item_id, item in zip(item_ids, fetcher._get_items(MAILBOX, item_ids, fetch_module._HEADER_PATHS)):
        conversation = getattr(item, "conversation_id", None)
        out.append(FetchedMessage(
            mailbox=MAILBOX, item_id=item_id, internet_message_id=item.message_id, subject=item.subject or "",
            sender=getattr(item.sender, "email_address", None), from_address=getattr(item.author, "email_address", None),
            to=[m.email_address for m in item.to_recipients or () if m.email_address],
            cc=[m.email_address for m in item.cc_recipients or () if m.email_address],
            received_at=item.datetime_received, conversation_id=getattr(conversation, "id", None),
            in_reply_to=item.in_reply_to, references=item.references,
            headers=[(h.name, h.value if h.value is not None else "") for h in item.headers or ()],
            item_class=item.item_class))
    return out


def test_fetch_reads_the_xml_exactly_as_exchangelibs_message_model_does(emulator, fetcher):
    """``fetch`` reads the GetItem answer's elements itself (the Message model costs most of a
    batched fetch's CPU): every field must come out as the model gives it, for all kinds of mail."""
    import mail_samples as mail

    raws = [RAW, mail.unrelated(to=MAILBOX), mail.dsn(to=MAILBOX, failed="x@prospect.example", original_id="<o@ours>"),
            mail.read_receipt(sender="pat@prospect.example", to=MAILBOX, original_id="<o@ours>"),
            mail.reply(sender="pat@prospect.example", to=MAILBOX, in_reply_to=None, references=None),
            b"Subject: \r\nFrom: <>\r\nTo: undisclosed-recipients:;\r\n\r\nno ids, no date\r\n",
            b"From: a@b.example\r\nTo: c@d.example\r\nSubject: =?utf-8?b?w6TDtsO8?=\r\nX-Empty:\r\n\r\nx\r\n"]
    ids = [emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    lean = fetcher.fetch(MAILBOX, ids)
    model = by_exchangelib_models(fetcher, ids)
    for got, want in zip(lean, model):
        assert isinstance(got, FetchedMessage)
        assert {**vars(got), "received_at": None} == {**vars(want), "received_at": None}
        assert got.received_at.timestamp() == want.received_at.timestamp()


@pytest.mark.parametrize("paths", ["_HEADER_PATHS", "_TEXT_PATHS", "_MIME_PATHS"])
def test_the_getitem_request_is_byte_for_byte_exchangelibs(fetcher, paths):
    """``_GetItem.get_payload`` builds the ItemShape once per field set and plain ItemIds itself:
    what it sends must be exactly what exchangelib's own GetItem would (asked twice, so the
    cached shape is met too)."""
    from exchangelib.properties import ItemId
    from exchangelib.services import GetItem
    from exchangelib.util import xml_to_str

    account = fetcher._account(MAILBOX)
    fields = getattr(fetch_module, paths)
    for items in ([ItemId(id="AAMkAD+/=one")], [ItemId(id=i) for i in ("AAMkAD+/=one", "AAMkAD&<two>", 'AAMkAD"3"')],
                  [ItemId(id="AAMkAD+/=one"), ItemId(id="AAMkAD=two", changekey="CQAAABYA")]):  # exchangelib's own
        ids = [item.id for item in items]
        ours = fetch_module._GetItem(account=account, chunk_size=len(ids))
        theirs = GetItem(account=account, chunk_size=len(ids))
        for _ in range(2):
            assert xml_to_str(ours.get_payload(items, fields, fetch_module.ID_ONLY)) == \
                xml_to_str(theirs.get_payload(items, fields, fetch_module.ID_ONLY))
