"""The failure windows on a clock the test moves: a window ends, and a new one counts from zero."""

from __future__ import annotations

import pytest

from gateway.failure_limits import FailureLimits, FailureWindows
from gateway.problems import GatewayError

HASHES = ("$argon2id$placeholder", None)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _retry_after(limits: FailureLimits, source: str = "192.0.2.1", token_id: str = "tok") -> int | None:
    try:
        limits.check(source, token_id)
    except GatewayError as error:
        assert (error.status, error.code) == (429, "too_many_failures")
        return int(error.headers["Retry-After"])
    return None


def _fail(limits: FailureLimits, n: int, *, source: str = "192.0.2.1", token_id: str = "tok") -> None:
    for i in range(n):
        limits.record_failure(source, token_id, f"{source} {token_id} {i}".encode(), HASHES)


def test_a_source_over_the_limit_is_refused_until_its_window_ends_then_accepted() -> None:
    clock = Clock()
    limits = FailureLimits(per_source=3, per_token=1000, window=60, clock=clock)
    _fail(limits, 2)
    assert _retry_after(limits) is None
    _fail(limits, 1, token_id="other")

    assert _retry_after(limits) == 60
    clock.now += 59.5
    assert _retry_after(limits) == 1
    clock.now += 0.5
    assert _retry_after(limits) is None
    clock.now += 3600
    assert _retry_after(limits) is None


def test_a_token_over_the_limit_is_refused_until_its_window_ends_then_accepted() -> None:
    clock = Clock()
    limits = FailureLimits(per_source=1000, per_token=2, window=30, clock=clock)
    _fail(limits, 1, source="198.51.100.1")
    clock.now += 10
    _fail(limits, 1, source="198.51.100.2")

    assert _retry_after(limits, source="203.0.113.9") == 20  # the window started at the first failure
    clock.now += 25
    assert _retry_after(limits, source="203.0.113.9") is None


def test_failures_after_a_window_ended_count_from_zero_in_a_new_window() -> None:
    clock = Clock()
    limits = FailureLimits(per_source=3, per_token=1000, window=60, clock=clock)
    _fail(limits, 2)
    clock.now += 61
    _fail(limits, 2, token_id="next")
    assert _retry_after(limits) is None  # 2 in the new window, not 4

    _fail(limits, 1, token_id="third")
    assert _retry_after(limits) == 60  # and the new window runs from its own first failure


def test_a_failure_inside_the_window_does_not_extend_it() -> None:
    clock = Clock()
    windows = FailureWindows(1, 60, clock=clock)
    windows.add("192.0.2.1")
    clock.now += 50
    windows.add("192.0.2.1")

    assert windows.retry_after("192.0.2.1") == pytest.approx(10)
    clock.now += 10
    assert windows.retry_after("192.0.2.1") is None


def test_the_least_recently_failed_key_is_dropped_first_when_the_windows_are_full() -> None:
    windows = FailureWindows(1, 60, max_keys=2, clock=Clock())
    for key in ("a", "b", "a", "c"):
        windows.add(key)

    assert [windows.retry_after(key) is not None for key in ("a", "b", "c")] == [True, False, True]


def test_the_429_says_how_long_to_wait_in_whole_seconds_and_at_least_one() -> None:
    clock = Clock()
    limits = FailureLimits(per_source=1, per_token=1000, window=60, clock=clock)
    _fail(limits, 1)
    clock.now += 59.8

    with pytest.raises(GatewayError) as refused:
        limits.check("192.0.2.1", "tok")
    assert (refused.value.status, refused.value.code) == (429, "too_many_failures")
    assert refused.value.headers == {"Retry-After": "1"}
    assert str(refused.value) == "Too many wrong secrets from this address or for this token; retry in 1 s."


def test_a_failure_at_the_very_end_of_a_window_starts_a_new_one() -> None:
    clock = Clock()
    windows = FailureWindows(2, 60, clock=clock)
    windows.add("192.0.2.1")
    clock.now += 60
    windows.add("192.0.2.1")
    assert windows.retry_after("192.0.2.1") is None  # one failure in the new window

    clock.now += 1
    windows.add("192.0.2.1")
    assert windows.retry_after("192.0.2.1") == pytest.approx(59)


def test_the_default_limits_are_those_of_the_default_settings() -> None:
    clock = Clock()
    limits = FailureLimits(clock=clock)
    _fail(limits, 19)
    assert _retry_after(limits) is None
    _fail(limits, 1, token_id="second")
    assert _retry_after(limits) == 60  # 20 per address in 60 s

    _fail(limits, 99, source="198.51.100.1", token_id="busy")
    assert _retry_after(limits, source="203.0.113.1", token_id="busy") is None
    _fail(limits, 1, source="198.51.100.2", token_id="busy")
    assert _retry_after(limits, source="203.0.113.1", token_id="busy") == 60  # 100 per token


def test_at_most_100_000_keys_are_counted_by_default() -> None:
    windows = FailureWindows(1, 60, clock=Clock())
    for n in range(100_001):
        windows.add(str(n))

    assert windows.retry_after("0") is None
    assert windows.retry_after("1") is not None


def test_a_secret_remembered_as_wrong_is_known_wrong_against_the_same_hashes_only() -> None:
    limits = FailureLimits(remembered_failures=2)
    limits.remember_wrong(b"first", HASHES)
    limits.record_failure("192.0.2.1", "tok", b"second", HASHES)

    assert limits.known_wrong(b"first", HASHES) and limits.known_wrong(b"second", HASHES)
    assert not limits.known_wrong(b"first", ("$argon2id$rotated", None))
    assert _retry_after(FailureLimits(per_source=1)) is None  # remembering alone counts nothing


def test_the_secret_remembered_longest_ago_is_forgotten_first() -> None:
    limits = FailureLimits(remembered_failures=2)
    limits.remember_wrong(b"a", HASHES)
    limits.remember_wrong(b"b", HASHES)
    limits.remember_wrong(b"a", HASHES)  # a is now the most recent
    limits.remember_wrong(b"c", HASHES)
    assert [limits.known_wrong(digest, HASHES) for digest in (b"a", b"b", b"c")] == [True, False, True]

    limits.record_failure("192.0.2.1", "tok", b"d", HASHES)
    assert [limits.known_wrong(digest, HASHES) for digest in (b"a", b"c", b"d")] == [False, True, True]


def test_at_most_100_000_wrong_secrets_are_remembered_by_default() -> None:
    limits = FailureLimits()
    for n in range(100_001):
        limits.remember_wrong(n.to_bytes(4, "big"), HASHES)

    assert not limits.known_wrong((0).to_bytes(4, "big"), HASHES)
    assert limits.known_wrong((1).to_bytes(4, "big"), HASHES)
