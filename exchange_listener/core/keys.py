"""Every Redis key exchange-listener uses, named in one place.

A key's string is built here and nowhere else (tests/test_keys.py fails on an ``"el:`` string
anywhere else in the product, and on any key a real run leaves in Redis that ``KEYSPACE`` does not
declare). The strings are the stored data's names: never change one without a migration.

Owner = the module that writes the key (and whose docstring says what it holds); readers only
read it. TTL rules name the settings they follow. Types are Redis types.

key                              type    owner (writes) -> readers; TTL
-------------------------------  ------  ---------------------------------------------------------------------------
el:mailboxes                     hash    listener.mailboxes -> listener.runner, health, CLI; no TTL
el:mailboxes:version             string  listener.mailboxes -> listener.runner; no TTL
el:mailboxes:source              hash    listener.mailboxes -> listener runners, CLI; no TTL (absent: ews)
el:lease:{mailbox}               string  listener.leases -> health; lease_seconds, renewed while held
el:listeners                     zset    listener.leases -> health; no TTL, members pruned after 10 leases
el:listener:{listener id}        hash    listener.leases -> health, status; 2 * lease_seconds, renewed
el:api:processes                 hash    api.presence -> health, status; no TTL, fields pruned after 10 leases
el:sync:{mailbox}                hash    sources.ews.catch_up -> sources.ews.fetch; no TTL (``mailboxes remove``)
el:folders:{mailbox}             hash    sources.ews.catch_up -> sources.ews.stream, .fetch; the same
el:tree:{mailbox}                hash    sources.ews.catch_up -> sources.ews.stream, .fetch; the same
el:ews:autodiscover              hash    sources.ews.discovery (listeners, workers); no TTL, a field replaced when
                                         autodiscover runs again (autodiscover_email -> JSON ews_url, found_at)
el:graph:subscriptions           hash    sources.graph.subscriptions -> sources.graph.receiver; no TTL, removed
                                         with the subscription (subscription id -> mailbox, clientState hash)
el:graph:lifecycle               stream  sources.graph.receiver -> listener.graph; capped at ~10,000 entries
el:graph:subscription:{mailbox}  hash    sources.graph.subscriptions -> health; no TTL (``mailboxes remove``)
el:graph:delta:{mailbox}         hash    sources.graph.delta -> health; no TTL (``mailboxes remove``)
el:graph:folders:{mailbox}       hash    sources.graph.delta; no TTL (``mailboxes remove``)
el:imap:cursor:{mailbox}         hash    sources.imap.cursor -> operators; no TTL (``mailboxes remove``)
el:imap:slots:{mailbox}          zset    sources.imap.session (listeners and workers); the slot TTL, renewed
                                         while a connection is open (members: one per open IMAP connection)
el:done:{mailbox}                zset    sources.ledger (in workers) -> sources.ews.catch_up; processed_days
el:moved:{mailbox}:{item hash}   string  sources.ledger (in the listener) -> sources.ews.fetch; processed_days
el:first_received:{mail hash}    string  workers.jobs; retention_days if the mail matched, else a day; only extended
el:decision:{mail hash}          string  workers.jobs; retention_days
el:observed                      stream  workers.jobs -> operators, bench/chaos; capped at ~100,000 entries
el:send:{message id}             string  workers.state.sends -> workers.jobs, CLI; retention_days after sent_at
el:domain:{domain}               zset    workers.state.sends -> workers.jobs; retention_days, entries trimmed
el:domain:{domain}:first         zset    workers.state.sends -> workers.jobs; with the one above
el:enrollment:{id}               hash    workers.state.enrollments -> the platform, sinks, CLI; retention_days
el:enrollment:{id}:events        set     workers.state.enrollments; retention_days
el:enrollment:{id}:history       list    workers.state.enrollments -> workers.sinks.webhooks, CLI; retention_days
el:transition:{transition id}    string  workers.state.enrollments -> workers.sinks.webhooks; retention_days
el:transitions                   stream  workers.state.enrollments -> health, the platform; capped at ~100,000
el:outbox                        zset    workers.state.enrollments (adds), workers.sinks.webhooks (claims,
                                         removes) -> CLI; no TTL (an entry leaves when delivered or given up)
el:outbox:state:{transition id}  hash    workers.sinks.webhooks -> CLI; 180 days (``STATE_TTL``)
el:outbox:failed                 hash    workers.sinks.webhooks -> health, CLI; no TTL (``--retry-failed``)
el:notify:stats                  hash    workers.sinks.webhooks -> CLI; no TTL (counters)
el:salesforce:unmatched          hash    workers.sinks.salesforce -> operators; retention_days after the last write,
                                         fields noted longer ago pruned on each write (one a prospect/enrollment)
rq:*                             (RQ)    RQ, for the queue ``queue_name`` -> health, CLI; RQ's own TTLs
-------------------------------  ------  ---------------------------------------------------------------------------

Mailbox addresses are lower-cased in ``el:done``/``el:moved`` (and by ``mailboxes.normalize`` for
the others); domains are lower-cased in ``el:domain``. Everything else is used as given.
"""
from __future__ import annotations

import dataclasses
import fnmatch

# -- the listener: what to watch and who watches it (exchange_listener.listener) ----------------
MAILBOXES = "el:mailboxes"
MAILBOXES_VERSION = "el:mailboxes:version"
MAILBOX_SOURCES = "el:mailboxes:source"  # address -> source name, for mailboxes not on EWS
LISTENERS = "el:listeners"


def lease(mailbox: str) -> str:
    return f"el:lease:{mailbox}"


def listener(listener_id: str) -> str:
    return f"el:listener:{listener_id}"


# -- the HTTP API's processes (exchange_listener.api.presence) --------------------------------------
API_PROCESSES = "el:api:processes"  # process id -> JSON heartbeat (address, host, pid, times)


# -- catch-up state (exchange_listener.sources.ews.catch_up) -----------------------------------
def sync(mailbox: str) -> str:
    return f"el:sync:{mailbox}"


def folders(mailbox: str) -> str:
    return f"el:folders:{mailbox}"


def tree(mailbox: str) -> str:
    return f"el:tree:{mailbox}"


# -- where EWS is (exchange_listener.sources.ews.discovery) -------------------------------------
EWS_AUTODISCOVER = "el:ews:autodiscover"  # address (lower case) -> JSON {ews_url, autodiscover_url, found_at}


# -- the Microsoft Graph source (exchange_listener.sources.graph) --------------------------------
GRAPH_SUBSCRIPTIONS = "el:graph:subscriptions"  # subscription id -> JSON {mailbox, client_state_sha256}
GRAPH_LIFECYCLE = "el:graph:lifecycle"  # lifecycle notifications and "notified" hints (a receiver got a
# notification for a mailbox its own listener does not hold), for the listener holding the mailbox


def graph_subscription(mailbox: str) -> str:
    return f"el:graph:subscription:{mailbox}"


def graph_delta(mailbox: str) -> str:
    return f"el:graph:delta:{mailbox}"


def graph_folders(mailbox: str) -> str:
    return f"el:graph:folders:{mailbox}"


def imap_cursor(mailbox: str) -> str:
    """Hash: folder name -> "UIDVALIDITY:last UID" (``sources.imap.cursor``)."""
    return f"el:imap:cursor:{mailbox.lower()}"


def imap_slots(mailbox: str) -> str:
    """Zset: one member per open IMAP connection to the mailbox, scored by when its slot lapses."""
    return f"el:imap:slots:{mailbox.lower()}"


# -- the ledger (exchange_listener.sources.ledger) ---------------------------------------------
def done(mailbox: str) -> str:
    return f"el:done:{mailbox.lower()}"


def moved(mailbox: str, item_hash: str) -> str:
    return f"el:moved:{mailbox.lower()}:{item_hash}"


# -- the job (workers.jobs) ----------------------------------------------------------------------
OBSERVED = "el:observed"


def first_received(mail_hash: str) -> str:
    return f"el:first_received:{mail_hash}"


def decision(mail_hash: str) -> str:
    return f"el:decision:{mail_hash}"


# -- sends (workers.state.sends) -----------------------------------------------------------------
def send(message_id: str) -> str:
    return f"el:send:{message_id}"


def domain(name: str) -> str:
    return f"el:domain:{name.lower()}"


def domain_first(name: str) -> str:
    return f"el:domain:{name.lower()}:first"


# -- enrollments (workers.state.enrollments) -----------------------------------------------------
OUTBOX = "el:outbox"
TRANSITIONS = "el:transitions"


def enrollment(enrollment_id: str) -> str:
    return f"el:enrollment:{enrollment_id}"


def enrollment_events(enrollment_id: str) -> str:
    return f"el:enrollment:{enrollment_id}:events"


def enrollment_history(enrollment_id: str) -> str:
    return f"el:enrollment:{enrollment_id}:history"


def transition(transition_id: str) -> str:
    return f"el:transition:{transition_id}"


# -- notification delivery (workers.sinks.webhooks) ----------------------------------------------
OUTBOX_FAILED = "el:outbox:failed"
NOTIFY_STATS = "el:notify:stats"


def outbox_state(transition_id: str) -> str:
    return f"el:outbox:state:{transition_id}"


# -- the Salesforce sink (workers.sinks.salesforce) ----------------------------------------------
SALESFORCE_UNMATCHED = "el:salesforce:unmatched"  # address or enrollment:{id} -> JSON: not logged, why


# -- the declared keyspace -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the table above; ``pattern`` is a Redis/fnmatch glob."""

    pattern: str
    type: str
    owner: str


KEYSPACE: tuple[Key, ...] = (
    Key(MAILBOXES, "hash", "exchange_listener.listener.mailboxes"),
    Key(MAILBOXES_VERSION, "string", "exchange_listener.listener.mailboxes"),
    Key(MAILBOX_SOURCES, "hash", "exchange_listener.listener.mailboxes"),
    Key(lease("*"), "string", "exchange_listener.listener.leases"),
    Key(LISTENERS, "zset", "exchange_listener.listener.leases"),
    Key(listener("*"), "hash", "exchange_listener.listener.leases"),
    Key(API_PROCESSES, "hash", "exchange_listener.api.presence"),
    Key(sync("*"), "hash", "exchange_listener.sources.ews.catch_up"),
    Key(folders("*"), "hash", "exchange_listener.sources.ews.catch_up"),
    Key(tree("*"), "hash", "exchange_listener.sources.ews.catch_up"),
    Key(EWS_AUTODISCOVER, "hash", "exchange_listener.sources.ews.discovery"),
    Key(GRAPH_SUBSCRIPTIONS, "hash", "exchange_listener.sources.graph.subscriptions"),
    Key(graph_subscription("*"), "hash", "exchange_listener.sources.graph.subscriptions"),
    Key(GRAPH_LIFECYCLE, "stream", "exchange_listener.sources.graph.receiver"),
    Key(graph_delta("*"), "hash", "exchange_listener.sources.graph.delta"),
    Key(graph_folders("*"), "hash", "exchange_listener.sources.graph.delta"),
    Key(imap_cursor("*"), "hash", "exchange_listener.sources.imap.cursor"),
    Key(imap_slots("*"), "zset", "exchange_listener.sources.imap.session"),
    Key(done("*"), "zset", "exchange_listener.sources.ledger"),
    Key(moved("*", "*"), "string", "exchange_listener.sources.ledger"),
    Key(first_received("*"), "string", "workers.jobs"),
    Key(decision("*"), "string", "workers.jobs"),
    Key(OBSERVED, "stream", "workers.jobs"),
    Key(send("*"), "string", "workers.state.sends"),
    Key(domain_first("*"), "zset", "workers.state.sends"),  # before el:domain:* (which also matches it)
    Key(domain("*"), "zset", "workers.state.sends"),
    Key(enrollment_events("*"), "set", "workers.state.enrollments"),
    Key(enrollment_history("*"), "list", "workers.state.enrollments"),
    Key(enrollment("*"), "hash", "workers.state.enrollments"),
    Key(transition("*"), "string", "workers.state.enrollments"),
    Key(TRANSITIONS, "stream", "workers.state.enrollments"),
    Key(OUTBOX, "zset", "workers.state.enrollments"),
    Key(outbox_state("*"), "hash", "workers.sinks.webhooks"),
    Key(OUTBOX_FAILED, "hash", "workers.sinks.webhooks"),
    Key(NOTIFY_STATS, "hash", "workers.sinks.webhooks"),
    Key(SALESFORCE_UNMATCHED, "hash", "workers.sinks.salesforce"),
    Key("rq:*", "(RQ)", "rq"),  # RQ's queue, jobs, registries and workers (queue name: settings.queue_name)
)


def declared(name: str) -> Key | None:
    """The first ``KEYSPACE`` entry whose pattern matches the key ``name`` (most specific first)."""
    return next((k for k in KEYSPACE if fnmatch.fnmatchcase(name, k.pattern)), None)
