"""Who may call the API and how often: bearer tokens checked by hash, a token bucket per token.

Only SHA-256 hashes of the tokens are configured (``api_tokens``), so a leaked settings file does
not leak a token; a presented token is hashed and compared with every configured hash in constant
time (``hmac.compare_digest``, no early exit), so timing tells nothing about which bytes matched.
The token itself is never stored, logged or echoed; the rate limiter keys on its hash.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Iterable


def hash_token(token: str) -> str:
    """The value to put in ``api_tokens`` for ``token``: SHA-256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    """The configured token hashes; ``check`` says which one an Authorization header carries."""

    def __init__(self, hashes: Iterable[str]):
        self.hashes = tuple(bytes.fromhex(h) for h in hashes)

    def check(self, authorization: str | None) -> str | None:
        """The matching hash (hex) for ``Authorization: Bearer TOKEN``, or None."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            presented = hashlib.sha256(token.encode("utf-8")).digest()
        except UnicodeEncodeError:
            return None
        found = None
        for known in self.hashes:  # every hash is compared, whatever matched before
            if hmac.compare_digest(presented, known):
                found = known.hex()
        return found


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second, bursts of ``2 * rate`` but at least one.

    A request spends a whole token, so a bucket holding less than one never lets anything
    through: below 0.5 requests a second, ``2 * rate`` alone would refuse every request forever."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = max(1.0, 2.0 * self.rate)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go ahead (a token is spent), else the seconds until one is free."""
        with self.lock:
            now = self.clock()
            tokens, at = self.buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self.buckets[key] = (tokens - 1.0, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        """``Retry-After`` in whole seconds (at least 1)."""
        return str(max(1, math.ceil(wait)))
