"""One enrollment transition, defined once: what the store writes, the sinks deliver and the CLI shows.

A transition is stored as one JSON object (``to_json``) in three places, all written by the
same Lua step (``exchange_listener/core/scripts/enrollment_transition.lua``): the enrollment's
``:history`` list, ``el:transition:{id}`` (what the notifier delivers) and the ``el:transitions``
stream (field ``data``). The webhook body is that object plus ``"type"`` (``to_payload``, keys
sorted, no spaces: ``webhook_body``); the callable gets ``to_fields()``; ``exchange-listener
enrollments show --history`` prints ``to_fields()`` of each. docs/webhooks.md documents the
fields. To add a field, add it here (with a default, so stored transitions still read):
``EnrollmentStore.transition`` fills it in the draft it hands to the script, which decodes and
re-encodes it with Redis's cjson: a field must be a string, an int below 1e14 or None (cjson turns
``[]`` into ``{}`` and writes larger numbers in exponent form), which tests/test_transitions.py
checks. Only the fields in ``FROM_STATE`` are the script's to set, from the enrollment's state at
the instant the transition applies.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

WEBHOOK_TYPE = "enrollment.transition"
STREAM_FIELD = "data"  # the field of an el:transitions entry (the script writes it)


@dataclasses.dataclass(frozen=True)
class Transition:
    """One applied change of an enrollment's status; what the platform is told."""

    FROM_STATE: ClassVar[tuple[str, ...]] = ("previous_status", "version", "mailbox", "sequence_id")

    id: str
    enrollment_id: str
    status: str
    previous_status: str
    reason: str
    at: str  # ISO 8601 UTC
    event_key: str
    version: int
    by: str | None = None
    item_id: str | None = None
    message_id: str | None = None
    mailbox: str | None = None
    sequence_id: str | None = None
    paused_until: str | None = None  # for status "paused" only

    def to_fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Transition:
        """From a stored object; fields this version does not know are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_fields(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Transition:
        return cls.from_fields(json.loads(raw))

    def to_payload(self) -> dict[str, Any]:
        """The webhook's JSON object."""
        return {"type": WEBHOOK_TYPE, **self.to_fields()}

    def webhook_body(self) -> bytes:
        """The exact bytes POSTed (and signed): keys sorted, no spaces."""
        return json.dumps(self.to_payload(), sort_keys=True, separators=(",", ":")).encode()
