"""The IMAP source's reading parts against a real Dovecot, without listener processes: the scan
from a cursor (what is new, what is old, nothing lost when enqueueing fails) and the workers'
fetcher (headers in one FETCH, mail that moved, a recreated folder, the rep's own mail)."""
from __future__ import annotations

import time

import mail_samples as mail
import pytest
import redis as redis_mod

from exchange_listener.core.config import load
from exchange_listener.sources.base import FetchedMessage, ItemGone, NewMail
from exchange_listener.sources.imap import session
from exchange_listener.sources.imap.cursor import Cursor, CursorStore
from exchange_listener.sources.imap.fetch import ImapFetcher
from exchange_listener.sources.imap.scan import examine, item_id, parse_item_id, scan
from exchange_listener.sources.imap.session import Budget
from exchange_listener.sources.ledger import Ledger

REP = "reader@ours.example"


@pytest.fixture
def settings(dovecot, monkeypatch):
    dovecot.add_user(REP)
    for key, value in {"source": "imap", "imap_host": dovecot.host, "imap_port": dovecot.port,
                       "imap_security": "none", "imap_username": dovecot.master_user,
                       "imap_password": dovecot.master_password}.items():
        monkeypatch.setenv(f"EXCHANGE_LISTENER_{key.upper()}", str(value))
    return load()


@pytest.fixture
def client(settings):
    conn = session.connect(settings, REP)
    conn.normalise_times = False
    yield conn
    session.close(conn)


def reply(subject: str) -> bytes:
    return mail.reply(sender="pat@prospect.example", to=REP, in_reply_to="<s@ours.example>",
                      references="<s@ours.example>", subject=subject)


def test_scan_takes_what_came_after_the_cursor_and_keeps_the_cursor_when_enqueueing_fails(dovecot, client, redis_client):
    store, ledger = CursorStore(redis_client), Ledger(redis_client)
    folder = f"Scan-{time.monotonic_ns()}"
    dovecot.create_folder(REP, folder)
    old = dovecot.append(REP, reply("old"), folder=folder, date_time=time.time() - 10 * 86400)
    recent = dovecot.append(REP, reply("recent"), folder=folder)
    got: list[NewMail] = []

    # first read of a folder: mail since the mailbox was added (less the skew allowance), not older
    n = scan(client, REP, examine(client, folder), store, ledger, got.extend, since=time.time() - 3600, via="catchup")
    assert n == 1 and [parse_item_id(m.item_id)[2] for m in got] == [recent]
    assert store.get(REP, folder).last_uid == recent and old < recent

    # a reply arrives; Redis refuses the job: the cursor stays where it was, nothing is skipped
    newer = dovecot.append(REP, reply("newer"), folder=folder)

    def refuse(_mails):
        raise redis_mod.exceptions.ConnectionError("Redis away")

    with pytest.raises(redis_mod.exceptions.ConnectionError):
        scan(client, REP, examine(client, folder), store, ledger, refuse, since=time.time() - 3600, via="stream")
    assert store.get(REP, folder).last_uid == recent
    got.clear()
    assert scan(client, REP, examine(client, folder), store, ledger, got.extend, since=time.time() - 3600,
                via="stream") == 1
    assert [parse_item_id(m.item_id)[2] for m in got] == [newer] and got[0].message_id
    assert store.get(REP, folder) == Cursor(examine(client, folder).uidvalidity, newer)


def test_mail_the_ledger_has_processed_is_not_taken_again_after_the_folder_is_recreated(dovecot, client, redis_client):
    store, ledger = CursorStore(redis_client), Ledger(redis_client)
    folder = f"Recreated-{time.monotonic_ns()}"
    dovecot.create_folder(REP, folder)
    dovecot.append(REP, reply("processed"), folder=folder)
    got: list[NewMail] = []
    scan(client, REP, examine(client, folder), store, ledger, got.extend, since=time.time() - 3600, via="catchup")
    (first,) = got
    ledger.mark_processed(REP, first.message_id, first.item_id)

    dovecot.recreate_folder(REP, folder)
    fresh = dovecot.append(REP, reply("new after recreation"), folder=folder)
    got.clear()
    scan(client, REP, examine(client, folder), store, ledger, got.extend, since=time.time() - 3600, via="catchup")
    assert [parse_item_id(m.item_id)[2] for m in got] == [fresh]
    assert store.get(REP, folder).uidvalidity == dovecot.uidvalidity(REP, folder)


def test_the_fetcher_reads_headers_follows_moves_and_knows_the_reps_own_mail(dovecot, settings):
    fetcher = ImapFetcher(settings)
    try:
        inbox = dovecot.uidvalidity(REP)
        first = dovecot.append(REP, reply("one"))
        second = dovecot.append(REP, mail.unrelated(to=REP))
        sent = dovecot.append(REP, mail.unrelated(to="pat@prospect.example"), folder="Sent")
        ids = [item_id("INBOX", inbox, first), item_id("INBOX", inbox, second),
               item_id("Sent", dovecot.uidvalidity(REP, "Sent"), sent), item_id("INBOX", inbox, 999_999)]
        one, two, own, missing = fetcher.fetch(REP, ids)
        assert isinstance(one, FetchedMessage) and one.in_reply_to == "<s@ours.example>"
        assert one.from_address == "pat@prospect.example" and REP in one.to and not one.outgoing
        assert isinstance(two, FetchedMessage) and two.in_reply_to is None
        assert isinstance(own, FetchedMessage) and own.outgoing  # \\Sent: never a reply
        assert isinstance(missing, ItemGone)
        assert b"In-Reply-To: <s@ours.example>" in fetcher.fetch_mime(REP, ids[0])

        # the rep files the reply away: gone where it was, found by its Message-ID where it went
        dovecot.move(REP, first, "INBOX", "Customers/Acme")
        (gone,) = fetcher.fetch(REP, [ids[0]])
        assert isinstance(gone, ItemGone)
        found = fetcher.relocate(REP, NewMail(REP, ids[0], "INBOX", message_id=one.internet_message_id))
        assert isinstance(found, FetchedMessage) and parse_item_id(found.item_id)[0] == "Customers/Acme"
        assert found.in_reply_to == "<s@ours.example>"

        # a stale UIDVALIDITY is gone, not some other mail with the same UID
        (stale,) = fetcher.fetch(REP, [item_id("INBOX", inbox - 1, second)])
        assert isinstance(stale, ItemGone) and "recreated" in str(stale)
        dovecot.expunge(REP, parse_item_id(found.item_id)[2], "Customers/Acme")
        nowhere = fetcher.relocate(REP, NewMail(REP, ids[0], "INBOX", message_id=one.internet_message_id))
        assert isinstance(nowhere, ItemGone)
    finally:
        fetcher.close()


def test_the_connection_budget_holds_across_processes_and_frees_a_crashed_holders_slots(redis_client):
    """Two processes' budgets over one Redis (a listener and a worker): never more than the limit
    together; a slot given back is free at once; one whose holder died lapses after its TTL."""
    listener, worker = Budget(3, redis_client, ttl=1.0), Budget(3, redis_client, ttl=1.0)
    slots = [listener.take(REP), listener.take(REP), worker.take(REP)]
    with pytest.raises(session.LimitReached, match="every listener and worker together"):
        worker.take(REP)
    worker.give_back(REP, slots.pop())
    slots.append(worker.take(REP))
    assert listener.renew(REP, slots[0])
    alone = Budget(1)  # without Redis: this process's own count still holds
    alone.take(REP)
    with pytest.raises(session.LimitReached, match="from this process"):
        alone.take(REP)
    time.sleep(1.2)  # nobody renewed: every slot lapsed (as when the holders were killed)
    fresh = Budget(3, redis_client, ttl=1.0)
    assert len({fresh.take(REP) for _ in range(3)}) == 3
    assert not listener.renew(REP, slots[0])  # a lapsed slot whose room was taken is not given back

