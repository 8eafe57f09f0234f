"""Shared fixtures: a real redis-server per session on a free port, and the EWS emulator.

Nothing here talks to a shared Redis on 6379; every test gets a flushed database. Likewise one
emulator process serves a whole session (per xdist worker), reset before each test that asks for
it, so every test starts from an empty emulator; a test that needs other flags or kills the
process starts its own ``Emulator``.
"""
from __future__ import annotations

import os

import ews_schema  # tests/ews_schema.py (conftest.py's directory is on sys.path)
import pytest
import redis

from emulators.dovecot import Dovecot, find_dovecot
from emulators.google_oauth import GoogleOAuth
from emulators.services import (
    CliProcess,
    Emulator,
    GraphEmulator,
    RedisServer,
    service_env,
)
from exchange_listener.core import config as settings

SERVICE_ACCOUNT = ("svc", "svc-password")


def pytest_configure(config):
    """Settings from the caller's environment (a config file, a Redis URL) must not reach the
    commands the tests start; and every emulator started by the suite validates its responses
    against Microsoft's schema."""
    for name in [n for n in os.environ if n.upper().startswith(settings.ENV_PREFIX)]:
        if name != ews_schema.ENV_VAR:  # xdist workers need the controller's schema-violation file
            os.environ.pop(name, None)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its emulators write to the controller's file
        assert os.environ.get(ews_schema.ENV_VAR), "xdist worker without the controller's schema-violation file"
        config._emulator_schema_log = None
        return
    config._emulator_schema_log = ews_schema.enable()


def pytest_sessionfinish(session, exitstatus):
    if session.config._emulator_schema_log is None:
        return  # an xdist worker: the controller reads the file once every worker is done
    found = ews_schema.recorded(session.config._emulator_schema_log, remove=True)
    if found:
        print(f"\nEWS schema violations in emulator responses ({len(found)}):")
        for line in found[:20]:
            print(f"  {line}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    if redis_server.proc.poll() is not None:  # a test stopped it: bring it back
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def emulator_process():
    """One emulator process per session, with the service account that may impersonate anyone."""
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0) as emu:
        yield emu


@pytest.fixture
def emulator(emulator_process):
    """The session's emulator, reset to a fresh process's state (no mail, streams, subscriptions,
    faults or counts from an earlier test); started again if a test stopped it."""
    if emulator_process.proc.poll() is not None:
        emulator_process.start()
    emulator_process.reset()
    return emulator_process


@pytest.fixture(scope="module")
def graph_process(request):
    """One Graph emulator per test module, with the module's ``MAILBOX``."""
    with GraphEmulator(mailboxes=[request.module.MAILBOX]) as emu:
        yield emu


@pytest.fixture
def graph(graph_process):
    """The module's Graph emulator, reset (no mail, subscriptions, faults or counts from an
    earlier test); started again if a test stopped it."""
    if graph_process.proc.poll() is not None:
        graph_process.start()
    graph_process.reset()
    graph_process.fault(kind="clear")
    return graph_process


@pytest.fixture
def listeners(redis_server, tmp_path):
    """Start `exchange-listener listen` processes (1 s heartbeats, 3 s leases); all are stopped after the test."""
    started = []

    def start(emulator, name="l1", redis_url=None, password=SERVICE_ACCOUNT[1], extra_env=None, **settings):
        env = service_env(redis_url or redis_server.url, emulator.ews_url, password=password,
                          **{"heartbeat_seconds": 1, "lease_seconds": 3, "listener_id": name, **settings})
        env.update(extra_env or {})
        proc = CliProcess(["listen"], env, tmp_path / f"listener-{name}-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def google_oauth_process():
    """One Google OAuth emulator (service-account token endpoint and introspection) per session."""
    with GoogleOAuth() as server:
        yield server


@pytest.fixture
def google_oauth(google_oauth_process):
    """The session's Google OAuth emulator with no live tokens; started again if a test stopped it."""
    if google_oauth_process.proc.poll() is not None:
        google_oauth_process.start()
    google_oauth_process.revoke()
    return google_oauth_process


def _new_dovecot(root, introspection_url: str) -> Dovecot:
    if find_dovecot() is None:
        pytest.fail("dovecot is not installed: the IMAP tests run a real Dovecot "
                    "(Debian/Ubuntu: apt-get install dovecot-imapd; .ci/run installs it)", pytrace=False)
    return Dovecot(root, oauth2_introspection_url=introspection_url)


@pytest.fixture(scope="module")
def dovecot_process(tmp_path_factory, google_oauth_process):
    """One real Dovecot per test module, its XOAUTH2 tokens checked by the session's Google OAuth
    emulator. Tests add their own users (``dovecot.add_user``)."""
    server = _new_dovecot(tmp_path_factory.mktemp("dovecot"), google_oauth_process.introspection_url)
    with server:
        yield server


@pytest.fixture
def dovecot(dovecot_process):
    """The module's Dovecot, started again if a test stopped or killed it."""
    if not dovecot_process.alive():
        dovecot_process.start()
    return dovecot_process


@pytest.fixture
def fresh_dovecot(tmp_path, google_oauth_process):
    """A Dovecot of the test's own (for tests that crash it or need an empty server)."""
    server = _new_dovecot(tmp_path / "dovecot", google_oauth_process.introspection_url)
    with server:
        yield server
