"""The watched-mailbox set: module API and the `exchange-listener mailboxes` command."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exchange_listener.core import keys
from exchange_listener.listener import mailboxes


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EXCHANGE_LISTENER_REDIS_URL=redis_url)
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", "mailboxes", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def test_add_remove_list_and_version(redis_client):
    assert mailboxes.version(redis_client) is None
    assert mailboxes.add(redis_client, ["A@Example.com", "b@example.com"]) == ["a@example.com", "b@example.com"]
    v1 = mailboxes.version(redis_client)
    assert mailboxes.add(redis_client, ["a@example.com"]) == []  # already watched: no change, no version bump
    assert mailboxes.version(redis_client) == v1
    assert set(mailboxes.list_all(redis_client)) == {"a@example.com", "b@example.com"}
    assert mailboxes.remove(redis_client, ["B@example.com", "nobody@example.com"]) == ["b@example.com"]
    assert mailboxes.version(redis_client) > v1
    assert set(mailboxes.list_all(redis_client)) == {"a@example.com"}


def test_bad_address_changes_nothing(redis_client):
    with pytest.raises(mailboxes.BadAddress):
        mailboxes.add(redis_client, ["ok@example.com", "not-an-address"])
    assert mailboxes.list_all(redis_client) == {}


def test_command(redis_client, redis_server):
    out = cli(redis_server.url, "add", "Zoe@Example.com", "yann@example.com")
    assert out.returncode == 0 and "added: zoe@example.com" in out.stdout
    assert "already watched: zoe@example.com" in cli(redis_server.url, "add", "zoe@example.com").stdout
    listing = cli(redis_server.url, "list").stdout
    assert "zoe@example.com" in listing and "yann@example.com" in listing
    assert "removed: yann@example.com" in cli(redis_server.url, "remove", "yann@example.com").stdout
    assert "yann@example.com" not in cli(redis_server.url, "list").stdout

    bad = cli(redis_server.url, "add", "nope")
    assert bad.returncode == 2 and "not an e-mail address" in bad.stderr and "Traceback" not in bad.stderr
    assert cli(redis_server.url, "add").returncode == 2
    assert set(mailboxes.list_all(redis_client)) == {"zoe@example.com"}


def test_remove_forgets_the_sync_state(redis_client, redis_server):
    from exchange_listener.sources.ews.catch_up import SyncStore
    from exchange_listener.sources.ledger import Ledger

    mailboxes.add(redis_client, ["wes@example.com"])
    store, ledger = SyncStore(redis_client), Ledger(redis_client)
    store.put("wes@example.com", "inbox", "some-state")
    store.update_tree("wes@example.com", {"folder-1": ("root-id", "IPF.Note")}, [], "tree-state")
    ledger.mark_processed("wes@example.com", "<a@b.example>", "item-1")
    assert ledger.processed("wes@example.com", [ledger_identity("<a@b.example>")])
    assert cli(redis_server.url, "remove", "wes@example.com").returncode == 0
    assert store.get("wes@example.com", "inbox") is None
    assert store.tree("wes@example.com") == {}
    assert ledger.processed("wes@example.com", [ledger_identity("<a@b.example>")]) == set()


def ledger_identity(message_id: str) -> str:
    from exchange_listener.sources.ledger import identity

    return identity(message_id, None)


def test_each_mailbox_has_a_source_and_adding_with_another_moves_it(redis_server, redis_client):
    assert mailboxes.add(redis_client, ["onprem@example.com"]) == ["onprem@example.com"]
    assert mailboxes.add(redis_client, ["online@example.com"], source="graph") == ["online@example.com"]
    assert mailboxes.list_all(redis_client, source="ews").keys() == {"onprem@example.com"}
    assert mailboxes.list_all(redis_client, source="graph").keys() == {"online@example.com"}
    v1 = mailboxes.version(redis_client)
    assert mailboxes.add(redis_client, ["onprem@example.com"], source="graph") == ["onprem@example.com"]  # migrated
    assert mailboxes.version(redis_client) > v1
    assert mailboxes.list_all(redis_client, source="ews") == {}
    with pytest.raises(ValueError):
        mailboxes.add(redis_client, ["x@example.com"], source="pop3")
    # the Graph state of a mailbox moving to EWS goes: a move back much later starts afresh, not from
    # links that would list everything EWS handled meanwhile as new
    redis_client.hset(keys.graph_delta("online@example.com"), mapping={"inbox-id": "https://graph/link",
                                                                        "@caught_up": "1700000000.0"})
    done = cli(redis_server.url, "add", "--source", "ews", "online@example.com")  # the README's order
    assert done.returncode == 0 and "moved to ews: online@example.com" in done.stdout, done.stderr
    assert not redis_client.exists(keys.graph_delta("online@example.com"))
    done = cli(redis_server.url, "add", "late@example.com", "--source", "graph")  # and the option last
    assert done.returncode == 0 and "added: late@example.com" in done.stdout, done.stderr
    assert cli(redis_server.url, "remove", "late@example.com").returncode == 0
    listed = cli(redis_server.url, "list").stdout.splitlines()
    assert [line.split("\t")[::2] for line in listed] == [["online@example.com", "ews"],
                                                         ["onprem@example.com", "graph"]]
    mailboxes.remove(redis_client, ["onprem@example.com"])
    assert mailboxes.sources(redis_client) == {}  # the source goes with the mailbox


def test_fair_shares_are_counted_among_listeners_of_one_source(redis_client):
    from exchange_listener.listener.leases import Leases

    ews_a, ews_b = Leases(redis_client, "ews-a", 30), Leases(redis_client, "ews-b", 30)
    graph = Leases(redis_client, "graph-a", 30, source="graph")
    for leases in (ews_a, ews_b, graph):
        leases.heartbeat({"mailboxes": 0})
    assert sorted(ews_a.live_listeners()) == ["ews-a", "ews-b"]
    assert graph.live_listeners() == ["graph-a"]  # alone among Graph listeners: it takes every Graph mailbox
