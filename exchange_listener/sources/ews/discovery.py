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

Where the credentials go: the HTTP redirect and the SRV record are unauthenticated answers
([MS-OXDISCO], the HTTP GET step: "prompt the user to warn them of the redirection"; the EWS
Managed API has the caller validate every redirection URL, AutodiscoverRedirectionUrlValidationCallback)
and a ``redirectUrl`` may come from anywhere on the way, so a host outside the address's domain (or
the autodiscover host's own domain) is never sent the credentials: it is skipped, and if nothing
else answers the error says to set ``autodiscover_url``. An explicit ``autodiscover_url`` is the
operator's word: a certificate or credential problem there stops the search; on a guessed host it
is noted and the next one tried.

The URL found is kept in Redis (``keys.EWS_AUTODISCOVER``, per address) so every listener and
worker shares one answer and a restart does not ask again. It is re-discovered when the cached
endpoint is gone (404) or redirects to another EWS path at a process's start (if that fails the
cached URL is kept, with a warning), and when autodiscover itself redirects (followed as above).
Redis is not trusted with where the credentials go: a cached URL must be https (unless the
configured ``autodiscover_url`` is http) and was found for the ``autodiscover_url`` configured now.
"""
from __future__ import annotations

import ipaddress
import json
import os
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
import requests.utils
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
_EXPIRED, _NOT_YET_VALID = 10, 9  # X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_CERT_NOT_YET_VALID
_REDIRECTS = (301, 302, 303, 307, 308)

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


def ca_bundle(settings: Settings) -> str:
    """What the real requests verify against: ``ca_file``, else requests' own choice (its session
    honours REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE, else certifi's bundle), so the start-up check
    and the requests after it trust the same CAs."""
    return (settings.ca_file or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH)


def check_tls(settings: Settings, url: str, what: str = "EWS server") -> None:
    """Raise a one-line ``ConfigError`` when ``url``'s certificate is untrusted, expired or names
    another host; anything else (refused, timeout) is left to the caller's retries."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not settings.verify_tls:
        return
    host, port = parts.hostname or "", parts.port or 443
    bundle = ca_bundle(settings)
    try:
        if os.path.isdir(bundle):
            context = ssl.create_default_context(capath=bundle)
        else:
            context = ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        name = "ca_file" if settings.ca_file else "the CA bundle (REQUESTS_CA_BUNDLE or requests' default)"
        raise ConfigError(f"{name}: cannot read {bundle!r} as PEM CA certificates "
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
    if exc.verify_code in (_EXPIRED, _NOT_YET_VALID):
        state = "expired" if exc.verify_code == _EXPIRED else "not yet valid"
        return (f"{what} {where}: TLS certificate {state} ({reason}); have the server's certificate renewed "
                "(or check this machine's clock)")
    trusted = (f"ca_file ({settings.ca_file})" if settings.ca_file
               else f"requests' CA bundle {ca_bundle(settings)} (ca_file is empty)")
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


def within(host: str, domain: str) -> bool:
    """``host`` is ``domain`` or a subdomain of it (an IP address: only itself)."""
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    if not host or not domain:
        return False
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        return host == domain or host.endswith("." + domain)
    return host == domain


def _own_domain(url: str) -> str:
    """The domain an autodiscover host speaks for: autodiscover.example.com -> example.com, else the host."""
    host = (urlsplit(url).hostname or "").lower()
    return host.removeprefix("autodiscover.") if host.count(".") >= 2 else host


def _refused(current: str, target: str, domains: list[str]) -> str:
    """Why a redirect from ``current`` to ``target`` is not followed ("" when it is): never to
    http from https (the credentials in clear text), never out of ``domains`` (Microsoft: a
    client should validate a redirect before sending the credentials there)."""
    scheme = urlsplit(target).scheme
    if not (scheme == "https" or (scheme == "http" and urlsplit(current).scheme == "http")):
        return f"a redirect from {urlsplit(current).scheme} to {scheme or 'no scheme'}"
    host = urlsplit(target).hostname or ""
    if not any(within(host, d) for d in domains):
        return f"{host or 'no host'} is outside {' and '.join(sorted(set(domains)))}"
    return ""


def http_redirect_guess(domain: str, url: str) -> tuple[str, str]:
    """``(candidate, skipped)``: where an unauthenticated GET to ``url`` (http://autodiscover.DOMAIN/...)
    redirects, when that is https within ``domain``; else "" and, for a redirect elsewhere, why not."""
    try:
        answer = requests.get(url, allow_redirects=False, timeout=TIMEOUT)
    except requests.RequestException:
        return "", ""
    location = answer.headers.get("Location", "")
    if answer.status_code not in (301, 302) or not location.startswith("https://"):
        return "", ""
    if not within(urlsplit(location).hostname or "", domain):
        return "", f"{location} (the redirect {url} answered; outside {domain})"
    return location, ""


def _guesses(domain: str, skipped: list[str]) -> list[str]:
    found = [f"https://{domain}{POX_PATH}", f"https://autodiscover.{domain}{POX_PATH}"]
    redirect, why = http_redirect_guess(domain, f"http://autodiscover.{domain}{POX_PATH}")
    found += [redirect] if redirect else []
    skipped += [why] if why else []
    try:
        import dns.resolver

        records = sorted(dns.resolver.resolve(f"_autodiscover._tcp.{domain}", "SRV", lifetime=TIMEOUT),
                         key=lambda r: (r.priority, -r.weight))
    except Exception as exc:  # noqa: BLE001 -- no record, no resolver: one candidate fewer
        log.debug("no autodiscover SRV record", domain=domain, error=type(exc).__name__)
        records = []
    for record in records:
        target = str(record.target).rstrip(".")
        url = f"https://{target}:{record.port}{POX_PATH}"
        if within(target, domain):
            found.append(url)
        else:  # the SRV answer is not authenticated: Outlook asks the user before going there
            skipped.append(f"{url} (the SRV record _autodiscover._tcp.{domain}; outside {domain})")
    return found


def _follow(settings: Settings, credentials: Credentials, start: str, explicit: bool,
            problems: list[str]) -> tuple[str, str] | None:
    """Ask ``start`` and follow its redirects: ``(EWS URL, endpoint)``, or None with why in
    ``problems``. A certificate or credential problem raises when ``explicit``."""
    address = settings.autodiscover_email
    domains = [address.rpartition("@")[2], _own_domain(start)]
    url, current, seen = start, address, {address.lower()}
    for _ in range(MAX_REDIRECTS + 1):
        try:
            check_tls(settings, url, "autodiscover server")
        except ConfigError as exc:
            if explicit:
                raise
            problems.append(str(exc))
            return None
        session = _session(settings, credentials, url)
        try:
            answer = session.post(url, data=_request(current), allow_redirects=False, timeout=TIMEOUT,
                                  headers={"Content-Type": "text/xml; charset=utf-8"})
        except requests.RequestException as exc:
            problems.append(f"{url}: unreachable ({type(exc).__name__})")
            return None
        finally:
            session.close()
        if answer.status_code in _REDIRECTS and answer.headers.get("Location"):
            target = urljoin(url, answer.headers["Location"])  # [MS-OXDSCLI] 3.2.5: POST again there
            why = _refused(url, target, domains)
            if why:
                problems.append(f"{url}: HTTP {answer.status_code} to {target} not followed ({why})")
                return None
            url = target
            continue
        if answer.status_code == 401:
            line = (f"autodiscover at {url} refused the credentials ({settings.auth_type}) for {address}; "
                    "check ews_username/ews_password or the OAuth2 settings")
            if explicit:
                raise AutodiscoverFailed(line)
            problems.append(line)
            return None
        if answer.status_code != 200:
            problems.append(f"{url}: HTTP {answer.status_code}")
            return None
        action, value = parse_response(answer.content)
        if action == "settings":
            log.info("EWS URL found by autodiscover", address=address, ews_url=value, autodiscover_url=url)
            return value, url
        if action == "redirectUrl":
            why = _refused(url, value, domains)
            if why:
                problems.append(f"{url}: redirectUrl {value} not followed ({why})")
                return None
            url = value
        elif action == "redirectAddr" and "@" in value and value.lower() not in seen:
            seen.add(value.lower())
            current = value
        else:
            problems.append(f"{url}: {action} {value}".strip())
            return None
    raise AutodiscoverFailed(f"autodiscover for {address} redirected more than {MAX_REDIRECTS} times "
                             f"(from {start}); set ews_url")


def discover(settings: Settings, credentials: Credentials, guesses: list[str] | None = None) -> tuple[str, str]:
    """``(EWS URL, autodiscover URL that answered)`` for ``autodiscover_email``; raises
    ``AutodiscoverFailed`` naming every endpoint asked and what each answered. ``guesses``
    replaces the DOMAIN-derived candidates when ``autodiscover_url`` is empty."""
    address = settings.autodiscover_email
    problems: list[str] = []
    skipped: list[str] = []
    if settings.autodiscover_url:
        starts, explicit = [settings.autodiscover_url], True
    else:
        explicit = False
        starts = guesses if guesses is not None else _guesses(address.rpartition("@")[2], skipped)
    for start in starts:
        found = _follow(settings, credentials, start, explicit, problems)
        if found:
            return found
        log.info("autodiscover candidate gave no EWS URL", url=start, problem=problems[-1] if problems else "")
    not_followed = f"; not asked: {', '.join(skipped)}" if skipped else ""
    raise AutodiscoverFailed(f"autodiscover found no EWS URL for {address} ({'; '.join(problems) or 'nothing asked'}"
                             f"{not_followed}); set autodiscover_url to the autodiscover endpoint, or ews_url")


# -- the cache ----------------------------------------------------------------------------------
def cached(settings: Settings) -> str | None:
    """The cached EWS URL, if it was found for the ``autodiscover_url`` configured now and is https
    (http only when ``autodiscover_url`` is): a Redis writer must not choose where credentials go."""
    raw = _redis(settings).hget(keys.EWS_AUTODISCOVER, settings.autodiscover_email.lower())
    if not raw:
        return None
    try:
        entry = json.loads(raw)
        url, asked = str(entry["ews_url"]), str(entry.get("asked", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if asked != settings.autodiscover_url:
        return None  # found through another autodiscover_url: ask again
    allowed = ("https",) + (("http",) if urlsplit(settings.autodiscover_url).scheme == "http" else ())
    if urlsplit(url).scheme not in allowed:
        log.warning("cached EWS URL ignored: not https", ews_url=url, key=keys.EWS_AUTODISCOVER)
        return None
    return url or None


def rediscover(settings: Settings, credentials: Credentials) -> str:
    """Autodiscover now and store the answer for every process (replacing any cached URL)."""
    url, endpoint = discover(settings, credentials)
    _redis(settings).hset(keys.EWS_AUTODISCOVER, settings.autodiscover_email.lower(), json.dumps(
        {"ews_url": url, "autodiscover_url": endpoint, "asked": settings.autodiscover_url,
         "found_at": round(time.time(), 3)}))
    return url


def ews_url(settings: Settings, credentials: Credentials) -> str:
    """The EWS endpoint: ``ews_url``, else the cached autodiscover answer, else a new one."""
    if settings.ews_url:
        return str(settings.ews_url)
    if not settings.autodiscover_email:
        settings.require("ews_url")
    return cached(settings) or rediscover(settings, credentials)


def _moved(settings: Settings, url: str) -> bool:
    """True when the endpoint is gone (404) or redirects to another EWS path (an unauthenticated
    GET; EWS answers 401/405). A redirect elsewhere (a sign-in page, a proxy) is not a move."""
    session = requests.Session()
    session.mount(url, adapter_class(settings)())
    try:
        answer = session.get(url, allow_redirects=False, timeout=TIMEOUT)
    except requests.RequestException:
        return False  # down: the retries handle it, the URL may still be right
    finally:
        session.close()
    if answer.status_code == 404:
        return True
    if answer.status_code not in _REDIRECTS:
        return False
    target = urljoin(url, answer.headers.get("Location", ""))
    return target != url and urlsplit(target).path.lower().endswith("/ews/exchange.asmx")


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
            try:
                fresh = rediscover(settings, credentials)
            except ConfigError as exc:  # it may only look moved: better the old URL than no start
                log.warning("autodiscover failed; keeping the cached EWS URL", ews_url=url, error=str(exc))
            else:
                check_tls(settings, fresh)
                url = fresh
    else:
        url = rediscover(settings, credentials)
        check_tls(settings, url)
    return settings.replace(ews_url=url)
