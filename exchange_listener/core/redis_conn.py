"""The one way to get a Redis connection, and what that Redis promises to keep.

Every part (listener, workers, RQ, every CLI command) connects through ``connect(url)``, so one
``redis_url`` decides where the system of record lives:

- ``redis://``, ``rediss://``, ``unix://``: redis-py's own URL forms;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER_NAME[/DB][?sentinel_password=..]``:
  the client asks the Sentinels which server is the primary of ``MASTER_NAME`` and follows it
  through a failover (see docs/redis.md).

RQ needs raw bytes (no ``decode_responses``); our own keys are read with ``decode()`` where
needed. Timeouts are bounded so an unreachable Redis is an error, not a hang.

Redis is our only store: a Redis that evicts keys or keeps nothing on disk silently loses
leases, sync states, sends, enrollments and queued jobs. ``durability(conn)`` reads what the
server is configured to keep and names every problem; ``check_at_start`` logs it once when a
listener or worker starts; ``exchange-listener status`` makes it a health problem.
"""
from __future__ import annotations

import time
from typing import Any, cast

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool
from structlog.typing import FilteringBoundLogger

from exchange_listener.core import logs

# re-exported (``X as X`` says so to mypy): the URL parsing lives in redis_url (config checks
# redis_url with it too)
from exchange_listener.core.redis_url import SENTINEL_SCHEME as SENTINEL_SCHEME  # noqa: PLC0414
from exchange_listener.core.redis_url import SENTINEL_SYNTAX as SENTINEL_SYNTAX  # noqa: PLC0414
from exchange_listener.core.redis_url import SentinelTarget as SentinelTarget  # noqa: PLC0414
from exchange_listener.core.redis_url import parse_sentinel_url as parse_sentinel_url  # noqa: PLC0414
from exchange_listener.core.redis_url import redact as redact  # noqa: PLC0414

SENTINEL_TIMEOUT = 2.0  # per Sentinel question; a dead Sentinel costs at most this before the next is asked
POOL_CAP = 256  # connections one client opens at most for many threads (the IMAP listener's)
POOL_WAIT = 20.0  # seconds a thread waits for one of them


def connect(url: str, *, socket_timeout: float | None = 10.0, shared_by: int = 0) -> redis.Redis:
    """A client for ``url``; for ``redis+sentinel://`` one bound to the current primary.

    A Sentinel-backed client asks the Sentinels for the primary whenever it opens a connection,
    so after a failover the next command (once the failed one raised ``ConnectionError``)
    reaches the promoted replica; a primary demoted to replica is left too (READONLY is
    turned into a reconnect by redis-py).

    ``shared_by``: how many threads may use the client at once, when that is more than
    redis-py's pool allows by default (100; one more raises "Too many connections"). The
    pool then holds up to ``POOL_CAP`` connections and a thread beyond it waits its turn
    (up to ``POOL_WAIT`` s) rather than failing; via Sentinel (whose pool cannot block) the pool
    is made large enough for every thread instead."""
    options: dict[str, Any] = {"socket_connect_timeout": 5.0, "socket_timeout": socket_timeout, "health_check_interval": 15}
    sentinel_url = str(url).startswith(SENTINEL_SCHEME + ":")
    if shared_by > 100:
        options["max_connections"] = shared_by if sentinel_url else min(shared_by, POOL_CAP)
    if not sentinel_url:
        if shared_by > 100:
            pool = redis.BlockingConnectionPool.from_url(url, timeout=POOL_WAIT, **options)
            return redis.Redis(connection_pool=pool)
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options: dict[str, Any] = {"socket_connect_timeout": SENTINEL_TIMEOUT, "socket_timeout": SENTINEL_TIMEOUT}
    if target.sentinel_password:
        sentinel_options.update(username=target.sentinel_username, password=target.sentinel_password)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    # master_for is untyped in redis-py; it returns its redis_class, redis.Redis by default
    return cast(redis.Redis, sentinel.master_for(target.master, db=target.db, username=target.username,
                                                 password=target.password, **options))


def text(value: bytes | str) -> str:
    """A Redis reply as str. Our clients return bytes (RQ needs them: no ``decode_responses``);
    redis-py's types say ``bytes | str`` since they cannot know how a client was made."""
    return value.decode() if isinstance(value, bytes) else value


def server_address(conn: redis.Redis) -> str:
    """``host:port`` (or socket path) of the server ``conn`` talks to; via Sentinel, the current primary."""
    pool = conn.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        try:
            host, port = pool.get_master_address()
            return f"{host}:{port} (primary of {pool.service_name!r} via Sentinel)"
        except redis.exceptions.RedisError:
            return f"unknown (primary of {pool.service_name!r} via Sentinel)"
    kwargs = pool.connection_kwargs
    return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")



def server_run_id(conn: redis.Redis) -> str | None:
    """The server's ``run_id`` (INFO server): it changes when Redis restarts or a failover puts
    another server behind the URL, the two moments the last writes may be missing."""
    return _info(conn, "server").get("run_id")


# -- what the server keeps -------------------------------------------------------------------------
EVICTION_FIX = "set maxmemory-policy noeviction"
PERSISTENCE_FIX = "set appendonly yes (appendfsync everysec)"
OUR_KEYS = "watched mailboxes, leases, sync states, sends, enrollments and queued jobs"


def _config(conn: redis.Redis, name: str) -> str | None:
    """One CONFIG GET value; None when CONFIG is renamed, disabled or forbidden (managed Redis)."""
    try:
        value = conn.config_get(name).get(name)
    except redis.exceptions.ResponseError:  # unknown command, NOPERM: not a reason to fail
        return None
    return value.decode() if isinstance(value, bytes) else value


def _info(conn: redis.Redis, section: str) -> dict[str, Any]:
    try:
        return conn.info(section)
    except redis.exceptions.ResponseError:
        return {}


def durability(conn: redis.Redis) -> dict[str, Any]:
    """What the server is set to keep, and each way it can lose our keys (one sentence each).

    Facts come from CONFIG GET where allowed and from INFO otherwise (INFO shows the eviction
    policy and whether AOF is on, not the RDB save points). What cannot be read is ``None``
    with a note, never a guess and never an exception (only an unreachable Redis raises).
    Judged a problem: any maxmemory-policy but ``noeviction`` (volatile-* ones evict keys with a
    TTL, and sends, enrollments, sync states and job results have one), nothing persisted (no
    AOF and no RDB save point), and a failing AOF write or RDB save."""
    persistence, memory, server = _info(conn, "persistence"), _info(conn, "memory"), _info(conn, "server")
    appendonly, save = _config(conn, "appendonly"), _config(conn, "save")
    policy = _config(conn, "maxmemory-policy") or memory.get("maxmemory_policy")
    aof_enabled = appendonly == "yes" if appendonly is not None else (
        bool(persistence["aof_enabled"]) if "aof_enabled" in persistence else None)
    facts = {
        "server": server_address(conn),
        "redis_version": server.get("redis_version"),
        "config_readable": appendonly is not None,
        "appendonly": None if aof_enabled is None else ("yes" if aof_enabled else "no"),
        "appendfsync": _config(conn, "appendfsync") if aof_enabled else None,
        "save": save,
        "maxmemory_policy": policy,
        "maxmemory": memory.get("maxmemory"),
        "aof_last_write_status": persistence.get("aof_last_write_status") if aof_enabled else None,
        "rdb_last_bgsave_status": persistence.get("rdb_last_bgsave_status"),
    }
    problems, notes = [], []
    if policy is None:
        notes.append("maxmemory-policy unknown: neither CONFIG GET nor INFO memory could be read")
    elif policy != "noeviction":
        scope = "any key with a TTL (sends, enrollments, sync states have one)" if policy.startswith("volatile") \
            else "any key"
        problems.append(f"Redis maxmemory-policy is {policy}: under memory pressure it evicts {scope} and "
                        f"loses our data; {EVICTION_FIX}")
    if aof_enabled is None:
        notes.append("persistence unknown: INFO persistence could not be read")
    elif not aof_enabled and save is None:
        notes.append("persistence unknown: AOF is off and CONFIG GET save is not allowed here (managed Redis?), "
                      "so the RDB snapshot schedule cannot be read; check it with your provider")
    elif not aof_enabled and not (save or "").strip():  # (save is not None here)
        problems.append(f"Redis persists nothing (appendonly no, save \"\"): a Redis restart loses {OUR_KEYS}; "
                        f"{PERSISTENCE_FIX}")
    elif not aof_enabled:
        notes.append(f"only RDB snapshots (save {save!r}): a Redis crash loses the writes since the last snapshot; "
                     f"{PERSISTENCE_FIX} loses at most about a second")
    elif facts["appendfsync"] == "no":
        notes.append("appendfsync no: the OS decides when the AOF reaches disk (about 30 s); everysec is recommended")
    if facts["aof_last_write_status"] == "err":
        problems.append("Redis cannot write its append-only file (aof_last_write_status:err); check the Redis "
                        "host's disk")
    if save and facts["rdb_last_bgsave_status"] == "err":
        problems.append("Redis failed its last RDB snapshot (rdb_last_bgsave_status:err); check the Redis host's disk")
    return {**facts, "problems": problems, "notes": notes}


def check_at_start(conn: redis.Redis, *, allow_volatile: bool,
                   log: FilteringBoundLogger | None = None) -> dict[str, Any] | None:
    """Read ``durability(conn)`` and log it as one line; for listeners and workers at start.

    A warning when Redis can lose our keys (an info line when ``allow_volatile_redis`` accepts
    it, or when all is well). Never raises: a Redis that cannot be asked yet is logged and the
    caller goes on (its own Redis error handling applies); returns the facts or None."""
    log = log or logs.get_logger(component="redis")
    started = time.monotonic()
    try:
        found = durability(conn)
    except redis.exceptions.RedisError as exc:
        log.warning("could not read Redis persistence and eviction settings", error=f"{type(exc).__name__}: {exc}")
        return None
    fields = {k: found[k] for k in ("server", "appendonly", "appendfsync", "save", "maxmemory_policy")}
    fields["took_ms"] = round((time.monotonic() - started) * 1000, 1)
    if found["notes"]:
        fields["notes"] = found["notes"]
    if found["problems"] and not allow_volatile:
        log.warning("Redis can lose our data (exchange-listener status is unhealthy until fixed; see docs/redis.md)",
                    problems=found["problems"], **fields)
    elif found["problems"]:
        log.info("Redis can lose our data; accepted by allow_volatile_redis = true", problems=found["problems"],
                 **fields)
    else:
        log.info("Redis durability checked", **fields)
    return found
