"""A Salesforce REST emulator: the JWT bearer token endpoint, SOQL queries and sObject rows.

What it serves, as Salesforce's REST API documents it:

- ``POST /services/oauth2/token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  and ``assertion=<JWT>``: the claims ``iss`` (a connected app's consumer key), ``aud``
  (https://login.salesforce.com, https://test.salesforce.com or this server's own URL), ``sub``
  (a seeded User's ``Username``) and ``exp`` (in the future, at most 3 minutes ahead plus a
  short allowance for clock skew) are checked; with ``jwt_cert`` the RS256 signature is verified
  against that X.509 certificate (the one uploaded to the connected app). Success is 200 with
  ``access_token``, ``instance_url``, ``token_type``, ``scope``, ``id``, ``issued_at``; a refusal
  is 400 ``{"error": ..., "error_description": ...}``.
- ``/services/data/vNN.N/``: ``GET query?q=SOQL`` (the subset in ``emulators.salesforce.soql``),
  ``POST sobjects/{Type}`` (create: 201 ``{"id", "success", "errors"}``),
  ``PATCH sobjects/{Type}/{ExternalIdField}/{value}`` (upsert: 201 with ``"created": true`` when
  made, 200 with ``"created": false`` when updated), ``GET sobjects/{Type}/{id}`` and
  ``GET sobjects/{Type}/{ExternalIdField}/{value}`` (both take ``?fields=A,B``), ``DELETE
  sobjects/{Type}/{id}`` (204).
- External-id fields are unique: a create or upsert that would give a second row the same value
  is 400 DUPLICATE_VALUE.
- A received (non-draft, ``Status`` other than ``5``) EmailMessage takes updates to custom
  fields only, as Salesforce's EmailMessage reference says; and its EmailMessageRelation rows
  may be created or deleted only by a user with the "Update Email Messages" permission (seeded
  as the User's ``PermissionsUpdateEmailMessages``), else 400
  INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY. A draft's relations need no permission.
- Errors as a JSON list ``[{"message", "errorCode", "fields"?}]``: 401 INVALID_SESSION_ID for a
  missing, unknown or expired token; 403 REQUEST_LIMIT_EXCEEDED; 400 MALFORMED_QUERY,
  INVALID_FIELD, INVALID_FIELD_FOR_INSERT_UPDATE (e.g. Task.TaskSubtype, which can be set on
  create only), INVALID_CROSS_REFERENCE_KEY, REQUIRED_FIELD_MISSING, JSON_PARSER_ERROR,
  DUPLICATE_VALUE; 404 NOT_FOUND (unknown object, row or external-id field), ENTITY_IS_DELETED
  (a deleted row); 503 when the fault asks for it.

Test hooks: ``POST /emulator/records/{Type}`` seeds a row (no validation; returns its id),
``GET /emulator/records/{Type}`` lists the rows held, ``POST /emulator/faults`` with
``{"kind": "expire_sessions"}``, ``{"kind": "request_limit", "count": N}`` or
``{"kind": "http_503", "count": N}`` (503 and 403 REQUEST_LIMIT_EXCEEDED carry ``Retry-After``
when the fault gives ``retry_after``), ``{"kind": "latency", "seconds": S, "count": N}`` (the next
N API requests wait S seconds before they are handled, so concurrent clients' requests overlap
as they would over a slow link), ``GET /emulator/stats`` (token grants, API requests),
``POST /emulator/reset`` (no rows, sessions, faults or counts).

Where it knowingly differs from Salesforce:
- Objects and fields are a fixed, small schema (User, Lead, Contact, Task, EmailMessage,
  EmailMessageRelation, with the fields in ``SCHEMA``); external-id fields are those given in
  ``Options.external_ids`` and are unique, compared exactly (a case-sensitive unique field). No
  sharing, field-level security, triggers, validation rules, Shared Activities or 300 Multiple
  Choices answers. Permissions: only "Update Email Messages", held on the User row (Salesforce
  keeps it on a profile or permission set); the refusal's code and text are the emulator's own.
  Any other user may do anything. The refused update of a received EmailMessage's standard
  field answers INVALID_FIELD_FOR_INSERT_UPDATE (the emulator's choice of code).
- SOQL: only the subset above; a string ``=`` compares case-insensitively, as Salesforce does
  for text fields. Rows come back in creation order (Salesforce promises no order without
  ORDER BY).
- Token refusal texts Salesforce does not document are the emulator's own: a bad signature or
  an unreadable assertion is ``invalid_grant`` / ``invalid assertion``; an unknown user is
  ``invalid_grant`` / ``user hasn't approved this consumer``. Sessions never time out by
  themselves; ``expire_sessions`` ends them all at once. ``issued_at``/``id`` are synthetic.
- Ids are 18 characters with Salesforce's case-safe suffix, but the key prefixes are the only
  real part; ``Name`` of a Lead/Contact is built from FirstName/LastName on write only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import json
import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

import jwt
from aiohttp import web

from emulators.salesforce import soql
from exchange_listener.core import logs

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ORG_ID = "00D000000000001AAA"
MAX_EXP_AHEAD = 180 + 120  # Salesforce: exp within 3 minutes; two more for clock skew
KNOWN_AUDIENCES = ("https://login.salesforce.com", "https://test.salesforce.com")
DEFAULT_EXTERNAL_IDS = ("Task.ExchangeListener_Transition_Id__c", "EmailMessage.ExchangeListener_Transition_Id__c")


@dataclasses.dataclass(frozen=True)
class SObject:
    prefix: str  # the id's key prefix
    fields: tuple[str, ...]  # canonical names; Id, CreatedDate, LastModifiedDate are added
    booleans: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()  # YYYY-MM-DD
    datetimes: tuple[str, ...] = ()
    create_only: tuple[str, ...] = ()  # createable, not updateable
    required: tuple[str, ...] = ()  # on create through the API
    references: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # field -> target types
    picklists: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


SCHEMA: dict[str, SObject] = {
    "User": SObject("005", ("Username", "Email", "FirstName", "LastName", "Name", "IsActive",
                            "PermissionsUpdateEmailMessages"), booleans=("IsActive", "PermissionsUpdateEmailMessages"),
                    defaults={"IsActive": True, "PermissionsUpdateEmailMessages": False}),
    "Lead": SObject("00Q", ("Email", "FirstName", "LastName", "Name", "Company", "Status", "IsConverted", "OwnerId"),
                    booleans=("IsConverted",), required=("LastName", "Company"),
                    defaults={"IsConverted": False, "Status": "Open - Not Contacted"}),
    "Contact": SObject("003", ("Email", "FirstName", "LastName", "Name", "AccountId", "OwnerId"),
                       required=("LastName",)),
    "Task": SObject("00T", ("Subject", "Description", "WhoId", "WhatId", "Status", "Priority", "ActivityDate",
                            "TaskSubtype", "Type", "OwnerId", "ExchangeListener_Transition_Id__c"),
                    dates=("ActivityDate",), create_only=("TaskSubtype",),
                    references={"WhoId": ("Lead", "Contact")},
                    picklists={"Status": ("Not Started", "In Progress", "Completed", "Waiting on someone else",
                                          "Deferred"),
                               "TaskSubtype": ("Task", "Email", "ListEmail", "Cadence", "Call", "LinkedIn"),
                               "Priority": ("High", "Normal", "Low")},
                    defaults={"Status": "Not Started", "Priority": "Normal", "TaskSubtype": "Task"}),
    "EmailMessage": SObject("02s", ("Subject", "TextBody", "HtmlBody", "FromAddress", "FromName", "ToAddress",
                                    "CcAddress", "Status", "Incoming", "MessageDate", "MessageIdentifier",
                                    "RelatedToId", "ExchangeListener_Transition_Id__c"),
                            booleans=("Incoming",), datetimes=("MessageDate",),
                            picklists={"Status": ("0", "1", "2", "3", "4", "5")}, defaults={"Incoming": False}),
    "EmailMessageRelation": SObject("0Ed", ("EmailMessageId", "RelationId", "RelationType", "RelationAddress",
                                            "RelationObjectType"),
                                    create_only=("EmailMessageId", "RelationId", "RelationType", "RelationAddress"),
                                    required=("EmailMessageId", "RelationType"),
                                    references={"EmailMessageId": ("EmailMessage",),
                                                "RelationId": ("Lead", "Contact", "User")},
                                    picklists={"RelationType": ("FromAddress", "ToAddress", "CcAddress",
                                                                "BccAddress")}),
}
SYSTEM_FIELDS = ("Id", "CreatedDate", "LastModifiedDate")
_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_VERSION = re.compile(r"^v(\d{2})\.0$")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: list[str] | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields
        self.retry_after = retry_after

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields is not None:
            body["fields"] = self.fields
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response([body], status=self.status, headers=headers)


class GrantError(Exception):
    def __init__(self, error: str, description: str):
        super().__init__(description)
        self.error, self.description = error, description


def case_safe(id15: str) -> str:
    """Salesforce's 18-character id: three suffix characters encode the case of the 15."""
    suffix = ""
    for chunk in range(3):
        bits = sum(1 << i for i, c in enumerate(id15[chunk * 5:chunk * 5 + 5]) if c.isupper())
        suffix += _SUFFIX_ALPHABET[bits]
    return id15 + suffix


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


@dataclasses.dataclass
class Options:
    client_ids: tuple[str, ...] = ()  # accepted JWT issuers; empty: any
    jwt_cert: bytes | None = None  # PEM certificate; None: signatures are not checked
    external_ids: tuple[str, ...] = DEFAULT_EXTERNAL_IDS  # "Type.Field"


@dataclasses.dataclass
class Faults:
    request_limit: int = 0
    http_503: int = 0
    retry_after: int | None = None  # the Retry-After of the two above
    latency: int = 0  # requests still to delay
    latency_seconds: float = 0.0


class Emulator:
    def __init__(self, options: Options):
        self.options = options
        self.log = logs.get_logger(component="salesforce-emulator")
        self.public_key = None
        if options.jwt_cert:
            from cryptography import x509

            self.public_key = x509.load_pem_x509_certificate(options.jwt_cert).public_key()
        self.external_ids: dict[str, set[str]] = {}
        for spec in options.external_ids:
            sobject, _, field = spec.partition(".")
            self.external_ids.setdefault(sobject, set()).add(field.lower())
        self.reset()

    def reset(self) -> None:
        self.rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SCHEMA}
        self.sessions: dict[str, str] = {}  # access token -> user id
        self.deleted: dict[str, str] = {}  # id -> type of the rows deleted
        self.faults = Faults()
        self.counts = {"token_grants": 0, "token_refusals": 0, "api_requests": 0}
        self._serial = itertools.count(1)
        self.base_url = ""

    # -- rows ------------------------------------------------------------------------------
    def _new_id(self, sobject: str) -> str:
        return case_safe(f"{SCHEMA[sobject].prefix}5g{next(self._serial):010d}")

    def find(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        """The row with this 15- or 18-character id, and its type."""
        for sobject, rows in self.rows.items():
            for row_id, row in rows.items():
                if record_id in (row_id, row_id[:15]):
                    return sobject, row
        return None

    def _canonical(self, sobject: str, name: str) -> str:
        for field in SYSTEM_FIELDS + SCHEMA[sobject].fields:
            if field.lower() == name.lower():
                return field
        raise ApiError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}", [name])

    def _check_value(self, sobject: str, field: str, value: Any) -> Any:
        spec = SCHEMA[sobject]
        if value is None:
            return None
        if field in spec.booleans:
            if not isinstance(value, bool):
                raise ApiError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of boolean from "
                               f"{type(value).__name__} value {value!r} at [field {field}]")
            return value
        if isinstance(value, (dict, list)):
            raise ApiError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of string from "
                           f"{'START_OBJECT' if isinstance(value, dict) else 'START_ARRAY'} value at [field {field}]")
        text = str(value)
        if field in spec.dates:
            try:
                dt.date.fromisoformat(text)
            except ValueError:
                raise ApiError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of date from VALUE_STRING "
                               f"value {text} or request may be missing a required field at [field {field}]") from None
        if field in spec.datetimes:
            try:
                dt.datetime.fromisoformat(text)
            except ValueError:
                raise ApiError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of datetime from VALUE_STRING "
                               f"value {text} at [field {field}]") from None
        if field in spec.picklists and text not in spec.picklists[field]:
            raise ApiError(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", f"{field}: bad value for restricted "
                           f"picklist field: {text}", [field])
        if field in spec.references:
            found = self.find(text)
            if found is None or found[0] not in spec.references[field]:
                raise ApiError(400, "INVALID_CROSS_REFERENCE_KEY", f"{field}: id value of incorrect type: {text}",
                               [field])
            return found[1]["Id"]
        return text

    def _fields(self, sobject: str, body: Any, *, creating: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        spec, out = SCHEMA[sobject], {}
        for name, value in body.items():
            if name == "attributes":
                continue
            field = self._canonical(sobject, name)
            if field in SYSTEM_FIELDS or field == "Name" and sobject in ("Lead", "Contact"):
                raise ApiError(400, "INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {field}. "
                               "Please check the security settings of this field and verify that it is read/write "
                               "for your profile or permission set.", [field])
            if not creating and field in spec.create_only:
                raise ApiError(400, "INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {field}. "
                               "Please check the security settings of this field and verify that it is read/write "
                               "for your profile or permission set.", [field])
            out[field] = self._check_value(sobject, field, value)
        if creating:
            missing = [f for f in spec.required if out.get(f) in (None, "")]
            if missing:
                raise ApiError(400, "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]",
                               missing)
        return out

    def _check_unique(self, sobject: str, fields: dict[str, Any], row_id: str | None = None) -> None:
        """DUPLICATE_VALUE when another row already holds one of these external-id values."""
        for field, value in fields.items():
            if value is None or field.lower() not in self.external_ids.get(sobject, set()):
                continue
            clash = next((r for r in self._by_external_id(sobject, field, value) if r["Id"] != row_id), None)
            if clash is not None:
                raise ApiError(400, "DUPLICATE_VALUE", f"duplicate value found: {field} duplicates value on record "
                               f"with id: {clash['Id']}", [])

    def _check_update(self, sobject: str, row: dict[str, Any], fields: dict[str, Any]) -> None:
        """A received EmailMessage: custom fields only."""
        if sobject == "EmailMessage" and row.get("Status") != "5":
            standard = [f for f in fields if not f.endswith("__c")]
            if standard:
                raise ApiError(400, "INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: "
                               f"{', '.join(standard)}. Only custom fields of an email message that is not a draft "
                               "can be updated.", standard)

    def _check_relation_access(self, relation: dict[str, Any], user_id: str) -> None:
        """An EmailMessageRelation of a received EmailMessage: only with "Update Email Messages"."""
        found = self.find(str(relation.get("EmailMessageId") or ""))
        if found is None or found[1].get("Status") == "5":
            return
        user = self.rows["User"].get(user_id) or {}
        if user.get("PermissionsUpdateEmailMessages") is not True:
            raise ApiError(400, "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY", "insufficient access rights on "
                           f"cross-reference id: {found[1]['Id']} (changing the relations of an email message that "
                           "is not a draft needs the Update Email Messages permission)", ["EmailMessageId"])

    def insert(self, sobject: str, fields: dict[str, Any]) -> dict[str, Any]:
        spec, now = SCHEMA[sobject], _now_iso()
        row = {f: None for f in spec.fields}
        row.update(spec.defaults)
        row.update(fields)
        row.update(Id=self._new_id(sobject), CreatedDate=now, LastModifiedDate=now)
        self._derive(sobject, row)
        self.rows[sobject][row["Id"]] = row
        return row

    def _derive(self, sobject: str, row: dict[str, Any]) -> None:
        if sobject in ("Lead", "Contact", "User"):
            row["Name"] = " ".join(p for p in (row.get("FirstName"), row.get("LastName")) if p) or row.get("Name")
        if sobject == "EmailMessageRelation" and row.get("RelationId"):
            found = self.find(row["RelationId"])
            row["RelationObjectType"] = found[0] if found else None

    def view(self, sobject: str, row: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        names = fields or (SYSTEM_FIELDS + SCHEMA[sobject].fields)
        return {"attributes": {"type": sobject, "url": f"{self.api_path}/sobjects/{sobject}/{row['Id']}"},
                **{name: row.get(name) for name in names}}

    api_path = "/services/data/v59.0"

    # -- HTTP ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._remember_base])
        app.router.add_post("/services/oauth2/token", self.token)
        app.router.add_get("/services/data/{version}/query", self.query)
        app.router.add_get("/services/data/{version}/query/", self.query)
        app.router.add_post("/services/data/{version}/sobjects/{sobject}", self.create)
        app.router.add_get("/services/data/{version}/sobjects/{sobject}/{record_id}", self.get_row)
        app.router.add_get("/services/data/{version}/sobjects/{sobject}/{field}/{value}", self.get_by_external_id)
        app.router.add_patch("/services/data/{version}/sobjects/{sobject}/{field}/{value}", self.upsert)
        app.router.add_delete("/services/data/{version}/sobjects/{sobject}/{record_id}", self.delete_row)
        app.router.add_post("/emulator/records/{sobject}", self.seed)
        app.router.add_get("/emulator/records/{sobject}", self.list_rows)
        app.router.add_post("/emulator/faults", self.fault)
        app.router.add_get("/emulator/stats", self.stats)
        app.router.add_post("/emulator/reset", self.reset_all)
        return app

    @web.middleware
    async def _remember_base(self, request: web.Request, handler):
        self.base_url = f"{request.scheme}://{request.host}"
        return await handler(request)

    # the token endpoint
    async def token(self, request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode("utf-8", "replace"))
        try:
            user_id = self._grant(form)
        except GrantError as exc:
            self.counts["token_refusals"] += 1
            self.log.info("token refused", error=exc.error, description=exc.description)
            return web.json_response({"error": exc.error, "error_description": exc.description}, status=400)
        access_token = f"{ORG_ID[:15]}!{secrets.token_urlsafe(48)}"
        self.sessions[access_token] = user_id
        self.counts["token_grants"] += 1
        return web.json_response({
            "access_token": access_token, "scope": "api", "instance_url": self.base_url,
            "id": f"{self.base_url}/id/{ORG_ID}/{user_id}", "token_type": "Bearer",
            "issued_at": str(int(time.time() * 1000))})

    def _grant(self, form: dict[str, list[str]]) -> str:
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != JWT_GRANT:
            raise GrantError("unsupported_grant_type", "grant type not supported")
        assertion = (form.get("assertion") or [""])[0]
        try:
            header = jwt.get_unverified_header(assertion)
            if self.public_key is not None:
                if header.get("alg") != "RS256":
                    raise GrantError("invalid_grant", "invalid assertion")
                claims = jwt.decode(assertion, self.public_key, algorithms=["RS256"],  # type: ignore[arg-type]
                                    options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                                             "verify_nbf": False})
            else:
                claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise GrantError("invalid_grant", "invalid assertion") from None
        issuer, audience, subject, expires = (claims.get(k) for k in ("iss", "aud", "sub", "exp"))
        if not issuer or (self.options.client_ids and issuer not in self.options.client_ids):
            raise GrantError("invalid_client_id", "client identifier invalid")
        audiences = audience if isinstance(audience, list) else [audience]
        allowed = {a.rstrip("/") for a in KNOWN_AUDIENCES + (self.base_url,)}
        if not any(isinstance(a, str) and a.rstrip("/") in allowed for a in audiences):
            raise GrantError("invalid_grant", "audience is invalid")
        user = next((u for u in self.rows["User"].values()
                     if isinstance(subject, str) and (u.get("Username") or "").lower() == subject.lower()
                     and u.get("IsActive") is not False), None)
        if user is None:
            raise GrantError("invalid_grant", "user hasn't approved this consumer")
        if not isinstance(expires, (int, float)) or expires <= time.time():
            raise GrantError("invalid_grant", "expired authorization code")
        if expires > time.time() + MAX_EXP_AHEAD:
            raise GrantError("invalid_grant", "invalid assertion")
        return user["Id"]

    # the REST API
    def _begin(self, request: web.Request) -> None:
        """Faults, session and version checks every API request goes through; the session's user
        id is left in ``request["user_id"]``."""
        self.counts["api_requests"] += 1
        if self.faults.http_503 > 0:
            self.faults.http_503 -= 1
            raise ApiError(503, "SERVER_UNAVAILABLE", "Server is unavailable, try again later",
                           retry_after=self.faults.retry_after)
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() not in ("bearer", "oauth") or token.strip() not in self.sessions:
            raise ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid")
        request["user_id"] = self.sessions[token.strip()]
        if self.faults.request_limit > 0:
            self.faults.request_limit -= 1
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.",
                           retry_after=self.faults.retry_after)
        match = _VERSION.match(request.match_info["version"])
        if not match or not 20 <= int(match.group(1)) <= 66:
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        self.api_path = f"/services/data/{request.match_info['version']}"

    def _sobject(self, name: str) -> str:
        for sobject in SCHEMA:
            if sobject.lower() == name.lower():
                return sobject
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")

    def _external_field(self, sobject: str, name: str) -> str:
        if name.lower() not in self.external_ids.get(sobject, set()):
            raise ApiError(404, "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {name}")
        return self._canonical(sobject, name)

    async def _json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"null")
        except ValueError:
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body is not valid JSON") from None

    def _selected(self, sobject: str, request: web.Request) -> tuple[str, ...] | None:
        """The fields ``?fields=A,B`` asks for (None: all)."""
        wanted = [f.strip() for f in request.query.get("fields", "").split(",") if f.strip()]
        return tuple(self._canonical(sobject, f) for f in wanted) or None

    async def _api(self, request: web.Request, work) -> web.Response:
        if self.faults.latency > 0:
            self.faults.latency -= 1
            await asyncio.sleep(self.faults.latency_seconds)
        try:
            self._begin(request)
            return await work()
        except ApiError as exc:
            return exc.response()

    async def query(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            text = request.query.get("q", "")
            try:
                parsed = soql.parse(text)
            except soql.SoqlError as exc:
                raise ApiError(400, "MALFORMED_QUERY", str(exc)) from None
            sobject = next((s for s in SCHEMA if s.lower() == parsed.sobject.lower()), None)
            if sobject is None:
                raise ApiError(400, "INVALID_TYPE", f"sObject type '{parsed.sobject}' is not supported.")
            fields = tuple(self._canonical(sobject, f) for f in parsed.fields)
            where = [(self._canonical(sobject, f), v) for f, v in parsed.where]
            rows = [r for r in self.rows[sobject].values() if all(_equal(r.get(f), v) for f, v in where)]
            rows = rows[:parsed.limit] if parsed.limit is not None else rows
            return web.json_response({"totalSize": len(rows), "done": True,
                                      "records": [self.view(sobject, r, fields) for r in rows]})
        return await self._api(request, work)

    async def create(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            sobject = self._sobject(request.match_info["sobject"])
            fields = self._fields(sobject, await self._json(request), creating=True)
            self._check_unique(sobject, fields)
            if sobject == "EmailMessageRelation":
                self._check_relation_access(fields, request["user_id"])
            row = self.insert(sobject, fields)
            self.log.info("record created", sobject=sobject, id=row["Id"])
            return web.json_response({"id": row["Id"], "success": True, "errors": []}, status=201)
        return await self._api(request, work)

    async def get_row(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            sobject = self._sobject(request.match_info["sobject"])
            found = self.find(request.match_info["record_id"])
            if found is None or found[0] != sobject:
                raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
            return web.json_response(self.view(sobject, found[1], self._selected(sobject, request)))
        return await self._api(request, work)

    async def delete_row(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            sobject = self._sobject(request.match_info["sobject"])
            record_id = request.match_info["record_id"]
            if any(record_id in (i, i[:15]) for i, kind in self.deleted.items() if kind == sobject):
                raise ApiError(404, "ENTITY_IS_DELETED", "entity is deleted", [])
            found = self.find(record_id)
            if found is None or found[0] != sobject:
                raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
            if sobject == "EmailMessageRelation":
                self._check_relation_access(found[1], request["user_id"])
            del self.rows[sobject][found[1]["Id"]]
            self.deleted[found[1]["Id"]] = sobject
            self.log.info("record deleted", sobject=sobject, id=found[1]["Id"])
            return web.Response(status=204)
        return await self._api(request, work)

    def _by_external_id(self, sobject: str, field: str, value: str) -> list[dict[str, Any]]:
        return [r for r in self.rows[sobject].values() if r.get(field) == value]

    async def get_by_external_id(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            sobject = self._sobject(request.match_info["sobject"])
            field = self._external_field(sobject, request.match_info["field"])
            rows = self._by_external_id(sobject, field, request.match_info["value"])
            if not rows:
                raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
            return web.json_response(self.view(sobject, rows[0], self._selected(sobject, request)))
        return await self._api(request, work)

    async def upsert(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            sobject = self._sobject(request.match_info["sobject"])
            field = self._external_field(sobject, request.match_info["field"])
            value = request.match_info["value"]
            body = await self._json(request)
            existing = self._by_external_id(sobject, field, value)
            if existing:
                row = existing[0]
                fields = self._fields(sobject, body, creating=False)
                self._check_update(sobject, row, fields)
                self._check_unique(sobject, fields, row["Id"])
                row.update(fields, LastModifiedDate=_now_iso())
                self._derive(sobject, row)
                self.log.info("record updated by upsert", sobject=sobject, id=row["Id"])
                return web.json_response({"id": row["Id"], "success": True, "errors": [], "created": False})
            fields = self._fields(sobject, body, creating=True)
            fields[field] = value
            self._check_unique(sobject, fields)
            row = self.insert(sobject, fields)
            self.log.info("record created by upsert", sobject=sobject, id=row["Id"])
            return web.json_response({"id": row["Id"], "success": True, "errors": [], "created": True}, status=201)
        return await self._api(request, work)

    # test hooks
    async def seed(self, request: web.Request) -> web.Response:
        try:
            sobject = self._sobject(request.match_info["sobject"])
            body = await self._json(request)
            fields = {self._canonical(sobject, k): v for k, v in (body or {}).items()}
        except ApiError as exc:
            return exc.response()
        row = self.insert(sobject, {k: v for k, v in fields.items() if k not in SYSTEM_FIELDS})
        return web.json_response({"id": row["Id"]}, status=201)

    async def list_rows(self, request: web.Request) -> web.Response:
        try:
            sobject = self._sobject(request.match_info["sobject"])
        except ApiError as exc:
            return exc.response()
        return web.json_response({"records": [self.view(sobject, r) for r in self.rows[sobject].values()]})

    async def fault(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            kind = body["kind"]
            if kind == "expire_sessions":
                count = len(self.sessions)
                self.sessions.clear()
            elif kind in ("request_limit", "http_503"):
                count = int(body.get("count", 1))
                setattr(self.faults, kind, count)
                self.faults.retry_after = int(body["retry_after"]) if body.get("retry_after") is not None else None
            elif kind == "latency":
                count = int(body.get("count", 1))
                self.faults.latency, self.faults.latency_seconds = count, float(body.get("seconds", 0.1))
            else:
                return web.json_response({"error": f"unknown fault kind {kind!r}"}, status=400)
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad fault parameters: {exc}"}, status=400)
        self.log.info("fault injected", kind=kind, affected=count)
        return web.json_response({"kind": kind, "affected": count})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.counts, "sessions": len(self.sessions),
                                  "records": {k: len(v) for k, v in self.rows.items()}})

    async def reset_all(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


def _equal(stored: Any, wanted: Any) -> bool:
    if isinstance(wanted, str):
        return isinstance(stored, str) and stored.lower() == wanted.lower()
    return stored is wanted if isinstance(wanted, bool) or wanted is None else stored == wanted


async def serve(options: Options, host: str, port: int, ready=None) -> None:
    """Serve until cancelled; ``ready(login_url)`` is called once connections are accepted."""
    runner = web.AppRunner(Emulator(options).app(), access_log=None, shutdown_timeout=2.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    if ready:
        ready(f"http://{host}:{port}")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(options: Options, host: str, port: int, ready=None) -> None:
    """Run ``serve`` until SIGTERM/SIGINT, then shut down cleanly."""
    import signal

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(options, host, port, ready)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
