"""``make demo SOURCE=imap``: the demo through a real Dovecot the demo runs itself. Its own file,
so that the test processes share the demos out (tests of one file run in one process)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_demo import (  # test_demo puts tools/ on sys.path
    ROOT,
    _logs,
    _pids_with_env,
    _play_and_check,
    demo_messages,
)

from emulators.dovecot import find_dovecot

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out


@pytest.fixture(autouse=True)
def _dovecot_installed():
    if find_dovecot() is None:  # a failure, never a skip: CI installs it (.ci/run)
        pytest.fail("dovecot not installed (apt-get install dovecot-imapd)", pytrace=False)


def _dovecot_pids(tmp_path: Path, group: int | None = None) -> list[int]:
    """Live processes of the demo's Dovecot: its master (its command line names the demo's config)
    and, given the master's pid, every process of its group (imap, auth, log ... children)."""
    conf = str(tmp_path / "dovecot" / "dovecot.conf").encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):
                continue
            if conf in (proc / "cmdline").read_bytes() or (group is not None and int(fields[2]) == group):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_imap_demo_plays_every_scenario_and_tears_down(tmp_path: Path) -> None:
    """``make demo SOURCE=imap``: the same seven outcomes through Dovecot (APPENDed to the inbox),
    an IMAP listener IDLEing on INBOX and Junk, and workers fetching over IMAP; then neither the
    supervised programs nor Dovecot are left running."""
    out = _play_and_check(tmp_path, "--source", "imap")
    assert "source: imap" in "".join(out.splitlines(keepends=True)[:2])
    assert "IDLEs on its 2 folders" in out
    assert "delivered 7 messages to dovecot" in out
    logs = _logs(tmp_path)
    assert logs >= {"redis.log", "listener.log", "worker-00.log", "worker-01.log"}
    assert not logs & {"emulator.log", "graph-emulator.log"}  # neither emulator is started
    settings = (tmp_path / "settings.toml").read_text()
    assert 'source = "imap"' in settings
    port = int(re.search(r"^imap_port = (\d+)$", settings, re.MULTILINE).group(1))  # type: ignore[union-attr]
    listener = [json.loads(line) for line in (tmp_path / "log" / "listener.log").read_text().splitlines()
                if line.startswith("{")]
    assert any(e.get("event") == "listener starting" and e.get("source") == "imap" for e in listener), listener[:5]
    # Dovecot really carried the mail: the listener and workers logged in as the rep (master user)
    # and IDLEd; the server was stopped by the demo's SIGTERM, not left to die
    dovecot_log = (tmp_path / "dovecot" / "dovecot.log").read_text()
    assert f"Login: user=<{demo_messages.MAILBOX}>" in dovecot_log
    assert "IDLE running" in dovecot_log
    assert "Killed with signal 15" in dovecot_log
    # Torn down: no Dovecot process and nothing listening on its port; its pid file is gone
    assert not _dovecot_pids(tmp_path)
    assert _refused(port)
    assert not (tmp_path / "dovecot.pid").exists()


def test_ctrl_c_mid_imap_demo_stops_dovecot_too(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "demo.py"), "--workdir", str(tmp_path),
                             "--source", "imap"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once Dovecot, the listener and workers are up and the mailbox is watched
        seen.append(line)
        if "watching" in line:
            break
    master = int((tmp_path / "dovecot.pid").read_text())
    assert _dovecot_pids(tmp_path, master), "".join(seen)
    assert _pids_with_env(f"EL_RUN_DIR={tmp_path / 'run'}"), "".join(seen)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "shutting down supervisord" in rest and "stopping dovecot" in rest
    assert not _pids_with_env(f"EL_RUN_DIR={tmp_path / 'run'}")
    assert not _dovecot_pids(tmp_path, master)
