"""What the classifier says about a mail (``Classification``, ``KINDS``) and the subject rules
every other classifier module reads (a reply's "Re:", an out-of-office's "Automatic reply:").

The bottom of ``workers.classify``: it imports nothing from the package, so the modules
above it (``return_date``, ``machine_mail``, ``auto_reply_text``, ``headers``) import it
at the top without a cycle.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("human_reply", "auto_reply", "bounce", "read_receipt", "complaint", "machine", "other")


class UnparseableMessage(ValueError):
    """The input is not an email message at all (nothing could be parsed)."""


@dataclass
class Classification:
    kind: str = "other"
    message_id: str | None = None
    from_address: str | None = None
    references: list[str] = field(default_factory=list)
    original_message_id: str | None = None
    failed_recipients: list[str] = field(default_factory=list)
    bounce_type: str | None = None          # "hard" | "soft" | None
    return_date: dt.date | None = None
    reasons: list[str] = field(default_factory=list)
    machine_family: str | None = None       # kind "machine": mailing_list | ticket_system | crm | calendar

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["return_date"] = self.return_date.isoformat() if self.return_date else None
        return data


# Subjects written by a person's client (answer, forward) or by an auto-responder.
FORWARD_SUBJECT = re.compile(r"^\s*(fwd?|fw|wg|tr|rv|i)\s*:", re.IGNORECASE)
REPLY_SUBJECT = re.compile(r"^\s*(re|aw|sv|vs|antw|ref|rif|r|res|odp|vá|atb|ynt|回复|答复|回覆)"
                           r"(\[\d+\])?\s*[:：]", re.IGNORECASE)
_SUBJECT_TAGS = re.compile(r"^\s*(?:\[[^\]]{0,40}\]\s*)+")  # "[EXTERNAL] Re: ...": a gateway's tag
_OOO_SUBJECTS = re.compile(
    r"automatic reply|auto(matic|mated)?[- ]?(reply|response|antwort)|autoreply|"
    r"out of (the )?office|out-of-office|\booo\b|abwesenheit|\babwesend\b|automatische antwort|"
    r"réponse automatique|reponse automatique|absence du bureau|"
    r"respuesta automática|respuesta automatica|fuera de la oficina|"
    r"risposta automatica|fuori sede|fuori ufficio|automatisch antwoord|afwezig|"
    r"resposta automática|fora do escritório|autosvar|automatiskt svar|frånvaro|"
    r"automaattinen vastaus|automatyczna odpowiedź|poza biurem|on vacation|vacation reply|"
    r"away from (the )?office|im urlaub|en vacances|de vacaciones|in ferie|"
    r"自動応答|自动回复|不在", re.IGNORECASE)


def is_reply_subject(subject: str) -> bool:
    """A subject a person's client wrote by answering or forwarding ("Re:", "AW:", "SV:",
    "Antw:", "RIF:", "回复：", "Fwd:" ..., after any "[EXTERNAL]" tag)."""
    subject = _SUBJECT_TAGS.sub("", subject or "", count=1)
    return bool(REPLY_SUBJECT.match(subject) or FORWARD_SUBJECT.match(subject))


def automatic_subject(subject: str) -> bool:
    """An out-of-office / automatic-reply subject. The responder puts its prefix first
    ("Automatic reply: Re: Intro"); a subject that starts with "Re:" was written by a person
    answering, even when our own subject says "Auto-reply templates that convert"."""
    return not is_reply_subject(subject) and bool(_OOO_SUBJECTS.search(subject or ""))
