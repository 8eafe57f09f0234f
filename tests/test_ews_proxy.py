"""EWS through a proxy named in the environment, as requests honours HTTP(S)_PROXY: the sessions
read the environment once per host (``sources.ews.account.remember_environment``), not on every
request, and must still send every request through the proxy. Real emulator, real HTTP; the
proxy is a TCP forwarder (the emulator's server takes the absolute-form request line a client
sends a plain-HTTP proxy), and the EWS URL names a host that does not resolve, so only requests
that went through the proxy can succeed."""
from __future__ import annotations

import mail_samples as mail
import requests
from tcp_proxy import TcpProxy

from exchange_listener.core import config
from exchange_listener.sources.ews.account import remember_environment
from exchange_listener.sources.ews.fetch import EwsFetcher

MAILBOX = "rep@ours.example"


def test_ews_requests_go_through_the_proxy_the_environment_names(emulator, monkeypatch, redis_server):
    proxy = TcpProxy("127.0.0.1", emulator.port)
    try:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        # a host only the proxy can reach: a request that skipped the proxy would fail to resolve it
        only_via_proxy = emulator.ews_url.replace("127.0.0.1", "ews.invalid")
        settings = config.load(env={}, overrides={"redis_url": redis_server.url, "ews_url": only_via_proxy,
                                                  "ews_username": "svc", "ews_password": "svc-password"})
        fetcher = EwsFetcher(settings)
        items = [emulator.deliver(MAILBOX, mail.reply(sender="pat@prospect.example", to=MAILBOX, in_reply_to=None,
                                                      references=None))["item_id"] for _ in range(3)]
        for item in items:  # one request each, on the session's kept-alive connection to the proxy
            (fetched,) = fetcher.fetch(MAILBOX, [item])
            assert fetched.item_id == item
        assert proxy.accepted >= 1
        session = fetcher._account(MAILBOX).protocol.get_session()  # the sessions merge the environment once
        assert session.merge_environment_settings.__name__ == "merged"
        fetcher._account(MAILBOX).protocol.release_session(session)
        fetcher.close()
    finally:
        proxy.close()


def test_the_environment_is_merged_once_per_host_and_arguments(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = remember_environment(requests.Session())
    first = session.merge_environment_settings("https://mail.ours.example/EWS/Exchange.asmx", {}, False, True, None)
    assert first["proxies"]["https"] == "http://proxy.example:3128"
    first["proxies"]["https"] = "changed by a caller"  # never leaks into the next answer
    monkeypatch.setenv("HTTPS_PROXY", "http://other.example:3128")
    again = session.merge_environment_settings("https://mail.ours.example/EWS/Exchange.asmx", {}, False, True, None)
    assert again["proxies"]["https"] == "http://proxy.example:3128"
    # another host (or other arguments) is merged from the environment as it is now
    other = session.merge_environment_settings("https://autodiscover.ours.example/x", {}, False, True, None)
    assert other["proxies"]["https"] == "http://other.example:3128"
