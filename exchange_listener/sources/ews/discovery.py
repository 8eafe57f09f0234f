"""Where the EWS endpoint is (POX autodiscover, cached in Redis) and whether its TLS certificate
is trusted, checked once at start so a wrong trust setting is one clear line, not a retry loop.

Autodiscover: exchangelib 5.x speaks only SOAP autodiscover (``autodiscover.svc``), requires
every candidate host to resolve in DNS and takes no explicit endpoint, so POX autodiscover
(``/autodiscover/autodiscover.xml``, what on-premises Exchange serves) is done here, on a session
exchangelib makes (same auth: basic, NTLM, OAuth2; same trust: ``adapter_class``). Shapes
and steps follow Microsoft's "Autodiscover for Exchange" and "POX Autodiscover request/response"
pages and [MS-OXDSCLI]: ask ``autodiscover_url`` when set, else https://DOMAIN/..., then
https://autodiscover.DOMAIN/..., then the redirect an unauthenticated GET to
http://autodiscover.DOMAIN/... answers, then the ``_autodiscover._tcp.DOMAIN`` SRV record;
follow ``redirectUrl``/``redirectAddr`` answers and HTTP 302s, at most 10 (the Action (POX)
page: "stop redirecting after 10 redirects"); take the EXCH protocol's ``EwsUrl``, else EXPR's.

The URL found is kept in Redis (``keys.EWS_AUTODISCOVER``, per address) so every listener and
worker shares one answer and a restart does not ask again. It is re-discovered when the cached
endpoint redirects or is gone (HTTP 3xx/404 at a listener's start) and when autodiscover itself
redirects (followed as above).
"""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree

import redis
import requests
import requests.adapters
from exchangelib.protocol import NoVerifyHTTPAdapter
from exchangelib.transport import BASIC, NTLM, OAUTH2

from exchange_listener.core import keys, logs, redis_conn
from exchange_listener.core.config import ConfigError, Settings

POX_PATH = "/autodiscover/autodiscover.xml"
REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
MAX_REDIRECTS = 10  # Microsoft, Action (POX): the client should stop redirecting after 10 redirects
TIMEOUT = 15.0  # seconds per autodiscover or probe request
_NAME_MISMATCH = {62, 64}  # OpenSSL X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH

AUTH = {"basic": BASIC, "ntlm": NTLM, "oauth2": OAUTH2}  # auth_type -> exchangelib's name
Credentials = Callable[[], Any]  # makes the exchangelib credentials (account.make_credentials), when needed

log = logs.get_logger(component="ews-discovery")
_conns: dict[str, redis.Redis] = {}
_lock = threading.Lock()


class AutodiscoverFailed(ConfigError):
    """No EWS URL could be found (one line: the address, what was asked, what to set)."""


def _redis(settings: Settings) -> redis.Redis:
    with _lock:
        conn = _conns.get(settings.redis_url)
        if conn is None:
            conn = _conns[settings.redis_url] = redis_conn.connect(settings.redis_url)
        return conn


# -- TLS --------------------------------------------------------------------------------------
class _CAFileAdapter(requests.adapters.HTTPAdapter):
    """Verifies against ``ca_file`` whatever a request asks (exchangelib never passes ``verify``)."""

    ca_file = ""

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, self.ca_file, cert)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        # requests >= 2.32.3 picks the connection pool by TLS settings here (as NoVerifyHTTPAdapter does)
        return super().get_connection_with_tls_context(request, self.ca_file, proxies=proxies, cert=cert)


_CA_ADAPTERS: dict[str, type[requests.adapters.HTTPAdapter]] = {}


def adapter_class(settings: Settings) -> type[requests.adapters.HTTPAdapter]:
    """The HTTP adapter class for ``settings``' trust (verify_tls, then ca_file), one per CA file."""
    if not settings.verify_tls:
        return NoVerifyHTTPAdapter
    if not settings.ca_file:
        return requests.adapters.HTTPAdapter
    return _CA_ADAPTERS.setdefault(settings.ca_file, type("CAFileAdapter", (_CAFileAdapter,), {"ca_file": settings.ca_file}))


def check_tls(settings: Settings, url: str, what: str = "EWS server") -> None:
    """Raise a one-line ``ConfigError`` when ``url``'s certificate is untrusted or names another
    host; anything else (refused, timeout) is left to the caller's retries."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not settings.verify_tls:
        return
    host, port = parts.hostname or "", parts.port or 443
    try:
        context = ssl.create_default_context(cafile=settings.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_file: cannot read {settings.ca_file!r} as PEM CA certificates "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(_tls_line(settings, what, f"{host}:{port}", exc)) from None
    except OSError:
        return  # down or unreachable: not a trust problem; the normal retries handle it


def _tls_line(settings: Settings, what: str, where: str, exc: ssl.SSLCertVerificationError) -> str:
    reason = exc.verify_message or str(exc)
    if exc.verify_code in _NAME_MISMATCH:
        return (f"{what} {where}: TLS name mismatch, its certificate is not issued for this host name "
                f"({reason}); use a host name the certificate names in the URL, or have it reissued")
    trusted = f"ca_file ({settings.ca_file})" if settings.ca_file else "the system's CAs (ca_file is empty)"
    return (f"{what} {where}: TLS certificate not trusted, untrusted CA ({reason}; checked against {trusted}); "
            "set ca_file to the PEM file of the CA that issued it (verify_tls = false turns checking off, tests only)")


# -- POX autodiscover -------------------------------------------------------------------------
def _session(settings: Settings, credentials: Credentials, url: str) -> requests.Session:
    """A session with the EWS credentials and trust for ``url`` (exchangelib builds it)."""
    from exchangelib import Configuration
    from exchangelib.protocol import BaseProtocol

    BaseProtocol.HTTP_ADAPTER_CLS = adapter_class(settings)
    config = Configuration(service_endpoint=url, credentials=credentials(), auth_type=AUTH[settings.auth_type])
    session: requests.Session = BaseProtocol(config).create_session()
    return session


def _request(address: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{REQUEST_NS}"><Request>'
            f"<EMailAddress>{address}</EMailAddress><AcceptableResponseSchema>{RESPONSE_SCHEMA}"
            "</AcceptableResponseSchema></Request></Autodiscover>").encode()


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _find(parent: Any, name: str) -> Any:
    return next((child for child in parent if _local(child.tag) == name), None)


def _text(parent: Any, name: str) -> str:
    found = _find(parent, name)
    return (found.text or "").strip() if found is not None else ""


def parse_response(body: bytes) -> tuple[str, str]:
    """``(action, value)`` of a POX answer: ("settings", EWS URL), ("redirectUrl", URL),
    ("redirectAddr", address) or ("error", message)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "error", "the answer is not XML"
    response = _find(root, "Response")
    if response is None:
        return "error", "no Response element"
    error = _find(response, "Error")
    if error is not None:
        return "error", f"{_text(error, 'ErrorCode')} {_text(error, 'Message')}".strip()
    account = _find(response, "Account")
    if account is None:
        return "error", "no Account element"
    action = _text(account, "Action")
    if action == "redirectUrl":
        return action, _text(account, "RedirectUrl")
    if action == "redirectAddr":
        return action, _text(account, "RedirectAddr")
    urls = {_text(p, "Type"): _text(p, "EwsUrl") for p in account if _local(p.tag) == "Protocol"}
    url = urls.get("EXCH") or urls.get("EXPR")
    return ("settings", url) if url else ("error", "no EwsUrl in an EXCH or EXPR protocol")


def _candidates(settings: Settings, address: str) -> list[str]:
    if settings.autodiscover_url:
        return [settings.autodiscover_url]
    domain = address.rpartition("@")[2]
    found = [f"https://{domain}{POX_PATH}", f"https://autodiscover.{domain}{POX_PATH}"]
    try:  # an unauthenticated GET over HTTP may only answer a redirect to the real endpoint
        answer = requests.get(f"http://autodiscover.{domain}{POX_PATH}", allow_redirects=False, timeout=TIMEOUT)
        if answer.status_code in (301, 302) and answer.headers.get("Location", "").startswith("https://"):
            found.append(answer.headers["Location"])
    except requests.RequestException:
        pass
    try:
        import dns.resolver

        records = sorted(dns.resolver.resolve(f"_autodiscover._tcp.{domain}", "SRV", lifetime=TIMEOUT),
                         key=lambda r: (r.priority, -r.weight))
        found += [f"https://{str(r.target).rstrip('.')}:{r.port}{POX_PATH}" for r in records]
    except Exception as exc:  # noqa: BLE001 -- no record, no resolver: one candidate fewer
        log.debug("no autodiscover SRV record", domain=domain, error=type(exc).__name__)
    return found


def _no_downgrade(current: str, target: str) -> bool:
    """A redirect may go to https, or to http only from http (a test endpoint): never send the
    credentials in clear text because an answer said so."""
    scheme = urlsplit(target).scheme
    return scheme == "https" or (scheme == "http" and urlsplit(current).scheme == "http")


def discover(settings: Settings, credentials: Credentials) -> tuple[str, str]:
    """``(EWS URL, autodiscover URL that answered)`` for ``autodiscover_email``; raises ``AutodiscoverFailed``."""
    address = settings.autodiscover_email
    tried: list[str] = []
    for start in _candidates(settings, address):
        url, current, seen = start, address, {address.lower()}
        for _ in range(MAX_REDIRECTS + 1):
            check_tls(settings, url, "autodiscover server")
            tried.append(url)
            session = _session(settings, credentials, url)
            try:
                answer = session.post(url, data=_request(current), allow_redirects=False, timeout=TIMEOUT,
                                      headers={"Content-Type": "text/xml; charset=utf-8"})
            except requests.RequestException as exc:
                log.info("autodiscover endpoint unreachable", url=url, error=type(exc).__name__)
                break
            finally:
                session.close()
            if answer.status_code in (301, 302, 307, 308) and answer.headers.get("Location"):
                target = urljoin(url, answer.headers["Location"])  # [MS-OXDSCLI] 3.2.5: POST again there
                if not _no_downgrade(url, target):
                    break
                url = target
                continue
            if answer.status_code == 401:
                raise AutodiscoverFailed(f"autodiscover at {url} refused the credentials ({settings.auth_type}) "
                                         f"for {address}; check ews_username/ews_password or the OAuth2 settings")
            if answer.status_code != 200:
                log.info("autodiscover endpoint answered an error", url=url, status=answer.status_code)
                break
            action, value = parse_response(answer.content)
            if action == "settings":
                log.info("EWS URL found by autodiscover", address=address, ews_url=value, autodiscover_url=url)
                return value, url
            if action == "redirectUrl" and _no_downgrade(url, value):
                url = value
            elif action == "redirectAddr" and "@" in value and value.lower() not in seen:
                seen.add(value.lower())
                current = value
            else:
                log.info("autodiscover gave no EWS URL", url=url, action=action, detail=value)
                break
        else:
            raise AutodiscoverFailed(f"autodiscover for {address} redirected more than {MAX_REDIRECTS} times "
                                     f"(from {start}); set ews_url")
    raise AutodiscoverFailed(f"autodiscover found no EWS URL for {address} (asked {', '.join(tried) or 'nothing'}); "
                             "set autodiscover_url to the autodiscover endpoint, or ews_url")


# -- the cache ----------------------------------------------------------------------------------
def cached(settings: Settings) -> str | None:
    raw = _redis(settings).hget(keys.EWS_AUTODISCOVER, settings.autodiscover_email.lower())
    if not raw:
        return None
    try:
        return str(json.loads(raw)["ews_url"]) or None
    except (ValueError, KeyError, TypeError):
        return None


def rediscover(settings: Settings, credentials: Credentials) -> str:
    """Autodiscover now and store the answer for every process (replacing any cached URL)."""
    url, endpoint = discover(settings, credentials)
    _redis(settings).hset(keys.EWS_AUTODISCOVER, settings.autodiscover_email.lower(), json.dumps(
        {"ews_url": url, "autodiscover_url": endpoint, "found_at": round(time.time(), 3)}))
    return url


def ews_url(settings: Settings, credentials: Credentials) -> str:
    """The EWS endpoint: ``ews_url``, else the cached autodiscover answer, else a new one."""
    if settings.ews_url:
        return str(settings.ews_url)
    if not settings.autodiscover_email:
        settings.require("ews_url")
    return cached(settings) or rediscover(settings, credentials)


def _moved(settings: Settings, url: str) -> bool:
    """True when the endpoint redirects or is gone (an unauthenticated GET; EWS answers 401/405)."""
    session = requests.Session()
    session.mount(url, adapter_class(settings)())
    try:
        answer = session.get(url, allow_redirects=False, timeout=TIMEOUT)
    except requests.RequestException:
        return False  # down: the retries handle it, the URL may still be right
    finally:
        session.close()
    return answer.status_code in (301, 302, 303, 307, 308, 404)


def check_at_start(settings: Settings, credentials: Credentials) -> Settings:
    """For a process about to use EWS: ``settings`` with ``ews_url`` filled in (autodiscover,
    re-discovered when the cached endpoint moved) after checking its certificate. Raises a
    ``ConfigError`` of one line for a certificate that is not trusted or names another host.
    Settings that use no EWS (neither ews_url nor autodiscover_email) come back unchanged."""
    if settings.ews_url:
        check_tls(settings, settings.ews_url)
        return settings
    if not settings.autodiscover_email:
        return settings
    url = cached(settings)
    if url:
        check_tls(settings, url)
        if _moved(settings, url):
            log.info("cached EWS URL moved; autodiscover again", ews_url=url)
            url = None
    if not url:
        url = rediscover(settings, credentials)
        check_tls(settings, url)
    return settings.replace(ews_url=url)
