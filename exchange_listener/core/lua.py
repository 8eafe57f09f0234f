"""Our Lua scripts, called with named keys and arguments.

Every script is a file ``exchange_listener/core/scripts/<name>.lua`` (shipped as package data)
whose first comment lines declare its calling convention::

    -- KEYS: outbox, state, predecessor_state
    -- ARGV: transition_id, predecessor_id, due_ms, latest_ms, ttl, *channels

``Script(name)`` reads those names, and a call passes each one as a keyword::

    PARK = Script("outbox_park")
    PARK(conn, outbox=..., state=..., predecessor_state=..., transition_id=..., ..., channels=["webhook"])

The values go into KEYS and ARGV in the declared order, so no caller counts positions. A name
written ``*name`` (last in its list only) takes a sequence and fills the rest of the list. A
missing or unknown name is a ``TypeError`` before anything reaches Redis.

On a client the script runs by EVALSHA (loaded with one EVAL when the server does not know it,
e.g. after a restart or a failover); on a pipeline, MULTI or not, by EVAL, which cannot meet
NOSCRIPT in the middle of a batch. Either way it is one atomic script run with Redis's reply.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.client import Pipeline

_HEADER = re.compile(r"^--\s*(KEYS|ARGV):(.*)$")
_NAME = re.compile(r"^\*?[a-z_][a-z0-9_]*$")


def _names(kind: str, text: str, where: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for index, name in enumerate(names):
        if not _NAME.match(name) or (name.startswith("*") and index != len(names) - 1):
            raise ValueError(f"{where}: bad {kind} name {name!r} (lower_case; only the last may be *name)")
    return names


class Script:
    """One Lua script from ``scripts/<name>.lua``, called as ``script(client, **names)``."""

    def __init__(self, name: str, text: str | None = None):
        """``text``: the script itself instead of ``scripts/<name>.lua`` (for tests)."""
        self.name = name
        if text is None:
            text = resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")
        self.text = text
        declared: dict[str, tuple[str, ...]] = {}
        for line in self.text.splitlines():
            if not line.startswith("--"):
                break
            match = _HEADER.match(line)
            if match:
                declared[match.group(1)] = _names(match.group(1), match.group(2), f"{name}.lua")
        if set(declared) != {"KEYS", "ARGV"}:
            raise ValueError(f"{name}.lua: the first comment lines must declare '-- KEYS: ...' and '-- ARGV: ...'")
        self.keys, self.args = declared["KEYS"], declared["ARGV"]
        plain = [n.lstrip("*") for n in self.keys + self.args]
        if len(set(plain)) != len(plain):
            raise ValueError(f"{name}.lua: a name is declared twice")
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, keys={self.keys}, args={self.args})"

    def _fill(self, names: tuple[str, ...], values: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for name in names:
            if name.startswith("*"):
                rest = values.pop(name[1:])
                if isinstance(rest, (str, bytes)) or not isinstance(rest, Sequence):
                    raise TypeError(f"{self.name}: {name[1:]} takes a list of values")
                out.extend(rest)
            else:
                out.append(values.pop(name))
        return out

    def bind(self, **named: Any) -> tuple[list[Any], list[Any]]:
        """(KEYS, ARGV) for these names; TypeError naming what is missing or unknown."""
        expected = {n.lstrip("*") for n in self.keys + self.args}
        missing, unknown = sorted(expected - set(named)), sorted(set(named) - expected)
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else [])
            raise TypeError(f"{self.name}: {'; '.join(problems)} (declared KEYS: {', '.join(self.keys) or '-'}; "
                            f"ARGV: {', '.join(self.args) or '-'})")
        values = dict(named)
        return self._fill(self.keys, values), self._fill(self.args, values)

    def __call__(self, client: redis.Redis | Pipeline, /, **named: Any) -> Any:
        """The script's reply as redis-py gives it (a pipeline: the pipeline; the reply comes from
        ``execute()``); what it is depends on the script, so callers narrow it."""
        keys, args = self.bind(**named)
        if isinstance(client, Pipeline):
            return client.eval(self.text, len(keys), *keys, *args)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.text, len(keys), *keys, *args)
