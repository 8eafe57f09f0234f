"""Settings: one TOML file plus ``EXCHANGE_LISTENER_<KEY>`` environment overrides.

Every key is declared once in ``FIELDS`` with its type, default and check, so a wrong or
missing value fails at start with a message that names the key, and ``docs/configuration.md``
can be checked against the same table. Code that needs a default outside a loaded
``Settings`` (a command-line default, a fallback) reads ``default(key)``, never a copy.
A name that is not a setting (an ``EXCHANGE_LISTENER_*`` variable other than those in
``OTHER_ENV``, a file key, an override) is an error that suggests the closest known name.

Why a plain table and not pydantic-settings (measured on the 2-core dev box, Python 3.11,
pydantic 2.14 / pydantic-settings 2.16; wall times are medians of 9 runs): importing this
module costs 16-20 ms (``-X importtime``, mostly tomllib and dataclasses), ``pydantic_settings``
about 100 ms, so a process starts about 105 ms later (``python -c "import ..."``: 35-40 ms
vs 140 ms); ``exchange-listener --help`` would go from about 125 ms to 200 ms and
``status --help`` from about 240 ms to 320 ms. It would not make the code smaller either:
even with ``extra="forbid"`` it silently ignores an unknown ``EXCHANGE_LISTENER_*`` environment
variable (tried: ``EXCHANGE_LISTENER_REDIS_ULR`` loaded the default), so the typo check stays ours, as do the TOML source, the error messages that
name the key (exit status 2, no traceback), secret hiding and the generated reference.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

# re-exported (``X as X`` says so to mypy): everyone else uses it as config.ConfigError
from exchange_listener.core.redis_url import ConfigError as ConfigError  # noqa: PLC0414
from exchange_listener.core.redis_url import parse_sentinel_url, redact

ENV_PREFIX = "EXCHANGE_LISTENER_"
CONFIG_ENV = "EXCHANGE_LISTENER_CONFIG"
# EXCHANGE_LISTENER_* names that are not settings, so a typo check must let them pass
OTHER_ENV = {
    CONFIG_ENV: "the settings file",
    "EXCHANGE_LISTENER_EMULATOR_SCHEMA_LOG": "test suite: file the EWS emulator appends schema violations to "
                                             "(emulators/ews/validation.py)",
}
SECRET_KEYS = frozenset({"ews_password", "client_secret", "webhook_secret", "imap_password"})


def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)} (got {value!r})")

    return check


def _between(low: float, high: float) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be between {low:g} and {high:g} (got {value!r})")

    return check


def _url(*schemes: str) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value in (None, ""):
            return
        parts = urlsplit(str(value))
        if parts.scheme not in schemes or not parts.netloc:
            raise ConfigError(f"{key}: must be a {'/'.join(schemes)} URL (got {redact(value)!r})")

    return check


def _host_port(key: str, value: Any) -> None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: must be host:port, e.g. 127.0.0.1:8780 (got {value!r})")


def _token_hashes(key: str, value: Any) -> None:
    for item in value:
        if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
            raise ConfigError(f"{key}: every entry must be a SHA-256 hash in hex (64 characters; "
                              "`exchange-listener api hash-token TOKEN` prints one), never a token itself")


def _subset(*allowed: str) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ConfigError(f"{key}: {', '.join(unknown)} not among {', '.join(allowed)}")
    return check


def _redis_url(key: str, value: Any) -> None:
    _url("redis", "rediss", "unix", "redis+sentinel")(key, value)
    if str(value).startswith("redis+sentinel:"):
        parse_sentinel_url(str(value))  # a ConfigError naming redis_url, password hidden


@dataclasses.dataclass(frozen=True)
class Field:
    key: str
    type: type
    default: Any
    doc: str
    check: Callable[[str, Any], None] | None = None


FIELDS: tuple[Field, ...] = (
    Field("redis_url", str, "redis://127.0.0.1:6379/0", "Redis holding queues, leases, sync states, sends and enrollments.", _redis_url),
    Field("allow_volatile_redis", bool, False, "Accept a Redis that persists nothing or may evict our keys (demo/tests only); otherwise status is unhealthy."),
    Field("ews_url", str, "", "EWS endpoint, e.g. https://mail.example.com/EWS/Exchange.asmx; empty: found by autodiscover for autodiscover_email.", _url("http", "https")),
    Field("autodiscover_email", str, "", "With ews_url empty: a mailbox address whose EWS URL POX autodiscover finds (cached in Redis, shared by listeners and workers; asked again when the endpoint moves)."),
    Field("autodiscover_url", str, "", "The autodiscover endpoint to ask, e.g. https://mail.example.com/autodiscover/autodiscover.xml; empty: found from autodiscover_email's domain (https://DOMAIN, https://autodiscover.DOMAIN, then DNS SRV).", _url("http", "https")),
    Field("ews_version", str, "15.1.2507.6", "Exchange build to assume, e.g. 15.1.2507.6 (skips exchangelib's version probe); empty: exchangelib asks the server once per connection pool (one ConvertId request)."),
    Field("auth_type", str, "basic", "basic | ntlm | oauth2.", _choice("basic", "ntlm", "oauth2")),
    Field("ews_username", str, "", "Service account (basic/ntlm)."),
    Field("ews_password", str, "", "Service account password (secret; never logged)."),
    Field("client_id", str, "", "OAuth2 application (client) id."),
    Field("client_secret", str, "", "OAuth2 client secret (secret; never logged)."),
    Field("tenant_id", str, "", "OAuth2 tenant id."),
    Field("token_url", str, "", "OAuth2 token endpoint; empty means Microsoft's login host for tenant_id.", _url("http", "https")),
    Field("access_type", str, "impersonation", "impersonation | delegate.", _choice("impersonation", "delegate")),
    Field("verify_tls", bool, True, "Verify the EWS server's TLS certificate."),
    Field("source", str, "ews", "ews | graph | imap: what this listener watches (Exchange Server by EWS, Exchange Online by Microsoft Graph, Gmail and any other server by IMAP IDLE); workers serve all.", _choice("ews", "graph", "imap")),
    Field("graph_url", str, "https://graph.microsoft.com/v1.0", "Microsoft Graph base URL (source = graph; workers fetch graph jobs through it).", _url("http", "https")),
    Field("client_certificate_file", str, "", "PEM file with the app's certificate and private key, instead of client_secret (Graph; its content is a secret; never logged)."),
    Field("ca_file", str, "", "PEM file of CA certificates to trust for EWS (listener and workers, autodiscover included), Graph and its token host, and IMAP (a private CA, the emulator); empty: the system's. verify_tls = false still turns EWS verification off."),
    Field("notification_url", str, "", "Public HTTPS URL Microsoft Graph POSTs change notifications to (a reverse proxy to notification_listen); empty: delta-only polling.", _url("http", "https")),
    Field("notification_listen", str, "127.0.0.1:8790", "host:port the Graph notification receiver binds (source = graph with notification_url).", _host_port),
    Field("graph_poll_seconds", float, 0.0, "Delta-only mode when > 0 and notification_url is empty: every mailbox's folders are read by delta this often.", _between(0, 86400)),
    Field("graph_subscription_minutes", float, 4230.0, "Lifetime asked for each Graph subscription (Outlook allows at most 4230; at most 4225 is asked, in case our clock runs ahead); renewed when a third of it is left.", _between(0.05, 4230)),
    Field("imap_host", str, "", "IMAP server (source = imap; workers fetch imap jobs through it), e.g. imap.gmail.com."),
    Field("imap_port", int, 993, "IMAP port (993 for tls, 143 for starttls or none).", _between(1, 65535)),
    Field("imap_security", str, "tls", "tls | starttls | none: how the IMAP connection is protected (none only on loopback or for tests).", _choice("tls", "starttls", "none")),
    Field("imap_auth", str, "master", "master | plain | xoauth2-google: master logs in as 'rep*imap_username' (Dovecot master user); plain is SASL PLAIN with the rep as authorization id; xoauth2-google mints a token per rep from google_service_account_file (domain-wide delegation).", _choice("master", "plain", "xoauth2-google")),
    Field("imap_username", str, "", "The master or authorizing IMAP account (imap_auth master or plain)."),
    Field("imap_password", str, "", "Its password (secret; never logged)."),
    Field("imap_folders", str, "INBOX,\\Junk", "Folders watched per mailbox, comma-separated: names, or special-use flags such as \\Junk (found by LIST); one IDLE connection each."),
    Field("google_service_account_file", str, "", "Google service account JSON key with domain-wide delegation for https://mail.google.com/ (imap_auth = xoauth2-google; its content is a secret; never logged)."),
    Field("imap_max_connections_per_account", int, 10, "IMAP connections one process opens per mailbox at most (Gmail allows 15 per account, shared by every client of the rep).", _between(1, 100)),
    Field("imap_timeout_seconds", float, 30.0, "Seconds an IMAP connect, login or command (the answer to DONE included) may take; a connection that stays silent longer is dropped and made anew.", _between(0.5, 600)),
    Field("imap_idle_seconds", float, 300.0, "An IDLE is ended and re-issued this often (RFC 2177 allows 29 minutes; NATs and servers drop quiet connections sooner).", _between(1, 1740)),
    Field("queue_name", str, "exchange-listener", "RQ queue the listener fills and workers drain."),
    Field("group_size", int, 200, "Mailboxes per GetStreamingEvents connection (Exchange allows at most 200).", _between(1, 200)),
    Field("connection_timeout", int, 30, "GetStreamingEvents ConnectionTimeout in minutes (1-30).", _between(1, 30)),
    Field("heartbeat_seconds", float, 45.0, "Heartbeat interval the server uses; a stream silent for two of them is reconnected.", _between(0.1, 3600)),
    Field("lease_seconds", float, 30.0, "How long a listener's hold on a mailbox lasts without renewal.", _between(1, 3600)),
    Field("listener_id", str, "", "Name of this listener in status; empty means host-pid."),
    Field("job_timeout", int, 120, "Seconds one job may run before RQ kills it.", _between(1, 86400)),
    Field("job_retries", int, 5, "Retries (with backoff) for a failed job.", _between(0, 100)),
    Field("worker_ttl", int, 30, "Seconds a worker's heartbeat key lives; a killed worker's job is requeued soon after.", _between(5, 3600)),
    Field("retention_days", int, 180, "How long a recorded send is kept.", _between(1, 3650)),
    Field("pause_days", int, 7, "Pause length for an auto-reply that states no return date.", _between(1, 365)),
    Field("stop_whole_domain", bool, False, "A human reply from anyone at the prospect's domain stops every active enrollment to that domain."),
    Field("webhook_url", str, "", "POST each enrollment transition here (JSON, signed per Standard Webhooks; see docs/webhooks.md).", _url("http", "https")),
    Field("webhook_secret", str, "", "Webhook signing secret: whsec_ + base64 per Standard Webhooks, or any string (used as UTF-8 bytes); never logged."),
    Field("webhook_timeout", float, 5.0, "Seconds per webhook attempt.", _between(0.1, 300)),
    Field("callback", str, "", "Dotted path of a Python callable called with each transition."),
    Field("callback_timeout", float, 5.0, "Seconds a callback call may take; past that it counts as a failed attempt and its thread is abandoned.", _between(0.1, 300)),
    Field("checkpoint_seconds", float, 300.0, "While streaming, a mailbox that had new mail has its sync state checkpointed this often, so a restart catches up only the gap.", _between(1, 86400)),
    Field("processed_days", int, 14, "How long a processed mail is remembered per mailbox; a catch-up never fetches it again within that time, and skips mail received longer ago.", _between(1, 365)),
    Field("mailbox_failure_grace_seconds", float, 900.0, "A mailbox that cannot be subscribed makes status unhealthy only after failing this long.", _between(0, 86400)),
    Field("api_listen", str, "127.0.0.1:8780", "host:port the HTTP API (`exchange-listener api`) binds.", _host_port),
    Field("api_tokens", tuple, (), "SHA-256 hashes of the API's bearer tokens (`exchange-listener api hash-token TOKEN` prints one); a list in the file, comma-separated in the environment. Empty: the API refuses every request but /healthz.", _token_hashes),
    Field("api_max_body_bytes", int, 1_048_576, "Largest request body the API accepts (413 beyond).", _between(1024, 64 * 1_048_576)),
    Field("api_rate_per_second", float, 50.0, "Requests per second each token may make, with bursts of twice that (429 beyond).", _between(0.1, 100_000)),
    Field("salesforce_login_url", str, "", "Salesforce login host for the JWT bearer flow (https://login.salesforce.com, https://test.salesforce.com or a My Domain); empty turns the Salesforce sink off.", _url("http", "https")),
    Field("salesforce_client_id", str, "", "Consumer key of the connected app (JWT issuer)."),
    Field("salesforce_username", str, "", "Salesforce user the integration acts as (JWT subject)."),
    Field("salesforce_private_key_file", str, "", "PEM file with the private key whose certificate is on the connected app (its content is a secret; never logged)."),
    Field("salesforce_activity", str, "task", "task | email_message: what a logged reply becomes on the Lead or Contact.", _choice("task", "email_message")),
    Field("salesforce_events", tuple, ("replied", "bounced", "paused"), "Transitions logged to Salesforce: any of replied, bounced, paused.", _subset("replied", "bounced", "paused")),
    Field("metrics_port", int, 0, "Port for Prometheus metrics; 0 disables.", _between(0, 65535)),
    Field("log_level", str, "info", "debug | info | warning | error.", _choice("debug", "info", "warning", "error")),
    Field("log_format", str, "auto", "auto (JSON unless on a terminal) | json | console.", _choice("auto", "json", "console")),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}


def default(key: str) -> Any:
    """The table's default for ``key``: what a command-line default or a fallback must use, so
    a default is written once (here)."""
    return FIELD_BY_KEY[key].default


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _not_a_setting(name: str, where: str, env: bool = False) -> str:
    """Name the unknown ``name`` and the closest known one (compared without the common prefix)."""
    known = list(FIELD_BY_KEY) + ([n.removeprefix(ENV_PREFIX).lower() for n in OTHER_ENV] if env else [])
    word = name[len(ENV_PREFIX):] if env else name
    close = difflib.get_close_matches(word.lower(), known, n=1)
    hint = f"did you mean {env_name(close[0]) if env else close[0]}?" if close else "see docs/configuration.md"
    return f"{name}{where} is not a setting ({hint})"


# Variables a platform sets for a service or container named "exchange-listener", not settings:
# Kubernetes service links (EXCHANGE_LISTENER_SERVICE_HOST, _SERVICE_PORT[_NAME], _PORT,
# _PORT_9100_TCP[_PROTO|_PORT|_ADDR]) and Docker links (the same _PORT* forms). A bare _PORT counts
# only with a link's value (tcp://...), so EXCHANGE_LISTENER_PORT=9100 meant as METRICS_PORT is a typo.
_LINK_VARIABLE = re.compile(re.escape(ENV_PREFIX) + r"(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$")
_LINK_URL = re.compile(r"^(tcp|udp|sctp)://")  # the value of a bare ..._PORT link variable


def _is_link(name: str, value: str) -> bool:
    return bool(_LINK_VARIABLE.match(name)) or (name == ENV_PREFIX + "PORT" and bool(_LINK_URL.match(value)))


def _check_names(env: Mapping[str, str], path: str | None, from_file: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    """Every ``EXCHANGE_LISTENER_*`` variable, file key and override must be a known name: a typo is
    an error, never a silently kept default (a mistyped redis_url would mean the wrong Redis)."""
    names = {env_name(k) for k in FIELD_BY_KEY} | set(OTHER_ENV)
    found = [_not_a_setting(n, "", env=True) for n in sorted(env)
             if n.upper().startswith(ENV_PREFIX) and n not in names and not _is_link(n, env[n])]
    found += [_not_a_setting(k, f" in {path}") for k in sorted(set(from_file) - set(FIELD_BY_KEY))]
    found += [_not_a_setting(k, " (an argument)") for k in sorted(set(overrides or ()) - set(FIELD_BY_KEY))]
    if found:
        raise ConfigError("; ".join(found))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings. ``repr`` hides secrets so a stray log line cannot leak them."""

    values: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        shown = {k: ("***" if k in SECRET_KEYS and v else v) for k, v in self.values.items()}
        if shown.get("redis_url"):
            shown["redis_url"] = redact(shown["redis_url"])
        return f"Settings({shown})"

    def require(self, *keys: str) -> None:
        """Fail, naming the key, when a value a command needs is empty."""
        for key in keys:
            if self.values.get(key) in ("", None):
                raise ConfigError(f"{key}: required (set it in the config file or {env_name(key)})")

    def replace(self, **changes: Any) -> Settings:
        return load(overrides={**self.values, **changes}, env={})


def _coerce(field: Field, raw: Any, origin: str) -> Any:
    key = field.key
    if field.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: must be true or false (got {raw!r} from {origin})")
    if field.type in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: must be a number (got {raw!r} from {origin})")
        try:
            number = field.type(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a{'n integer' if field.type is int else ' number'} (got {raw!r} from {origin})") from None
        if field.type is int and isinstance(raw, float) and raw != int(raw):
            raise ConfigError(f"{key}: must be an integer (got {raw!r} from {origin})")
        return number
    if field.type is tuple:  # a list in the file, comma-separated in the environment
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key}: must be a list of strings (got {raw!r} from {origin})")
        return tuple(i.strip() for i in items if i.strip())
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: must be a string (got {type(raw).__name__} from {origin})")
    return raw


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    return data


def load(path: str | None = None, *, env: Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """File (``path`` or ``$EXCHANGE_LISTENER_CONFIG``), then environment, then ``overrides``."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    from_file = read_file(path) if path else {}
    _check_names(env, path, from_file, overrides)
    values: dict[str, Any] = {}
    for field in FIELDS:
        name = env_name(field.key)
        if overrides and field.key in overrides:
            raw, origin = overrides[field.key], "arguments"
        elif name in env:
            raw, origin = env[name], name
        elif path and field.key in from_file:  # (from_file is empty without a path)
            raw, origin = from_file[field.key], path
        else:
            values[field.key] = field.default
            continue
        value = _coerce(field, raw, origin)
        if field.check:
            field.check(field.key, value)
        values[field.key] = value
    settings = Settings(values)
    _check_combinations(settings)
    return settings


def scrub(text: str, settings: Settings) -> str:
    """``text`` with the value of every secret setting replaced by ``***`` (for error text that
    goes to logs or Redis)."""
    for key in SECRET_KEYS:
        secret = settings.values.get(key)
        if secret:
            text = text.replace(secret, "***")
    return text


def folder_list(value: str) -> list[str]:
    """``imap_folders`` as a list: names or special-use flags, in order, without repeats."""
    out: list[str] = []
    for part in str(value).split(","):
        name = part.strip()
        if name and name not in out:
            out.append(name)
    return out


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _check_combinations(settings: Settings) -> None:
    if settings.source == "graph" and not settings.notification_url and not settings.graph_poll_seconds:
        raise ConfigError("source = graph needs notification_url (change notifications) or graph_poll_seconds > 0 "
                          "(delta-only polling)")
    if settings.source == "graph":
        settings.require("client_id")
        if not settings.client_secret and not settings.client_certificate_file:
            raise ConfigError("source = graph needs client_secret or client_certificate_file (the app's credential; "
                              f"set one in the config file or {env_name('client_secret')})")
        if not settings.token_url:
            settings.require("tenant_id")
    if settings.source == "imap":
        settings.require("imap_host")
        if settings.imap_auth == "xoauth2-google":
            settings.require("google_service_account_file")
        else:
            settings.require("imap_username", "imap_password")
        if settings.imap_security == "none" and not _loopback(settings.imap_host):
            raise ConfigError("imap_security = none sends the IMAP password in clear text; use tls or starttls "
                              f"(none is only for a server on this host; imap_host is {settings.imap_host!r})")
        if not folder_list(settings.imap_folders):
            raise ConfigError("imap_folders: name at least one folder, e.g. INBOX,\\Junk")
        if settings.imap_max_connections_per_account < len(folder_list(settings.imap_folders)):
            raise ConfigError(f"imap_max_connections_per_account ({settings.imap_max_connections_per_account}) is "
                              f"below the {len(folder_list(settings.imap_folders))} folders of imap_folders, "
                              "each of which needs its own IDLE connection")
    if settings.autodiscover_url:
        settings.require("autodiscover_email")
    if settings.autodiscover_email and "@" not in settings.autodiscover_email:
        raise ConfigError(f"autodiscover_email: must be a mailbox address, user@domain (got {settings.autodiscover_email!r})")
    if settings.ews_url or settings.autodiscover_email:
        if settings.auth_type in ("basic", "ntlm"):
            settings.require("ews_username", "ews_password")
        else:
            settings.require("client_id", "client_secret")
            if not settings.token_url:
                settings.require("tenant_id")
    if settings.webhook_url:
        settings.require("webhook_secret")
    if settings.salesforce_login_url:
        settings.require("salesforce_client_id", "salesforce_username", "salesforce_private_key_file")
