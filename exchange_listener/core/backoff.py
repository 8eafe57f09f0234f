"""Retry delays: one formula for every retry schedule of the listener and the worker.

``delay()`` is the pure schedule (exponential, or linear, with a cap, a random factor and a
floor); ``Backoff`` keeps the attempt count for a loop that retries the same thing.

Why not tenacity: our retries are not "call this function again" wrappers but delays computed
inside state machines (a stream group's loop, a mailbox's ``retry_at``, an outbox entry's
next-attempt score in Redis). Tenacity's wait strategies want a ``RetryCallState`` per call,
draw from the global ``random`` (no seeded tests), and add jitter rather than scale by it, so
our schedules (``d * U(0.5, 1)``, ``d * U(0.75, 1.25)``) would need wait classes of our own
anyway: a dependency for nothing.

The exponent is bounded: ``base * 2 ** 1024`` raises OverflowError, and a loop that keeps
failing (EWS down, a password expired over a weekend) gets there in about 13 hours at a 60 s cap;
the error then escaped the except clause that computed the delay and ended the retrying thread.
"""
from __future__ import annotations

import random

HALF = (0.5, 1.0)  # a delay in [d/2, d]: never above the cap, spread so retries do not line up
SPREAD = (0.75, 1.25)  # d +- 25%
_MAX_EXPONENT = 1000  # 2.0 ** 1000 is still a float; every cap is reached long before


def delay(attempt: int, base: float, cap: float, *, jitter: tuple[float, float] | None = HALF,
          floor: float = 0.0, linear: bool = False, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = the first retry).

    ``min(cap, base * 2 ** attempt)`` (``base * (attempt + 1)`` when ``linear``), times a factor
    drawn uniformly from ``jitter`` (none when None), and at least ``floor`` (e.g. what the
    server asked for; the floor is not jittered, so it may exceed the cap)."""
    attempt = max(0, attempt)
    grown = base * (attempt + 1) if linear else base * 2.0 ** min(attempt, _MAX_EXPONENT)
    value = min(cap, grown)
    if jitter is not None:
        value *= (rng or random).uniform(*jitter)
    return max(floor, value)


class Backoff:
    """The attempt count of one retry loop: ``next()`` gives a delay and counts the attempt,
    ``reset()`` after a success starts the schedule again."""

    def __init__(self, base: float, cap: float, *, jitter: tuple[float, float] | None = HALF,
                 rng: random.Random | None = None):
        self.base, self.cap, self.jitter, self.rng = base, cap, jitter, rng
        self.attempt = 0

    def next(self, floor: float = 0.0) -> float:
        value = delay(self.attempt, self.base, self.cap, jitter=self.jitter, floor=floor, rng=self.rng)
        self.attempt += 1
        return value

    def reset(self) -> None:
        self.attempt = 0
