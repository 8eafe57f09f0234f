"""The one retry-delay formula (exchange_listener.core.backoff): bounds, cap, floor, reset."""
import random

import pytest

from exchange_listener.core.backoff import HALF, SPREAD, Backoff, delay

DRAWS = 2000


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 7, 20])
def test_half_jitter_stays_between_half_and_whole_of_the_capped_delay(attempt):
    rng = random.Random(attempt)
    whole = min(60.0, 0.5 * 2 ** attempt)
    draws = [delay(attempt, 0.5, 60.0, jitter=HALF, rng=rng) for _ in range(DRAWS)]
    assert all(whole / 2 <= d <= whole for d in draws)
    assert min(draws) < whole * 0.55 and max(draws) > whole * 0.95  # the whole range is used, not one point


def test_spread_jitter_is_a_quarter_either_side_and_may_pass_the_cap():
    """The per-mailbox subscribe retries scale the capped delay by U(0.75, 1.25), as before."""
    rng = random.Random(1)
    draws = [delay(10, 4.0, 300.0, jitter=SPREAD, rng=rng) for _ in range(DRAWS)]
    assert all(225.0 <= d <= 375.0 for d in draws)
    assert max(draws) > 300.0


def test_without_jitter_the_schedule_is_exact():
    assert [delay(a, 2.0, 3600.0, jitter=None) for a in range(13)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 3600.0, 3600.0]


def test_linear_grows_by_base_each_attempt_up_to_the_cap():
    assert [delay(a, 30.0, 600.0, jitter=None, linear=True) for a in (0, 1, 2, 18, 19, 50)] == [
        30.0, 60.0, 90.0, 570.0, 600.0, 600.0]


def test_floor_wins_over_a_shorter_delay_and_is_not_jittered():
    rng = random.Random(2)
    assert all(delay(0, 0.5, 60.0, floor=15.0, rng=rng) == 15.0 for _ in range(DRAWS))
    assert delay(0, 0.5, 60.0, jitter=None, floor=90.0) == 90.0  # what the server asked for, even past the cap
    assert delay(8, 0.5, 60.0, jitter=None, floor=1.0) == 60.0


def test_a_loop_failing_for_days_stays_at_the_cap():
    """base * 2 ** 1024 raised OverflowError, which ended the retrying thread (a stream group
    after ~13 hours of failures, the worker after ~6 hours of Redis away)."""
    rng = random.Random(3)
    for attempt in (1023, 1024, 1100, 10**6):
        assert 30.0 <= delay(attempt, 0.5, 60.0, rng=rng) <= 60.0
        assert delay(attempt, 2.0, 30.0, jitter=None) == 30.0
        assert delay(attempt, 4.0, 300.0, jitter=None, linear=True) == 300.0
    backoff = Backoff(base=0.5, cap=60.0, rng=rng)
    assert all(0.25 <= backoff.next() <= 60.0 for _ in range(1100))


def test_backoff_counts_attempts_and_reset_starts_again():
    backoff = Backoff(base=1.0, cap=8.0, jitter=None)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.attempt == 6
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next(floor=3.0) == 3.0
    assert backoff.next() == 2.0  # a floored attempt still counts


def test_backoff_draws_like_the_pure_function():
    """Same seed, same draws: the class adds only the attempt count."""
    stateful = Backoff(base=0.5, cap=60.0, rng=random.Random(4))
    pure = random.Random(4)
    assert [stateful.next() for _ in range(12)] == [delay(a, 0.5, 60.0, rng=pure) for a in range(12)]
