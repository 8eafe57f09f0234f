"""One module names every Redis key (``exchange_listener.core.keys``); Lua scripts are called by name
(``exchange_listener.core.lua``).

The keyspace is complete in both directions: no ``"el:`` string is built anywhere else in the
product, and a realistic run (real ``listen`` and ``work`` processes, the EWS emulator, a real
redis-server, then the notifier giving up on a dead webhook) leaves only keys that ``KEYSPACE``
declares, of the declared type, and every declared key is met.
"""
from __future__ import annotations

import ast
import configparser
import datetime as dt
import functools
import json
import re
from pathlib import Path

import mail_samples as mail
import pytest

from emulators.services import (
    CliProcess,
    GraphEmulator,
    free_port,
    service_env,
    wait_for,
)
from exchange_listener.core import keys
from exchange_listener.core.lua import Script
from exchange_listener.listener import mailboxes
from workers.sinks.salesforce import SalesforceSink
from workers.sinks.webhooks import Notifier
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("exchange_listener", "workers")
SCRIPTS = ROOT / "exchange_listener" / "core" / "scripts"
MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
ONLINE = "rep@online.example"  # a mailbox on Exchange Online, watched through Graph
IMAP_MAILBOX = "rep@imap.example"  # a mailbox on an IMAP server (a real Dovecot)
wait_for = functools.partial(wait_for, timeout=60.0, interval=0.1)


# -- no key is named outside keys.py ------------------------------------------------------------
def key_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal or f-string that starts with ``el:``."""
    found, parts = [], set()
    for node in ast.walk(ast.parse(source)):  # an f-string is met before its parts
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and str(first.value).startswith("el:"):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("el:")
              and id(node) not in parts):
            found.append((node.lineno, node.value))
    return found


def test_the_literal_finder_finds_plain_and_f_string_keys():
    source = 'A = "el:thing"\ndef f(x):\n    return f"el:other:{x}"\nB = "not el:"\n'
    assert sorted(key_literals(source)) == [(1, "el:thing"), (3, "f'el:other:{x}'")]


def test_no_module_but_keys_py_names_a_redis_key():
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "exchange_listener" / "core" / "keys.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in key_literals(path.read_text())]
    for path in sorted(SCRIPTS.glob("*.lua")):  # scripts get every key as KEYS[n]
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"""['"]el:[^'"]*['"]""", path.read_text())]
    assert offenders == [], "name Redis keys in exchange_listener/core/keys.py:\n" + "\n".join(offenders)


def test_keyspace_patterns_are_distinct_and_documented():
    patterns = [k.pattern for k in keys.KEYSPACE]
    assert len(patterns) == len(set(patterns))
    docs = (ROOT / "docs" / "redis.md").read_text()
    assert [p for p in patterns if f"`{p}`" not in docs] == [], "docs/redis.md must list every key"
    # most specific first: a pattern is never shadowed by an earlier one
    for index, key in enumerate(keys.KEYSPACE):
        example = key.pattern.replace("*", "x")
        assert keys.declared(example) == key, (key.pattern, keys.declared(example))


def test_key_strings_are_the_stored_names():
    """The names existing data lives under: never change one without a migration."""
    assert [keys.lease("a@b.c"), keys.listener("l1"), keys.sync("a@b.c"), keys.folders("a@b.c"), keys.tree("a@b.c"),
            keys.done("A@B.c"), keys.moved("A@B.c", "h"), keys.first_received("h"), keys.decision("h"),
            keys.send("<m@x>"), keys.domain("X.example"), keys.domain_first("X.example"), keys.enrollment("e"),
            keys.enrollment_events("e"), keys.enrollment_history("e"), keys.transition("t"),
            keys.outbox_state("t")] == [
        "el:lease:a@b.c", "el:listener:l1", "el:sync:a@b.c", "el:folders:a@b.c", "el:tree:a@b.c",
        "el:done:a@b.c", "el:moved:a@b.c:h", "el:first_received:h", "el:decision:h",
        "el:send:<m@x>", "el:domain:x.example", "el:domain:x.example:first", "el:enrollment:e",
        "el:enrollment:e:events", "el:enrollment:e:history", "el:transition:t", "el:outbox:state:t"]
    assert (keys.MAILBOXES, keys.MAILBOXES_VERSION, keys.LISTENERS, keys.OBSERVED, keys.OUTBOX, keys.TRANSITIONS,
            keys.OUTBOX_FAILED, keys.NOTIFY_STATS) == (
        "el:mailboxes", "el:mailboxes:version", "el:listeners", "el:observed", "el:outbox", "el:transitions",
        "el:outbox:failed", "el:notify:stats")


# -- a real run leaves only declared keys -------------------------------------------------------
def streaming(conn) -> bool:
    raw = conn.hget(keys.listener("l1"), "groups")
    return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == 1


def snapshot(conn) -> dict[str, str]:
    return {k.decode(): conn.type(k).decode() for k in conn.scan_iter(count=1000)}


@pytest.fixture(scope="module")
def graph():
    with GraphEmulator(mailboxes=[ONLINE]) as emu:
        yield emu


@pytest.mark.slow
def test_a_realistic_run_leaves_only_declared_keys_of_the_declared_type(redis_server, redis_client, emulator, graph,
                                                                        dovecot, tmp_path):
    graph_settings = {k: v for k, v in graph.settings_env().items() if k != "EXCHANGE_LISTENER_SOURCE"}
    imap_settings = {"EXCHANGE_LISTENER_IMAP_HOST": dovecot.host, "EXCHANGE_LISTENER_IMAP_PORT": str(dovecot.port),
                     "EXCHANGE_LISTENER_IMAP_SECURITY": "none", "EXCHANGE_LISTENER_IMAP_USERNAME": dovecot.master_user,
                     "EXCHANGE_LISTENER_IMAP_PASSWORD": dovecot.master_password}
    dovecot.add_user(IMAP_MAILBOX)
    env = {**service_env(redis_server.url, emulator.ews_url, heartbeat_seconds=1, lease_seconds=3, listener_id="l1"),
           **graph_settings, **imap_settings}  # the workers fetch every source's mail
    port = free_port()
    graph_env = {**env, "EXCHANGE_LISTENER_SOURCE": "graph", "EXCHANGE_LISTENER_LISTENER_ID": "g1",
                 "EXCHANGE_LISTENER_NOTIFICATION_URL": f"http://127.0.0.1:{port}/graph/notify",
                 "EXCHANGE_LISTENER_NOTIFICATION_LISTEN": f"127.0.0.1:{port}",
                 "EXCHANGE_LISTENER_CHECKPOINT_SECONDS": "1"}
    # the EWS listener finds its URL by autodiscover (el:ews:autodiscover), the workers read it there
    ews_env = {**env, "EXCHANGE_LISTENER_EWS_URL": "", "EXCHANGE_LISTENER_AUTODISCOVER_EMAIL": MAILBOX,
               "EXCHANGE_LISTENER_AUTODISCOVER_URL": emulator.base_url + "/autodiscover/autodiscover.xml"}
    procs = [CliProcess(["listen"], ews_env, tmp_path / "listener.log"),
             CliProcess(["api"], {**env, "EXCHANGE_LISTENER_API_LISTEN": f"127.0.0.1:{free_port()}"},
                        tmp_path / "api.log")]
    try:
        mailboxes.add(redis_client, [MAILBOX])
        mailboxes.add(redis_client, [ONLINE], source="graph")
        procs.append(CliProcess(["listen"], graph_env, tmp_path / "graph-listener.log"))
        mailboxes.add(redis_client, [IMAP_MAILBOX], source="imap")
        procs.append(CliProcess(["listen"], {**env, "EXCHANGE_LISTENER_SOURCE": "imap",
                                             "EXCHANGE_LISTENER_LISTENER_ID": "i1"}, tmp_path / "imap-listener.log"))
        worker = CliProcess(["work", "--name", "keys-worker"], env, tmp_path / "worker.log")
        procs.append(worker)
        wait_for(lambda: streaming(redis_client), message="the mailbox streaming")
        sends, store = SendRegistry(redis_client), EnrollmentStore(redis_client)
        sent = {e: mail.new_id("ours.example") for e in ("e-reply", "e-ooo", "e-soft")}
        for enrollment, message_id in sent.items():
            sends.record([message_id], enrollment, "seq-1", MAILBOX, to=[PROSPECT])
        reply = emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent["e-reply"],
                                                     references=sent["e-reply"]))
        back = dt.date.today() + dt.timedelta(days=20)
        emulator.deliver(MAILBOX, mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=sent["e-ooo"],
                                                     return_text=f"I will be back on {back.day} {back:%B %Y}."))
        emulator.deliver(MAILBOX, mail.dsn(to=MAILBOX, failed=PROSPECT, original_id=sent["e-soft"], status="4.2.2",
                                           action="delayed"))
        # >= 1: a mail the start-up catch-up also queued is recorded again with the same event_key
        # (workers/jobs.py says so); this test is about keys, not about that
        wait_for(lambda: [(store.get(e) or {}).get("status") for e in ("e-reply", "e-ooo")] == ["stopped", "paused"]
                 and redis_client.xlen(keys.OBSERVED) >= 1, message="the reply, the out-of-office, the soft bounce")
        # the Graph side: a reply by notification, then a lifecycle event (its stream)
        online = mail.new_id("ours.example")
        sends.record([online], "e-online", "seq-1", ONLINE, to=[PROSPECT])
        wait_for(lambda: redis_client.hget(keys.graph_delta(ONLINE), "@caught_up") is not None,
                 message="the Graph mailbox subscribed and caught up")
        graph.deliver(ONLINE, mail.reply(sender=PROSPECT, to=ONLINE, in_reply_to=online, references=online))
        graph.fault(kind="reauthorization_required")
        wait_for(lambda: (store.get("e-online") or {}).get("status") == "stopped"
                 and redis_client.xlen(keys.GRAPH_LIFECYCLE) >= 1, message="the Graph reply and a lifecycle event")
        # the IMAP side: a reply read from the folder's cursor, its connections holding slots
        by_imap = mail.new_id("ours.example")
        sends.record([by_imap], "e-imap", "seq-1", IMAP_MAILBOX, to=[PROSPECT])
        dovecot.append(IMAP_MAILBOX, mail.reply(sender=PROSPECT, to=IMAP_MAILBOX, in_reply_to=by_imap,
                                                references=by_imap))
        wait_for(lambda: (store.get("e-imap") or {}).get("status") == "stopped", message="the IMAP reply")
        emulator.move(reply["item_id"], "Customers/Acme")  # the listener records the move
        wait_for(lambda: any(redis_client.scan_iter(keys.moved(MAILBOX, "*"))), message="the move recorded")
        wait_for(lambda: redis_client.zcard(keys.OUTBOX) == 0, message="the worker drained the outbox")
        wait_for(lambda: redis_client.hlen(keys.API_PROCESSES) == 1, message="the API's heartbeat")
        seen = snapshot(redis_client)
    finally:
        for proc in procs:
            proc.stop()
    # the notifier gives up on a dead webhook (failed), and keeps retrying another (outbox state)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    store.transition("e-gone", "stopped", "replied", event_key="r:1")
    Notifier(redis_client, webhook_url=dead, webhook_secret="keys-test-secret", max_attempts=1).drain()
    store.transition("e-later", "stopped", "replied", event_key="r:2")
    Notifier(redis_client, webhook_url=dead, webhook_secret="keys-test-secret", max_attempts=5).drain()
    # an enrollment with no prospect on record: the Salesforce sink records it unmatched (no HTTP call)
    SalesforceSink(redis_client, login_url=dead, client_id="c", username="u",
                   private_key=None).deliver(store.transitions("e-gone")[-1])
    seen.update(snapshot(redis_client))

    undeclared = sorted(k for k in seen if keys.declared(k) is None)
    assert undeclared == [], "declare these keys in exchange_listener/core/keys.py"
    wrong_type = {k: t for k, t in seen.items() if keys.declared(k).type not in (t, "(RQ)")}
    assert wrong_type == {}
    met = {keys.declared(k).pattern for k in seen}
    assert [k.pattern for k in keys.KEYSPACE if k.pattern not in met] == []  # a realistic run meets every key


# -- Lua scripts by name ------------------------------------------------------------------------
def test_every_script_declares_what_its_body_uses():
    for path in sorted(SCRIPTS.glob("*.lua")):
        script, text = Script(path.stem), path.read_text()
        for kind, names in (("KEYS", script.keys), ("ARGV", script.args)):
            used = {int(n) for n in re.findall(rf"{kind}\[(\d+)\]", text)}
            fixed = [n for n in names if not n.startswith("*")]
            if names and names[-1].startswith("*"):
                assert not used or min(used) >= 1, path.name
            else:
                assert used <= set(range(1, len(fixed) + 1)), (path.name, kind, sorted(used), names)


def test_named_arguments_map_to_keys_and_argv_in_declared_order():
    requeue = Script("outbox_requeue")
    assert (requeue.keys, requeue.args) == (("failed", "outbox", "*states"), ("now_ms", "*ids"))
    assert requeue.bind(ids=["a", "b"], now_ms=7, states=["s:a", "s:b"], outbox="O", failed="F") == (
        ["F", "O", "s:a", "s:b"], [7, "a", "b"])
    assert Script("lease_claim").bind(holder="me", ttl_ms=500, lease="L") == (["L"], ["me", 500])


def test_a_missing_or_unknown_name_is_a_clear_error_before_redis_is_asked(redis_client):
    claim = Script("lease_claim")
    with pytest.raises(TypeError, match=r"lease_claim: missing ttl_ms \(declared KEYS: lease; ARGV: holder, ttl_ms\)"):
        claim(redis_client, lease="L", holder="me")
    with pytest.raises(TypeError, match=r"unknown tll_ms"):
        claim(redis_client, lease="L", holder="me", ttl_ms=1, tll_ms=1)
    with pytest.raises(TypeError, match="ids takes a list"):
        Script("outbox_requeue").bind(failed="F", outbox="O", states=[], now_ms=1, ids="abc")
    assert redis_client.dbsize() == 0


def test_a_script_runs_on_a_client_and_in_a_pipeline_with_redis_replies(redis_client):
    claim, release = Script("lease_claim"), Script("lease_release")
    assert claim(redis_client, lease="L", holder="a", ttl_ms=10_000) == 1
    assert claim(redis_client, lease="L", holder="b", ttl_ms=10_000) == 0
    redis_client.script_flush()  # a server that forgot the script (restart, failover): loaded again
    assert claim(redis_client, lease="L", holder="a", ttl_ms=10_000) == 1
    pipe = redis_client.pipeline(transaction=True)
    claim(pipe, lease="M", holder="b", ttl_ms=10_000)
    release(pipe, lease="L", holder="b")
    release(pipe, lease="L", holder="a")
    assert pipe.execute() == [1, 0, 1]
    assert redis_client.get("L") is None and redis_client.get("M") == b"b"


def test_a_bad_header_is_refused():
    with pytest.raises(ValueError, match="must declare"):
        Script("no_header", "return 1\n")
    with pytest.raises(ValueError, match="must declare"):
        Script("late_header", "-- what it does\nlocal x = 1\n-- KEYS: a\n-- ARGV: b\nreturn x\n")
    with pytest.raises(ValueError, match="declared twice"):
        Script("twice", "-- KEYS: a\n-- ARGV: a\nreturn 1\n")
    with pytest.raises(ValueError, match="only the last may be"):
        Script("star", "-- KEYS: *a, b\n-- ARGV:\nreturn 1\n")
    assert (Script("none", "-- KEYS:\n-- ARGV:\nreturn 1\n").bind()) == ([], [])


def test_scripts_are_shipped_with_the_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    shipped = [p.strip() for p in cfg["options.package_data"]["exchange_listener.core"].split(",")]
    assert "scripts/*.lua" in shipped
    assert json.dumps(sorted(p.name for p in SCRIPTS.iterdir())) == json.dumps(
        sorted(p.name for p in SCRIPTS.glob("*.lua")))  # nothing else lives there
