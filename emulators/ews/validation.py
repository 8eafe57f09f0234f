"""Check emulator responses against Microsoft's EWS schema (the copy in emulators/ews/schema).

Used by the test suite (``EXCHANGE_LISTENER_EMULATOR_SCHEMA_LOG``): the emulator validates every
body it sends and appends each violation to that file. Off in production: it costs CPU.
The only accepted deviations are the wire forms real Exchange uses (see schema/README.md).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from lxml import etree

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
ENV_VAR = "EXCHANGE_LISTENER_EMULATOR_SCHEMA_LOG"
_S = "http://schemas.xmlsoap.org/soap/envelope/"
_M = "http://schemas.microsoft.com/exchange/services/2006/messages"
_T = "http://schemas.microsoft.com/exchange/services/2006/types"

_schema: etree.XMLSchema | None = None


def schema() -> etree.XMLSchema:
    global _schema
    if _schema is None:
        _schema = etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "messages.patched.xsd")))
    return _schema


def _to_schema_form(elem: etree._Element) -> etree._Element:
    """Rename the documented wire deviations (m:Notification, m:SubscriptionId) to the schema's t: form."""
    for parent_tag, child in (("Notifications", "Notification"), ("ErrorSubscriptionIds", "SubscriptionId")):
        for parent in elem.iter(f"{{{_M}}}{parent_tag}"):
            for node in parent.findall(f"{{{_M}}}{child}"):
                node.tag = f"{{{_T}}}{child}"
    return elem


def violations(envelope: bytes) -> list[str]:
    """Schema violations of the element inside s:Body ([] when valid; SOAP Faults are not EWS schema)."""
    try:
        root = etree.fromstring(envelope)
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed: {exc}"]
    body = root.find(f"{{{_S}}}Body")
    if root.tag != f"{{{_S}}}Envelope" or body is None or len(body) != 1:
        return ["not a SOAP envelope with exactly one body element"]
    content = body[0]
    if content.tag == f"{{{_S}}}Fault":
        return []
    if etree.QName(content).namespace != _M:
        return [f"body element {content.tag} is not in the messages namespace"]
    doc = etree.ElementTree(_to_schema_form(copy.deepcopy(content)))
    checker = schema()
    if checker.validate(doc):
        return []
    return [f"{etree.QName(content).localname}: line {e.line}: {e.message}" for e in checker.error_log]


class ViolationLog:
    """Appends violations to the file named by the env var; a no-op when it is unset."""

    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get(ENV_VAR) or None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def check(self, envelope: bytes) -> None:
        if not self.path:
            return
        found = violations(envelope)
        if found:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.writelines(line.replace("\n", " ") + "\n" for line in found)
