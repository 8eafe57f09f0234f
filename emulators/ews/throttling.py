"""Exchange Server's default EWS throttling policy, as the emulator enforces it (``--throttling default``).

The values and who is charged come from Microsoft's pages:

[T] "EWS throttling in Exchange"
    https://learn.microsoft.com/en-us/exchange/client-developer/exchange-web-services/ews-throttling-in-exchange
[A] "Maintain affinity between a group of subscriptions and the Mailbox server in Exchange", section
    "What throttling values do I need to take into consideration?"
    https://learn.microsoft.com/en-us/exchange/client-developer/exchange-web-services/how-to-maintain-affinity-between-group-of-subscriptions-and-mailbox-server
[E] "Handling notification-related errors in EWS in Exchange"
    https://learn.microsoft.com/en-us/exchange/client-developer/exchange-web-services/handling-notification-related-errors-in-ews-in-exchange
[W] "Exchange workload management" (Exchange 2013+ budgets: MaxBurst, RechargeRate, CutoffBalance)
    https://learn.microsoft.com/en-us/exchange/exchange-workload-management-exchange-2013-help

What is limited, and whose budget pays:

- Open GetStreamingEvents connections: ``HangingConnectionLimit`` (web.config, not a policy
  parameter), 3 on Exchange Server 2013 and later [A][E] (Exchange Online: 10 [E]). A connection
  opened while impersonating m1 is charged to a *copy of m1's budget* that every service account
  impersonating m1 shares; without impersonation it is charged to the calling account [A]. So a
  service account that impersonates a different mailbox per connection is never refused [A].
- Subscriptions: ``EWSMaxSubscriptions``, 5000 on Exchange 2013 and later (Exchange Online: 20)
  [A], charged against the target mailbox when impersonating (Exchange 2010 SP3 and later,
  Table 2 of [T]), against the calling account otherwise. Over it: ErrorExceededSubscriptionCount.
- Concurrent requests other than streaming: ``EWSMaxConcurrency``, 27 on Exchange 2013 and later
  [T][A]; streaming connections do not count [T]. With impersonation the service account has a
  budget separate from the user's [T]; like the connections, it is a copy per impersonated
  mailbox. Over it: ErrorExceededConnectionCount (Table 3 of [T]).
- Time: since Exchange 2013 the ``EWSPercentTimeIn*`` parameters became a token bucket of server
  time in milliseconds [W]: the balance starts at ``EwsMaxBurst``, each request spends the time
  it took, it grows back by ``EwsRechargeRate`` per hour up to ``EwsMaxBurst``; once it falls to
  ``-EwsCutoffBalance`` the budget is locked out and requests get ErrorServerBusy (HTTP 500) with
  ``BackOffMilliseconds`` [T, Tables 3 and 4] until it has recharged to zero. The global policy's
  EWS values are 300000 / 900000 / 3000000 (Get-ThrottlingPolicy on Exchange 2013-2019, and the
  MSExchange ADAccess event 4023 quotes them: "Max Burst: 300000, Recharge Rate: 900000,
  CutoffBalance: -3000000"). Microsoft's docs deliberately do not print these defaults [T]; the
  emulator takes the published global policy and lets tests shrink them (``Policy``).
  Exchange 2013 also micro-delays a caller whose balance is negative but above the cutoff; the
  emulator does not (it would only slow tests down).

Not modelled: EWSFindCountLimit, message rate limits, CPUStartPercent (Exchange 2010 only).
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HANGING_CONNECTION_LIMIT = 3  # [A] "3 for Exchange 2013"; [E] "the default value of three open connections"
EWS_MAX_SUBSCRIPTIONS = 5000  # [A] "5000 for Exchange 2013"
EWS_MAX_CONCURRENCY = 27  # [T][A] "The default value for Exchange 2013 and Exchange Online is 27"
EWS_MAX_BURST_MS = 300_000  # global policy, Exchange 2013+ [W]
EWS_RECHARGE_RATE_MS_PER_HOUR = 900_000
EWS_CUTOFF_BALANCE_MS = 3_000_000

CONNECTIONS_TEXT = "You have exceeded the available concurrent connections for your account. Try again once your other requests have completed."
SUBSCRIPTIONS_TEXT = "You have exceeded the maximum number of subscriptions allowed for this account."
BUSY_TEXT = "The server cannot service this request right now. Try again later."

# the operation and the impersonated address, read before the request is parsed (the guard sits
# in front of the dispatch; a full parse follows there)
_OPERATION = re.compile(rb"<(?:[\w.-]+:)?Body\b[^>]*>\s*<(?:[\w.-]+:)?(\w+)")
_IMPERSONATED = re.compile(
    rb"<(?:[\w.-]+:)?ExchangeImpersonation\b.*?<(?:[\w.-]+:)?(?:PrimarySmtpAddress|SmtpAddress|PrincipalName)>\s*([^<\s]+)",
    re.DOTALL)


@dataclass
class Policy:
    """One throttling policy's EWS values (the defaults are Exchange Server 2013-SE's)."""

    hanging_connection_limit: int = HANGING_CONNECTION_LIMIT
    max_subscriptions: int = EWS_MAX_SUBSCRIPTIONS
    max_concurrency: int = EWS_MAX_CONCURRENCY
    max_burst_ms: float = EWS_MAX_BURST_MS
    recharge_rate_ms_per_hour: float = EWS_RECHARGE_RATE_MS_PER_HOUR
    cutoff_balance_ms: float = EWS_CUTOFF_BALANCE_MS


@dataclass
class Budget:
    """The time budget of one account (or of one impersonated mailbox's copy)."""

    balance: float
    at: float = field(default_factory=time.monotonic)

    def recharge(self, policy: Policy, now: float) -> None:
        rate = policy.recharge_rate_ms_per_hour / 3_600.0  # ms of budget per second
        self.balance = min(policy.max_burst_ms, self.balance + (now - self.at) * rate)
        self.at = now


class Refused(Exception):
    """A request the policy turns away: ``code``, ``text`` and, for ErrorServerBusy, the back off."""

    def __init__(self, code: str, text: str, back_off_ms: int | None = None):
        super().__init__(code)
        self.code, self.text, self.back_off_ms = code, text, back_off_ms


def peek(data: bytes) -> tuple[str, str | None]:
    """(operation, impersonated address or None) of a SOAP request, without parsing it."""
    head = data[:16_384]
    op = _OPERATION.search(head)
    who = _IMPERSONATED.search(head)
    return (op.group(1).decode() if op else "",
            who.group(1).decode(errors="replace").lower() if who else None)


def charged_to(principal: str, impersonated: str | None) -> str:
    """Whose budget pays [A]: the impersonated mailbox's copy (shared by every service account
    impersonating it), or the calling account itself."""
    return f"as:{impersonated}" if impersonated else f"account:{principal}"


class Throttle:
    """Counters and budgets of the policy. Everything runs on the emulator's one event loop."""

    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy()
        self.streams: Counter[str] = Counter()  # budget key -> open GetStreamingEvents connections
        self.inflight: Counter[str] = Counter()  # budget key -> requests being answered (not streams)
        self.budgets: dict[str, Budget] = {}
        self.refusals: Counter[str] = Counter()  # error code -> how often (for tests and stats)
        self.store: object = None  # the emulator store this throttle belongs to (see ``of``)

    def _refuse(self, code: str, text: str, back_off_ms: int | None = None) -> Refused:
        self.refusals[code] += 1
        return Refused(code, text, back_off_ms)

    # -- EWSMaxConcurrency and the time budget (every operation but GetStreamingEvents) --------
    def _budget(self, key: str, now: float) -> Budget:
        budget = self.budgets.get(key)
        if budget is None:
            budget = self.budgets[key] = Budget(self.policy.max_burst_ms, now)
        budget.recharge(self.policy, now)
        return budget

    @contextlib.contextmanager
    def request(self, key: str) -> Iterator[None]:
        """Hold one of ``key``'s concurrent requests and charge its time; raises ``Refused``."""
        policy = self.policy
        now = time.monotonic()
        budget = self._budget(key, now)
        if budget.balance <= -policy.cutoff_balance_ms:
            rate = policy.recharge_rate_ms_per_hour / 3_600_000.0  # budget ms per ms
            back_off = int(-budget.balance / rate) + 1 if rate > 0 else 3_600_000
            raise self._refuse("ErrorServerBusy", BUSY_TEXT, back_off)
        if self.inflight[key] >= policy.max_concurrency:
            raise self._refuse("ErrorExceededConnectionCount", CONNECTIONS_TEXT)
        self.inflight[key] += 1
        try:
            yield
        finally:
            self.inflight[key] -= 1
            if self.inflight[key] <= 0:
                del self.inflight[key]
            end = time.monotonic()
            budget = self._budget(key, end)
            budget.balance -= (end - now) * 1000.0

    # -- HangingConnectionLimit ------------------------------------------------------------------
    def open_stream(self, key: str) -> None:
        if self.streams[key] >= self.policy.hanging_connection_limit:
            raise self._refuse("ErrorExceededConnectionCount", CONNECTIONS_TEXT)
        self.streams[key] += 1

    def close_stream(self, key: str) -> None:
        self.streams[key] -= 1
        if self.streams[key] <= 0:
            del self.streams[key]

    # -- EWSMaxSubscriptions ---------------------------------------------------------------------
    def check_subscriptions(self, held: int) -> None:
        """``held``: the subscriptions already charged to the same budget (see ``charged_to``)."""
        if held >= self.policy.max_subscriptions:
            raise self._refuse("ErrorExceededSubscriptionCount", SUBSCRIPTIONS_TEXT)

    def stats(self) -> dict:
        return {"policy": vars(self.policy), "streams": dict(self.streams), "refusals": dict(self.refusals),
                "budgets": {k: round(b.balance, 1) for k, b in self.budgets.items()}}


def of(emulator: Any) -> Throttle | None:
    """The emulator's throttle when ``--throttling default``, else None. Made on first use and
    again after ``/emulator/reset`` (a new store), so a reset also refills every budget; streams
    and requests still open keep a reference to the old one and release into it."""
    if emulator.options.throttling != "default":
        return None
    throttle = emulator.__dict__.get("_throttle")
    if throttle is None or throttle.store is not emulator.store:
        throttle = Throttle()
        throttle.store = emulator.store
        emulator.__dict__["_throttle"] = throttle
    return throttle


def subscriptions_charged(store: Any, principal: str, mailbox: str, impersonated: str | None) -> int:
    """Subscriptions already charged to the budget a new one would be charged to (Table 2 of [T]):
    the target mailbox's when impersonating, the calling account's otherwise."""
    if impersonated:
        return len(store.by_mailbox.get(mailbox, ()))
    return sum(1 for sub in store.subscriptions.values() if sub.owner == principal)
