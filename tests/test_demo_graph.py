"""``make demo SOURCE=graph``: the demo through the Microsoft Graph emulator. Its own file, so
that the test processes share the demos out (tests of one file run in one process)."""
from __future__ import annotations

import json

import pytest
from test_demo import (  # test_demo puts tools/ on sys.path
    _logs,
    _play_and_check,
    demo_messages,
)

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out


def test_graph_demo_plays_every_scenario_and_tears_down(tmp_path):
    """``make demo SOURCE=graph``: the same seven outcomes through the Graph emulator, a Graph
    listener (its receiver takes the emulator's notifications) and workers fetching by Graph."""
    out = _play_and_check(tmp_path, "--source", "graph")
    assert "source: graph" in "".join(out.splitlines(keepends=True)[:2])
    assert "Graph subscription is made" in out
    logs = _logs(tmp_path)
    assert logs >= {"redis.log", "graph-emulator.log", "listener.log", "worker-00.log", "worker-01.log"}
    assert "emulator.log" not in logs  # the EWS emulator is not started
    assert 'source = "graph"' in (tmp_path / "settings.toml").read_text()
    listener = [json.loads(line) for line in (tmp_path / "log" / "listener.log").read_text().splitlines()
                if line.startswith("{")]
    assert any(e.get("event") == "listener starting" and e.get("source") == "graph"
               and e.get("mode") == "notifications" for e in listener), listener[:5]
    assert any(e.get("event") == "subscribed" for e in listener)
    delivered = (tmp_path / "log" / "graph-emulator.log").read_text().count('"message delivered"')
    assert delivered == len(demo_messages.SCENARIOS)
