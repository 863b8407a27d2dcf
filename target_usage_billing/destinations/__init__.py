"""Billing destinations, by the name used in the ``destination`` setting."""

from __future__ import annotations

from target_usage_billing.destinations.base import (
    Destination,
    OutgoingRequest,
    Ruling,
    Verdict,
)
from target_usage_billing.destinations.lago import LagoDestination
from target_usage_billing.destinations.m3ter import M3terDestination
from target_usage_billing.destinations.metronome import MetronomeDestination
from target_usage_billing.destinations.openmeter import OpenMeterDestination
from target_usage_billing.destinations.orb import OrbDestination
from target_usage_billing.destinations.stripe import StripeDestination

DESTINATIONS: dict[str, type[Destination]] = {
    cls.name: cls
    for cls in (
        M3terDestination,
        MetronomeDestination,
        OrbDestination,
        LagoDestination,
        OpenMeterDestination,
        StripeDestination,
    )
}

__all__ = ["DESTINATIONS", "Destination", "OutgoingRequest", "Ruling", "Verdict"]
