"""The return date an out-of-office states ("back on 14 December", "bis zum 14.12.",
"12月14日まで"), and whether its text states one at all.

Imports nothing from ``workers.classify``: ``auto_reply_text`` and ``headers`` read dates
through it.
"""
from __future__ import annotations

import datetime as dt
import re

from rq.timeouts import BaseTimeoutException

_RETURN_CUES = re.compile(
    r"(?:back|return(?:ing)?|returns|in the office|available again|reachable again)"
    r"(?:\s+(?:to|in|into)\s+(?:the\s+)?office)?\s+(?:on|by|from)?\s*"
    r"|(?:until|till|through|thru)\s+"
    r"|(?:bis\s+(?:zum|einschließlich|einschl\.|am)?|zurück\s+(?:am|ab)|"
    r"wieder\s+(?:im büro\s+|erreichbar\s+|da\s+)?(?:am|ab)|ab\s+dem|ab)\s*"
    r"|(?:de retour\s+(?:le|au bureau le)?|jusqu'au|jusqu’au|à partir du|a partir du|"
    r"retour prévu le|je serai de retour le|dès le)\s*"
    r"|(?:hasta el|de vuelta el|regresaré el|volveré el|a partir del|estaré de vuelta el)\s*"
    r"|(?:fino al|rientro il|di ritorno il|rientrerò il|a partire dal)\s*"
    r"|(?:tot en met|terug op|vanaf|weer aanwezig op|tot)\s+"
    r"|(?:até (?:o dia|dia|ao dia)?|de volta (?:no dia|em|a)?|regresso (?:a|em|no dia)?|"
    r"retorno (?:em|no dia|dia)?|a partir de|a partir do dia)\s*"
    r"|(?:do dnia|do|od dnia|od|wracam(?: dnia)?|powrót(?: dnia)?|będę dostępn[ya] od(?: dnia)?)\s+(?=\d)",
    re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?:(?<=\d{4}\.)|(?<=[^\d\W]{2}[.!?]))\s+(?=[A-ZÀ-ŽА-Я])")
_DATE_LANGS = ["en", "de", "fr", "es", "it", "nl", "pt", "pl"]
_WEEKDAYS = {name: i for i, names in enumerate([
    "monday montag lundi lunes lunedì lunedi maandag segunda-feira segunda poniedziałek",
    "tuesday dienstag mardi martes martedì martedi dinsdag terça-feira terça wtorek",
    "wednesday mittwoch mercredi miércoles miercoles mercoledì mercoledi woensdag quarta-feira quarta środa",
    "thursday donnerstag jeudi jueves giovedì giovedi donderdag quinta-feira quinta czwartek",
    "friday freitag vendredi viernes venerdì venerdi vrijdag sexta-feira sexta piątek",
    "saturday samstag samedi sábado sabato zaterdag sobota",
    "sunday sonntag dimanche domingo domenica zondag niedziela"]) for name in names.split()}
_WEEKDAY = r"(?:" + "|".join(sorted(map(re.escape, _WEEKDAYS), key=len, reverse=True)) + r")\b"
_MONTH = (r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|mär|mai|okt|dez|janv|févr|fév|avr|juil|déc|"
          r"ene|abr|ago|dic|gen|mag|giu|lug|ott|set|mei|maa|fev|out|sty|lut|kwi|cze|lip|sie|wrz|paź|lis|gru)"
          r"[^\W\d]*\.?")
_NOT_SENTENCE_END = r"(?:[^.;!?\n]|\.(?!\s+[A-ZÀ-Ž]))"
# A range states the absence's last day at its end: "from 1 Dec to 14 Dec", "between 21 December
# and 4 January", "du 28 décembre au 3 janvier", "od 28 grudnia do 3 stycznia", "21-23 December".
# Its start must hold a day or weekday ("from the team to you" is no range); a bare "9-17" is
# office hours, so a dash range needs a month after its end.
_RANGES = re.compile(
    r"\b(?:from|between|vom|von|du|del|desde(?:\s+el)?|de|dal|dalla|da|van|od|entre)\s+"
    r"(?=" + _NOT_SENTENCE_END + r"{0,12}?(?:\d|" + _WEEKDAY + r"))" + _NOT_SENTENCE_END + r"{1,30}?"
    r"(?:\s+(?:to|until|till|through|thru|and|bis(?:\s+zum|\s+einschließlich)?|au|jusqu'au|jusqu’au|al|"
    r"hasta\s+el|fino\s+al|tot(?:\s+en\s+met)?|a|ao|até(?:\s+(?:ao\s+)?dia)?|e|y|et|do)\s+|\s*[-–—]\s*)"
    r"|(?<![\d+])\d{1,2}(?:[./]\d{1,2}[./]?)?\.?(?:\s+" + _MONTH + r")?\s*[-–—]\s*"
    r"(?=\d{1,2}\.?\s*(?:[./]\d{1,2}|" + _MONTH + r"))",
    re.IGNORECASE)
_WHEN = re.compile(r"^(?:the\s+|le\s+|el\s+|il\s+|am\s+|on\s+|dem\s+|zum\s+|o\s+dia\s+|dia\s+)?"
                   r"(?:\d|" + _WEEKDAY + r"|" + _MONTH + r"\s+\d)", re.IGNORECASE)


def _cue_ends(text: str) -> list[int]:
    """Where a return date may start, in order: after each return cue, and after the
    connector of each date range (a cue inside a range's start, "od 28 grudnia", is the first
    day of the absence, not the return)."""
    ranges = [(m.start(), m.end()) for m in _RANGES.finditer(text)]
    ends = {end for _start, end in ranges}
    for cue in _RETURN_CUES.finditer(text):
        if not any(start <= cue.start() < end for start, end in ranges):
            ends.add(cue.end())
    return sorted(ends)


def states_return(text: str) -> bool:
    """The text says when its writer is back: a return cue followed by a date or weekday
    ("until 14 December", "bis zum 18.12.", "back on Monday", "12月14日まで") or a date range.
    A bare "until" or "bis" ("bis bald", "until we talk") is not enough."""
    text = " ".join(text[:20_000].split())
    for end in _cue_ends(text):
        after = text[end:end + 40]
        if _WHEN.match(after):
            return True
    return _has_ja_return(text)


def _has_ja_return(text: str) -> bool:
    return any(_JA_CUE.match(text[m.end():m.end() + 12]) for m in _JA_DATE.finditer(text[:20_000]))


# Japanese states the date before its cue: "12月14日（月）まで", "2026年12月14日より出社".
# dateparser reads a year-less "12月14日" as the year 2112, so these are read here.
_JA_DATE = re.compile(r"(?:(\d{4})\s*年\s*)?(\d{1,2})\s*月\s*(\d{1,2})\s*日|(\d{1,2})/(\d{1,2})(?![/\d])")
_JA_CUE = re.compile(r"^\s*(?:[（(][^）)]{1,4}[）)])?\s*(?:まで|より|から|に(?:出社|戻|帰社)|以降)")


def find_return_date_ja(text: str, base: dt.date | None) -> dt.date | None:
    """A Japanese return date ("12月14日まで", "2026年12月14日（月）より出社"), or None."""
    base = base or dt.date.today()
    for match in _JA_DATE.finditer(text[:20_000]):
        if not _JA_CUE.match(text[match.end():match.end() + 12]):
            continue
        year, month, day = match.group(1), match.group(2) or match.group(4), match.group(3) or match.group(5)
        try:
            found = dt.date(int(year) if year else base.year, int(month), int(day))
            if not year and found < base:
                found = found.replace(year=base.year + 1)
        except ValueError:
            continue
        if base <= found <= base + dt.timedelta(days=366):
            return found
    return None


def find_return_date(text: str, base: dt.date | None = None) -> dt.date | None:
    """The return date an out-of-office states ("back on 14 December", "bis zum 14.12.",
    "de retour le lundi 7 décembre", "hasta el 3 de enero"), or None. Dates are read
    relative to ``base`` (the message's date) and must fall within a year after it."""
    if not text:
        return None
    import dateparser  # imported lazily: only auto-replies pay for it

    base = base or dt.date.today()
    if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", text[:20_000]):
        found = find_return_date_ja(text, base)
        if found:
            return found
    start = dt.datetime.combine(base, dt.time())
    settings = {"PREFER_DATES_FROM": "future", "RELATIVE_BASE": start,
                "PREFER_DAY_OF_MONTH": "first", "REQUIRE_PARTS": ["day"]}
    text = " ".join(text[:20_000].split())
    tried = 0
    for end in _cue_ends(text):
        words = _SENTENCE_END.split(text[end:end + 60], maxsplit=1)[0].split()
        day = _WEEKDAYS.get(words[0].strip(".,;:!)").lower()) if words else None
        if day is not None and not any(ch.isdigit() for ch in " ".join(words[:4])):
            return base + dt.timedelta(days=(day - base.weekday() - 1) % 7 + 1)  # "back on Monday"
        for n in range(min(5, len(words)), 0, -1):
            candidate = " ".join(words[:n]).rstrip(".,;:!)")
            if not any(ch.isdigit() for ch in candidate):
                continue
            tried += 1
            try:
                dotted = re.fullmatch(r"\d{1,2}\.\d{1,2}\.(\d{2,4})?", candidate)  # day-first everywhere
                found = dateparser.parse(candidate, languages=_DATE_LANGS,
                                         settings={**settings, "DATE_ORDER": "DMY"} if dotted else settings)
            except BaseTimeoutException:  # RQ's job timeout must end the job
                raise
            except Exception:  # noqa: BLE001 - bad mail must not crash the worker
                found = None
            if found:  # the longest readable date after the cue decides for this cue
                if base <= found.date() <= base + dt.timedelta(days=366):
                    return found.date()
                break
            if tried > 40:
                return None
    return None
