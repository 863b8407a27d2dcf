"""Requests in flight that adapt to the platform: additive increase, multiplicative decrease.

Over a real network one request's round trip, not the target's CPU, bounds throughput:
with 100 ms of latency, 8 requests in flight carry at most 80 requests a second. So the
level starts where a fixed default used to be and grows while every slot is busy and
answers stay as fast as the fastest recently seen (TCP's slow start, then one more
request per round trip). It shrinks when the platform says it is overloaded (429, 503,
``Retry-After``, a timeout or a dropped connection: by half) or answers slow down (by a
tenth), at most once per round trip, so one burst of refusals counts once. While the
platform refuses, one attempt at a time goes out (a probe; the others wait for its answer,
and none goes before a ``Retry-After``): a storm costs the requests that were already on
their way and one a retry interval, however many batches wait. After it, the level climbs
in slow start again up to half of where it was (TCP's threshold). It never grows
while requests wait for the client-side rate limit (more in flight would only wait too),
and never passes ``ceiling`` (``max_requests_in_flight``) nor IN_FLIGHT_BYTES of batches.

``next_level`` is the whole rule, pure; ``AdaptiveLimit`` applies it to the slots.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from target_usage_billing.constants import INITIAL_RETRY_DELAY_SECONDS, MAX_RETRY_DELAY_SECONDS

INITIAL_LEVEL = 8  # the fixed default this replaced: loopback runs start the same
SLOW_ANSWER = 2.0  # an answer this many times the fastest recent one means a queue is growing
CONGESTED_FACTOR = 0.5  # 429/503/Retry-After/timeouts
SLOW_FACTOR = 0.9  # answers slowing down
RECENT_ANSWERS = 100  # the fastest of the last this many answers is the base round trip
CONGESTION_STATUSES = frozenset((429, 503))  # the platform asks for fewer requests
# Below this round trip the initial level keeps up with reading; more threads would only
# contend for the interpreter (measured on loopback: Metronome +36 % CPU at no gain).
GROW_ABOVE_SECONDS = 0.01
IN_FLIGHT_BYTES = 128 << 20  # batches in flight hold at most this much (bodies and input lines)


@dataclass(frozen=True)
class Answer:
    """What one attempt told about the platform's load."""

    seconds: float  # the request's round trip (rate-limit waits excluded)
    congested: bool = False  # 429, 503, Retry-After, a timeout, a dropped connection
    rate_limited: bool = False  # it waited for the client-side rate limit first
    saturated: bool = False  # every slot was busy when it was sent
    retry_after: float | None = None  # the platform's Retry-After, in seconds


def next_level(
    level: float, answer: Answer, base_seconds: float, ceiling: int, slow_start: bool
) -> tuple[float, bool]:
    """The level after ``answer`` (and whether slow start goes on). Decreases are only
    applied by the caller once per round trip."""
    if answer.congested:
        return max(1.0, level * CONGESTED_FACTOR), False
    if answer.seconds > SLOW_ANSWER * base_seconds:
        return max(1.0, level * SLOW_FACTOR), False
    if answer.rate_limited or not answer.saturated or base_seconds < GROW_ABOVE_SECONDS:
        return level, slow_start  # more requests in flight would not go faster
    grown = level + 1 if slow_start else level + 1 / level
    return min(float(ceiling), grown), slow_start


class AdaptiveLimit:
    """Slots for requests in flight, as many as the current level allows."""

    def __init__(
        self,
        ceiling: int,
        *,
        adaptive: bool = True,
        initial: int = INITIAL_LEVEL,
        budget_bytes: int = IN_FLIGHT_BYTES,
        max_pause_seconds: float = MAX_RETRY_DELAY_SECONDS,
    ):
        self.ceiling = max(1, ceiling)
        self.adaptive = adaptive
        self.level = float(min(self.ceiling, initial) if adaptive else self.ceiling)
        self.peak = int(self.level)
        self.in_use = 0
        self.bytes_in_use = 0
        self.budget_bytes = budget_bytes
        self.decreases = 0
        self._slow_start = True
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_ANSWERS)
        self._last_decrease = 0.0
        self._condition = threading.Condition()
        # a congestion episode: from a refusal to the next answer that is not one
        self._congested = False
        self._probe_out = False  # the one attempt testing the platform meanwhile
        self._resume_at = 0.0  # time.monotonic() before which no attempt goes out
        self._threshold: float | None = None  # slow start ends here (half the level before)
        self._refusals = 0  # in this episode
        self.max_pause_seconds = max_pause_seconds

    @property
    def current(self) -> int:
        return int(self.level)

    def _free(self, size: int) -> bool:
        if self.in_use >= int(self.level):
            return False
        return self.in_use == 0 or self.bytes_in_use + size <= self.budget_bytes

    def acquire(self, timeout: float, size: int = 0) -> bool:
        """Take a slot for a batch holding ``size`` bytes; False when none came free
        within ``timeout`` seconds (the memory budget is a bound too: one batch always
        goes)."""
        with self._condition:
            if not self._free(size) and not self._condition.wait_for(lambda: self._free(size), timeout):
                return False
            self.in_use += 1
            self.bytes_in_use += size
            return True

    def _may_send(self) -> bool:
        if not self._congested:
            return True
        return not self._probe_out and time.monotonic() >= self._resume_at

    def clear_to_send(self, timeout: float) -> bool:
        """Wait until an attempt may go out (at once unless the platform is refusing);
        False after ``timeout`` seconds. Each True is followed by ``sent``."""
        if not self.adaptive:
            return True
        deadline = time.monotonic() + timeout
        with self._condition:
            while not self._may_send():
                now = time.monotonic()
                if now >= deadline:
                    return False
                until = deadline if self._probe_out else min(deadline, self._resume_at)
                self._condition.wait(max(0.001, until - now))
            if self._congested:
                self._probe_out = True
            return True

    def sent(self) -> None:
        """An attempt cleared by ``clear_to_send`` has its answer (or failed)."""
        if not self.adaptive:
            return
        with self._condition:
            self._probe_out = False
            self._condition.notify_all()

    def saturated(self) -> bool:
        """Whether every slot is busy (asked as a request goes out)."""
        return self.in_use >= int(self.level)

    def release(self, size: int = 0) -> None:
        with self._condition:
            self.in_use -= 1
            self.bytes_in_use -= size
            self._condition.notify_all()

    def observe(self, answer: Answer) -> None:
        """Adjust the level to what one attempt said."""
        if not self.adaptive:
            return
        with self._condition:
            if answer.congested:
                if not self._congested:
                    self._congested = True
                    self._threshold = max(1.0, self.level * CONGESTED_FACTOR)
                # the platform's wait (0: one probe at a time, no pause), else a backoff
                # that doubles with each refused probe (not with the answers of requests
                # sent before the pause began, which all come back at once)
                now = time.monotonic()
                wait = answer.retry_after
                if wait is None and now >= self._resume_at:
                    self._refusals += 1
                    wait = min(
                        MAX_RETRY_DELAY_SECONDS, INITIAL_RETRY_DELAY_SECONDS * 2 ** (self._refusals - 1)
                    )
                wait = min(wait or 0.0, self.max_pause_seconds)
                self._resume_at = max(self._resume_at, now + wait)
            else:
                self._recent.append(answer.seconds)
                if self._congested:  # the episode is over: slow start back to the threshold
                    self._congested = False
                    self._refusals = 0
                    self._slow_start = True
                    self._condition.notify_all()
            base = min(self._recent, default=answer.seconds)
            level, slow_start = next_level(self.level, answer, base, self.ceiling, self._slow_start)
            if slow_start and self._threshold is not None and level >= self._threshold:
                slow_start = False
            if level < self.level:
                now = time.monotonic()
                if now - self._last_decrease < max(base, 0.05):  # once per round trip
                    return
                self._last_decrease = now
                self.decreases += 1
            self.level, self._slow_start = level, slow_start
            self.peak = max(self.peak, int(level))
            self._condition.notify_all()

    def describe(self) -> str:
        return f"{self.current} of up to {self.ceiling}" if self.adaptive else str(self.ceiling)
