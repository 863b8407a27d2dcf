"""A stream's id scheme: which key properties its derived ids are computed from.

A derived id is a UUIDv5 over the stream name and the record's key property values
(mapping/ids.py). When a tap announces other key properties for a stream (a SCHEMA
mid-run, or a tap upgrade between runs), the same record gets another id, and the
platform bills it a second time. So a change of key properties stops the run, unless
the rule maps an explicit id (then the key properties do not make the id) or the user
accepted the change for that stream (``accept_key_property_changes``).

The check is a pure function of what was and what is, so that a remembered key list
(the run journal's, across runs) can be fed to it as well as the one seen in this run.
"""

from __future__ import annotations

import fnmatch
import typing as t
from collections.abc import Sequence


def key_change_error(
    stream: str,
    previous: Sequence[str],
    new: Sequence[str],
    *,
    explicit_id: bool,
    acknowledged: bool,
) -> str | None:
    """The one-line error when ``stream``'s ids would change with its key properties."""
    if list(previous) == list(new) or explicit_id or acknowledged:
        return None
    return (
        f"stream {stream!r} changed its key properties from {list(previous)} to {list(new)}: "
        "its derived ids would change and usage already sent would be billed again; map an "
        "explicit id for the stream, or list it in accept_key_property_changes if re-billing "
        "is understood (e.g. nothing was sent before)"
    )


def accepted(stream: str, patterns: t.Iterable[str] | None) -> bool:
    """Whether ``accept_key_property_changes`` names ``stream`` (names or glob patterns)."""
    return any(fnmatch.fnmatchcase(stream, pattern) for pattern in patterns or ())
