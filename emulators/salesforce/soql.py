"""The part of SOQL the emulator answers: one object, equality filters joined by AND, a LIMIT.

Grammar (keywords in any case)::

    SELECT field [, field]* FROM object [WHERE field = value [AND field = value]*] [LIMIT n]
    value: 'quoted string' | true | false | null

Quoted strings take SOQL's escapes (``\\n \\r \\t \\b \\f \\" \\' \\\\``); ``\\_`` and ``\\%`` belong
to LIKE, which is not supported, so they and any other backslash sequence are a malformed
query, as an unescaped quote is. Anything outside the grammar is ``SoqlError``, which the server
answers with 400 MALFORMED_QUERY as Salesforce does.
"""
from __future__ import annotations

import dataclasses
import re

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}
_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:[^'\\]|\\.)*')|(?P<word>[A-Za-z_][A-Za-z0-9_.]*)|(?P<number>\d+)"
                    r"|(?P<punct>[,=])|(?P<bad>\S))", re.DOTALL)


class SoqlError(ValueError):
    """The query is outside what the emulator (or SOQL) accepts."""


@dataclasses.dataclass(frozen=True)
class Query:
    fields: tuple[str, ...]
    sobject: str
    where: tuple[tuple[str, object], ...]  # (field, value): value is str, bool or None
    limit: int | None


def unescape(quoted: str) -> str:
    """The text of a quoted SOQL string (quotes included in ``quoted``)."""
    body, out, i = quoted[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt not in _ESCAPES:
                raise SoqlError(f"Invalid string literal {quoted!r}. Illegal character sequence '\\{nxt}' in string "
                                "literal.")
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def quote(text: str) -> str:
    """``text`` as a quoted SOQL string literal (what a client must send)."""
    return "'" + "".join("\\" + c if c in "'\\" else {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
                                                     "\f": "\\f"}.get(c, c) for c in text) + "'"


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            break
        pos = match.end()
        kind = match.lastgroup or "bad"
        if kind == "bad":
            raise SoqlError(f"unexpected token: {match.group(kind)!r}")
        out.append((kind, match.group(kind)))
    if text[pos:].strip():
        raise SoqlError("unexpected end of query")
    return out


def parse(text: str) -> Query:
    tokens = _tokens(text)
    pos = 0

    def take(kind: str | None = None, word: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise SoqlError(f"unexpected end of query, expecting {word or kind}")
        got_kind, value = tokens[pos]
        if (kind and got_kind != kind) or (word and value.upper() != word):
            raise SoqlError(f"unexpected token: {value!r}, expecting {word or kind}")
        pos += 1
        return value

    def peek(word: str) -> bool:
        return pos < len(tokens) and tokens[pos][0] == "word" and tokens[pos][1].upper() == word

    take("word", "SELECT")
    fields = [take("word")]
    while pos < len(tokens) and tokens[pos] == ("punct", ","):
        pos += 1
        fields.append(take("word"))
    if any(f.upper() in ("FROM", "WHERE", "LIMIT") for f in fields):
        raise SoqlError("unexpected token: 'FROM'")
    take("word", "FROM")
    sobject = take("word")
    where: list[tuple[str, object]] = []
    if peek("WHERE"):
        pos += 1
        while True:
            field = take("word")
            take("punct")  # only '=' is a punct token besides ','
            if tokens[pos - 1][1] != "=":
                raise SoqlError("unexpected token: ','")
            if pos < len(tokens) and tokens[pos][0] == "string":
                value: object = unescape(take("string"))
            else:
                literal = take("word").lower()
                if literal not in ("true", "false", "null"):
                    raise SoqlError(f"unexpected token: {literal!r}")
                value = {"true": True, "false": False, "null": None}[literal]
            where.append((field, value))
            if not peek("AND"):
                break
            pos += 1
    limit = None
    if peek("LIMIT"):
        pos += 1
        limit = int(take("number"))
    if pos != len(tokens):
        raise SoqlError(f"unexpected token: {tokens[pos][1]!r}")
    return Query(tuple(fields), sobject, tuple(where), limit)
