"""Suite-wide schema check of every emulator response (wired into tests/conftest.py).

Every emulator started while the suite runs inherits ``EXCHANGE_LISTENER_EMULATOR_SCHEMA_LOG``
and appends each schema violation of a body it sends to that file; the session fails if the
file is not empty at the end.
"""
from __future__ import annotations

import os
import tempfile

from emulators.ews.validation import ENV_VAR


def enable() -> str:
    """Point every emulator this process starts at a fresh violations file; return its path."""
    fd, path = tempfile.mkstemp(prefix="emulator-schema-", suffix=".log")
    os.close(fd)
    os.environ[ENV_VAR] = path
    return path


def recorded(path: str, remove: bool = False) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            found = [line.rstrip("\n") for line in fh if line.strip()]
    except FileNotFoundError:
        return []
    if remove:
        os.unlink(path)
    return found
