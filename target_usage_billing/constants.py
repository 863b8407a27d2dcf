"""Transport constants in one place: timeouts, what is retried, backoff bounds, caps.

As the Stainless vendor SDKs keep theirs in ``_constants.py``: every number the retry
policy and the transport use is named here once, and the settings' defaults say the
same numbers (``settings.py`` reads them from here).
"""

from __future__ import annotations

# Seconds to wait for a whole answer (request_timeout_seconds' default) and to connect.
DEFAULT_TIMEOUT_SECONDS = 60
CONNECT_TIMEOUT_SECONDS = 10

# How long transient failures are retried before the run stops (max_retry_seconds).
DEFAULT_RETRY_BUDGET_SECONDS = 600

# Capped exponential backoff with equal jitter: the first wait is at most INITIAL, no
# wait is longer than MAX (unless the server asks for longer with Retry-After).
INITIAL_RETRY_DELAY_SECONDS = 0.5
MAX_RETRY_DELAY_SECONDS = 30.0

# Error answers worth sending again unchanged, as the vendors' SDKs decide (their
# ``_should_retry``): request timeout, lock timeout (conflict), rate limit ...
RETRY_STATUSES = frozenset({408, 409, 429})
# ... and every server error from here up.
RETRY_SERVER_ERRORS_FROM = 500

# The server's own say, which wins over the status: "true" or "false" (Stainless APIs).
SHOULD_RETRY_HEADER = "x-should-retry"

# An answer larger than this is no platform's acknowledgement or refusal: cut off.
MAX_ANSWER_BYTES = 4 << 20

# Each delivery thread's requests Session: origins kept (a pool each), connections per pool.
POOL_CONNECTIONS = 4
POOL_MAXSIZE = 2
