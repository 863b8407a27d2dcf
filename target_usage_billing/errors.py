"""Errors the target reports to the user as one clear line (no traceback)."""

from __future__ import annotations

import traceback


class UsageBillingError(Exception):
    """An expected failure with a message written for the operator."""

    exit_code = 1


class ConfigError(UsageBillingError):
    """Invalid settings: raised before any input is read."""

    exit_code = 2


class StreamMappingError(ConfigError):
    """A stream's SCHEMA or first records show the mapping cannot work for it."""


class ResendBeyondWindowError(StreamMappingError):
    """A batch re-sends ids the platform acknowledged before its de-duplication window."""


class UnmatchedStreamError(StreamMappingError):
    """A stream arrived that no mapping rule matches, and unmatched_streams is "fail"."""


class CredentialsError(UsageBillingError):
    """The billing platform refused the credentials."""

    exit_code = 3


class DeliveryError(UsageBillingError):
    """Usage could not be delivered (outage past the retry budget, unexpected API answer)."""

    exit_code = 4


class InputError(UsageBillingError):
    """The Singer input is malformed (bad JSON line, record before schema, ...)."""

    exit_code = 5


class RejectionLimitError(UsageBillingError):
    """More records were rejected than the configured limit allows."""

    exit_code = 6


class InterruptedRun(UsageBillingError):
    """SIGTERM/SIGINT arrived and some received usage was not delivered."""

    exit_code = 7


class OutputError(UsageBillingError):
    """An output (dead_letter_path, dry_run_path, stdout, the run journal) could not be
    written during the run: no STATE goes past what it holds."""

    exit_code = 9


class JournalError(OutputError):
    """The run journal could not be written (locked past its busy timeout, disk full)."""


class ReconcileMismatch(UsageBillingError):
    """--reconcile found usage the platform does not hold, or holds as invalid."""

    exit_code = 8

    def __init__(self, message: str, report: list[str] | None = None):
        super().__init__(message)
        self.report = report or []


def drop_frames(exc: BaseException, handled: BaseException | None = None) -> None:
    """Let the frames of ``exc``'s tracebacks go (and of its causes): they hold what the
    failed code held, a request body or a whole batch, while the error is kept (a run's
    failure, until it ends) or sits in a cycle (urllib3 keeps each exception it handles in
    a local of the frame its traceback holds) that only the cyclic GC would free, and the
    run runs that rarely (target.py). ``handled``: an error being handled when the failed
    code began, and what led to it, are left as they are. The executing frames (the
    caller's) are skipped."""
    seen: set[int] = {id(handled)} if handled is not None else set()
    pending: list[BaseException | None] = [exc]
    while pending:
        each = pending.pop()
        if each is None or id(each) in seen:
            continue
        seen.add(id(each))
        traceback.clear_frames(each.__traceback__)
        each.__traceback__ = None
        pending += (each.__cause__, each.__context__)
