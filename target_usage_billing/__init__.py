"""Singer target that loads usage into billing platforms (m3ter, Metronome, Orb, Lago, OpenMeter, Stripe)."""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("target-usage-billing")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
