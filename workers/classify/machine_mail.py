"""Mail written by software that is not an auto-reply: list managers, ticket systems, CRMs,
calendars. Such mail may reference our send (a held-for-moderation notice, "your request #123
was received", a meeting acceptance) but must never count as a person answering, nor pause.

Decided from headers first (see tests/data/machine/*/README.md for where each fact comes
from). Two rules keep people people:
- A post a person sent *through* a mailing list carries list headers too; only mail from the
  list manager itself (its -request/-owner/-admin/-help/-bounces/+owners address, its robot,
  or a notice subject) is a machine.
- Ticket systems and CRMs also relay what an agent or rep wrote. Those are decided by the
  text: an acknowledgement ("your request was received") is a machine, anything else is the
  person's answer (``human_reply``). Until the text is read the verdict is provisional
  (``PROVISIONAL`` in the reasons) and ``needs_text`` asks for it once the mail matched a send.
- People work at these vendors too. Mail is platform mail by the platform's own marks (its
  X- headers, a tenant address such as prospect.zendesk.com, its Sender / Message-ID /
  Return-Path hosts), never because a person's address is at salesforce.com; and a person's
  own RFC 3834 out-of-office ("Auto-Submitted: auto-replied" with an out-of-office subject)
  is an auto-reply even when the mailbox is connected to a CRM.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

from workers.classify.verdict import automatic_subject

PROVISIONAL = "platform mail: text decides"

_LIST_HEADERS = ("list-id", "mailing-list", "x-mailman-version", "x-beenthere", "x-google-group-id",
                 "x-ml-name", "x-mlserver", "x-ml-server", "x-sympa-to", "x-loop", "list-unsubscribe",
                 "x-mailing-list")
_LIST_ROBOT_LOCAL = re.compile(
    r"^(?:.+[-+](?:owner|owners|request|bounces|admin|help|confirm|return|reject|moderator|editor|"
    r"subscribe|unsubscribe|join|leave|sc\.[\w.-]+|uc\.[\w.-]+)|owner-.+|mailman|sympa|majordomo|"
    r"listserv|listproc|fml|ezmlm|googlegroups-noreply|noreply-groups)$", re.IGNORECASE)
_LIST_NOTICE_SUBJECT = re.compile(
    r"awaits moderator approval|held for moderation|pending (moderator )?approval|"
    r"your message to .{1,100} (was rejected|has been rejected|awaits|is being held)|"
    r"not a member|non-?member|post by non-member|posting (was )?rejected|"
    r"^\s*confirm\b|confirm (your )?subscription|subscription (request|confirmation)|"
    r"your confirmation is (needed|required)|welcome to the .{1,100} (mailing )?list|"
    r"ezmlm response|fml status report|message distribution: authori[sz]ation|"
    r"forwarded to (the )?(moderator|editor)|message for list .{1,100} (rejected|forwarded)|"
    r"request to mailing list .{1,100} rejected|you (have been|were) (added|invited) to|"
    r"join request|google groups:", re.IGNORECASE)

_TICKET_HEADER_PREFIXES = ("x-zendesk-", "x-freshdesk-", "x-fd-", "x-jira-", "x-servicenow-",
                           "x-atlassian-")
_TICKET_DOMAINS = re.compile(r"(?:^|[@.])(zendesk\.com|freshdesk\.com|freshservice\.com|"
                             r"atlassian\.net|service-now\.com|servicenow\.com)\b", re.IGNORECASE)
_TICKET_SUBJECT = re.compile(r"\[(?:request received|ticket received)\]|\[jira\]\s*\[created\]|"
                             r"\b(?:request|ticket|case|incident) #?\s?[A-Z]{0,6}\d{2,} "
                             r"(?:has been |was )?(?:received|created|opened|logged)", re.IGNORECASE)
_CRM_HEADER_PREFIXES = ("x-sfdc-", "x-hubspot-", "x-hs-")
_CRM_DOMAINS = re.compile(r"(?:^|[@.])(salesforce\.com|force\.com|sfdc\.net|hubspot\.com|hubspotemail\.net|"
                          r"hs-inbox\.com)\b", re.IGNORECASE)
_CRM_AUTO_CATEGORY = re.compile(r"auto|workflow|alert|rule|notif|trigger|flow", re.IGNORECASE)

# The vendors' own domains: mail from a person there is that person's, not the platform's.
_VENDOR_DOMAINS = re.compile(r"^(salesforce\.com|force\.com|hubspot\.com|zendesk\.com|freshdesk\.com|"
                             r"freshworks\.com|freshservice\.com|servicenow\.com|service-now\.com|"
                             r"atlassian\.com|atlassian\.net)$", re.IGNORECASE)
_ROBOT_LOCAL = re.compile(r"^(no-?reply|do-?not-?reply|donotreply|notifications?|notify|alerts?|mailer|system|"
                          r"automated|support|help(desk)?|bounces?)([-+._].*)?$", re.IGNORECASE)
_HOST = re.compile(r"@([\w.-]+)")

_CAL_SENDERS = re.compile(r"^(calendar-notification@google\.com|calendar-server@google\.com|"
                          r"noreply@calendar\.google\.com)$", re.IGNORECASE)
_CAL_SUBJECT = re.compile(
    r"^\s*(accepted|declined|tentative|tentatively accepted|angenommen|abgelehnt|mit vorbehalt angenommen|"
    r"vorläufig angenommen|accepté|refusé|provisoire|acceptée|aceptado|rechazado|provisional|"
    r"accettato|rifiutato|provvisorio|geaccepteerd|geweigerd|voorlopig|aceito|recusado|"
    r"zaakceptowano|odrzucono|wstępnie zaakceptowano|承諾|辞退|仮承諾|"
    r"invitation|updated invitation|canceled event|cancelled event|einladung|invitación|"
    r"invito|uitnodiging|convite|zaproszenie|招待)\s*[:：]", re.IGNORECASE)


class HeaderView(Protocol):
    """What these rules read of a mail's headers (``headers._Headers``, which imports this module)."""

    def get(self, name: str) -> str | None: ...

    def has(self, name: str) -> bool: ...

    def names(self) -> Iterable[str]: ...


def _local(addr: str) -> str:
    return addr.split("@", 1)[0] if addr else ""


def _header_prefixed(h: HeaderView, prefixes: tuple[str, ...]) -> str | None:
    for name in h.names():
        if name.startswith(prefixes):
            return name
    return None


def machine_from_headers(h: HeaderView, subject: str, from_addr: str, item_class: str | None = None
                         ) -> tuple[str, str, bool] | None:
    """(family, reason, settled) when the headers show software wrote the mail; None when
    they do not. ``settled`` False: a ticket system / CRM that may relay a person's words,
    so its text decides (see ``settle_platform``). ``h`` is the classifier's header view."""
    ctype = (h.get("content-type") or "").lower()
    content_class = (h.get("content-class") or "").lower()
    item = item_class or ""
    if item.lower().startswith(("ipm.schedule.meeting.", "ipm.appointment")):
        return "calendar", f"item class {item[:60]}", True
    if ctype.startswith("text/calendar") or "calendarmessage" in content_class:
        return "calendar", "calendar message (text/calendar / content-class)", True
    sender = (h.get("sender") or "").lower()
    if _CAL_SENDERS.match(from_addr) or "calendar-notification@google.com" in sender:
        return "calendar", "calendar notification sender", True

    listish = any(h.has(name) for name in _LIST_HEADERS) or \
        "mailing list" in (h.get("delivered-to") or "").lower()
    robot = bool(_LIST_ROBOT_LOCAL.match(_local(from_addr)))
    if listish or robot:
        notice = _LIST_NOTICE_SUBJECT.search(subject)
        if (robot and (listish or notice)) or (listish and notice and not _personal(h)):
            return "mailing_list", "list manager notice" + (" (sender)" if robot else " (subject)"), True

    robot_sender = bool(_ROBOT_LOCAL.match(_local(from_addr)))
    if not robot_sender and _own_out_of_office(h, subject):
        return None  # a person's auto-reply, whatever their employer or CRM
    ticket = _header_prefixed(h, _TICKET_HEADER_PREFIXES)
    where = _platform_hosts(h, from_addr, robot_sender)
    if ticket or _TICKET_DOMAINS.search(where):
        reason = f"ticket system ({ticket or 'domain'})"
        if _TICKET_SUBJECT.search(subject):
            return "ticket_system", reason + ": acknowledgement subject", True
        return "ticket_system", reason, False
    crm = _header_prefixed(h, _CRM_HEADER_PREFIXES)
    if crm or _CRM_DOMAINS.search(where):
        category = h.get("x-sfdc-emailcategory") or ""
        auto = (h.get("auto-submitted") or "no").strip().lower()
        if _CRM_AUTO_CATEGORY.search(category) or not auto.startswith("no"):
            return "crm", f"crm ({crm or 'domain'}): automated {category or auto}"[:120], True
        return "crm", f"crm ({crm or 'domain'})", False
    if _CAL_SUBJECT.match(subject) and ("multipart" in ctype or h.has("x-ms-exchange-calendar-series-instance-id")):
        return "calendar", "calendar subject: body decides", False
    return None


def _platform_hosts(h: HeaderView, from_addr: str, robot_sender: bool) -> str:
    """The hosts of From, Sender, Message-ID, Reply-To and Return-Path, as "@host" words,
    without those at the vendor's own domain when From is a person there (anna@salesforce.com
    writes from her own mailbox: her Message-ID and Return-Path are at salesforce.com too)."""
    values = (from_addr, h.get("sender"), h.get("message-id"), h.get("reply-to"), h.get("return-path"))
    hosts = [host.lower() for v in values if v for host in _HOST.findall(v)]
    own = from_addr.rpartition("@")[2].lower()
    if own and not robot_sender and _VENDOR_DOMAINS.match(own):
        hosts = [host for host in hosts if host != own]
    return " ".join("@" + host for host in hosts)


def _own_out_of_office(h: HeaderView, subject: str) -> bool:
    """An RFC 3834 auto-reply that calls itself an out-of-office in its subject."""
    auto = (h.get("auto-submitted") or "").strip().lower()
    return auto.startswith("auto-replied") and automatic_subject(subject)


def _personal(h: HeaderView) -> bool:
    """A list post sent by a person: the list relayed it, so From is the author and the
    author's own client headers are there (kept to the cheap, common ones)."""
    return h.has("user-agent") or "outlook" in (h.get("x-mailer") or "").lower() or h.has("thread-index")


def calendar_in_parts(types_and_text: Iterable[tuple[str, str]]) -> str | None:
    """Reason when a part is an iCalendar object (text/calendar, METHOD:REPLY etc.)."""
    for ctype, text in types_and_text:
        if ctype == "text/calendar" or ctype == "application/ics":
            method = re.search(r"^METHOD:(\w+)", text or "", re.MULTILINE | re.IGNORECASE)
            return f"text/calendar part (METHOD:{method.group(1).upper()})" if method else "text/calendar part"
    return None
