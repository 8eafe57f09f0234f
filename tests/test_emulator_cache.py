"""The emulator parses a delivered message once and keeps what GetItem needs: what it keeps must
be what a fresh parse of the same bytes gives, and the XML it serves must change only where the
item changed (a read flag, a move, a touch) and nowhere else."""
from __future__ import annotations

import email
import email.policy
import re
from email.utils import getaddresses
from pathlib import Path

import pytest
import requests

from emulators.ews import soap
from emulators.ews.soap import M, S, T
from emulators.ews.store import Item, Store, _header_text, decoded, store_safe, unfold

DATA = Path(__file__).parent / "data"
CORPUS = sorted(DATA.rglob("*.eml"))
ALICE = "alice@example.com"
AUTH = ("svc", "svc-password")
EVERY_FIELD = list(soap.ITEM_FIELDS)


def _fresh_headers(raw: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [(name, _header_text(str(value))) for name, value in msg.raw_items()]


def _fresh_body(raw: bytes) -> tuple[str, str]:
    """The body exactly as the emulator worked it out before it kept anything: policy.default as shipped."""
    part = email.message_from_bytes(raw, policy=email.policy.default).get_body(preferencelist=("plain", "html"))
    if part is None:
        return "Text", ""
    try:
        content = part.get_content()
    except (LookupError, ValueError):
        content = ""
    return ("HTML" if part.get_content_subtype() == "html" else "Text"), store_safe(content)


def _fresh_attached(raw: bytes) -> bool:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return any(True for _ in msg.iter_attachments()) if msg.is_multipart() else False


def _copy(item: Item) -> Item:
    """The same item in the same state, with nothing parsed or rendered yet."""
    return Item(id=item.id, mailbox=item.mailbox, folder_id=item.folder_id, raw=item.raw, received=item.received,
                is_read=item.is_read, change_key=item.change_key, item_class=item.item_class)


def test_the_corpus_is_there():
    assert len(CORPUS) >= 100 and any(p.parent.name == "replies-clients" for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: str(p.relative_to(DATA)))
def test_what_an_item_keeps_equals_a_fresh_parse(path):
    raw = path.read_bytes()
    store = Store()
    item = store.deliver(ALICE, raw)
    cold = soap.item_xml(store, item, "AllProperties", EVERY_FIELD)  # parses and keeps
    headers = _fresh_headers(raw)
    assert item.headers == headers
    for name in ("Subject", "Message-ID", "In-Reply-To", "References", "Date", "X-Missing"):
        values = [v for k, v in headers if k.lower() == name.lower()]
        assert item.header(name) == (values[0] if values else None)
    for name in ("From", "Sender", "To", "Cc", "Reply-To"):
        values = [v for k, v in headers if k.lower() == name.lower()]
        assert item.addresses(name) == [(decoded(n), a) for n, a in getaddresses([unfold(v) for v in values])
                                        if a or n]
    subject = [v for k, v in headers if k.lower() == "subject"]
    assert item.subject == (decoded(subject[0]) if subject else "")
    assert item.body == _fresh_body(raw)
    assert item.has_attachments == _fresh_attached(raw)
    # served again from what it kept: the same bytes, and the same as an item that parsed nothing yet
    assert soap.item_xml(store, item, "AllProperties", EVERY_FIELD) == cold
    assert soap.item_xml(store, _copy(item), "AllProperties", EVERY_FIELD) == cold


def test_read_flag_move_and_touch_change_only_their_own_fields():
    raw = (DATA / "replies-clients" / "gmail-reply.eml").read_bytes()
    store = Store()
    item = store.deliver(ALICE, raw)
    inbox = store.folder(ALICE, "inbox")
    before = soap.item_xml(store, item, "AllProperties", EVERY_FIELD)
    assert "<t:IsRead>false</t:IsRead>" in before

    store.set_read(item.id, True)
    read = soap.item_xml(store, item, "AllProperties", EVERY_FIELD)
    assert read == soap.item_xml(store, _copy(item), "AllProperties", EVERY_FIELD)
    assert "<t:IsRead>true</t:IsRead>" in read and f'ChangeKey="{item.change_key}"' in read

    old_id = item.id
    store.move(item.id, "Archive")
    moved = soap.item_xml(store, item, "AllProperties", EVERY_FIELD)
    assert moved == soap.item_xml(store, _copy(item), "AllProperties", EVERY_FIELD)
    archive = store.folder(ALICE, "Archive")
    assert item.id != old_id and f'Id="{item.id}"' in moved and old_id not in moved
    assert f'<t:ParentFolderId Id="{archive.id}"' in moved and inbox.id not in moved

    store.touch(item.id)
    touched = soap.item_xml(store, item, "AllProperties", EVERY_FIELD)
    assert touched == soap.item_xml(store, _copy(item), "AllProperties", EVERY_FIELD)
    assert f'ChangeKey="{item.change_key}"' in touched

    def rest(xml: str) -> str:  # everything but the fields an item can change
        xml = re.sub(r"<t:(ItemId|ParentFolderId) [^>]*/>", "", xml)
        return xml.replace("<t:IsRead>true</t:IsRead>", "").replace("<t:IsRead>false</t:IsRead>", "")
    assert rest(before) == rest(read) == rest(moved) == rest(touched)


def _get_item(emulator, item_id: str) -> bytes:
    props = "".join(f'<t:FieldURI FieldURI="{f}"/>' for f in EVERY_FIELD)
    body = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{S}" xmlns:m="{M}" xmlns:t="{T}">'
            f'<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
            f"<t:PrimarySmtpAddress>{ALICE}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"
            f"</s:Header><s:Body><m:GetItem><m:ItemShape><t:BaseShape>AllProperties</t:BaseShape>"
            f"<t:AdditionalProperties>{props}</t:AdditionalProperties></m:ItemShape>"
            f'<m:ItemIds><t:ItemId Id="{item_id}"/></m:ItemIds></m:GetItem></s:Body></s:Envelope>').encode()
    resp = requests.post(emulator.ews_url, data=body, auth=AUTH, timeout=10,
                         headers={"Content-Type": "text/xml; charset=utf-8"})
    assert resp.status_code == 200 and b'ResponseClass="Success"' in resp.content
    return resp.content


def test_getitem_on_the_wire_before_and_after_a_read_flag_and_a_move(emulator):
    """Over HTTP: a kept item, read and moved, answers byte for byte as a newly delivered copy of
    the same message in the same state does (ids, change keys and arrival time aside)."""
    raw = (DATA / "replies-clients" / "outlook-exchange-reply.eml").read_bytes()
    first = emulator.deliver(ALICE, raw)["item_id"]
    cold = _get_item(emulator, first)
    assert _get_item(emulator, first) == cold
    emulator.mark_read(first)
    moved = emulator.move(first, "Archive")
    warm = _get_item(emulator, moved["item_id"])
    twin = emulator.deliver(ALICE, raw, folder="Archive")["item_id"]
    emulator.mark_read(twin)
    fresh = _get_item(emulator, twin)

    def mask(data: bytes) -> str:
        text = re.sub(r'<t:ItemId Id="[^"]*" ChangeKey="[^"]*"/>', "<ID/>", data.decode())
        return re.sub(r"<t:DateTime(Received|Created)>[^<]*<", r"<t:DateTime\1>T<", text)
    assert mask(warm) == mask(fresh)
    assert "<t:IsRead>true</t:IsRead>" in mask(warm) and "<t:IsRead>false</t:IsRead>" in mask(cold)
    assert f'<t:ParentFolderId Id="{moved["folder_id"]}"' in warm.decode()

    def rest(text: str) -> str:  # and the folder and read flag, which the move and the flag changed
        text = re.sub(r'<t:ParentFolderId Id="[^"]*" ChangeKey="[^"]*"/>', "<PARENT/>", text)
        return re.sub(r"<t:IsRead>(true|false)</t:IsRead>", "<READ/>", text)
    assert rest(mask(cold)) == rest(mask(warm))
