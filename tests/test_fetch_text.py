"""EwsFetcher.fetch_text: the text a reply added (EWS UniqueBody), over real HTTP through
unmodified exchangelib against the emulator. Out-of-office detection reads only this, so a
quoted out-of-office further down a human reply must not be in it."""
from __future__ import annotations

import pytest

from exchange_listener.core import config
from exchange_listener.sources.base import ItemGone
from exchange_listener.sources.ews.fetch import EwsFetcher

MAILBOX = "rep@ours.example"


def message(body: str, content_type: str = "text/plain") -> bytes:
    return (f"From: pat@prospect.example\r\nTo: {MAILBOX}\r\nSubject: Re: hello\r\n"
            f"Message-ID: <t-{abs(hash(body))}@prospect.example>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: {content_type}; charset=utf-8\r\n\r\n{body}").encode()


@pytest.fixture
def fetcher(emulator, redis_server):
    settings = config.load(env={}, overrides={"ews_url": emulator.ews_url, "ews_username": "svc",
                                              "ews_password": "svc-password", "redis_url": redis_server.url})
    f = EwsFetcher(settings)
    yield f
    f.close()


def test_fetch_text_is_the_new_part_of_a_reply_without_the_quoted_thread(emulator, fetcher):
    body = ("Thanks, I am back next week and will call you.\r\n\r\n"
            "On Mon, 30 Nov 2026 at 10:00, Rep <rep@ours.example> wrote:\r\n"
            "> I am out of the office until 14 December.\r\n")
    item = emulator.deliver(MAILBOX, message(body))
    text = fetcher.fetch_text(MAILBOX, item["item_id"])
    assert "back next week" in text
    assert "out of the office" not in text


def test_fetch_text_turns_html_into_text(emulator, fetcher):
    item = emulator.deliver(MAILBOX, message("<html><body><p>Je suis absent jusqu'au 14 d&eacute;cembre.</p>"
                                             "</body></html>", "text/html"))
    text = fetcher.fetch_text(MAILBOX, item["item_id"])
    assert "absent jusqu'au 14 décembre" in text and "<p>" not in text


def test_fetch_text_of_a_gone_item_says_gone(emulator, fetcher):
    item = emulator.deliver(MAILBOX, message("hello"))
    emulator.delete(item["item_id"], purge=True)
    with pytest.raises(ItemGone):
        fetcher.fetch_text(MAILBOX, item["item_id"])


def test_fetch_texts_reads_unique_body_as_exchangelibs_model_does(emulator, fetcher):
    """``fetch_texts`` reads the UniqueBody element itself; the text must equal what the
    model's Body / HTMLBody gave, plain and HTML alike."""
    from exchange_listener.mail.text import html_to_text
    from exchange_listener.sources.ews import fetch as fetch_module

    raws = [message("Plain answer.\r\n\r\nOn Mon wrote:\r\n> quoted\r\n"),
            message("<html><body><p>Bin bis 3.&nbsp;M&auml;rz weg.</p><div>Gru&szlig;</div></body></html>", "text/html"),
            message("")]
    ids = [emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    want = []
    for item in fetcher._get_items(MAILBOX, ids, fetch_module._TEXT_PATHS):
        body = item.unique_body
        text = "" if not body else html_to_text(str(body)) if type(body).__name__ == "HTMLBody" else str(body)
        want.append(text[:fetch_module.TEXT_LIMIT])
    assert fetcher.fetch_texts(MAILBOX, ids) == want
    assert want[0] and want[1]
