"""Build exchangelib objects from settings: credentials, one Protocol per pool, Accounts.

exchangelib caches one Protocol (one HTTP session pool, one cookie jar) per endpoint and
credentials. A stream holds its session for up to 30 minutes and affinity cookies leak
through a shared jar, so callers ask for a *pool* by name (one per subscription group, one
per worker process): each pool gets credentials that differ only in their pool tag, hence its
own Protocol, sessions and cookies.

TLS: exchangelib makes every HTTP adapter from one class attribute (``BaseProtocol.HTTP_ADAPTER_CLS``),
so trust is process-wide: ``verify_tls = false`` turns verification off, else ``ca_file`` (a
private CA's PEM) is what an adapter verifies against, else the system's CAs
(``discovery.adapter_class``). The endpoint is ``ews_url`` or, when that is empty, the one
autodiscover found (``sources.ews.discovery``).

Proxies and a CA bundle from the environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ...)
apply as requests applies them, but are read once per session and host rather than on every
request: requests' own per-request scan of the environment was a tenth of a worker's CPU per
reply. A daemon's environment does not change while it runs.
"""
from __future__ import annotations

from typing import Any

import requests
from exchangelib import (
    DELEGATE,
    IMPERSONATION,
    Account,
    Build,
    Configuration,
    Credentials,
    Version,
)
from exchangelib.credentials import OAuth2Credentials
from exchangelib.protocol import BaseProtocol

from exchange_listener.core.config import Settings
from exchange_listener.sources.ews import discovery

AUTH = discovery.AUTH


class _PooledPassword(Credentials):
    def __init__(self, username: str, password: str, pool: str):
        super().__init__(username, password)
        self.pool = pool


class _PooledOAuth2(OAuth2Credentials):
    """Client-credentials OAuth2 whose token endpoint can be set (exchangelib fixes it to Microsoft's)."""

    def __init__(self, *, client_id: str, client_secret: str, tenant_id: str | None, token_url: str, pool: str):
        super().__init__(client_id=client_id, client_secret=client_secret, tenant_id=tenant_id)
        self._token_url_override = token_url
        self.pool = pool

    @property
    def token_url(self) -> str:
        return self._token_url_override or super().token_url


def make_credentials(settings: Settings, pool: str = "default") -> Credentials | OAuth2Credentials:
    if settings.auth_type == "oauth2":
        return _PooledOAuth2(
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            tenant_id=settings.tenant_id or None,
            token_url=settings.token_url,
            pool=pool,
        )
    return _PooledPassword(settings.ews_username, settings.ews_password, pool)


def _version(settings: Settings) -> Version | None:
    """The configured build, or None (empty ``ews_version``): exchangelib then asks the server
    once per Protocol (a ConvertId probe; the answer's ServerVersionInfo header gives the build)."""
    if not settings.ews_version.strip():
        return None
    parts = [int(p) for p in settings.ews_version.strip().split(".")]
    return Version(build=Build(*parts[:4]))


def remember_environment(session: requests.Session) -> requests.Session:
    """Have ``session`` merge the environment's proxy and CA settings once per host and
    per-request arguments, then reuse the result (see the module docstring)."""
    merge = session.merge_environment_settings
    known: dict[tuple, dict[str, Any]] = {}

    def merged(url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        scheme, _, rest = url.partition("://")
        key = (scheme, rest.split("/", 1)[0], tuple(sorted((proxies or {}).items())), stream, verify, cert)
        found = known.get(key)
        if found is None:
            found = known[key] = merge(url, proxies, stream, verify, cert)
        return {**found, "proxies": dict(found["proxies"])}  # requests may add to the dict it is given

    session.merge_environment_settings = merged  # type: ignore[method-assign]
    return session


_raw_session = BaseProtocol.raw_session.__func__


def _raw_session_remembering(cls: type[BaseProtocol], *args: Any, **kwargs: Any) -> requests.Session:
    return remember_environment(_raw_session(cls, *args, **kwargs))


def make_configuration(settings: Settings, *, pool: str = "default", max_connections: int = 4) -> Configuration:
    """A Configuration whose Protocol is private to ``pool``; sends no EWS request (autodiscover
    runs here only when ``ews_url`` is empty and nothing is cached in Redis yet)."""
    BaseProtocol.HTTP_ADAPTER_CLS = discovery.adapter_class(settings)
    BaseProtocol.raw_session = classmethod(_raw_session_remembering)
    return Configuration(
        service_endpoint=discovery.ews_url(settings, lambda: make_credentials(settings, "autodiscover")),
        credentials=make_credentials(settings, pool),
        auth_type=AUTH[settings.auth_type],
        version=_version(settings),
        max_connections=max_connections,
    )


def make_account(settings: Settings, mailbox: str, configuration: Configuration) -> Account:
    """An Account for ``mailbox`` (impersonated or delegated); sends no request."""
    access = IMPERSONATION if settings.access_type == "impersonation" else DELEGATE
    return Account(mailbox, config=configuration, autodiscover=False, access_type=access)


def check_at_start(settings: Settings) -> Settings:
    """``discovery.check_at_start`` with this module's credentials: for a process about to use
    EWS, ``settings`` with ``ews_url`` filled in (autodiscover) after its certificate was checked;
    a certificate that is not trusted or names another host is a one-line ``ConfigError``."""
    return discovery.check_at_start(settings, lambda: make_credentials(settings, "autodiscover"))
