"""Auto-replies and machine acknowledgements that say what they are only in their text.

Some out-of-office replies carry no auto headers and a plain "Re:" subject; some ticket
systems acknowledge a request with a plain reply. Only the start of the reply's own text is
read: quoted history below it (our send, or an earlier out-of-office we quoted) and the
signature never count, so a person who answers above a quoted auto-reply, or signs with
"Out of office Fridays", stays a person.

A person's answer must never read as an out-of-office: it would pause a sequence the person
asked to stop, or leave unanswered someone who said "yes, send the deck". So an
out-of-office needs all of:
- an absence *stated* in the opening (first ~200 characters), in the present or future, by
  the writer ("I am out of the office", "ich bin ... nicht im Büro", "不在にしております");
  "I was out last week" or a bare "out of the office" is not one;
- one more sign anywhere above the signature: a return date ("until 14 December", "from 1 to
  14 Dec"), "limited access to e-mail", "for urgent matters contact", "upon my return", or an
  explicit "this is an automatic reply" (in the opening or as the subject's prefix). A bare
  "urgent" or "until" is not one;
- no request, question or engagement: a "?" in the opening, "please send", "let's",
  "interested", "call me", "remove me", "yes", "sounds good" (in every language read).
"Thanks, I'm back next week and will call you" has no absence statement and stays human.
A ticket / CRM acknowledgement counts only for mail whose headers already name the platform
(see ``workers.classify.machine_mail``), never for a plain reply.
"""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
from email.message import Message

from rq.timeouts import BaseTimeoutException

from exchange_listener.mail.text import html_to_text
from workers.classify.return_date import find_return_date, states_return
from workers.classify.verdict import Classification, automatic_subject

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

OPENING_CHARS = 200        # where the absence must be stated (and a "?" marks a person)

# An explicit "this is an automatic reply" (with one more sign).
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

# Within one sentence: a period only after a digit ("bis zum 11. Dezember", "18.12.2026").
_S = r"(?:[^.!?\n]|(?<=\d)\.)"
# The writer states an absence, now or to come: the first sign.
_ABSENT = re.compile(
    r"\b(i am|i'm|i will be|i'll be|i shall be|[a-z]+ is|currently)\s+(currently\s+|now\s+|still\s+)?"
    r"(out of (the )?office|ooo\b|away\b|on (annual |parental |maternity |paternity |sick |study )?"
    r"(leave|vacation|holiday)|out of town|travell?ing|on a business trip|not in the office|off work|absent)|"
    r"\bich (bin|werde)\b" + _S + r"{0,60}\b(nicht im (büro|haus)|abwesend|im urlaub|außer haus|ausser haus|"
    r"nicht erreichbar|auf (dienst|geschäfts)reise|in elternzeit)|"
    r"\bich befinde mich\b" + _S + r"{0,40}\b(im urlaub|auf (dienst|geschäfts)reise|in elternzeit)|"
    r"\bje (suis|serai)\b" + _S + r"{0,40}\b(absente?|en (congés?|vacances|déplacement)|hors du bureau)|"
    r"\b(estoy|estaré|estare)\b" + _S + r"{0,40}\b(fuera de la oficina|de vacaciones|ausente|fuera)|"
    r"\b(sono|sarò|saro)\b" + _S + r"{0,40}\b(fuori (ufficio|sede)|in ferie|assente|in vacanza)|"
    r"\bik ben\b" + _S + r"{0,40}\b(afwezig|niet op kantoor|met vakantie|op vakantie|niet aanwezig)|"
    r"\b(estou|estarei)\b" + _S + r"{0,40}\b(fora do escritório|de férias|ausente|fora)|"
    r"\b(jestem|będę)\b" + _S + r"{0,40}\b(poza biurem|na urlopie|nieobecn[ya])|\bprzebywam na urlopie\b|"
    r"不在に?して(おり|い)(?!まし)|不在(です|となります)|休暇(を|で|中)|外出して(おり|い)(?!まし)|"
    r"出張(中|して(おり|い)(?!まし))|お休み(を|させて)", re.IGNORECASE)
# ... but not a past one ("sono stato fuori ufficio", "ich bin im Urlaub gewesen") nor a
# recurring one ("I am out of the office on Fridays").
_NOT_NOW = re.compile(
    r"\b(sono stat[oaie]|siamo stat[ie]|gewesen|geweest|was|were)\b|"
    r"\b(on|every) (mondays|tuesdays|wednesdays|thursdays|fridays|weekends)\b|"
    r"\b(montags|dienstags|mittwochs|donnerstags|freitags)\b", re.IGNORECASE)

# The second sign: what an out-of-office goes on to say.
_OOO_MORE = re.compile(
    r"limited access to (my )?e-?mails?|no access to (my )?e-?mails?|"
    r"\b(for|with|regarding|in case of) (any(thing)? )?urgent\b|\bif (it is|it's|this is|your (matter|request|enquiry|"
    r"inquiry) is) urgent\b|\banything urgent\b|\burgent (matters|enquiries|inquiries|requests|issues|cases)\b|"
    r"(will|shall) (respond|reply|get back|answer).{0,40}(return|back)|upon my return|"
    r"when i (return|am back|get back)|in my absence|"
    r"(wird|werden) nicht weitergeleitet|nach meiner rückkehr|in dringenden (fällen|angelegenheiten)|"
    r"bei dringenden (anliegen|fragen|angelegenheiten)|keinen zugriff auf (meine )?e-?mails?|"
    r"à mon retour|dès mon retour|en mon absence|en cas d'urgence|pour toute (urgence|demande urgente)|"
    r"a mi regreso|a mi vuelta|en mi ausencia|(para|en) (asuntos|casos|temas) urgentes|en caso de urgencia|"
    r"al mio rientro|al mio ritorno|in mia assenza|per urgenze|in caso di urgenza|per (questioni|richieste) urgenti|"
    r"na mijn terugkeer|bij mijn terugkomst|tijdens mijn afwezigheid|voor dringende (zaken|vragen)|"
    r"in dringende gevallen|"
    r"quando (eu )?(voltar|retornar)|no meu regresso|após o meu regresso|durante a minha ausência|"
    r"para (assuntos|questões) urgentes|em caso de urgência|"
    r"po moim powrocie|po powrocie|w czasie mojej nieobecności|w (pilnych sprawach|sprawach pilnych)|"
    r"帰社|戻り|出社|ご不便|緊急(の|時)", re.IGNORECASE)

# A person asking, agreeing or engaging: never an out-of-office.
_ENGAGED = re.compile(
    r"\byes\b|\b(sounds|looks) (good|great|interesting|fine)\b|\blet'?s\b|\blet us (talk|meet|set|schedule|chat)|"
    r"\binterest(ed|ing)\b|\b(please|pls|kindly) (send|share|forward|email) (me|us|over|it|more|some|pricing|"
    r"details|a (quote|proposal|deck|demo|copy))\b|\bsend (me|us|it over)\b|"
    r"\b(call|ring) me\b(?! (on|at) (my )?(mobile|cell|phone|\+|\d))|\bgive me a (call|ring)\b|"
    r"\b(remove|unsubscribe|take) (me|us)\b|\bunsubscribe\b|\bstop (emailing|e-mailing|sending|contacting)\b|"
    r"\bnot interested\b|\bno,? thank(s| you)\b|\bcount (me|us) in\b|\b(book|schedule|set up) a (call|meeting|demo)\b|"
    r"\bhappy to (chat|talk|meet|discuss|connect|hop on|set up|look)\b|\b(can|could|shall) (we|you) (chat|talk|speak|meet)\b|"
    r"\b(chat|talk|speak|catch up) (next week|then|soon|afterwards)\b|"
    r"\b(sprechen|reden|telefonieren) wir\b|"
    r"\b(aber )?ja\b|\b(schicken|senden) sie (mir|uns)\b|\bschick (mir|uns)\b|\binteress(iert|ant)\b|"
    r"\blassen sie uns\b|\blass uns\b|\bklingt (gut|interessant)\b|\brufen sie mich\b|"
    r"\b(entfernen|streichen|löschen) sie (mich|uns)\b|\babmelden\b|\baustragen\b|"
    r"\boui\b|\benvoyez[- ](moi|nous)\b|\bintéress(é|ée|és|ées|ant|e)\b|\b(ça|cela) (me|nous) (va|convient)\b|"
    r"\bappelez[- ](moi|nous)\b|\bparlons\b|\bdésinscri|\bretirez[- ](moi|nous)\b|"
    r"\bsí\b|\b(envíe|mánde|envía|manda)(me|nos)\b|\binteres(a|ado|ada|ante)\b|\bhablemos\b|\bllám(e|a)me\b|"
    r"\bsuena bien\b|\bd(a|e)r(me|nos) de baja\b|\belimín(e|a)(me|nos)\b|"
    r"\bsì\b|\bmi (mandi|invii)\b|\b(inviate|mandate|invia|manda)(mi|ci)\b|\binteress(a|ato|ata|ante)\b|"
    r"\bsentiamoci\b|\bmi chiami\b|\bchiamami\b|\bva bene\b|\b(cancellate|rimuovete)(mi|ci)\b|\bdisiscriv|"
    r"\bstuur (me|mij|ons)\b|\b(geïnteresseerd|interesse|interessant)\b|\blaten we\b|\bbel (me|mij)\b|"
    r"\bklinkt goed\b|\buitschrijven\b|\bverwijder (me|mij|ons)\b|"
    r"\bsim\b|\b(envie|mande)-(me|nos)\b|\binteress(ado|ada|ante|a-nos|a-me)\b|\bvamos (falar|conversar|marcar)\b|"
    r"\bligue-me\b|\bparece (bom|ótimo)\b|\bremova-(me|nos)\b|\bdescadastr|"
    r"(^|[.!?]\s*)tak\b|\bproszę (przesłać|wysłać)\b|\b(prześlij|wyślij)(cie)?\b|\bzainteresowan|\binteresuje\b|"
    r"\bporozmawiajmy\b|\bbrzmi dobrze\b|\bwypisz|\busuń(cie)? (mnie|nas)\b|"
    r"興味|ぜひ|是非|お送りください|送ってください|ご送付ください|打ち合わせ|配信停止", re.IGNORECASE)
_QUESTION = re.compile(r"[?？](\s|$)")

# Where the signature starts: "-- ", or a sign-off line below the first line.
_SIGNATURE = re.compile(
    r"^[ \t]*(--[ \t]*$|_{2,}[ \t]*$|((best|kind|warm|many)[ \t]+)?(regards|wishes)\b|"
    r"(thanks|thank you|many thanks|cheers|best|br)[ \t]*[,!.]?[ \t]*$|sent from my\b|"
    r"mit freundlichen grüßen|(viele|beste|liebe|freundliche) grüße|cordialement|bien à vous|"
    r"(un )?(cordial )?saludos?\b|atentamente|cordiali saluti|distinti saluti|"
    r"met (vriendelijke )?groet|vriendelijke groet|atenciosamente|(com os )?(melhores )?cumprimentos|"
    r"z poważaniem|pozdrawiam|pozdrowienia)", re.IGNORECASE | re.MULTILINE)

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


def own_words(head: str) -> str:
    """``head`` (see ``reply_head``) without its signature: what a signature says ("Out of
    office Fridays", "for urgent matters call ...") is never the reply."""
    first_line_end = head.find("\n")
    if first_line_end < 0:
        return head
    sign_off = _SIGNATURE.search(head, first_line_end + 1)
    return head[:sign_off.start()] if sign_off else head


def engaged(text: str, questions: bool = True) -> bool:
    """The writer asks, agrees or engages: a request, "let's", "interested", "yes", "remove
    me" anywhere in ``text``, or (with ``questions``) a question in its opening."""
    return bool(_ENGAGED.search(text) or questions and _QUESTION.search(text[:OPENING_CHARS]))


def _states_absence(own: str) -> bool:
    for found in _ABSENT.finditer(own[:OPENING_CHARS + 100]):
        if found.start() >= OPENING_CHARS:
            return False
        start = max(own.rfind(". ", 0, found.start()), own.rfind("\n", 0, found.start())) + 1
        ends = [i for i in (own.find(". ", found.end()), own.find("\n", found.end())) if i >= 0]
        if not _NOT_NOW.search(own[start:min(ends) if ends else len(own)]):
            return True
    return False


def looks_out_of_office(head: str, subject: str = "") -> str | None:
    """Why ``head`` (see ``reply_head``) reads as an out-of-office, or None (see the module's
    docstring for the rules)."""
    own = own_words(head)
    if engaged(own):
        return None
    absent = _states_absence(own)
    more = _OOO_MORE.search(own)
    if (_AUTOMATIC.search(own[:OPENING_CHARS]) or automatic_subject(subject)) and (absent or more):
        return "automatic-reply text"
    if absent and (more or states_return(own)):
        return "out-of-office text"
    return None


def looks_acknowledgement(head: str, subject: str = "") -> bool:
    """True when the text (or subject) of mail the headers already name as ticket-system / CRM
    mail is a "your request was received" notice that asks for nothing (an agent who writes
    "we've received your message, please send pricing" is a person)."""
    if not (_ACK.search(head) or _ACK.search(subject or "")):
        return False
    return not engaged(own_words(head), questions=False)


def auto_reply_from_text(text: str, subject: str = "", base: dt.date | None = None) -> Classification | None:
    """An ``auto_reply`` Classification (with ``return_date`` where the text states one) when
    the start of ``text`` (first text part or EWS UniqueBody, plain text) is an out-of-office
    or automatic reply; None otherwise. ``base`` is the reply's date (return dates are read
    relative to it; today when None)."""
    head = reply_head(text)
    reason = looks_out_of_office(head, subject)
    if not reason:
        return None
    found = Classification(kind="auto_reply", reasons=[reason])
    found.return_date = find_return_date(f"{subject or ''}\n{head}", base)
    if found.return_date:
        found.reasons.append("return date in text")
    return found
