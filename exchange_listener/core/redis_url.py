"""Reading a ``redis_url``: hiding its passwords and parsing the ``redis+sentinel://`` form.

Pure text handling with no Redis client, so ``config`` (checking the setting) and ``redis_conn``
(connecting) both import it at the top without importing each other. ``ConfigError`` is
defined here, the lowest module that raises it; everyone else uses it as ``config.ConfigError``.
"""
from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_DEFAULT_PORT = 26379
SENTINEL_QUERY_KEYS = ("sentinel_username", "sentinel_password")
SENTINEL_SYNTAX = "redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/DB]"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL. ``repr`` hides the passwords."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)
    sentinel_username: str | None = dataclasses.field(default=None, repr=False)
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)


def redact(url: str) -> str:
    """``url`` with every password (the netloc's and ``sentinel_password``) replaced by ``***``."""
    parts = urlsplit(str(url))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = "&".join(
        f"{key}=***" if "password" in key.lower() else f"{key}={value}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True))
    return parts._replace(netloc=netloc, query=query).geturl()


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(f"redis_url: {why}; expected {SENTINEL_SYNTAX} (got {redact(url)!r})")


def _host_port(url: str, text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise _bad(url, f"Sentinel address {text!r} has no host")
    if not port_text:
        return host, SENTINEL_DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"Sentinel address {text!r} has no valid port")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL; a ``ConfigError`` naming ``redis_url`` when it is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise _bad(url, f"the scheme must be {SENTINEL_SCHEME}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user_text, has_password, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if has_password else None
    sentinels = tuple(_host_port(url, item.strip()) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise _bad(url, "no Sentinel address")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise _bad(url, "no MASTER_NAME (the name the Sentinels monitor the primary under)")
    if len(path) > 2:
        raise _bad(url, "too many path parts")
    if len(path) == 2 and not path[1].isdigit():
        raise _bad(url, f"DB must be a number (got {path[1]!r})")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in SENTINEL_QUERY_KEYS:
            raise _bad(url, f"unknown query parameter {key!r} (known: {', '.join(SENTINEL_QUERY_KEYS)})")
        query[key] = value
    return SentinelTarget(sentinels=sentinels, master=path[0], db=int(path[1]) if len(path) == 2 else 0,
                          username=username, password=password,
                          sentinel_username=query.get("sentinel_username") or None,
                          sentinel_password=query.get("sentinel_password") or None)
