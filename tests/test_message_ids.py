"""Message-ID parsing and generation: examples from real clients, and hypothesis properties."""
from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from exchange_listener.mail.message_ids import (
    MAX_ID_LENGTH,
    new_message_id,
    normalize,
    parse_id_list,
    references_of,
)

# --- normalize ----------------------------------------------------------------------------


def test_normalize_canonical_form():
    assert normalize("  <Abc.123@Mail.Example.COM>\r\n") == "<Abc.123@mail.example.com>"
    assert normalize("abc@example.com") == "<abc@example.com>"          # brackets missing
    assert normalize("<CaseKept@x.org>") == "<CaseKept@x.org>"        # local part case kept
    assert normalize("<abc@exa\r\n mple.com>") == "<abc@example.com>"  # folded inside
    assert normalize("<test-reference-id>") == "<test-reference-id>"  # bracketed, no @


def test_normalize_rejects_garbage():
    for bad in ("", "   ", "<>", "word", "<a@>", "<@b>", "<a<b@c>", "a@b>", None, 42,
                "<a\x00b@c>", "<" + "a" * MAX_ID_LENGTH + "@b>"):
        assert normalize(bad) is None, bad


# --- parse_id_list ------------------------------------------------------------------------


def test_parse_id_list_real_forms():
    assert parse_id_list("<a@x.com> <b@y.com>") == ["<a@x.com>", "<b@y.com>"]
    assert parse_id_list("<a@x.com>,<b@y.com>, <c@z.com>") == ["<a@x.com>", "<b@y.com>", "<c@z.com>"]
    assert parse_id_list("<a@x.com>\r\n <b@y.com>\r\n\t<c@z.com>") == ["<a@x.com>", "<b@y.com>", "<c@z.com>"]
    assert parse_id_list("<a@x.com><b@y.com>") == ["<a@x.com>", "<b@y.com>"]           # jammed
    assert parse_id_list('"<a@x.com>,<b@y.com>"') == ["<a@x.com>", "<b@y.com>"]        # quoted
    assert parse_id_list("a@x.com b@y.com") == ["<a@x.com>", "<b@y.com>"]               # no brackets
    gnus = '<87k0abc.fsf@gnus.org> (Jane Doe\'s message of "Mon, 01 Dec 2026 10:00:00 +0100")'
    assert parse_id_list(gnus) == ["<87k0abc.fsf@gnus.org>"]
    assert parse_id_list("<a@x.com> <b@y.com> <trunc@exa") == ["<a@x.com>", "<b@y.com>", "<trunc@exa>"]
    assert parse_id_list("<a@x.com> <a@X.COM> <b@y.com> <a@x.com>") == ["<a@x.com>", "<b@y.com>"]
    assert parse_id_list(None) == [] and parse_id_list("") == [] and parse_id_list("(just a comment)") == []


def test_an_unclosed_comment_never_swallows_the_ids_after_it():
    """Two References headers are read as one list; a comment left open in the first (found by
    the property test of handle_mail) must not hide the id of our send in the second."""
    assert parse_id_list("( <prop-send@ours.example>") == ["<prop-send@ours.example>"]
    assert parse_id_list("(truncated comment <a@x.com> <b@y.com>") == ["<a@x.com>", "<b@y.com>"]
    assert references_of(None, "( " + "<a@x.com>") == ["<a@x.com>"]


def test_references_of_puts_in_reply_to_first():
    refs = references_of("<c@z.com>", "<a@x.com> <b@y.com> <c@z.com>")
    assert refs == ["<c@z.com>", "<a@x.com>", "<b@y.com>"]
    assert references_of(None, None) == []


def test_limit():
    value = " ".join(f"<id{i}@example.com>" for i in range(50))
    assert len(parse_id_list(value, limit=10)) == 10
    assert len(references_of(value, value, limit=7)) == 7


# --- new_message_id -----------------------------------------------------------------------

_RFC5322_MSG_ID = re.compile(r"^<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                             r"@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*>$")


def test_new_message_id_valid_unique_and_canonical():
    ids = {new_message_id("Vendor.Example") for _ in range(2000)}
    assert len(ids) == 2000
    for msgid in ids:
        assert _RFC5322_MSG_ID.match(msgid), msgid
        assert msgid.endswith("@vendor.example>")
        assert normalize(msgid) == msgid
        assert parse_id_list(f"Re: {msgid}, <other@x.org>")[0] == msgid
    # unguessable: 160 random bits, not a counter or a clock
    left = sorted(m.split("@")[0] for m in ids)
    assert min(len(x) for x in left) >= 27


def test_new_message_id_rejects_bad_domain():
    import pytest
    for bad in ("", "exa mple.com", "a@b", "-bad.com", "x\r\nBcc: evil@x.com"):
        with pytest.raises(ValueError):
            new_message_id(bad)


# --- properties ---------------------------------------------------------------------------

_atext = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-",
                 min_size=1, max_size=20)
_local = st.lists(_atext, min_size=1, max_size=3).map(".".join)
_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-", min_size=1, max_size=12)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_msgid = st.builds(lambda l, d: f"{l}@{d}", _local, _domain)
_sep = st.sampled_from([" ", ",", ", ", "", "\r\n ", "\n\t", " ,\r\n  ", "  "])


@given(st.text(max_size=500))
@settings(max_examples=400, deadline=None)
def test_parsers_never_crash_and_stay_canonical(text):
    ids = parse_id_list(text)
    assert len(ids) == len(set(ids))
    for msgid in ids:
        assert normalize(msgid) == msgid
    references_of(text, text)
    one = normalize(text)
    assert one is None or normalize(one) == one


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_normalize_idempotent(text):
    once = normalize(text)
    if once is not None:
        assert once.startswith("<") and once.endswith(">")
        assert normalize(once) == once


@given(st.lists(_msgid, min_size=1, max_size=30), st.data(), st.booleans(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_parse_recovers_generated_ids(ids, data, brackets, quoted):
    """Whatever separators or folding a client uses, every id comes back, in order."""
    parts = []
    for msgid in ids:
        parts.append(f"<{msgid}>" if brackets else msgid)
        sep = data.draw(_sep)
        parts.append(sep or (" " if not brackets else ""))  # bare ids need some separator
    value = "".join(parts)
    if quoted:
        value = f'"{value}"'
    expected = []
    for msgid in ids:
        norm = normalize(msgid)
        if norm not in expected:
            expected.append(norm)
    assert parse_id_list(value) == expected


def test_ten_thousand_ids_in_linear_time():
    """A 10,000-id References parses completely, and 10x the input costs about 10x the time."""
    big = "\r\n ".join(f"<{i:05d}.thread@example.com>" for i in range(10000))
    small = big[: len(big) // 10]

    def cost(value: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            parse_id_list(value)
            best = min(best, time.process_time() - start)
        return best

    ids = parse_id_list(big)
    assert len(ids) == 10000 and ids[0] == "<00000.thread@example.com>"
    assert len(parse_id_list(big + " <extra@x.com>", limit=10000)) == 10000
    assert cost(big) < 30 * max(cost(small), 1e-4)  # generous: quadratic would be ~100x
