"""Client-side request-rate limiting: the platforms' published limits, kept before sending."""

from __future__ import annotations

import collections
import threading
import time
import typing as t


class RateLimiter:
    """Sliding-window client-side limit: at most ``count`` requests per ``seconds``.

    Several windows may apply at once (m3ter: 50/s per org and 5,000 per 5 min per IP).
    """

    def __init__(self, windows: t.Sequence[tuple[int, float]]):
        self.windows = [(count, seconds) for count, seconds in windows if count > 0]
        self._sent: list[collections.deque[float]] = [collections.deque() for _ in self.windows]
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a request may be sent; returns the seconds waited."""
        if not self.windows:
            return 0.0
        waited = 0.0
        with self._lock:  # waiters queue on the lock: first come, first served
            while True:
                now = time.monotonic()
                wait = 0.0
                for (count, seconds), sent in zip(self.windows, self._sent):
                    while sent and sent[0] <= now - seconds:
                        sent.popleft()
                    if len(sent) >= count:
                        wait = max(wait, sent[0] + seconds - now)
                if wait <= 0:
                    for sent in self._sent:
                        sent.append(now)
                    return waited
                time.sleep(wait)
                waited += wait
