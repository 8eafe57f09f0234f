"""Redis is the system of record: ``status`` is unhealthy when Redis can evict our keys or keeps
nothing on disk, unless ``allow_volatile_redis = true``; listeners and workers say so at start.

Each case is a real redis-server started with the settings under test; ``status`` runs as the
operator runs it (a child process reading the environment).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from emulators.services import RedisServer, free_port, service_env
from exchange_listener.core import logs, redis_conn


def status(url: str, *flags: str, **settings) -> tuple[int, dict | str]:
    env = service_env(url, "", **settings)
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status", *flags], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout) if "--json" in flags else done.stdout


@pytest.fixture
def server(request):
    """A redis-server with the options of ``@pytest.mark.parametrize("server", [(aof, [args])], indirect=True)``."""
    aof, extra = request.param
    with RedisServer(aof=aof, extra_args=extra) as started:
        yield started


@pytest.mark.parametrize("server", [(False, ["--maxmemory-policy", "allkeys-lru"])], indirect=True)
def test_evicting_and_unpersisted_redis_is_unhealthy_unless_accepted(server):
    code, snap = status(server.url, "--json")
    assert code == 1
    eviction = [p for p in snap["problems"] if "maxmemory-policy is allkeys-lru" in p]
    nothing = [p for p in snap["problems"] if "persists nothing" in p]
    assert len(eviction) == 1 and "set maxmemory-policy noeviction" in eviction[0]
    assert len(nothing) == 1 and "set appendonly yes" in nothing[0]
    assert snap["redis"]["maxmemory_policy"] == "allkeys-lru" and snap["redis"]["appendonly"] == "no"
    assert snap["redis"]["save"] == "" and snap["redis"]["allow_volatile_redis"] is False

    code, text = status(server.url)  # what an operator reads: one line per problem, naming the fix
    assert code == 1 and "UNHEALTHY" in text
    assert f"  ! {eviction[0]}" in text.splitlines() and f"  ! {nothing[0]}" in text.splitlines()

    code, snap = status(server.url, "--json", allow_volatile_redis="true")
    assert code == 0 and snap["healthy"] is True and snap["problems"] == []
    assert len(snap["redis"]["problems"]) == 2  # still shown, no longer a health problem
    code, text = status(server.url, allow_volatile_redis="true")
    assert code == 0 and "accepted by allow_volatile_redis: Redis maxmemory-policy is allkeys-lru" in text


def test_the_session_redis_keeping_nothing_is_unhealthy(redis_server, redis_client):
    code, snap = status(redis_server.url, "--json")
    assert code == 1
    assert [p for p in snap["problems"] if "persists nothing" in p] == snap["problems"]


@pytest.mark.parametrize("server", [(True, ["--maxmemory-policy", "volatile-lru"])], indirect=True)
def test_volatile_policies_are_a_problem_too(server):
    """volatile-* evicts only keys with a TTL, and sends, enrollments and sync states have one."""
    code, snap = status(server.url, "--json")
    assert code == 1
    (problem,) = snap["problems"]
    assert "maxmemory-policy is volatile-lru" in problem and "TTL" in problem and "noeviction" in problem


@pytest.mark.parametrize("server", [(True, ["--maxmemory-policy", "noeviction"])], indirect=True)
def test_aof_and_noeviction_is_healthy(server):
    code, snap = status(server.url, "--json")
    assert code == 0 and snap["problems"] == []
    assert snap["redis"]["appendonly"] == "yes" and snap["redis"]["appendfsync"] == "everysec"
    assert snap["redis"]["maxmemory_policy"] == "noeviction"
    assert snap["redis"]["problems"] == [] and snap["redis"]["notes"] == []


@pytest.mark.parametrize("server", [(False, ["--save", "60 1"])], indirect=True)
def test_rdb_snapshots_alone_are_healthy_with_a_note(server):
    code, snap = status(server.url, "--json")
    assert code == 0, snap["problems"]
    (note,) = snap["redis"]["notes"]
    assert "only RDB snapshots" in note and "appendonly yes" in note


@pytest.mark.parametrize("server", [(False, ["--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""])],
                         indirect=True)
def test_config_disabled_as_on_managed_redis_reports_unknown_not_a_crash(server):
    code, snap = status(server.url, "--json")
    found = snap["redis"]
    assert found["config_readable"] is False and found["save"] is None
    assert found["appendonly"] == "no"  # from INFO persistence
    assert found["maxmemory_policy"] == "allkeys-lru"  # from INFO memory: still judged
    assert code == 1 and any("maxmemory-policy is allkeys-lru" in p for p in snap["problems"])
    assert not any("persists nothing" in p for p in snap["problems"])  # cannot know: a note, not a guess
    assert any(n.startswith("persistence unknown") for n in found["notes"])


def _logged(action) -> list[dict]:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    try:
        action()
    finally:
        logs.configure("info", "json")
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_check_at_start_logs_one_line_and_never_raises(redis_server, redis_client):
    (line,) = _logged(lambda: redis_conn.check_at_start(redis_client, allow_volatile=False))
    assert line["level"] == "warning" and "Redis can lose our data" in line["event"]
    assert any("persists nothing" in p for p in line["problems"]) and line["appendonly"] == "no"

    (line,) = _logged(lambda: redis_conn.check_at_start(redis_client, allow_volatile=True))
    assert line["level"] == "info" and "allow_volatile_redis" in line["event"]

    nowhere = redis_conn.connect(f"redis://127.0.0.1:{free_port()}/0")
    results = []
    (line,) = _logged(lambda: results.append(redis_conn.check_at_start(nowhere, allow_volatile=False)))
    assert results == [None] and line["level"] == "warning" and "could not read" in line["event"]
