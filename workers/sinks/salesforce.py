"""Log a prospect's reply, bounce or out-of-office on their Salesforce Lead or Contact.

The third channel of ``workers.sinks.webhooks.Notifier`` (docs/salesforce.md is the admin's
guide). For each outbox transition whose event is in ``salesforce_events``:

- event: ``replied`` = stopped/replied, ``bounced`` = stopped/bounced, ``paused`` =
  paused/auto_reply. Other transitions (a colleague's domain reply ``domain_replied``, a
  complaint, a resume) are not logged: they are done on this channel at once.
- who: the enrollment's ``prospect`` (the first ``to`` address of its first recorded send), not
  the reply's sender, so a colleague's answer is logged on the prospect's record. A Contact is
  looked up first, then an unconverted Lead: a person who became a Contact has a converted Lead
  left behind (which takes no new activities), and the Contact is where the account team looks.
  Several matches: the first Salesforce returns is used.
- what (``salesforce_activity``): a completed Task (``task``, default) with TaskSubtype Email, or
  an EmailMessage linked to the record by an EmailMessageRelation (``email_message``).
- once: the activity carries the transition id in the external-id field
  ``ExchangeListener_Transition_Id__c`` (on Activity, and on EmailMessage for that mode). A
  delivery first reads the activity by that id and writes it only when missing, by an upsert on
  the same id. Two deliveries of one transition at once (a drainer outliving its lease) both
  find it missing and both upsert: Salesforce makes one row and answers the other with an update
  (200, created false) or a refusal (TaskSubtype and a received EmailMessage's fields cannot be
  updated; DUPLICATE_VALUE), after which the row is there by that id: either way the activity is
  "already logged", not a failure. An EmailMessage's relation has no external id: it is created
  when a query finds none for that message and record, then queried again, and of several (two
  deliveries raced) all but the lowest id are deleted, so both racers keep the same one. A crash
  between the writes heals on retry.
- unmatched: no Contact or Lead with the prospect's address is noted in
  ``el:salesforce:unmatched`` under the address; an enrollment with no prospect on record
  (enrolled before prospects were recorded) under ``enrollment:{id}``; each with the last such
  transition and the reason. The channel is then done: retrying would find nothing either. The
  notes hold addresses, so they are kept ``retention_days``: each write drops notes older than
  that and sets the key to expire that long after the last write.

Time: a delivery is up to eight requests (token, Contact, Lead, read, upsert, relation query,
create and re-query, a token renewal). ``deliver`` takes an absolute ``deadline`` (monotonic
clock; the Notifier gives the channel's budget, well inside the outbox lease) and gives each
request only what is left of it, at most ``timeout``; once it has passed, ``Down`` with
``out_of_time`` and nothing more is sent. Every write is keyed by the transition id, so a
delivery stopped anywhere is completed, not repeated, by the next.

Access: OAuth 2.0 JWT bearer flow (RS256 assertion signed with ``salesforce_private_key_file``,
``exp`` 170 s ahead as Salesforce allows at most 3 minutes); the token is cached per process
and fetched again once when Salesforce answers 401 INVALID_SESSION_ID. Salesforce unavailable
(connection errors, timeouts, 5xx, 403 REQUEST_LIMIT_EXCEEDED - a rolling 24-hour org limit)
raises ``Down`` (with Salesforce's Retry-After, if any): the Notifier hands the entries back
without spending an attempt and backs the channel off, so nothing is ever given up because
Salesforce was down or over its limit. Any other refusal raises ``Refused``: an attempt is
spent, retried with backoff, then given up like a webhook. The private key is read once and kept
only as a key object; neither it nor the access token appears in a log line, an exception or
Redis.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
import redis
import requests
from cryptography.hazmat.primitives import serialization

from exchange_listener.core import keys, logs
from exchange_listener.core.config import ConfigError, Settings, default
from workers.state.transitions import Transition

API_VERSION = "v59.0"
EXTERNAL_ID_FIELD = "ExchangeListener_Transition_Id__c"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_SECONDS = 170  # Salesforce: exp at most 3 minutes ahead
EVENTS = {("stopped", "replied"): "replied", ("stopped", "bounced"): "bounced", ("paused", "auto_reply"): "paused"}
SUBJECTS = {"replied": "Email reply received", "bounced": "Email bounced", "paused": "Auto-reply (out of office)"}
UNMATCHED_KEY = keys.SALESFORCE_UNMATCHED
NO_PROSPECT = "no prospect on record (enrolled before this version)"
NO_RECORD = "no Contact or Lead with this email"
MIN_REQUEST_SECONDS = 0.05  # less left than this: the delivery is out of time, no request is started


class Down(Exception):
    """Salesforce is unavailable as a whole, or this delivery ran out of time (``out_of_time``:
    its deadline passed, or a request cut short by it timed out). ``retry_after``: the seconds
    Salesforce's Retry-After asked for; ``limit``: 403 REQUEST_LIMIT_EXCEEDED."""

    def __init__(self, message: str, *, timed_out: bool = False, out_of_time: bool = False,
                 retry_after: float | None = None, limit: bool = False):
        super().__init__(message)
        self.timed_out, self.out_of_time, self.retry_after, self.limit = timed_out, out_of_time, retry_after, limit


class Refused(Exception):
    """Salesforce refused this transition's request (an attempt is spent)."""


@dataclasses.dataclass
class _Token:
    access_token: str
    instance_url: str

    def __repr__(self) -> str:  # never show the token
        return f"_Token(instance_url={self.instance_url!r})"


_TOKENS: dict[tuple[str, str, str], _Token] = {}  # per process: (login URL, client id, user) -> token
_TOKENS_LOCK = threading.Lock()


def audience(login_url: str) -> str:
    """The JWT ``aud``: Salesforce wants the login host, test.salesforce.com for sandboxes
    (also behind a sandbox My Domain), else login.salesforce.com."""
    host = (urlsplit(login_url).hostname or "").lower()
    sandbox = host == "test.salesforce.com" or host.endswith(".sandbox.my.salesforce.com")
    return "https://test.salesforce.com" if sandbox else "https://login.salesforce.com"


def soql_string(text: str) -> str:
    """``text`` as a quoted SOQL literal (backslash and quote escaped, control characters named)."""
    escaped = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
    return "'" + "".join(escaped.get(c, c) for c in text) + "'"


def load_private_key(path: str) -> Any:
    """The key object from a PEM file; ConfigError naming only the file and the kind of problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"salesforce_private_key_file: cannot read {path!r} ({exc.strerror or type(exc).__name__})")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # the message never quotes the key; ours does not either
        raise ConfigError(f"salesforce_private_key_file: {path!r} is not an unencrypted PEM private key "
                          f"({type(exc).__name__})") from None
    finally:
        del data


class SalesforceSink:
    """Logs configured transitions as activities on the prospect's Contact or Lead."""

    def __init__(self, redis_client: redis.Redis, *, login_url: str, client_id: str, username: str,
                 private_key: Any, activity: str = "task", events: tuple[str, ...] = default("salesforce_events"),
                 timeout: float = default("webhook_timeout"), retention_days: int = default("retention_days")):
        if activity not in ("task", "email_message"):
            raise ConfigError("salesforce_activity: task | email_message")
        self.redis = redis_client
        self.login_url, self.client_id, self.username = login_url.rstrip("/"), client_id, username
        self._private_key = private_key  # a key object: its repr shows no key material
        self.activity, self.events, self.timeout = activity, tuple(events), timeout
        self.budget = 2 * timeout  # one delivery's time, all its requests together (the Notifier's default)
        self.retention = int(retention_days) * 86400
        self._local = threading.local()
        self.log = logs.get_logger(component="notify", channel="salesforce")

    @classmethod
    def from_settings(cls, redis_client: redis.Redis, settings: Settings) -> SalesforceSink:
        return cls(redis_client, login_url=settings.salesforce_login_url, client_id=settings.salesforce_client_id,
                   username=settings.salesforce_username,
                   private_key=load_private_key(settings.salesforce_private_key_file),
                   activity=settings.salesforce_activity, events=tuple(settings.salesforce_events),
                   timeout=settings.webhook_timeout, retention_days=settings.retention_days)

    def __repr__(self) -> str:
        return f"SalesforceSink(login_url={self.login_url!r}, username={self.username!r}, activity={self.activity!r})"

    # -- HTTP ------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    @property
    def _cache_key(self) -> tuple[str, str, str]:
        return (self.login_url, self.client_id, self.username)

    def _left(self, deadline: float) -> float:
        """The timeout for the next request: what is left before ``deadline``, at most ``timeout``."""
        left = deadline - time.monotonic()
        if left < MIN_REQUEST_SECONDS:
            raise Down("salesforce delivery out of time", timed_out=True, out_of_time=True)
        return min(self.timeout, left)

    def _token(self, deadline: float, fresh: bool = False) -> _Token:
        with _TOKENS_LOCK:
            cached = None if fresh else _TOKENS.get(self._cache_key)
        if cached:
            return cached
        timeout = self._left(deadline)
        now = int(time.time())
        assertion = jwt.encode({"iss": self.client_id, "sub": self.username, "aud": audience(self.login_url),
                                "exp": now + ASSERTION_SECONDS}, self._private_key, algorithm="RS256")
        try:
            response = self._session().post(f"{self.login_url}/services/oauth2/token", timeout=timeout,
                                            data={"grant_type": JWT_GRANT, "assertion": assertion},
                                            allow_redirects=False)
        except requests.Timeout:
            raise Down("salesforce token endpoint: timed out", timed_out=True,
                       out_of_time=timeout < self.timeout) from None
        except requests.ConnectionError as exc:
            raise Down(f"salesforce token endpoint: unreachable ({type(exc).__name__})") from None
        if response.status_code >= 500:
            raise Down(f"salesforce token endpoint answered HTTP {response.status_code}",
                       retry_after=_retry_after(response))
        body = _json(response)
        if response.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
            error = body if isinstance(body, dict) else {}
            raise Refused(f"salesforce token refused: HTTP {response.status_code} {error.get('error', '')}: "
                          f"{error.get('error_description', '')}".rstrip(": "))
        token = _Token(body["access_token"], str(body.get("instance_url") or self.login_url).rstrip("/"))
        with _TOKENS_LOCK:
            _TOKENS[self._cache_key] = token
        self.log.info("salesforce token obtained", instance=token.instance_url, user=self.username)
        return token

    def _request(self, method: str, path: str, deadline: float, *, expect: tuple[int, ...] = (),
                 **kwargs: Any) -> requests.Response:
        """One REST call under /services/data/vNN.N/, within ``deadline``; a 401 INVALID_SESSION_ID
        gets a new token and one more try. Down / Refused per the module docstring; a status in
        ``expect`` is returned."""
        token = self._token(deadline)
        for second_try in (False, True):
            timeout = self._left(deadline)
            try:
                response = self._session().request(
                    method, f"{token.instance_url}/services/data/{API_VERSION}/{path}", timeout=timeout,
                    headers={"Authorization": f"Bearer {token.access_token}", "Accept": "application/json"},
                    allow_redirects=False, **kwargs)
            except requests.Timeout:
                raise Down(f"salesforce {method} timed out", timed_out=True,
                           out_of_time=timeout < self.timeout) from None
            except requests.ConnectionError as exc:
                raise Down(f"salesforce unreachable ({type(exc).__name__})") from None
            code, errors = response.status_code, _errors(response)
            if code == 401 and "INVALID_SESSION_ID" in errors and not second_try:
                token = self._token(deadline, fresh=True)
                continue
            if 200 <= code < 300 or code in expect:
                return response
            limit = code == 403 and "REQUEST_LIMIT_EXCEEDED" in errors
            if code >= 500 or limit:
                raise Down(f"salesforce answered HTTP {code} ({_detail(response)})", retry_after=_retry_after(response),
                           limit=limit)
            raise Refused(_refusal(method, path, response))
        raise AssertionError("unreachable")

    def _query(self, soql: str, deadline: float) -> list[dict[str, Any]]:
        body = _json(self._request("GET", "query", deadline, params={"q": soql}))
        return list(body.get("records") or []) if isinstance(body, dict) else []

    # -- delivery --------------------------------------------------------------------------
    def event(self, transition: Transition) -> str | None:
        """The configured event this transition is, or None (nothing to log)."""
        name = EVENTS.get((transition.status, transition.reason))
        return name if name in self.events else None

    def deliver(self, transition: Transition, deadline: float | None = None) -> str:
        """Log ``transition`` by ``deadline`` (``time.monotonic()`` value; default: ``budget`` from
        now): "logged", "already_logged", "unmatched" or "skipped" (not an event to log). Down or
        Refused if it could not be done now."""
        deadline = time.monotonic() + self.budget if deadline is None else deadline
        event = self.event(transition)
        if event is None:
            return "skipped"
        raw = self.redis.hget(keys.enrollment(transition.enrollment_id), "prospect")
        prospect = raw.decode() if isinstance(raw, bytes) else (raw or "")
        record = self._find_person(prospect, deadline) if prospect else None
        if record is None:
            self._unmatched(transition, event, prospect)
            return "unmatched"
        sobject, record_id = record
        bound = self.log.bind(transition_id=transition.id, enrollment_id=transition.enrollment_id, salesforce_event=event,
                              record=record_id, record_type=sobject)
        if self.activity == "task":
            outcome, activity_id = self._log_task(transition, event, prospect, record_id, deadline)
        else:
            outcome, activity_id = self._log_email_message(transition, event, prospect, record_id, deadline)
        bound.info("salesforce activity " + outcome.replace("_", " "), activity=self.activity, activity_id=activity_id)
        return outcome

    def _find_person(self, prospect: str, deadline: float) -> tuple[str, str] | None:
        """(type, id) of the Contact with this email, else of the unconverted Lead; None if neither."""
        for sobject, extra in (("Contact", ""), ("Lead", " AND IsConverted = false")):
            found = self._query(f"SELECT Id FROM {sobject} WHERE Email = {soql_string(prospect)}{extra} LIMIT 1",
                                deadline)
            if found:
                return sobject, str(found[0]["Id"])
        return None

    def _existing(self, sobject: str, transition_id: str, deadline: float) -> str | None:
        """The id of the activity already logged for this transition, if any."""
        response = self._request("GET", f"sobjects/{sobject}/{EXTERNAL_ID_FIELD}/{quote(transition_id, safe='')}",
                                 deadline, expect=(404,), params={"fields": "Id"})
        if response.status_code == 404:
            return None
        body = _json(response)
        return str(body.get("Id")) if isinstance(body, dict) and body.get("Id") else None

    def _upsert(self, sobject: str, transition_id: str, fields: dict[str, Any], deadline: float) -> tuple[str, bool]:
        """(id, made by this call). A concurrent delivery of the same transition may have made the
        row since we looked: Salesforce then updates it (created false) or refuses the update
        (create-only fields, DUPLICATE_VALUE); if the row is there by its id, it is logged."""
        path = f"sobjects/{sobject}/{EXTERNAL_ID_FIELD}/{quote(transition_id, safe='')}"
        response = self._request("PATCH", path, deadline, expect=(400,), json=fields)
        if response.status_code == 400:
            existing = self._existing(sobject, transition_id, deadline)
            if existing:
                return existing, False
            raise Refused(_refusal("PATCH", path, response))
        body = _json(response)
        if not isinstance(body, dict) or not body.get("id"):
            raise Refused(f"salesforce upsert of {sobject} answered HTTP {response.status_code} without an id")
        return str(body["id"]), response.status_code == 201  # 200: updated, so made by someone else

    def _log_task(self, t: Transition, event: str, prospect: str, record_id: str, deadline: float) -> tuple[str, str]:
        existing = self._existing("Task", t.id, deadline)
        if existing:
            return "already_logged", existing
        fields = {"Subject": _subject(event, prospect), "Description": _description(t, event, prospect),
                  "WhoId": record_id, "Status": "Completed", "ActivityDate": t.at[:10], "TaskSubtype": "Email",
                  "Priority": "Normal"}
        task_id, created = self._upsert("Task", t.id, fields, deadline)
        return ("logged" if created else "already_logged"), task_id

    def _log_email_message(self, t: Transition, event: str, prospect: str, record_id: str,
                           deadline: float) -> tuple[str, str]:
        message_id = self._existing("EmailMessage", t.id, deadline)
        outcome = "already_logged"
        if message_id is None:
            fields = {"Subject": _subject(event, prospect), "TextBody": _description(t, event, prospect),
                      "FromAddress": t.by or prospect, "ToAddress": t.mailbox or "", "Incoming": True, "Status": "0",
                      "MessageDate": t.at, "MessageIdentifier": t.message_id or ""}
            message_id, created = self._upsert("EmailMessage", t.id, fields, deadline)
            outcome = "logged" if created else outcome
        linked = self._relations(message_id, record_id, deadline)
        if not linked:
            # the prospect wrote it, or was party to a thread a colleague answered
            from_prospect = (t.by or "").lower() == prospect.lower()
            self._request("POST", "sobjects/EmailMessageRelation", deadline, json={
                "EmailMessageId": message_id, "RelationId": record_id, "RelationAddress": prospect,
                "RelationType": "FromAddress" if from_prospect else "CcAddress"})
            outcome = "logged"
            linked = self._relations(message_id, record_id, deadline)
        for extra in linked[1:]:  # a concurrent delivery made one too: every racer keeps the lowest id
            self._request("DELETE", f"sobjects/EmailMessageRelation/{quote(extra, safe='')}", deadline, expect=(404,))
        return outcome, message_id

    def _relations(self, message_id: str, record_id: str, deadline: float) -> list[str]:
        """Ids of the relations between this message and record, lowest first."""
        rows = self._query(f"SELECT Id FROM EmailMessageRelation WHERE EmailMessageId = {soql_string(message_id)} "
                           f"AND RelationId = {soql_string(record_id)}", deadline)
        return sorted(str(r["Id"]) for r in rows if r.get("Id"))

    # -- unmatched -------------------------------------------------------------------------
    def _unmatched(self, t: Transition, event: str, prospect: str) -> None:
        field = prospect.lower() if prospect else f"enrollment:{t.enrollment_id}"
        now = time.time()
        note = {"transition_id": t.id, "enrollment_id": t.enrollment_id, "event": event, "at": t.at,
                "reason": NO_RECORD if prospect else NO_PROSPECT, "noted_at": _iso(now)}
        self._note(field, json.dumps(note), oldest=_iso(now - self.retention))
        self.log.info("salesforce: no Contact or Lead for the prospect, not logged", transition_id=t.id,
                      enrollment_id=t.enrollment_id, prospect=prospect or None, salesforce_event=event,
                      reason=note["reason"])

    def _note(self, field: str, value: str, oldest: str) -> None:
        """Write one note, drop the notes taken before ``oldest`` and let the key expire
        ``retention`` after this write; in one transaction (WATCH: a concurrent note is kept)."""
        for _ in range(5):
            try:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.watch(UNMATCHED_KEY)
                    stale = [k for k, v in pipe.hgetall(UNMATCHED_KEY).items() if _noted_at(v) < oldest]
                    pipe.multi()
                    if stale:
                        pipe.hdel(UNMATCHED_KEY, *stale)
                    pipe.hset(UNMATCHED_KEY, field, value)
                    pipe.expire(UNMATCHED_KEY, self.retention)
                    pipe.execute()
                return
            except redis.WatchError:
                continue
        pipe = self.redis.pipeline(transaction=True)  # busy: note it now, the next note prunes
        pipe.hset(UNMATCHED_KEY, field, value)
        pipe.expire(UNMATCHED_KEY, self.retention)
        pipe.execute()

    def unmatched(self) -> dict[str, dict[str, Any]]:
        """What was not logged: prospect address (or ``enrollment:{id}``) -> the last such
        transition and the reason."""
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                for k, v in self.redis.hgetall(UNMATCHED_KEY).items()}


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _noted_at(raw: bytes | str) -> str:
    """A note's ``noted_at`` (ISO, sorts as text); a note that cannot be read is kept ("~")."""
    try:
        noted = json.loads(raw)
    except ValueError:
        return "~"
    value = noted.get("noted_at") if isinstance(noted, dict) else None
    return value if isinstance(value, str) and value else "~"


def _subject(event: str, prospect: str) -> str:
    return f"{SUBJECTS[event]}: {prospect}"[:255]


def _description(t: Transition, event: str, prospect: str) -> str:
    lines = [f"{SUBJECTS[event]} (exchange-listener: enrollment {t.status}, reason {t.reason})",
             f"Prospect: {prospect}"]
    lines += [f"{label}: {value}" for label, value in (
        ("From", t.by), ("Mailbox", t.mailbox), ("Message-ID", t.message_id), ("Paused until", t.paused_until),
        ("Sequence", t.sequence_id), ("Enrollment", t.enrollment_id), ("At", t.at), ("Transition", t.id)) if value]
    return "\n".join(lines)


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: requests.Response) -> str:
    return "; ".join(f"{c}: {m}" for c, m in _errors(response).items()) or response.reason


def _refusal(method: str, path: str, response: requests.Response) -> str:
    return f"salesforce {method} {path.split('?')[0]} answered HTTP {response.status_code} ({_detail(response)})"


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


def _errors(response: requests.Response) -> dict[str, str]:
    """Salesforce's error list ``[{"errorCode", "message"}]`` as code -> message."""
    body = _json(response)
    if not isinstance(body, list):
        return {}
    return {str(e.get("errorCode")): str(e.get("message", ""))[:300] for e in body if isinstance(e, dict)}
