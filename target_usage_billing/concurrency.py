"""Requests in flight that adapt to the platform: additive increase, multiplicative decrease.

Over a real network one request's round trip, not the target's CPU, bounds throughput:
with 100 ms of latency, 8 requests in flight carry at most 80 requests a second. So the
level starts where a fixed default used to be and grows while every slot is busy and
answers stay as fast as the fastest recently seen (TCP's slow start, then one more
request per round trip). It shrinks when the platform says it is overloaded (429, 503,
``Retry-After``, a timeout or a dropped connection: by half) or answers slow down (by a
tenth), at most once per round trip, so one burst of refusals counts once. It never grows
while requests wait for the client-side rate limit (more in flight would only wait too),
and never passes ``ceiling`` (``max_requests_in_flight``) nor IN_FLIGHT_BYTES of batches.

``next_level`` is the whole rule, pure; ``AdaptiveLimit`` applies it to the slots.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

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
            if not answer.congested:
                self._recent.append(answer.seconds)
            base = min(self._recent, default=answer.seconds)
            level, slow_start = next_level(self.level, answer, base, self.ceiling, self._slow_start)
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
