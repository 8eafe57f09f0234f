"""Leases in a real Redis: one holder per mailbox, expiry hands mailboxes over, fair share."""
from __future__ import annotations

import time

from emulators.services import wait_for
from exchange_listener.listener import leases

LEASE = 1.0


def test_one_holder_at_a_time_and_expiry(redis_client):
    a = leases.Leases(redis_client, "a", LEASE)
    b = leases.Leases(redis_client, "b", LEASE)
    assert a.claim(["m1", "m2"]) == ["m1", "m2"]
    assert b.claim(["m1", "m2", "m3"]) == ["m3"]
    assert a.claim(["m1"]) == ["m1"]  # renewing our own lease works
    assert b.holders(["m1", "m3", "m9"]) == {"m1": "a", "m3": "b", "m9": None}
    b.release(["m1"])  # not b's to release
    assert redis_client.get(leases.lease_key("m1")) == b"a"
    # a stops renewing, as if killed: its lease lives at most LEASE; end it now rather than sleep it out
    assert 0 < redis_client.pttl(leases.lease_key("m1")) <= LEASE * 1000
    redis_client.pexpire(leases.lease_key("m1"), 1)
    redis_client.pexpire(leases.lease_key("m2"), 1)
    wait_for(lambda: not redis_client.exists(leases.lease_key("m1"), leases.lease_key("m2")), timeout=5,
             interval=0.005, message="a's leases expired")
    assert b.claim(["m1", "m2"]) == ["m1", "m2"]
    a.release(["m1"])
    assert redis_client.get(leases.lease_key("m1")) == b"b"


def test_liveness(redis_client):
    a = leases.Leases(redis_client, "a", LEASE)
    b = leases.Leases(redis_client, "b", LEASE)
    a.heartbeat({"mailboxes": 3, "groups": [{"group": "g1"}]})
    b.heartbeat({"mailboxes": 0, "groups": []})
    assert sorted(a.live_listeners()) == ["a", "b"]
    assert redis_client.hget(leases.LISTENER_PREFIX + "a", "mailboxes") == b"3"
    assert a.live_listeners(now=time.time() + LEASE + 0.5) == []
    b.leave()
    assert a.live_listeners() == ["a"]
    assert not redis_client.exists(leases.LISTENER_PREFIX + "b")


def test_fair_share_plan():
    watched = [f"m{i}" for i in range(10)]
    # alone: take everything free
    claim, release = leases.plan(watched, [], {}, 1, "a")
    assert claim == watched and release == []
    # a second listener appears: the first keeps 5 and releases 5
    claim, release = leases.plan(watched, watched, {m: "a" for m in watched}, 2, "a")
    assert claim == [] and len(release) == 5
    # the newcomer claims only what is free, up to its share
    holders = {m: ("a" if m not in release else None) for m in watched}
    claim, release2 = leases.plan(watched, [], holders, 2, "b")
    assert sorted(claim) == sorted(release) and release2 == []
    # a mailbox no longer watched is released
    claim, release = leases.plan(watched[:3], ["m0", "gone"], {}, 1, "a")
    assert "gone" in release and claim == ["m1", "m2"]
    assert leases.fair_share(5000, 3) == 1667
