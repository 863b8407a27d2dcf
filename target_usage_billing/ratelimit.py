"""Client-side request-rate limiting: the platforms' published limits, kept before sending."""

from __future__ import annotations

import collections
import threading
import time
import typing as t


class RateLimiter:
    """Sliding-window client-side limit: at most ``count`` requests per ``seconds``.

    Several windows may apply at once (m3ter: 50/s per org and 5,000 per 5 min per IP).
    Requests are also spaced evenly at the fastest window's rate (``seconds / count``
    apart), not let out in bursts of ``count``: a burst reaches the platform bunched or
    spread by however late each request gets to the wire, and the platform counts
    arrivals, so even spacing is what keeps a window's margin when the process is busy.
    """

    def __init__(
        self,
        windows: t.Sequence[tuple[int, float]],
        *,
        clock: t.Callable[[], float] = time.monotonic,
        sleep: t.Callable[[float], None] = time.sleep,
    ):
        self._clock, self._sleep = clock, sleep
        self.windows = [(count, seconds) for count, seconds in windows if count > 0]
        self._sent: list[collections.deque[float]] = [collections.deque() for _ in self.windows]
        self._spacing = min((seconds / count for count, seconds in self.windows), default=0.0)
        self._next = 0.0  # the earliest time the next request may go
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a request may be sent; returns the seconds waited."""
        if not self.windows:
            return 0.0
        waited = 0.0
        due: float | None = None  # when this request's sleep should have ended
        with self._lock:  # waiters queue on the lock: first come, first served
            while True:
                now = self._clock()
                wait = self._next - now
                for (count, seconds), sent in zip(self.windows, self._sent):
                    while sent and sent[0] <= now - seconds:
                        sent.popleft()
                    if len(sent) >= count:
                        wait = max(wait, sent[0] + seconds - now)
                if wait <= 0:
                    for sent in self._sent:
                        sent.append(now)
                    # spaced from when it was due: waking late (a sleeper waits for the
                    # interpreter lock) shortens the next gap instead of costing rate
                    self._next = (now if due is None else min(now, due)) + self._spacing
                    return waited
                due = now + wait
                self._sleep(wait)
                waited += wait
