"""Auto-replies and machine acknowledgements that say what they are only in their text.

Some out-of-office replies carry no auto headers and a plain "Re:" subject; some ticket
systems acknowledge a request with a plain reply. Only the start of the reply's own text is
read: quoted history below it (our send, or an earlier out-of-office we quoted) never counts,
so a person who answers above a quoted auto-reply stays a person.

An out-of-office needs two signs in the head of the text: an absence statement ("I am out of
the office", "ich bin nicht im Büro", "不在にしております") plus one more (a return date cue, a
"limited access to e-mail", "in urgent cases contact", "your message will not be forwarded",
or an explicit "this is an automatic reply", which settles it alone). "Thanks, I'm back next
week and will call you" has none of the absence statements and stays human.
"""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import html as html_lib
import re
from email.message import Message

from rq.timeouts import BaseTimeoutException

HEAD_CHARS = 1500          # of the reply's own text, after quoted history is cut off
FIRST_TEXT_LIMIT = 8192    # characters taken from the first text part

# Where the quoted history starts, in the clients and languages we read.
_QUOTE_START = re.compile(
    r"^\s*>"
    r"|^-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|mensaje original|"
    r"messaggio originale|oorspronkelijk bericht|mensagem original|wiadomość oryginalna|"
    r"元のメッセージ|forwarded message)"
    r"|^_{5,}\s*$"
    r"|^\s*(from|von|de|da|van|od|差出人|送信者)\s*:\s*.+"
    r"|^\s*on .{4,200}(wrote|a écrit)\s*:?\s*$"
    r"|^\s*am .{4,200}schrieb .{0,200}:?\s*$"
    r"|^\s*le .{4,200}a écrit\s*:?\s*$"
    r"|^\s*el .{4,200}escribió\s*:?\s*$"
    r"|^\s*il .{4,200}ha scritto\s*:?\s*$"
    r"|^\s*op .{4,200}(schreef|geschreven)[^:\n]{0,100}:?\s*$"
    r"|^\s*(em|no dia) .{4,200}escreveu\s*:?\s*$"
    r"|^\s*(w dniu|dnia) .{4,200}(napisał|napisała|pisze)[^:\n]{0,60}:?\s*$"
    r"|^.{0,200}(書きました|のメッセージ)\s*[:：]?\s*$",
    re.IGNORECASE | re.MULTILINE)

# An explicit "this is an automatic reply" settles it alone.
_AUTOMATIC = re.compile(
    r"this is an? (automatic|automated|auto-generated) (reply|response|message)|"
    r"\bauto(matic|mated)?[- ]?(reply|response)\b|"
    r"(dies ist eine )?automatische (antwort|abwesenheitsnotiz|nachricht)|abwesenheitsnotiz|"
    r"(ceci est une )?réponse automatique|message automatique|"
    r"(esta es una )?respuesta automática|mensaje automático|"
    r"(questa è una )?risposta automatica|messaggio automatico|"
    r"(dit is een )?automatisch (antwoord|bericht|gegenereerd)|"
    r"(esta é uma )?resposta automática|mensagem automática|"
    r"(to jest )?automatyczna (odpowiedź|wiadomość)|wiadomość wygenerowana automatycznie|"
    r"自動(返信|応答|送信)|このメールは自動", re.IGNORECASE)

# Absence statements: the first sign.
_ABSENT = re.compile(
    r"\b(i am|i'm|i will be|i'll be|i am currently|i'm currently|currently)\s+(currently\s+)?"
    r"(out of (the )?office|ooo|away|on (annual |parental |maternity |sick )?(leave|vacation|holiday)|"
    r"out of town|travell?ing|not in the office|off work|absent)|\bout of (the )?office\b|"
    r"\bich bin\b.{0,60}\b(nicht im (büro|haus)|abwesend|im urlaub|außer haus|ausser haus|"
    r"nicht erreichbar)|\b(abwesend|im urlaub|außer haus)\b|"
    r"\bje (suis|serai)\b.{0,40}\b(absente?|en (congés?|vacances|déplacement)|hors du bureau)|"
    r"\babsente? du bureau\b|"
    r"\b(estoy|estaré)\b.{0,40}\b(fuera de la oficina|de vacaciones|ausente|fuera)|"
    r"\bfuera de la oficina\b|"
    r"\b(sono|sarò|saro)\b.{0,40}\b(fuori (ufficio|sede)|in ferie|assente|in vacanza)|"
    r"\bfuori (ufficio|sede)\b|"
    r"\bik ben\b.{0,40}\b(afwezig|niet op kantoor|met vakantie|op vakantie|niet aanwezig)|"
    r"\b(estou|estarei)\b.{0,40}\b(fora do escritório|de férias|ausente|fora)|"
    r"\bfora do escritório\b|"
    r"\b(jestem|będę)\b.{0,40}\b(poza biurem|na urlopie|nieobecn[ya])|\bprzebywam na urlopie\b|"
    r"\bpoza biurem\b|"
    r"不在に?して(おり|い)|不在(です|となります)|休暇(を|で|中)|外出して(おり|い)|出張(中|して)|"
    r"お休み(を|させて)", re.IGNORECASE)

# The second sign: what an out-of-office goes on to say.
_OOO_MORE = re.compile(
    r"limited access to (my )?e-?mail|no access to (my )?e-?mail|"
    r"(urgent|dringend|urgente|urgent(e|es)|pilne|緊急)|"
    r"(will|shall) (respond|reply|get back|answer).{0,40}(return|back)|upon my return|"
    r"when i (return|am back|get back)|in my absence|"
    r"(wird|werden) nicht weitergeleitet|nach meiner rückkehr|in dringenden fällen|"
    r"à mon retour|dès mon retour|en mon absence|"
    r"a mi regreso|a mi vuelta|en mi ausencia|"
    r"al mio rientro|al mio ritorno|in mia assenza|"
    r"na mijn terugkeer|bij mijn terugkomst|tijdens mijn afwezigheid|"
    r"quando (eu )?(voltar|retornar)|no meu regresso|após o meu regresso|durante a minha ausência|"
    r"po moim powrocie|po powrocie|w czasie mojej nieobecności|"
    r"帰社|戻り|出社|ご不便", re.IGNORECASE)

# Ticket-system / CRM acknowledgements: a machine, not a person.
_ACK = re.compile(
    r"(your|the) (request|ticket|case|incident|enquiry|inquiry)\b.{0,60}\b"
    r"(has been|was|is) (received|created|opened|logged|submitted|registered)|"
    r"(we|we've|we have) (have )?received your (request|message|e-?mail|enquiry|inquiry)|"
    r"(request|ticket|case|incident) (received|created|opened|logged)\b|"
    r"(ticket|request|case|incident) (number|no\.?|id|#)\s*[:#]?\s*[A-Z]{0,6}\d{2,}.{0,80}"
    r"(received|created|opened|assigned)|"
    r"\[(request received|ticket received|created)\]|"
    r"ihre? (anfrage|ticket|nachricht).{0,60}(ist eingegangen|wurde (erstellt|empfangen|erfasst))|"
    r"votre (demande|ticket).{0,60}a (bien )?été (reçue?|créée?|enregistrée?)|"
    r"su (solicitud|ticket|caso).{0,60}(ha sido|fue) (recibid[oa]|cread[oa]|registrad[oa])|"
    r"la (sua|tua) (richiesta|segnalazione).{0,60}(è stata|e' stata) (ricevuta|creata|registrata)|"
    r"uw (verzoek|aanvraag|ticket).{0,60}is (ontvangen|aangemaakt|geregistreerd)|"
    r"(sua|seu) (solicitação|pedido|chamado|ticket).{0,60}foi (recebid[oa]|criad[oa]|registrad[oa])|"
    r"(twoje|pana|pani) (zgłoszenie|zapytanie).{0,60}zostało (przyjęte|utworzone|zarejestrowane)|"
    r"お問い合わせ.{0,30}(受け付け|受付)", re.IGNORECASE | re.DOTALL)

_WS = re.compile(r"[ \t\u00a0\u3000]+")
_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(r"<(br|/p|/div|/tr|/li|/h\d|blockquote|/blockquote)\b[^>]{0,2000}>",
                         re.IGNORECASE)
_HTML_QUOTE = re.compile(r"<blockquote\b|<div[^>]{0,300}(gmail_quote|divRplyFwdMsg|OLK_SRC_BODY_SECTION|"
                         r"moz-cite-prefix|yahoo_quoted|appendonsend)", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]{0,2000}>")


def html_to_text(html: str) -> str:
    """Rough text of an HTML body: quoted history (blockquote, client quote markers) dropped,
    breaks kept as new lines. Good enough for reading the first lines; not a renderer."""
    quote = _HTML_QUOTE.search(html)
    if quote:
        html = html[:quote.start()]
    html = _HTML_BREAK.sub("\n", _HTML_DROP.sub(" ", html))
    return html_lib.unescape(_HTML_TAG.sub(" ", html)).replace("\u00a0", " ")


def first_text(raw: bytes | str | Message, limit: int = FIRST_TEXT_LIMIT) -> str:
    """The first text/plain part of a message (else the first text/html, stripped to text),
    decoded and cut to ``limit`` characters. Never raises: unreadable mail gives ""."""
    try:
        msg = raw if isinstance(raw, Message) else (
            email.message_from_bytes(raw, policy=email.policy.compat32) if isinstance(raw, bytes)
            else email.message_from_string(raw, policy=email.policy.compat32))
        html = None
        for count, part in enumerate(msg.walk()):
            if count > 200:
                break
            ctype = part.get_content_type()
            if part.get_content_disposition() == "attachment" or part.get("content-id") and ctype != "text/plain":
                continue
            if ctype == "text/plain":
                return _decoded_text(part)[:limit]
            if ctype == "text/html" and html is None:
                html = part
        if html is not None:
            return html_to_text(_decoded_text(html, limit * 8))[:limit]
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return ""
    return ""


def _decoded_text(part: Message, max_bytes: int = FIRST_TEXT_LIMIT * 4) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload[:max_bytes] if isinstance(payload, str) else ""
    data = data[:max_bytes]
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError):
        return data.decode("utf-8", "replace")


def reply_head(text: str, chars: int = HEAD_CHARS) -> str:
    """The reply's own words: the text above the first quoted-history marker, whitespace
    collapsed, at most ``chars`` characters."""
    text = (text or "")[:FIRST_TEXT_LIMIT]
    quote = _QUOTE_START.search(text)
    if quote:
        text = text[:quote.start()]
    return _WS.sub(" ", text).strip()[:chars]


def looks_out_of_office(head: str, subject: str = "") -> str | None:
    """Why ``head`` (see ``reply_head``) reads as an out-of-office, or None."""
    automatic = _AUTOMATIC.search(head) or _AUTOMATIC.search(subject or "")
    absent = _ABSENT.search(head)
    if automatic and (absent or _OOO_MORE.search(head)):
        return "automatic-reply text"
    if absent and (_OOO_MORE.search(head) or _has_return_cue(head)):
        return "out-of-office text"
    return None


def looks_acknowledgement(head: str, subject: str = "") -> bool:
    """True when the text (or subject) is a ticket/CRM "your request was received" notice."""
    return bool(_ACK.search(head) or _ACK.search(subject or ""))


def _has_return_cue(head: str) -> bool:
    from workers.classify import RETURN_CUES, find_return_date_ja

    return bool(RETURN_CUES.search(head)) or find_return_date_ja(head, None) is not None


def auto_reply_from_text(text: str, subject: str = "", base: dt.date | None = None):
    """An ``auto_reply`` Classification (with ``return_date`` where the text states one) when
    the start of ``text`` (first text part or EWS UniqueBody, plain text) is an out-of-office
    or automatic reply; None otherwise. ``base`` is the reply's date (return dates are read
    relative to it; today when None)."""
    from workers.classify import Classification, find_return_date

    head = reply_head(text)
    reason = looks_out_of_office(head, subject)
    if not reason:
        return None
    found = Classification(kind="auto_reply", reasons=[reason])
    found.return_date = find_return_date(f"{subject or ''}\n{head}", base)
    if found.return_date:
        found.reasons.append("return date in text")
    return found
