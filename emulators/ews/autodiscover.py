"""POX autodiscover (``POST /autodiscover/autodiscover.xml``): where a mailbox's EWS endpoint is.

The shapes follow Microsoft's "POX Autodiscover request/response for Exchange" pages and
[MS-OXDSCLI] 2.2.3/2.2.4: the request is ``Autodiscover/Request/EMailAddress`` with an
``AcceptableResponseSchema``; the answer is ``Autodiscover/Response/Account`` with ``Action``
``settings`` and one ``Protocol`` each of ``Type`` EXCH (inside the organisation) and EXPR
(Outlook Anywhere) carrying ``EwsUrl``, or ``Action`` ``redirectUrl``/``redirectAddr`` with
``RedirectUrl``/``RedirectAddr`` ([MS-OXDSCLI] 3.2.5: a redirect to another URL or address), or an
``Error`` with an ``ErrorCode``. Auth is the EWS endpoint's (a 401 like EWS's).

``--autodiscover-redirect VALUE``: an address (``user@domain``) answers ``redirectAddr`` for any
other address; a URL answers ``redirectUrl`` for every request.
"""
from __future__ import annotations

import time
import uuid
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from aiohttp import web

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
PATH = "/autodiscover/autodiscover.xml"


def _document(inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover xmlns="{RESPONSE_NS}">'
            f'<Response xmlns="{OUTLOOK_NS}">{inner}</Response></Autodiscover>').encode()


def _error(code: int, message: str) -> bytes:
    # [MS-OXDSCLI] 2.2.4.1.1.3: Error (Time, Id attributes) with ErrorCode, Message, DebugData
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    return _document(f'<Error Time="{stamp}" Id="{uuid.uuid4().int % 10**10}"><ErrorCode>{code}</ErrorCode>'
                     f"<Message>{escape(message)}</Message><DebugData /></Error>")


def _requested_address(body: bytes) -> str | None:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    found = root.find(f"{{{REQUEST_NS}}}Request/{{{REQUEST_NS}}}EMailAddress")
    return (found.text or "").strip() if found is not None else None


def answer(address: str, ews_url: str, redirect: str) -> bytes:
    """The POX response for ``address`` on a server whose EWS endpoint is ``ews_url``."""
    if redirect and "://" in redirect:
        account = (f"<AccountType>email</AccountType><Action>redirectUrl</Action>"
                   f"<RedirectUrl>{escape(redirect)}</RedirectUrl>")
    elif redirect and redirect.lower() != address.lower():
        account = (f"<AccountType>email</AccountType><Action>redirectAddr</Action>"
                   f"<RedirectAddr>{escape(redirect)}</RedirectAddr>")
    else:
        protocols = "".join(f"<Protocol><Type>{kind}</Type><EwsUrl>{escape(ews_url)}</EwsUrl>"
                            f"<ASUrl>{escape(ews_url)}</ASUrl></Protocol>" for kind in ("EXCH", "EXPR"))
        account = f"<AccountType>email</AccountType><Action>settings</Action>{protocols}"
        user = (f"<User><DisplayName>{escape(address)}</DisplayName>"
                f"<AutoDiscoverSMTPAddress>{escape(address)}</AutoDiscoverSMTPAddress></User>")
        return _document(f"{user}<Account>{account}</Account>")
    return _document(f"<Account>{account}</Account>")  # a redirect names no user


async def handle(emulator: Any, request: web.Request) -> web.StreamResponse:
    """``POST /autodiscover/autodiscover.xml`` with the same auth as EWS (``emulator`` is
    server.Emulator; not imported, server imports this module)."""
    body = await request.read()
    principal = emulator._principal(request)  # EWS's: who it is, or the 401 (an offer, an NTLM challenge)
    if principal is None:
        return emulator._unauthorized()
    if isinstance(principal, web.StreamResponse):
        return principal
    address = _requested_address(body)
    emulator.operations["Autodiscover"] += 1
    if not address or "@" not in address:
        # 600 is [MS-OXDSCLI]'s "Invalid request"
        return web.Response(body=_error(600, "Invalid Request"), content_type="text/xml", charset="utf-8")
    ews_url = f"{request.scheme}://{request.host}/EWS/Exchange.asmx"
    return web.Response(body=answer(address, ews_url, emulator.options.autodiscover_redirect),
                        content_type="text/xml", charset="utf-8")
