"""Short-lived credentials: fetched when first needed, renewed before they expire."""

from __future__ import annotations

import threading
import time
import typing as t


class ExpiringToken:
    """A token from ``fetch()`` (which returns it and its lifetime in seconds), kept until
    90% of that lifetime has passed (and at least 5 s before it ends), then fetched again.

    ``drop(stale)``: a request was answered "expired" although the token should still
    be good (clock skew, an early revocation): the next request fetches a new one. Several
    requests may fail with the same token at once; only the first drop counts.
    """

    def __init__(self, fetch: t.Callable[[], tuple[str, float]]):
        self._fetch = fetch
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def get(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                token, lifetime = self._fetch()
                self._refresh_at = time.monotonic() + max(0.0, min(lifetime * 0.9, lifetime - 5))
                self._token = token
            return self._token

    def drop(self, stale: str) -> None:
        with self._lock:
            if self._token is not None and stale == self._token:
                self._token = None

    @property
    def current(self) -> str | None:
        """The token in use, if any (to keep it out of logs)."""
        return self._token
