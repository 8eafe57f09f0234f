"""EWS SOAP on the wire: parse requests, build response XML in the schema's element order.

Responses are built as strings (cheap for thousands of streams); every value goes through
``esc``. Wire deviations that real Exchange has (``m:Notification``, ``m:SubscriptionId`` in
``m:ErrorSubscriptionIds``) are reproduced deliberately.
"""
from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from emulators.ews.store import Event, Folder, Item, Store, unfold

S = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NS = {"s": S, "m": M, "t": T}

# The product the emulator answers as (``--server-version``): build numbers from Microsoft's
# "Exchange Server build numbers and release dates"
# (https://learn.microsoft.com/exchange/new-features/build-numbers-and-release-dates):
# Exchange Server 2016 CU23 15.1.2507.6, Exchange Server 2019 CU15 15.2.1748.10,
# Exchange Server SE RTM 15.2.2562.17. On-premises servers of these lines write the schema
# version "V2017_07_11" in the Version attribute (seen in 2016 CU23 and SE responses); it is
# not a RequestServerVersion value, so clients keep the version they asked with (exchangelib
# does: Version._is_invalid_version_string).
SERVER_BUILDS = {"2016": (15, 1, 2507, 6), "2019": (15, 2, 1748, 10), "SE": (15, 2, 2562, 17)}
SERVER_SCHEMA_VERSION = "V2017_07_11"
# RequestServerVersion values these servers accept: the ExchangeVersionType enumeration of
# their types.xsd (schema/types.xsd). Anything else: an ErrorInvalidServerVersion SOAP fault.
REQUEST_VERSIONS = frozenset({
    "Exchange2007", "Exchange2007_SP1", "Exchange2009", "Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2",
    "Exchange2012", "Exchange2013", "Exchange2013_SP1", "Exchange2015", "Exchange2016", "V2015_10_05",
    "V2016_01_06", "V2016_04_13", "V2016_07_13", "V2016_10_10"})


def server_version_info(product: str) -> str:
    """The ``t:ServerVersionInfo`` SOAP header Exchange writes for ``product`` (2016, 2019, SE)."""
    major, minor, build, revision = SERVER_BUILDS[product]
    return (f'<h:ServerVersionInfo MajorVersion="{major}" MinorVersion="{minor}" MajorBuildNumber="{build}" '
            f'MinorBuildNumber="{revision}" Version="{SERVER_SCHEMA_VERSION}" xmlns:h="{T}"/>')


SERVER_VERSION = server_version_info("2016")


def set_server_version(product: str) -> None:
    """Answer as ``product`` from now on. One emulator per process, so a module setting: every
    envelope built here carries it without threading it through each caller."""
    global SERVER_VERSION
    if product not in SERVER_BUILDS:
        raise ValueError(f"server version must be one of {sorted(SERVER_BUILDS)}")
    SERVER_VERSION = server_version_info(product)


_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class BadRequest(Exception):
    """The request is not EWS SOAP we can read; answered with a SOAP fault."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


# Characters XML 1.0 cannot carry; real Exchange replaces them rather than send invalid XML.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(value) -> str:
    return escape(_XML_ILLEGAL.sub("\ufffd", str(value)))


def ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- requests ---------------------------------------------------------------------------------
@dataclass
class Request:
    operation: str
    body: etree._Element  # the operation element, e.g. m:GetItem
    impersonated: str | None  # PrimarySmtpAddress/SmtpAddress from ExchangeImpersonation
    requested_version: str | None = None  # RequestServerVersion's Version, if the header is there


def parse_request(data: bytes) -> Request:
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise BadRequest("ErrorSchemaValidation", f"The request is not well-formed XML: {exc}")
    body = root.find(f"{{{S}}}Body")
    if root.tag != f"{{{S}}}Envelope" or body is None or len(body) == 0:
        raise BadRequest("ErrorSchemaValidation", "The request is not a SOAP 1.1 envelope with a body.")
    op = body[0]
    if etree.QName(op).namespace != M:
        raise BadRequest("ErrorSchemaValidation", "The request body is not in the EWS messages namespace.")
    impersonated = requested = None
    header = root.find(f"{{{S}}}Header")
    if header is not None:
        version = header.find(f"{{{T}}}RequestServerVersion")
        if version is not None:
            requested = version.get("Version", "")
        imp = header.find(f"{{{T}}}ExchangeImpersonation")
        if imp is not None:
            for tag in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
                found = imp.find(f".//{{{T}}}{tag}")
                if found is not None and found.text:
                    impersonated = found.text.strip()
                    break
            if impersonated is None:
                raise BadRequest("ErrorImpersonateUserDenied", "The impersonation header names no user.")
    return Request(etree.QName(op).localname, op, impersonated, requested)


def check_requested_version(req: Request) -> None:
    """Exchange refuses a RequestServerVersion it does not know with a SOAP fault (HTTP 500)
    ``ErrorInvalidServerVersion`` "The specified server version is invalid."; exchangelib's
    version probe reads that and tries its next version. A request without the header is served."""
    if req.requested_version is not None and req.requested_version not in REQUEST_VERSIONS:
        raise BadRequest("ErrorInvalidServerVersion", "The specified server version is invalid.")


def mailbox_hint(op: etree._Element) -> str | None:
    """The mailbox named in a DistinguishedFolderId (delegate access), if any."""
    found = op.find(f".//{{{T}}}DistinguishedFolderId/{{{T}}}Mailbox/{{{T}}}EmailAddress")
    return found.text.strip() if found is not None and found.text else None


def folder_refs(parent: etree._Element | None) -> list[tuple[str, str]]:
    """[('distinguished', name) | ('id', folder id)] under a FolderIds-like element."""
    refs = []
    if parent is None:
        return refs
    for child in parent:
        name = etree.QName(child).localname
        if name == "DistinguishedFolderId":
            refs.append(("distinguished", child.get("Id", "")))
        elif name == "FolderId":
            refs.append(("id", child.get("Id", "")))
    return refs


def text_of(op: etree._Element, path: str) -> str | None:
    found = op.find(path, NS)
    return found.text.strip() if found is not None and found.text is not None else None


def shape(op: etree._Element, tag: str) -> tuple[str, list[str]]:
    """(BaseShape, [FieldURI, ...]) of an ItemShape/FolderShape element."""
    elem = op.find(f"m:{tag}", NS)
    if elem is None:
        return "IdOnly", []
    base = text_of(elem, "t:BaseShape") or "IdOnly"
    fields = [f.get("FieldURI") for f in elem.findall("t:AdditionalProperties/t:FieldURI", NS)]
    if (text_of(elem, "t:IncludeMimeContent") or "").lower() in ("true", "1"):
        fields.append("item:MimeContent")  # the shape's own way to ask for MIME (Microsoft's GetItem example)
    return base, [f for f in fields if f]


# -- envelopes -------------------------------------------------------------------------------
def envelope(body: str, *, header: bool = True) -> bytes:
    head = f"<s:Header>{SERVER_VERSION}</s:Header>" if header else ""
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{S}">{head}'
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


def stream_envelope(body: str) -> bytes:
    """One streamed document: ``<s:Envelope `` then a space, as exchangelib's splitter needs.
    Each carries the ServerVersionInfo header, as in Microsoft's GetStreamingEvents example."""
    return f'<s:Envelope xmlns:s="{S}"><s:Header>{SERVER_VERSION}</s:Header><s:Body>{body}</s:Body></s:Envelope>'.encode()


def response(operation: str, messages: list[str]) -> str:
    return (f'<m:{operation}Response xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
            f'{"".join(messages)}</m:ResponseMessages></m:{operation}Response>')


def ok(operation: str, inner: str = "") -> str:
    return (f'<m:{operation}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
            f"{inner}</m:{operation}ResponseMessage>")


def error(operation: str, code: str, text: str, inner: str = "") -> str:
    return (f'<m:{operation}ResponseMessage ResponseClass="Error"><m:MessageText>{esc(text)}</m:MessageText>'
            f"<m:ResponseCode>{esc(code)}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
            f"{inner}</m:{operation}ResponseMessage>")


def fault(code: str, text: str, back_off_ms: int | None = None) -> bytes:
    """A SOAP Fault as Exchange sends it (HTTP 500); exchangelib maps ResponseCode to its error class."""
    xml = ""
    if back_off_ms is not None:
        xml = (f'<t:MessageXml xmlns:t="{T}"><t:Value Name="BackOffMilliseconds">{int(back_off_ms)}</t:Value>'
               "</t:MessageXml>")
    body = (f'<s:Fault><faultcode xmlns:a="{T}">a:{esc(code)}</faultcode>'
            f'<faultstring xml:lang="en-US">{esc(text)}</faultstring><detail>'
            f'<e:ResponseCode xmlns:e="{E}">{esc(code)}</e:ResponseCode>'
            f'<e:Message xmlns:e="{E}">{esc(text)}</e:Message>{xml}</detail></s:Fault>')
    return envelope(body, header=False)


# -- ConvertId (exchangelib's version probe) ------------------------------------------------
def convert_id_messages(op: etree._Element) -> list[str]:
    """One ConvertIdResponseMessage per m:SourceIds child. The emulator's ids exist in one
    format only: an id asked for in its own format comes back as it is; any other conversion
    (exchangelib's probe converts the EwsId "DUMMY" to an EntryId) is ErrorInvalidIdMalformed,
    as Exchange answers for an id it cannot decode."""
    destination = op.get("DestinationFormat", "")
    messages = []
    for source in op.findall("m:SourceIds/*", NS):
        if source.get("Format") == destination and source.get("Id"):
            tag = etree.QName(source).localname
            attrs = "".join(f" {name}={quoteattr(source.get(name))}" for name in ("Format", "Id", "Mailbox")
                            if source.get(name) is not None)
            messages.append(ok("ConvertId", f'<m:AlternateId xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                                            f'xsi:type="t:{tag}Type"{attrs}/>'))
        else:
            messages.append(error("ConvertId", "ErrorInvalidIdMalformed", "Id is malformed."))
    return messages


# -- folders ----------------------------------------------------------------------------------
def folder_id(folder: Folder, tag: str = "FolderId") -> str:
    return f"<t:{tag} Id={quoteattr(folder.id)} ChangeKey={quoteattr(folder.change_key)}/>"


# the element Exchange answers with, by folder class (the schema's BaseFolderType choices)
FOLDER_ELEMENTS = {"IPF.Appointment": "CalendarFolder", "IPF.Contact": "ContactsFolder", "IPF.Task": "TasksFolder"}


def folder_element(folder: Folder) -> str:
    cls = folder.folder_class or ""
    return next((tag for prefix, tag in FOLDER_ELEMENTS.items() if cls == prefix or cls.startswith(prefix + ".")),
                "Folder")


def folder_xml(store: Store, folder: Folder) -> str:
    """One folder in the schema's BaseFolderType order; UnreadCount only where the type has it."""
    tag = folder_element(folder)
    parts = [folder_id(folder)]
    if folder.parent_id:
        parts.append(folder_id(store.folders[folder.parent_id], "ParentFolderId"))
    if folder.folder_class:
        parts.append(f"<t:FolderClass>{esc(folder.folder_class)}</t:FolderClass>")
    parts.append(f"<t:DisplayName>{esc(folder.display_name)}</t:DisplayName>")
    parts.append(f"<t:TotalCount>{len(folder.items)}</t:TotalCount>")
    parts.append(f"<t:ChildFolderCount>{len(store.children(folder))}</t:ChildFolderCount>")
    if tag in ("Folder", "TasksFolder"):
        parts.append(f"<t:UnreadCount>{folder.unread}</t:UnreadCount>")
    return f"<t:{tag}>{''.join(parts)}</t:{tag}>"


# -- items ------------------------------------------------------------------------------------
# Default/AllProperties: Exchange's Default includes the Body (Microsoft's GetItem example).
DEFAULT_FIELDS = ("item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Body", "item:DateTimeReceived",
                  "item:Size", "item:InReplyTo", "item:DateTimeSent", "item:DateTimeCreated", "item:HasAttachments",
                  "item:ConversationId", "message:Sender", "message:ToRecipients", "message:CcRecipients",
                  "message:From", "message:InternetMessageId", "message:IsRead", "message:References",
                  "message:ReplyTo")


def item_id(item: Item) -> str:
    return f"<t:ItemId Id={quoteattr(item.id)} ChangeKey={quoteattr(item.change_key)}/>"


def _mailbox(name: str, address: str) -> str:
    name_xml = f"<t:Name>{esc(name)}</t:Name>" if name else ""
    return (f"<t:Mailbox>{name_xml}<t:EmailAddress>{esc(address)}</t:EmailAddress>"
            "<t:RoutingType>SMTP</t:RoutingType><t:MailboxType>OneOff</t:MailboxType></t:Mailbox>")


def _single(tag: str, pairs: list[tuple[str, str]]) -> str:
    return f"<t:{tag}>{_mailbox(*pairs[0])}</t:{tag}>" if pairs else ""


def _many(tag: str, pairs: list[tuple[str, str]]) -> str:
    return f"<t:{tag}>{''.join(_mailbox(n, a) for n, a in pairs)}</t:{tag}>" if pairs else ""


def _text(tag: str, value: str | None) -> str:
    return f"<t:{tag}>{esc(unfold(value))}</t:{tag}>" if value is not None else ""


def _sent(item: Item) -> dt.datetime:
    try:
        value = parsedate_to_datetime(unfold(item.header("Date") or ""))
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return item.received


def _body(item: Item) -> str:
    kind, content = item.body
    return f'<t:Body BodyType="{kind}">{esc(content)}</t:Body>'


_QUOTED_HISTORY = re.compile(
    r"^(>|-{2,}\s*Original Message\s*-{2,}|On .{1,200} wrote:\s*$|From: .+$|Am .{1,200} schrieb .{1,200}:\s*$|"
    r"Le .{1,200} a écrit\s*:\s*$|_{8,})", re.MULTILINE | re.IGNORECASE)


def _unique_body(item: Item) -> str:
    """UniqueBody: the part of the body this message added, without the quoted conversation.
    Exchange works this out from the conversation; here the body is cut at the first line that
    starts quoted history (``>``, "Original Message", "On ... wrote:", a From: block)."""
    kind, content = item.body
    if kind == "Text":
        quoted = _QUOTED_HISTORY.search(content)
        if quoted:
            content = content[:quoted.start()]
    return f'<t:UniqueBody BodyType="{kind}">{esc(content)}</t:UniqueBody>'


# FieldURI -> builder, in the schema's element order (ItemType, then MessageType).
ITEM_FIELDS = {
    "item:MimeContent": lambda s, i: f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(i.raw).decode()}</t:MimeContent>',
    "item:ItemId": lambda s, i: "",  # always sent
    "item:ParentFolderId": lambda s, i: folder_id(s.folders[i.folder_id], "ParentFolderId"),
    "item:ItemClass": lambda s, i: f"<t:ItemClass>{esc(i.item_class)}</t:ItemClass>",
    "item:Subject": lambda s, i: f"<t:Subject>{esc(i.subject)}</t:Subject>",
    "item:Body": lambda s, i: _body(i),
    "item:DateTimeReceived": lambda s, i: f"<t:DateTimeReceived>{ts(i.received)}</t:DateTimeReceived>",
    "item:Size": lambda s, i: f"<t:Size>{len(i.raw)}</t:Size>",
    "item:InReplyTo": lambda s, i: _text("InReplyTo", i.header("In-Reply-To")),
    "item:InternetMessageHeaders": lambda s, i: "<t:InternetMessageHeaders>" + "".join(
        f"<t:InternetMessageHeader HeaderName={quoteattr(k)}>{esc(unfold(v))}</t:InternetMessageHeader>"
        for k, v in i.headers) + "</t:InternetMessageHeaders>" if i.headers else "",
    "item:DateTimeSent": lambda s, i: f"<t:DateTimeSent>{ts(_sent(i))}</t:DateTimeSent>",
    "item:DateTimeCreated": lambda s, i: f"<t:DateTimeCreated>{ts(i.received)}</t:DateTimeCreated>",
    "item:HasAttachments": lambda s, i: f"<t:HasAttachments>{str(i.has_attachments).lower()}</t:HasAttachments>",
    "item:ConversationId": lambda s, i: f"<t:ConversationId Id={quoteattr(i.conversation_id)}/>",
    "item:UniqueBody": lambda s, i: _unique_body(i),
    "message:Sender": lambda s, i: _single("Sender", i.addresses("Sender") or i.addresses("From")),
    "message:ToRecipients": lambda s, i: _many("ToRecipients", i.addresses("To")),
    "message:CcRecipients": lambda s, i: _many("CcRecipients", i.addresses("Cc")),
    "message:From": lambda s, i: _single("From", i.addresses("From")),
    "message:InternetMessageId": lambda s, i: _text("InternetMessageId", i.header("Message-ID")),
    "message:IsRead": lambda s, i: f"<t:IsRead>{str(i.is_read).lower()}</t:IsRead>",
    "message:References": lambda s, i: _text("References", i.header("References")),
    "message:ReplyTo": lambda s, i: _many("ReplyTo", i.addresses("Reply-To")),
}
_ORDER = {name: n for n, name in enumerate(ITEM_FIELDS)}
# Built from what an item can change (id, change key, folder, read flag), or too big to keep twice
# (the MIME and the body texts, which the item keeps parsed): built on every request. Every other
# field's XML depends only on the delivered message, so it is built once and kept on the item.
_UNCACHED = frozenset({"item:MimeContent", "item:ItemId", "item:ParentFolderId", "message:IsRead", "item:Body",
                       "item:UniqueBody"})


def item_xml(store: Store, item: Item, base: str, fields: list[str]) -> str:
    """A mail item as ``t:Message``; anything else (a delivery into calendar, contacts, tasks,
    notes) as a plain ``t:Item`` carrying only ItemType's fields."""
    is_message = item.item_class.startswith("IPM.Note")
    wanted = set(fields)
    if base in ("Default", "AllProperties"):
        wanted.update(DEFAULT_FIELDS)
    if not is_message:
        wanted = {f for f in wanted if not f.startswith("message:")}
    parts = []
    rendered = item.rendered
    for name in sorted(wanted & ITEM_FIELDS.keys(), key=_ORDER.__getitem__):
        if name in _UNCACHED:
            parts.append(ITEM_FIELDS[name](store, item))
            if name == "item:MimeContent":
                parts.append(item_id(item))
        else:
            xml = rendered.get(name)
            if xml is None:
                xml = rendered[name] = ITEM_FIELDS[name](store, item)
            parts.append(xml)
    if "item:MimeContent" not in wanted:
        parts.insert(0, item_id(item))
    tag = "Message" if is_message else "Item"
    return f"<t:{tag}>{''.join(parts)}</t:{tag}>"


# -- notifications ----------------------------------------------------------------------------
def event_xml(event: Event, store: Store) -> str:
    def fid(folder_id_: str, tag: str) -> str:
        folder = store.folders.get(folder_id_)
        key = f" ChangeKey={quoteattr(folder.change_key)}" if folder else ""
        return f"<t:{tag} Id={quoteattr(folder_id_)}{key}/>"

    parts = [f"<t:Watermark>{esc(event.watermark)}</t:Watermark>", f"<t:TimeStamp>{ts(event.timestamp)}</t:TimeStamp>"]
    if event.item_id:  # with its ChangeKey while the item exists (Microsoft's GetStreamingEvents example)
        item = store.items.get(event.item_id)
        key = f" ChangeKey={quoteattr(item.change_key)}" if item is not None else ""
        parts.append(f"<t:ItemId Id={quoteattr(event.item_id)}{key}/>")
    else:
        parts.append(fid(event.folder_id, "FolderId"))
    parts.append(fid(event.parent_folder_id, "ParentFolderId"))
    if event.kind == "MovedEvent":
        parts.append(f"<t:OldItemId Id={quoteattr(event.old_item_id)}/>")
        parts.append(fid(event.old_parent_folder_id, "OldParentFolderId"))
    if event.kind == "ModifiedEvent" and event.unread_count is not None:
        parts.append(f"<t:UnreadCount>{event.unread_count}</t:UnreadCount>")
    return f"<t:{event.kind}>{''.join(parts)}</t:{event.kind}>"


def notification_xml(sub_id: str, events: list[Event], more: bool, store: Store) -> str:
    return (f"<m:Notification><t:SubscriptionId>{esc(sub_id)}</t:SubscriptionId>"
            f"<t:MoreEvents>{str(more).lower()}</t:MoreEvents>"
            f"{''.join(event_xml(e, store) for e in events)}</m:Notification>")


def streaming_message(notifications: list[str] = (), status: str | None = None) -> bytes:
    inner = f"<m:Notifications>{''.join(notifications)}</m:Notifications>" if notifications else ""
    if status:
        inner += f"<m:ConnectionStatus>{status}</m:ConnectionStatus>"
    return stream_envelope(response("GetStreamingEvents", [ok("GetStreamingEvents", inner)]))


def streaming_error(code: str, text: str, bad_ids: list[str] = (), *, streamed: bool = True) -> bytes:
    """An error for GetStreamingEvents: inside an open stream, or as the whole (non-streamed) response."""
    inner = ""
    if bad_ids:
        inner = "<m:ErrorSubscriptionIds>" + "".join(
            f"<m:SubscriptionId>{esc(i)}</m:SubscriptionId>" for i in bad_ids) + "</m:ErrorSubscriptionIds>"
    body = response("GetStreamingEvents", [error("GetStreamingEvents", code, text, inner)])
    return stream_envelope(body) if streamed else envelope(body)
