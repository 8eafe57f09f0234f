"""A plain HTTP client for Microsoft Graph: app-only tokens by msal, retries, typed errors, $batch.

Why not msgraph-sdk: ~380 MB installed and ~1 s to import, for the handful of calls a listener
and a worker make (read a message, its MIME, folders, message delta, subscriptions).

What every request gets:

- a token from msal's client-credentials flow (secret or certificate), cached by msal; a 401
  ``InvalidAuthenticationToken`` drops the cached token and tries once more with a fresh one;
- ``Prefer: IdType="ImmutableId"`` (merged with any other preference, e.g. odata.maxpagesize),
  so an item keeps its id when a rule or the user moves it (also inside ``$batch``);
- ``verify=ca_file`` (a private CA, the emulator's) or the system's CAs, and a timeout, given per
  request, token host included (see ``_TokenHttp``);
- retries of 429/503/504 honouring ``Retry-After`` (seconds, may be fractional) and of network
  errors with ``core.backoff``, all within one sleep budget per call. Past the budget the call
  raises ``GraphUnavailable``: the job or the catch-up is retried later, it never sleeps long.

The HTTP session and the msal application (which holds a session of its own) are built in the
process that uses them and tagged with its pid: after a fork the child starts cold. Error text
never contains the client secret or a token (``core.config.scrub``, and the token is blanked).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import json as jsonlib
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
import requests.adapters

from exchange_listener.core import logs
from exchange_listener.core.backoff import Backoff
from exchange_listener.core.config import ConfigError, Settings, scrub

SCOPES = ["https://graph.microsoft.com/.default"]
DEFAULT_AUTHORITY = "https://login.microsoftonline.com/{tenant}"
TOKEN_PATH = "/oauth2/v2.0/token"
IMMUTABLE_IDS = 'IdType="ImmutableId"'
BATCH_LIMIT = 20  # requests per $batch, Graph's documented maximum
RETRY_STATUSES = frozenset({429, 503, 504})
BATCH_RETRY_STATUSES = frozenset({429, 503})  # sub-responses retried inside a $batch
TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
BUDGET = 30.0  # seconds one call may spend waiting between retries (Retry-After or backoff)
MAX_ATTEMPTS = 8  # tries of one request (first included), whatever the budget says

log = logs.get_logger(component="graph")


class GraphError(Exception):
    """Graph refused a request: ``status`` (0 when no HTTP answer), Graph's error ``code``, message."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None):
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        super().__init__(f"Graph {status or 'request'} {code}: {message}" if code else f"Graph {status}: {message}")


class NotFound(GraphError):
    """404: the item, folder or mailbox does not exist (any more)."""


class SyncStateNotFound(GraphError):
    """410: the delta (or skip) token is no longer known to Graph; a full resync is needed."""


class GraphUnavailable(GraphError):
    """Network failure, 5xx, or throttled past the retry budget: try again later."""


class AuthenticationFailed(GraphError):
    """The token host refused our credentials, or Graph refused a fresh token (401)."""


def user_path(mailbox: str) -> str:
    """``users/{address}``, the address percent-quoted (a ``+`` or ``/`` in it stays one segment)."""
    return "users/" + quote(mailbox, safe="@")


def retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (seconds, fractional or an HTTP date), else None."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - time.time())


def body_bytes(body: Any) -> bytes:
    """A $batch sub-response body as bytes: Graph base64-encodes bodies that are not JSON."""
    if body is None:
        return b""
    if isinstance(body, (dict, list)):
        return jsonlib.dumps(body).encode()
    text = str(body)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text.encode("utf-8", "surrogateescape")


def merge_prefer(*values: str | None) -> str:
    """One ``Prefer`` value holding every preference given (duplicates dropped, order kept)."""
    seen: list[str] = []
    for value in values:
        for part in (value or "").split(","):
            part = part.strip()
            if part and part.lower() not in (p.lower() for p in seen):
                seen.append(part)
    return ", ".join(seen)


class _Budget:
    """Seconds left to spend sleeping before retries, shared by every request of one call."""

    def __init__(self, seconds: float):
        self.left = seconds

    def take(self, wait: float) -> bool:
        if wait > self.left:
            return False
        self.left -= wait
        return True


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_PEM_KEY = re.compile(r"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


def certificate_credential(path: str) -> dict[str, str]:
    """msal's credential from one PEM file holding the app's certificate and its private key.

    Only the certificate is handed over, not a thumbprint: msal then signs the assertion with
    the certificate's SHA-256 thumbprint (PS256), and sends the chain (x5c) for SN/I auth."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"client_certificate_file {path}: cannot be read ({type(exc).__name__})") from None
    cert, key = _PEM_CERT.search(text), _PEM_KEY.search(text)
    if not cert or not key:
        raise ConfigError(f"client_certificate_file {path}: must hold a PEM certificate and its private key")
    if key.group(1).startswith("ENCRYPTED"):
        raise ConfigError(f"client_certificate_file {path}: the private key must not be encrypted")
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        private = load_pem_private_key(key.group(0).encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"client_certificate_file {path}: the private key cannot be read") from None
    if not isinstance(private, rsa.RSAPrivateKey):  # msal signs PS256/RS256; Entra takes RSA certificates
        raise ConfigError(f"client_certificate_file {path}: the key must be an RSA key")
    return {"private_key": key.group(0), "public_certificate": cert.group(0)}


def authority_of(settings: Settings) -> str:
    """The msal authority: token_url without its ``/oauth2/v2.0/token``, else Microsoft's login host."""
    if settings.token_url:
        return settings.token_url.rstrip("/").removesuffix(TOKEN_PATH)
    if not settings.tenant_id:
        raise ConfigError("Graph needs tenant_id (or token_url)")
    return DEFAULT_AUTHORITY.format(tenant=settings.tenant_id)


class _TokenHttp:
    """The HTTP client msal uses for the token host: our session, ``verify`` passed on every call.

    Left to itself msal sets ``session.verify = ca_file``, which requests ignores whenever
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE is set (the environment wins over a session's
    verify; only a per-request value beats it), and the token host then fails TLS."""

    def __init__(self, session: requests.Session, verify: str | bool, timeout: tuple[float, float]):
        self.session, self.verify, self.timeout = session, verify, timeout

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.session.get(url, **self._options(kwargs))

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.session.post(url, **self._options(kwargs))

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs["verify"] = self.verify
        kwargs.setdefault("timeout", self.timeout)
        return kwargs

    def close(self) -> None:  # the session is the client's; it closes it
        pass


class GraphClient:
    """Requests to one Graph endpoint with one app's credentials. Cheap to build: nothing talks
    to the network until the first request. Safe across a fork (the pid tag, see the module)."""

    def __init__(self, settings: Settings, *, budget: float = BUDGET,
                 timeout: tuple[float, float] = TIMEOUT):
        self.settings = settings
        self.base = settings.graph_url.rstrip("/")
        self.verify: str | bool = settings.ca_file or True
        self.budget = budget
        self.timeout = timeout
        self._pid: int | None = None
        self._session: requests.Session | None = None
        self._app: Any = None  # msal.ConfidentialClientApplication, built on first token
        self._token: str | None = None

    # -- per-process objects -------------------------------------------------------------------
    def _fresh(self) -> None:
        if self._pid == os.getpid():
            return
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._app, self._token, self._pid = None, None, os.getpid()

    @property
    def session(self) -> requests.Session:
        self._fresh()
        assert self._session is not None
        return self._session

    def _credential(self) -> str | dict[str, str]:
        if self.settings.client_secret:
            return str(self.settings.client_secret)
        if self.settings.client_certificate_file:
            return certificate_credential(self.settings.client_certificate_file)
        raise ConfigError("Graph needs client_secret or client_certificate_file")

    def _msal(self) -> Any:
        self._fresh()
        if self._app is None:
            if not self.settings.client_id:
                raise ConfigError("Graph needs client_id")
            import msal  # type: ignore[import-untyped]  # here, so a worker that never runs a Graph job does not pay for the import

            credential = self._credential()
            try:
                self._app = msal.ConfidentialClientApplication(
                    self.settings.client_id, client_credential=credential, authority=authority_of(self.settings),
                    http_client=_TokenHttp(self.session, self.verify, self.timeout),
                    instance_discovery=False if self.settings.token_url else None)
            except (requests.RequestException, OSError) as exc:
                raise GraphUnavailable(0, type(exc).__name__, self._describe(exc)) from None
            except msal.exceptions.MsalServiceError as exc:  # the token host answered discovery with an error
                raise GraphUnavailable(0, "TokenHostError", self._describe(exc)) from None
            except ValueError as exc:  # msal: authority discovery refused (bad tenant, bad answer)
                raise AuthenticationFailed(0, "InvalidAuthority", self._describe(exc)) from None
        return self._app

    def token(self, *, fresh: bool = False) -> str:
        """An app-only access token (msal's cache; ``fresh`` drops the cached one first)."""
        app = self._msal()
        import msal  # (imported by _msal already; for its exception types)

        if fresh:
            app.remove_tokens_for_client()
        try:
            result = app.acquire_token_for_client(scopes=SCOPES)
        except (requests.RequestException, OSError) as exc:
            raise GraphUnavailable(0, type(exc).__name__, self._describe(exc)) from None
        except msal.exceptions.MsalServiceError as exc:  # the token host answered 5xx
            raise GraphUnavailable(0, "TokenHostError", self._describe(exc)) from None
        token = (result or {}).get("access_token")
        if token:
            self._token = token
            return str(token)
        error = str((result or {}).get("error") or "token_error")
        text = self._scrub(str((result or {}).get("error_description") or "").splitlines()[0][:300]
                           if (result or {}).get("error_description") else "no access token")
        if error in ("temporarily_unavailable", "server_error"):
            raise GraphUnavailable(0, error, text)
        raise AuthenticationFailed(401, error, text)

    # -- requests --------------------------------------------------------------------------------
    def url(self, url: str, params: Mapping[str, Any] | None = None) -> str:
        """Absolute URL of ``url`` (relative to graph_url, or a nextLink/deltaLink), with ``params``.

        OData's ``$`` and the commas of ``$select`` stay as they are, as Graph's own links have them.
        An absolute URL on another host than graph_url is refused: our token goes nowhere else."""
        if url.startswith(("http://", "https://")):
            mine, theirs = urlsplit(self.base), urlsplit(url)
            if (mine.scheme, mine.netloc) != (theirs.scheme, theirs.netloc):
                raise GraphError(0, "ForeignLink", f"refusing a link to {theirs.scheme}://{theirs.netloc}")
            full = url
        else:
            full = f"{self.base}/{url.lstrip('/')}"
        if params:
            full += ("&" if "?" in full else "?") + urlencode(params, safe="$,'()=:@/", quote_via=quote)
        return full

    def _headers(self, extra: Mapping[str, str] | None, token: str) -> dict[str, str]:
        headers = {k: v for k, v in (extra or {}).items() if k.lower() != "prefer"}
        prefer = next((v for k, v in (extra or {}).items() if k.lower() == "prefer"), None)
        headers["Prefer"] = merge_prefer(IMMUTABLE_IDS, prefer)
        headers["Authorization"] = f"Bearer {token}"
        headers["client-request-id"] = str(uuid.uuid4())
        return headers

    def request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None, json: Any = None,
                headers: Mapping[str, str] | None = None, _budget: _Budget | None = None) -> requests.Response:
        """One request, retried as the module says; a 2xx/3xx response or a typed ``GraphError``."""
        budget = _budget or _Budget(self.budget)
        full = self.url(url, params)
        backoff = Backoff(0.5, 8.0)
        refreshed = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            token = self.token()
            try:
                resp = self.session.request(method, full, json=json, headers=self._headers(headers, token),
                                            timeout=self.timeout, verify=self.verify, allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                wait = backoff.next()
                if attempt == MAX_ATTEMPTS or not budget.take(wait):
                    raise GraphUnavailable(0, type(exc).__name__, self._describe(exc)) from None
                log.info("graph request failed; retrying", method=method, error=type(exc).__name__, wait=round(wait, 3))
                time.sleep(wait)
                continue
            if resp.status_code < 400:
                return resp
            error = self.error_of(resp.status_code, resp.headers, self._json(resp))
            if resp.status_code == 401 and not refreshed and error.code == "InvalidAuthenticationToken":
                refreshed = True
                self.token(fresh=True)  # a new token for the next attempt
                continue
            if resp.status_code in RETRY_STATUSES:
                asked = error.retry_after
                wait = asked if asked is not None else backoff.next()
                if attempt == MAX_ATTEMPTS or not budget.take(wait):
                    raise GraphUnavailable(error.status, error.code, error.message + " (retry budget spent)",
                                           retry_after=asked)
                log.info("graph throttled or busy; retrying", method=method, status=resp.status_code, wait=round(wait, 3))
                time.sleep(wait)
                continue
            raise error
        raise GraphUnavailable(0, "TooManyAttempts", f"{method} failed {MAX_ATTEMPTS} times")  # not reached

    def get_json(self, url: str, *, params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        resp = self.request("GET", url, params=params, headers=headers)
        data = self._json(resp)
        if not isinstance(data, dict):
            raise GraphUnavailable(resp.status_code, "NotJson", "the response is not a JSON object")
        return data

    def batch(self, requests_: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Run ``requests_`` (each ``{"url", "method"="GET", "headers"?, "body"?}``, url relative to
        graph_url) in ``$batch`` calls of at most 20; the answers in request order as
        ``{"status", "headers", "body"}``. Sub-responses 429/503 are sent again (only those,
        after their Retry-After) within the budget; past it they are returned as they are."""
        budget = _Budget(self.budget)
        out: list[dict[str, Any]] = []
        for start in range(0, len(requests_), BATCH_LIMIT):
            out.extend(self._batch_chunk(requests_[start:start + BATCH_LIMIT], budget))
        return out

    def _batch_chunk(self, chunk: Sequence[Mapping[str, Any]], budget: _Budget) -> list[dict[str, Any]]:
        answers: list[dict[str, Any] | None] = [None] * len(chunk)
        pending = list(range(len(chunk)))
        backoff = Backoff(0.5, 8.0)
        while pending:
            body = {"requests": [self._sub_request(i, chunk[i]) for i in pending]}
            resp = self.request("POST", "$batch", json=body, headers={"Content-Type": "application/json"},
                                _budget=budget)
            data = self._json(resp)
            responses = {str(r.get("id")): r for r in (data or {}).get("responses", []) if isinstance(r, dict)}
            again: list[int] = []
            waits: list[float] = []
            for i in pending:
                sub = responses.get(str(i))
                if sub is None:  # Graph answers every id; a missing one is treated as busy
                    sub = {"status": 503, "headers": {}, "body": {"error": {"code": "NoResponse",
                                                                           "message": "no answer in the $batch"}}}
                status = int(sub.get("status") or 0)
                sub_headers: dict[str, Any] = dict(sub.get("headers") or {})
                answers[i] = {"status": status, "headers": sub_headers, "body": sub.get("body")}
                if status in BATCH_RETRY_STATUSES:
                    again.append(i)
                    asked = retry_after(sub_headers)
                    if asked is not None:
                        waits.append(asked)
            if not again:
                break
            wait = max(waits) if waits else backoff.next()
            if not budget.take(wait):
                log.info("graph $batch items still throttled; budget spent", items=len(again))
                break
            log.info("graph $batch items throttled; retrying them", items=len(again), wait=round(wait, 3))
            time.sleep(wait)
            pending = again
        return [a if a is not None else {"status": 0, "headers": {}, "body": None} for a in answers]

    def _sub_request(self, index: int, req: Mapping[str, Any]) -> dict[str, Any]:
        url = str(req["url"])
        url = url.removeprefix(self.base)
        headers = {k: v for k, v in (req.get("headers") or {}).items() if k.lower() != "prefer"}
        prefer = next((v for k, v in (req.get("headers") or {}).items() if k.lower() == "prefer"), None)
        headers["Prefer"] = merge_prefer(IMMUTABLE_IDS, prefer)
        sub: dict[str, Any] = {"id": str(index), "method": req.get("method", "GET"), "url": "/" + url.lstrip("/"),
                               "headers": headers}
        if req.get("body") is not None:
            sub["body"] = req["body"]
            headers.setdefault("Content-Type", "application/json")
        return sub

    # -- errors ----------------------------------------------------------------------------------
    def error_of(self, status: int, headers: Mapping[str, Any] | None, body: Any) -> GraphError:
        """The typed error for an HTTP (or $batch sub-) response ``status`` with ``body``."""
        error = body.get("error") if isinstance(body, dict) else None
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
        message = str(error.get("message") or "") if isinstance(error, dict) else ""
        if not message and isinstance(body, (str, bytes)):
            message = (body.decode("utf-8", "replace") if isinstance(body, bytes) else body)[:200]
        message = self._scrub(message.splitlines()[0][:300] if message else "")
        asked = retry_after(headers)
        cls: type[GraphError] = GraphError
        if status == 404:
            cls = NotFound
        elif status == 410:
            cls = SyncStateNotFound
        elif status == 401:
            cls = AuthenticationFailed
        elif status in RETRY_STATUSES or status >= 500:
            cls = GraphUnavailable
        return cls(status, code, message, retry_after=asked)

    @staticmethod
    def _json(resp: requests.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            return resp.text[:300] if resp.content else None

    def _scrub(self, text: str) -> str:
        text = scrub(text, self.settings)
        if self._token:
            text = text.replace(self._token, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return self._scrub(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)

    def close(self) -> None:
        """Close this process's HTTP session (a forked child's copy is left alone)."""
        if self._session is not None and self._pid == os.getpid():
            self._session.close()
        self._session, self._app, self._token, self._pid = None, None, None, None
