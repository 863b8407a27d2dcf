"""Command line of the sandbox: ``usage-billing-sandbox --port 8787 --data-dir DIR``."""

from __future__ import annotations

import argparse
import gc
import signal
import ssl
import sys
from pathlib import Path

from target_usage_billing.sandbox.server import SandboxServer
from target_usage_billing.sandbox.state import FAULT_KINDS, Fault, Sandbox, SandboxSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SandboxSettings()
    parser = argparse.ArgumentParser(
        prog="usage-billing-sandbox",
        description="Local emulator of billing platforms' ingest APIs (m3ter, Metronome, Orb, Lago, "
        "OpenMeter, Stripe), for trying and testing usage pipelines without an account.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port (0 picks a free one; default 8787)")
    parser.add_argument("--port-file", type=Path, help="write the chosen port to this file once listening")
    parser.add_argument(
        "--data-dir", type=Path, default=defaults.data_dir, help="where accepted items are stored"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every ingest answer")
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=defaults.token_lifetime,
        help="m3ter token lifetime in seconds",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[:count=N][:every=N][:after=N][:seconds=S][:retry_after=S][:destination=D]",
        help=f"inject a fault; KIND is one of {', '.join(FAULT_KINDS)} (repeatable)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="do not enforce m3ter's published request-rate limits"
    )
    parser.add_argument(
        "--refuse-items-containing",
        action="append",
        default=[],
        metavar="TEXT",
        help="refuse (400) items whose JSON contains TEXT, as if the API rejected them (repeatable)",
    )
    parser.add_argument("--m3ter-access-key-id", default=defaults.m3ter_access_key_id)
    parser.add_argument("--m3ter-api-secret", default=defaults.m3ter_api_secret)
    parser.add_argument("--metronome-api-token", default=defaults.metronome_api_token)
    parser.add_argument("--orb-api-key", default=defaults.orb_api_key)
    parser.add_argument("--lago-api-key", default=defaults.lago_api_key)
    parser.add_argument(
        "--openmeter-api-token",
        default=defaults.openmeter_api_token,
        help="the Bearer token OpenMeter Cloud expects; empty: none (a self-hosted OpenMeter)",
    )
    parser.add_argument("--stripe-api-key", default=defaults.stripe_api_key)
    parser.add_argument(
        "--stripe-session-seconds",
        type=float,
        default=defaults.stripe_session_seconds,
        help="lifetime of Stripe meter event sessions (default 900)",
    )
    parser.add_argument(
        "--orb-grace-period-hours",
        type=float,
        default=defaults.orb_grace_period_hours,
        help="Orb refuses events older than this (the account's ingestion grace period)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        faults = [Fault.parse_cli(spec) for spec in args.fault]
    except ValueError as exc:
        sys.exit(f"usage-billing-sandbox: error: {exc}")
    settings = SandboxSettings(
        m3ter_access_key_id=args.m3ter_access_key_id,
        m3ter_api_secret=args.m3ter_api_secret,
        metronome_api_token=args.metronome_api_token,
        orb_api_key=args.orb_api_key,
        lago_api_key=args.lago_api_key,
        openmeter_api_token=args.openmeter_api_token,
        stripe_api_key=args.stripe_api_key,
        stripe_session_seconds=args.stripe_session_seconds,
        orb_grace_period_hours=args.orb_grace_period_hours,
        token_lifetime=args.token_lifetime,
        latency_ms=args.latency_ms,
        data_dir=args.data_dir,
        refuse_items_containing=args.refuse_items_containing,
    )
    if args.no_rate_limit:
        settings.m3ter_rate_limits = ()
    sandbox = Sandbox(settings, faults)
    # The de-duplication index holds millions of entries after a long run; a full
    # collection walks it every time, so freeze what exists and collect young objects
    # less often (what the sandbox allocates per request is acyclic anyway).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    server = SandboxServer((args.host, args.port), sandbox)
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.scheme = "https"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"usage-billing-sandbox listening on {server.url} (data in {settings.data_dir})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
