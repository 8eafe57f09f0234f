"""Outlook message subscriptions: create (with the validation handshake), renew, delete, reauthorize,
expiry, and turning the store's changes into change and lifecycle notifications."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from emulators.graph.errors import GraphError
from emulators.graph.notify import Notifier
from emulators.graph.store import Folder, Mailbox, Message, Store

MAX_MINUTES = 4230  # Outlook resources: "Subscription expiration can only be 4230 minutes in the future."
SKEW = dt.timedelta(seconds=30)  # what a client's clock may be ahead of ours
CHANGE_TYPES = ("created", "updated", "deleted")
PAGE = 100
_RESOURCE = re.compile(
    r"^/?users(?:/(?P<user>[^/()']+)|\('(?P<user_key>[^']+)'\))/"
    r"(?:messages|mailfolders(?:/(?P<folder>[^/()']+)|\('(?P<folder_key>[^']+)'\))/messages)/?$", re.IGNORECASE)
PAYLOAD_ERROR = "Could not process subscription creation payload. Are all property names spelled and camelCased properly?"
KNOWN_FIELDS = frozenset({"@odata.type", "changeType", "notificationUrl", "lifecycleNotificationUrl", "resource",
                          "expirationDateTime", "clientState", "latestSupportedTlsVersion", "includeResourceData",
                          "encryptionCertificate", "encryptionCertificateId", "notificationQueryOptions",
                          "notificationUrlAppId"})


def graph_time(when: dt.datetime) -> str:
    """Graph's subscription timestamps: seven fractional digits, Z."""
    when = when.astimezone(dt.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond:06d}0Z"


@dataclasses.dataclass
class Subscription:
    id: str
    resource: str
    mailbox: Mailbox
    folder: Folder | None  # None: every folder (users/{u}/messages)
    change_type: str
    change_types: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    expiration: dt.datetime
    client_state: str | None
    immutable: bool  # created with Prefer: IdType="ImmutableId"
    application_id: str
    held: list[dict[str, Any]] | None = None  # notifications held until reauthorized (None: not held)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "resource": self.resource, "applicationId": self.application_id,
                "changeType": self.change_type, "clientState": self.client_state,
                "notificationUrl": self.notification_url, "notificationQueryOptions": None,
                "lifecycleNotificationUrl": self.lifecycle_url, "expirationDateTime": graph_time(self.expiration),
                "creatorId": self.application_id, "includeResourceData": False, "latestSupportedTlsVersion": "v1_2",
                "encryptionCertificate": None, "encryptionCertificateId": None, "notificationUrlAppId": None}


def _not_found() -> GraphError:
    return GraphError(404, "ResourceNotFound", "The object was not found.")


def _url(value: Any, name: str) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise GraphError(400, "InvalidRequest", f"Invalid {name}: an absolute http(s) URL is required.")
    return value


def _expiration(value: Any, now: dt.datetime) -> dt.datetime:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", "expirationDateTime is a required property for subscription creation.")
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise GraphError(400, "InvalidRequest", PAYLOAD_ERROR) from None
    when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    if when <= now:
        raise GraphError(400, "ExtensionError", "Subscription expiration can only be in the future.")
    if when > now + dt.timedelta(minutes=MAX_MINUTES) + SKEW:
        raise GraphError(400, "ExtensionError", f"Subscription expiration can only be {MAX_MINUTES} minutes in the future.")
    return when


class Subscriptions:
    def __init__(self, store: Store, notifier: Notifier, tenant_id: str, application_id: str, max_per_mailbox: int):
        self.store, self.notifier = store, notifier
        self.tenant_id, self.application_id = tenant_id, application_id
        self.max_per_mailbox = max_per_mailbox
        self.subs: dict[str, Subscription] = {}
        self.expired = 0
        store.listeners.append(self.on_change)
        notifier.on_missed = self._missed
        notifier.is_live = lambda subscription_id: subscription_id in self.subs

    def clear(self) -> int:
        count = len(self.subs)
        self.subs.clear()
        self.expired = 0
        return count

    # -- the API ---------------------------------------------------------------------------
    def _resource(self, text: Any) -> tuple[Mailbox, Folder | None]:
        match = _RESOURCE.match(text) if isinstance(text, str) else None
        if match is None:
            raise GraphError(400, "InvalidRequest", f"The resource '{text}' is not supported: use users/{{id}}/messages, "
                             "users/{id}/mailFolders('{id}')/messages or users/{id}/mailFolders/{id}/messages.")
        user = unquote(match.group("user") or match.group("user_key"))
        mailbox = self.store.user(user)
        if mailbox is None:
            raise GraphError(404, "ExtensionError", f"Operation: Create; Exception: [Status Code: NotFound; "
                             f"Reason: The requested user '{user}' is invalid.]")
        folder_ref = match.group("folder") or match.group("folder_key")
        if folder_ref is None:
            return mailbox, None
        folder_ref = unquote(folder_ref)
        try:
            return mailbox, self.store.folder(mailbox, folder_ref)
        except GraphError as exc:
            raise GraphError(exc.status, "ExtensionError", f"Operation: Create; Exception: [Status Code: "
                             f"{'NotFound' if exc.status == 404 else 'BadRequest'}; Reason: {exc.message}]") from None

    async def create(self, body: Any, immutable: bool) -> Subscription:
        if not isinstance(body, dict) or any(k not in KNOWN_FIELDS for k in body):
            raise GraphError(400, "InvalidRequest", PAYLOAD_ERROR)
        now = dt.datetime.now(dt.UTC)
        change_type = body.get("changeType")
        types = [t.strip() for t in change_type.split(",")] if isinstance(change_type, str) else []
        if not types or any(t not in CHANGE_TYPES for t in types):
            raise GraphError(400, "InvalidRequest", f"Invalid changeType '{change_type}': use created, updated and/or "
                             "deleted, comma separated.")
        notification_url = _url(body.get("notificationUrl"), "notificationUrl")
        lifecycle_url = body.get("lifecycleNotificationUrl")
        if lifecycle_url is not None:
            lifecycle_url = _url(lifecycle_url, "lifecycleNotificationUrl")
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > 128):
            raise GraphError(400, "InvalidRequest", "clientState must be a string of at most 128 characters.")
        expiration = _expiration(body.get("expirationDateTime"), now)
        mailbox, folder = self._resource(body.get("resource"))
        self._check_room(mailbox)
        await self.notifier.validate(notification_url)
        if lifecycle_url is not None:
            await self.notifier.validate(lifecycle_url)
        self._check_room(mailbox)  # again: others may have been created while we validated
        sub = Subscription(str(uuid.uuid4()), body["resource"], mailbox, folder, change_type, frozenset(types),
                           notification_url, lifecycle_url, expiration, client_state, immutable, self.application_id)
        self.subs[sub.id] = sub
        return sub

    def _check_room(self, mailbox: Mailbox) -> None:
        self.sweep()
        if sum(1 for s in self.subs.values() if s.mailbox is mailbox) >= self.max_per_mailbox:
            raise GraphError(403, "ExtensionError", "Operation: Create; Exception: [Status Code: Forbidden; "
                             "Reason: Maximum number of subscriptions has been reached]")

    def get(self, subscription_id: str) -> Subscription:
        self.sweep()
        sub = self.subs.get(subscription_id)
        if sub is None:
            raise _not_found()
        return sub

    def page(self, offset: int) -> tuple[list[Subscription], int | None]:
        self.sweep()
        subs = list(self.subs.values())
        rest = offset + PAGE if offset + PAGE < len(subs) else None
        return subs[offset:offset + PAGE], rest

    async def update(self, subscription_id: str, body: Any) -> Subscription:
        sub = self.get(subscription_id)
        if not isinstance(body, dict) or not body or any(k not in ("expirationDateTime", "notificationUrl")
                                                         for k in body):
            raise GraphError(400, "InvalidRequest", "Only expirationDateTime and notificationUrl can be updated.")
        expiration = sub.expiration
        if "expirationDateTime" in body:
            expiration = _expiration(body["expirationDateTime"], dt.datetime.now(dt.UTC))
        if "notificationUrl" in body:
            url = _url(body["notificationUrl"], "notificationUrl")
            await self.notifier.validate(url)
            sub.notification_url = url
        sub.expiration = expiration
        self._release(sub)  # a renewal reauthorizes too
        return sub

    def delete(self, subscription_id: str) -> None:
        self.get(subscription_id)
        del self.subs[subscription_id]

    def reauthorize(self, subscription_id: str) -> None:
        self._release(self.get(subscription_id))

    def sweep(self) -> int:
        """Forget every subscription past its expiry (Graph sends nothing for that)."""
        now = dt.datetime.now(dt.UTC)
        gone = [s.id for s in self.subs.values() if s.expiration <= now]
        for subscription_id in gone:
            del self.subs[subscription_id]
        self.expired += len(gone)
        return len(gone)

    def per_mailbox(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sub in self.subs.values():
            out[sub.mailbox.address] = out.get(sub.mailbox.address, 0) + 1
        return out

    # -- faults ----------------------------------------------------------------------------
    def remove_all(self, tell: bool) -> int:
        """Remove every subscription; with ``tell`` each gets a subscriptionRemoved first."""
        subs = list(self.subs.values())
        self.subs.clear()
        if tell:
            for sub in subs:
                self.lifecycle(sub, "subscriptionRemoved")
        return len(subs)

    def require_reauthorization(self) -> int:
        self.sweep()
        for sub in self.subs.values():
            if sub.held is None:
                sub.held = []
            self.lifecycle(sub, "reauthorizationRequired")
        return len(self.subs)

    def _release(self, sub: Subscription) -> None:
        held, sub.held = sub.held, None
        for payload in held or ():
            self.notifier.notify(sub.notification_url, sub.id, payload)

    # -- notifications ---------------------------------------------------------------------
    def lifecycle(self, sub: Subscription, event: str) -> None:
        if sub.lifecycle_url is None:
            return
        self.notifier.lifecycle(sub.lifecycle_url, sub.id, {
            "subscriptionId": sub.id, "subscriptionExpirationDateTime": graph_time(sub.expiration),
            "tenantId": self.tenant_id, "clientState": sub.client_state, "lifecycleEvent": event,
            "organizationId": self.tenant_id})

    def _missed(self, subscription_id: str) -> None:
        sub = self.subs.get(subscription_id)
        if sub is not None:
            self.lifecycle(sub, "missed")

    def on_change(self, event: str, message: Message, folder: Folder) -> None:
        """The store's hook: a message came into or left ``folder``."""
        change_type = "created" if event == "in" else "deleted"
        now = dt.datetime.now(dt.UTC)
        for sub in list(self.subs.values()):
            if (sub.mailbox is not message.mailbox or change_type not in sub.change_types or sub.expiration <= now
                    or (sub.folder is not None and sub.folder is not folder) or (sub.folder is None and not folder.ipm)):
                continue
            message_id = message.graph_id(sub.immutable)
            resource = f"Users/{message.mailbox.object_id}/Messages/{message_id}"
            payload = {"subscriptionId": sub.id, "subscriptionExpirationDateTime": graph_time(sub.expiration),
                       "changeType": change_type, "resource": resource, "clientState": sub.client_state,
                       "tenantId": self.tenant_id,
                       "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": resource,
                                        "@odata.etag": f'W/"{message.change_key}"', "id": message_id}}
            if sub.held is not None:
                sub.held.append(payload)
                self.notifier.counts["held"] += 1
            else:
                self.notifier.notify(sub.notification_url, sub.id, payload)
