"""Benchmark: the real CLI against the sandbox, beside a no-op singer-sdk target.

    python benchmarks/run.py --events 1000000 --destination m3ter --latency-ms 0
    python benchmarks/run.py --events 200000 --mappings 1 2 10 --repeat 3   # fan-out, dry runs

Generates N Segment-shaped events (cached in benchmarks/results/), starts the sandbox,
runs `target-usage-billing` on them and prints records/s, requests, requests/s, the
most requests seen in one second and peak RSS; then runs a no-op singer-sdk BatchSink
target with default settings on the same input as the baseline and prints the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ACCOUNTS = 50  # customers of the generated events (the sandbox's samples: 50)
STATE_EVERY = 10_000  # records between STATE messages of the generated input
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE.parent))

from target_usage_billing.sandbox.launch import launch  # noqa: E402
from target_usage_billing.sandbox.samples import STREAM, singer_lines  # noqa: E402

M3TER_RULE = {
    "stream": "segment_events",
    "preset": "segment",
    "fields": {
        "meter": "event == 'Tokens Consumed' && 'llm_tokens' || 'api_requests'",
        "who": {"user": "userId"},
        "where": {"region": "properties.region"},
        "measure": {
            "requests": "properties.requests",
            "tokens": "properties.tokens",
            "compute_seconds": "properties.compute_seconds",
            "input_tokens": "properties.input_tokens",
            "output_tokens": "properties.output_tokens",
        },
        "cost": {"usd": "properties.cost_usd"},
    },
}
SEGMENT_PRESET = {"stream": "segment_events", "preset": "segment"}
STRIPE_RULE = {
    "stream": "segment_events",
    "preset": "segment",
    "filter": "type == 'track' && properties.tokens != null",
    "fields": {"payload": {"stripe_customer_id": "context.groupId", "value": "properties.tokens"}},
}
RULES = {
    "m3ter": M3TER_RULE,
    "metronome": SEGMENT_PRESET,
    "orb": SEGMENT_PRESET,
    "lago": SEGMENT_PRESET,
    "openmeter": SEGMENT_PRESET,
    "stripe": STRIPE_RULE,
}
DESTINATIONS = ["m3ter", "metronome", "orb", "lago", "openmeter", "stripe"]


def events_file(
    count: int, streams: int = 1, accounts: int = ACCOUNTS, state_every: int = STATE_EVERY
) -> Path:
    """The generated events; with ``streams`` > 1, spread round-robin over that many
    streams (segment_events_0, ...), each with its own SCHEMA first; ``accounts``: the
    customers they come from; a STATE every ``state_every`` records (0: only at the end)."""
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-{streams}-streams" if streams > 1 else ""
    suffix += f"-{accounts}-accounts" if accounts != ACCOUNTS else ""
    suffix += f"-state-every-{state_every}" if state_every != STATE_EVERY else ""
    path = RESULTS / f"segment-{count}{suffix}.singer.jsonl"
    # regenerate daily: Metronome refuses events older than 34 days
    if not path.exists() or time.time() - path.stat().st_mtime > 86400:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            lines = singer_lines(count, seed=1, hours=72, accounts=accounts, state_every=state_every)
            if streams > 1:
                lines = _spread(lines, streams)
            for line in lines:
                out.write(line + "\n")
        tmp.replace(path)
    return path


def _spread(lines: t.Iterable[str], streams: int) -> t.Iterator[str]:
    records = 0
    for line in lines:
        message = json.loads(line)
        if message["type"] == "SCHEMA":
            for n in range(streams):
                yield json.dumps({**message, "stream": f"{STREAM}_{n}"})
            continue
        if message["type"] == "RECORD":
            message["stream"] = f"{STREAM}_{records % streams}"
            records += 1
        yield json.dumps(message)


def run_child(command: list[str], input_path: Path, log_path: Path) -> tuple[float, int, int, float]:
    """(seconds, exit code, peak RSS in bytes, CPU seconds) of one process reading input_path.

    It runs in log_path's folder, so that its output files (dead letters) stay there.
    """
    with open(input_path, "rb") as stdin, open(log_path, "wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen(
            command, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log, cwd=log_path.parent
        )
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, child.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def fetch(url: str, method: str = "GET", body: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read() or b"{}")


def destination_settings(destination: str, url: str) -> dict:
    """The sandbox's credentials and URLs for ``destination`` (the examples' own settings)."""
    sandbox = {
        "m3ter": {
            "m3ter_org_id": "bench",
            "m3ter_access_key_id": "sandbox-access-key",
            "m3ter_api_secret": "sandbox-api-secret",
            "m3ter_ingest_url": url,
            "m3ter_auth_url": url,
        },
        "metronome": {"metronome_api_token": "sandbox-metronome-token", "metronome_api_url": url},
        # the generated events span 72 hours; the sandbox is started with the same grace
        "orb": {"orb_api_key": "sandbox-orb-key", "orb_api_url": f"{url}/orb", "orb_grace_period_hours": 96},
        "lago": {"lago_api_key": "sandbox-lago-key", "lago_api_url": f"{url}/lago"},
        "openmeter": {
            "openmeter_api_token": "sandbox-openmeter-token",
            "openmeter_api_url": f"{url}/openmeter",
        },
        "stripe": {
            "stripe_api_key": "sk_test_sandbox",
            "stripe_api_url": f"{url}/stripe",
            "stripe_meter_events_url": f"{url}/stripe",
        },
    }
    return sandbox[destination]


ID_FIELDS = {"m3ter": "uid", "openmeter": "id", "stripe": "identifier", "orb": "idempotency_key"}


def fanout_rules(destination: str, count: int) -> list[dict]:
    """``count`` mappings on segment_events: the destination's rule, each named; every
    mapping after the first derives its ids (``null`` drops the preset's messageId), which
    then include its name; m3ter meters differ."""
    rules = []
    for n in range(count):
        rule = json.loads(json.dumps(RULES[destination]))
        rule["name"] = f"meter_{n}"
        if n:
            rule.setdefault("fields", {})[ID_FIELDS.get(destination, "transaction_id")] = None
            if destination == "m3ter":
                rule["fields"]["meter"] = f"'meter_{n}'"
        rules.append(rule)
    return rules


def target_config(
    destination: str,
    url: str,
    rate_limited: bool,
    in_flight: int | None,
    mappings: int = 1,
    streams: int = 1,
) -> dict:
    rule = RULES[destination]
    if streams > 1:
        rule = {**rule, "stream": f"{STREAM}_*"}
    config = {
        "destination": destination,
        **destination_settings(destination, url),
        "mappings": fanout_rules(destination, mappings) if mappings > 1 else [rule],
    }
    if not rate_limited:
        config["max_requests_per_second"] = 0
    if in_flight:
        config["max_requests_in_flight"] = in_flight
    config["progress_interval_seconds"] = 0
    return config


def bench(
    destination: str,
    count: int,
    latency_ms: float,
    baseline: float | None,
    in_flight: int | None,
    *,  # by name: a positional streams once landed in journal
    dry_run: bool = False,
    journal: bool = True,
    mappings: int = 1,
    streams: int = 1,
    faults: t.Sequence[str] = (),
    accounts: int = ACCOUNTS,
    state_every: int = STATE_EVERY,
) -> dict:
    input_path = events_file(count, streams, accounts, state_every)
    rate_limited = (
        latency_ms > 0
    )  # zero latency measures the target itself; with latency, the API's limits apply
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        options = ["--latency-ms", str(latency_ms), "--orb-grace-period-hours", "96"]
        options += [] if rate_limited else ["--no-rate-limit"]
        for fault in faults:
            options += ["--fault", fault]
        sandbox = launch(work / "sandbox", *options)
        url = sandbox.url
        try:
            config_path = work / "config.json"
            config = target_config(destination, url, rate_limited, in_flight, mappings, streams)
            if dry_run:  # everything but sending: request bodies go to /dev/null
                config.update(dry_run=True, dry_run_path=os.devnull)
            if not journal:
                config["journal"] = False
            config["journal_path"] = str(work / "journal.sqlite")
            config_path.write_text(json.dumps(config))
            sandbox_cpu = process_cpu(sandbox.process.pid)
            seconds, code, rss, cpu = run_child(
                [str(BIN / "target-usage-billing"), "--config", str(config_path)],
                input_path,
                work / "target.log",
            )
            if code != 0:
                sys.exit(f"benchmark: target exited {code}:\n{(work / 'target.log').read_text()[-3000:]}")
            sandbox_cpu = process_cpu(sandbox.process.pid) - sandbox_cpu
            stats = fetch(f"{url}/_sandbox/stats")[destination]
            if dry_run:  # nothing reached the sandbox: the items are the summary's
                summary = (work / "target.log").read_text().rsplit("total: would send ", 1)[1]
                stats["accepted"] = int(summary.split(" ", 1)[0])
        finally:
            sandbox.stop()
    result = {
        "destination": destination,
        "events": count,
        "streams": streams,
        "dry_run": dry_run,
        "latency_ms": latency_ms,
        "seconds": round(seconds, 2),
        "records_per_s": round(count / seconds),
        "items_sent": stats["accepted"],
        "items_per_s": round(stats["accepted"] / seconds),
        "requests": stats["requests"],
        "statuses": stats.get("statuses", {}),
        "requests_per_s": round(stats["requests"] / seconds, 1),
        "max_requests_in_1s": stats["max_requests_in_1s"],
        "peak_rss_mb": round(rss / 2**20, 1),
        # user+sys of the target alone: steadier than wall time on a shared machine
        "cpu_seconds": round(cpu, 2),
        "cpu_us_per_record": round(cpu / count * 1e6, 1),
        # the sandbox shares the machine: when its CPU nears a core, it is what bounds the run
        "sandbox_cpu_seconds": round(sandbox_cpu, 2),
    }
    if baseline:
        result["baseline_records_per_s"] = round(baseline)
        result["ratio_to_baseline"] = round(result["records_per_s"] / baseline, 2)
    return result


def process_cpu(pid: int) -> float:
    """user + sys CPU seconds of a running process (Linux /proc), threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline_rate(count: int) -> tuple[float, float, float]:
    """(records/s, peak RSS, CPU seconds) of the no-op SDK target."""
    input_path = events_file(count)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, code, rss, cpu = run_child(
            [sys.executable, str(HERE / "noop_target.py")], input_path, Path(tmp) / "log"
        )
    if code != 0:
        sys.exit("benchmark: the no-op baseline target failed")
    return count / seconds, rss, cpu


def stage_costs(destination: str, count: int) -> dict:
    """CPU microseconds per record for decoding, mapping and encoding, measured in this
    process on the same input with the target's own functions (sending: main() compares a
    dry run)."""
    from target_usage_billing.destinations import DESTINATIONS
    from target_usage_billing.mapping import MappingRejection, compile_rules, encode_payload
    from target_usage_billing.reader import _decoder

    config = target_config(destination, "http://unused", False, None)
    cls = DESTINATIONS[destination]
    (rule,) = compile_rules(config["mappings"], cls.field_specs(config), cls.presets, destination)
    lines = [line for line in events_file(count).read_bytes().split(b"\n") if line]
    gc.disable()  # as in the target (it relaxes the collector): measure the work, not GC
    try:
        started = time.process_time()
        for line in lines:
            _decoder.decode(line)
        decode = time.process_time() - started
        started = time.process_time()
        payloads = []
        for line in lines:
            message = _decoder.decode(line)
            if message.get("type") != "RECORD":
                continue
            try:
                payload = rule.apply(message["record"], "segment_events", ("messageId",))
            except MappingRejection:
                continue
            if payload is not None:
                payloads.append(payload)
        mapping = time.process_time() - started - decode
        started = time.process_time()
        for payload in payloads:
            encode_payload(payload)
        encode = time.process_time() - started
    finally:
        gc.enable()
    per = 1e6 / count
    return {
        "cpu_us_per_record_decode": round(decode * per, 1),
        "cpu_us_per_record_map": round(mapping * per, 1),
        "cpu_us_per_record_encode": round(encode * per, 1),
    }


def fanout_map_cost(destination: str, count: int, mappings: int) -> dict:
    """CPU microseconds per record of mapping alone with ``mappings`` mappings on the
    stream: the stream's one generated function, and (for comparison) each mapping's own
    function called in turn, as without shared trigger terms."""
    from target_usage_billing.destinations import DESTINATIONS
    from target_usage_billing.mapping import MappingRejection, StreamPlan, compile_rules, find_rules
    from target_usage_billing.reader import _decoder

    config = target_config(destination, "http://unused", False, None, mappings)
    cls = DESTINATIONS[destination]
    rules = compile_rules(config["mappings"], cls.field_specs(config), cls.presets, destination)
    plan = StreamPlan(find_rules(rules, "segment_events"))
    records = []
    for line in events_file(count).read_bytes().split(b"\n"):
        if line:
            message = _decoder.decode(line)
            if message.get("type") == "RECORD":
                records.append(message["record"])
    keys = ("messageId",)
    alone = [rule.generate(id_tag=tag) for rule, tag in zip(plan.rules, plan.id_tags)]
    gc.disable()
    try:
        started = time.process_time()
        if plan.apply is None:
            for record in records:
                try:
                    alone[0](record, "segment_events", keys)
                except MappingRejection:
                    pass
        else:
            apply_all = plan.apply
            for record in records:
                apply_all(record, "segment_events", keys)
        combined = time.process_time() - started
        started = time.process_time()
        for record in records:
            for one in alone:
                try:
                    one(record, "segment_events", keys)
                except MappingRejection:
                    pass
        separate = time.process_time() - started
    finally:
        gc.enable()
    per = 1e6 / count
    return {
        "cpu_us_per_record_map": round(combined * per, 2),
        "cpu_us_per_record_map_each_alone": round(separate * per, 2),
    }


def stage_costs_in_child(destination: str, count: int) -> dict:
    # A child of its own: the decoded input must not inflate this process, whose size a
    # forked target would inherit in its peak-RSS figure.
    done = subprocess.run(
        [sys.executable, __file__, "--stage-costs", destination, "--events", str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def compile_package() -> None:
    """Byte-compile the package, as installing it does (pip compiles every module).

    From a checkout (an editable install) with PYTHONDONTWRITEBYTECODE set, as on some
    CI images, the target would otherwise compile each of its modules at every start:
    about 0.1 s of CPU a run that no installed copy pays (the baseline's singer-sdk is
    installed, so compiled). The cached files go to __pycache__ beside the sources.
    """
    import compileall

    compileall.compile_dir(str(HERE.parent / "target_usage_billing"), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--destination", choices=[*DESTINATIONS, "all"], default="all")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--in-flight", type=int, help="max_requests_in_flight (default: the target's)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the baseline and each target this many times, interleaved, and report the "
        "least CPU time of each (the run least disturbed by the rest of the machine)",
    )
    parser.add_argument(
        "--journal-cost",
        action="store_true",
        help="only measure the run journal: CPU with and without it, interleaved --repeat times",
    )
    parser.add_argument(
        "--mappings",
        type=int,
        nargs="+",
        help="fan-out: dry runs with this many mappings on the one stream (e.g. 1 2 10), CPU "
        "per record of the whole run and of mapping alone; --destination m3ter by default",
    )
    parser.add_argument("--stage-costs", choices=DESTINATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--fanout-map-cost", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help="spread the events over this many streams")
    parser.add_argument(
        "--accounts", type=int, default=ACCOUNTS, help="--journal-cost: the customers the events come from"
    )
    parser.add_argument(
        "--state-every",
        type=int,
        default=STATE_EVERY,
        help="--journal-cost: a STATE every this many records (0: only at the end, as from a tap "
        "without STATE)",
    )
    parser.add_argument(
        "--official-sdk",
        action="store_true",
        help="m3ter and Metronome: the target beside benchmarks/official_sdk.py (the vendor's SDK "
        "in a plain script) on the same input, interleaved --repeat times, CPU ratio",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="the sandbox's --fault (repeatable): runs with and without it, interleaved --repeat times, "
        "and the requests each made, e.g. --fault 429:after=1000:seconds=3:retry_after=1",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="dry runs only (request bodies to /dev/null), no baseline: peak RSS and CPU of "
        "the target alone, e.g. --events 10000000 --destination m3ter --memory",
    )
    args = parser.parse_args()
    if args.stage_costs:
        if args.fanout_map_cost:
            print(json.dumps(fanout_map_cost(args.stage_costs, args.events, args.fanout_map_cost)))
        else:
            print(json.dumps(stage_costs(args.stage_costs, args.events)))
        return
    if args.mappings:
        compile_package()
        bench_fanout("m3ter" if args.destination == "all" else args.destination, args)
        return
    if args.memory:
        compile_package()
        for destination in DESTINATIONS if args.destination == "all" else [args.destination]:
            for _ in range(max(1, args.repeat)):
                result = bench(
                    destination, args.events, 0.0, None, args.in_flight, dry_run=True, streams=args.streams
                )
                print(json.dumps(result), flush=True)
        return
    destinations = DESTINATIONS if args.destination == "all" else [args.destination]
    compile_package()
    if args.journal_cost:
        journal_cost(args, destinations)
        return
    if args.fault:
        fault_cost(args, destinations)
        return
    if args.official_sdk:
        sdk_comparison(args, destinations)
        return
    throughput(args, destinations)


def journal_cost(args: argparse.Namespace, destinations: list[str]) -> None:
    """CPU of runs with and without the run journal, interleaved ``--repeat`` times."""
    for latency in args.latency_ms:
        for destination in destinations:
            with_journal, without = [], []
            shape = {"accounts": args.accounts, "state_every": args.state_every}
            for _ in range(max(1, args.repeat)):  # interleaved: both see the same machine
                with_journal.append(bench(destination, args.events, latency, None, args.in_flight, **shape))
                without.append(
                    bench(destination, args.events, latency, None, args.in_flight, journal=False, **shape)
                )
            on = min(run["cpu_seconds"] for run in with_journal)
            off = min(run["cpu_seconds"] for run in without)
            print(
                json.dumps(
                    {
                        "destination": destination,
                        "events": args.events,
                        **shape,
                        "latency_ms": latency,
                        "peak_rss_mb_with_journal": max(run["peak_rss_mb"] for run in with_journal),
                        "peak_rss_mb_without_journal": max(run["peak_rss_mb"] for run in without),
                        "cpu_seconds_with_journal": on,
                        "cpu_seconds_without_journal": off,
                        "cpu_seconds_all_runs": [r["cpu_seconds"] for r in with_journal + without],
                        "journal_share_of_cpu": round((on - off) / on, 3),
                    }
                ),
                flush=True,
            )


def sdk_script_run(destination: str, count: int, latency_ms: float) -> dict:
    """benchmarks/official_sdk.py (the vendor's SDK, as a user's script) over the same
    input against a fresh sandbox: items, seconds and CPU time."""
    input_path = events_file(count)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        options = ["--latency-ms", str(latency_ms)] + ([] if latency_ms > 0 else ["--no-rate-limit"])
        sandbox = launch(work / "sandbox", *options)
        try:
            command = [sys.executable, str(HERE / "official_sdk.py"), destination, "--url", sandbox.url]
            seconds, code, rss, cpu = run_child(command, input_path, work / "sdk.log")
            if code != 0:
                sys.exit(
                    f"benchmark: the SDK script exited {code}:\n{(work / 'sdk.log').read_text()[-3000:]}"
                )
            stats = fetch(f"{sandbox.url}/_sandbox/stats")[destination]
        finally:
            sandbox.stop()
    return {
        "run": f"official SDK script ({destination})",
        "events": count,
        "seconds": round(seconds, 2),
        "items_sent": stats["accepted"],
        "requests": stats["requests"],
        "peak_rss_mb": round(rss / 2**20, 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_us_per_record": round(cpu / count * 1e6, 1),
    }


def sdk_comparison(args: argparse.Namespace, destinations: list[str]) -> None:
    """The target and the official-SDK script on the same input, interleaved ``--repeat``
    times: the least CPU time of each and their ratio."""
    for latency in args.latency_ms:
        for destination in [d for d in destinations if d in ("m3ter", "metronome")]:
            target_runs, sdk_runs = [], []
            for _ in range(max(1, args.repeat)):
                target_runs.append(bench(destination, args.events, latency, None, args.in_flight))
                sdk_runs.append(sdk_script_run(destination, args.events, latency))
            target = min(target_runs, key=lambda run: run["cpu_seconds"])
            sdk = min(sdk_runs, key=lambda run: run["cpu_seconds"])
            print(
                json.dumps(
                    {
                        "destination": destination,
                        "events": args.events,
                        "latency_ms": latency,
                        "target": {
                            k: target[k] for k in ("seconds", "items_sent", "requests", "cpu_seconds")
                        },
                        "official_sdk_script": {
                            k: sdk[k] for k in ("seconds", "items_sent", "requests", "cpu_seconds")
                        },
                        "target_cpu_seconds_all_runs": [run["cpu_seconds"] for run in target_runs],
                        "sdk_cpu_seconds_all_runs": [run["cpu_seconds"] for run in sdk_runs],
                        "cpu_ratio_sdk_to_target": round(sdk["cpu_seconds"] / target["cpu_seconds"], 2),
                    }
                ),
                flush=True,
            )


def fault_cost(args: argparse.Namespace, destinations: list[str]) -> None:
    """Requests of runs with and without the faults (a 429 storm), interleaved ``--repeat`` times:
    what the faults cost beyond the requests they refused themselves shows here."""
    for latency in args.latency_ms:
        for destination in destinations:
            clean, faulted = [], []
            for _ in range(max(1, args.repeat)):
                clean.append(bench(destination, args.events, latency, None, args.in_flight))
                faulted.append(
                    bench(destination, args.events, latency, None, args.in_flight, faults=args.fault)
                )
            most = max(run["requests"] for run in faulted)
            least = min(run["requests"] for run in clean)
            print(
                json.dumps(
                    {
                        "destination": destination,
                        "events": args.events,
                        "latency_ms": latency,
                        "faults": args.fault,
                        "requests_without_faults": [run["requests"] for run in clean],
                        "requests_with_faults": [run["requests"] for run in faulted],
                        "statuses_with_faults": [run["statuses"] for run in faulted],
                        "items_sent_with_faults": [run["items_sent"] for run in faulted],
                        "seconds_without_faults": [run["seconds"] for run in clean],
                        "seconds_with_faults": [run["seconds"] for run in faulted],
                        # the worst faulted run against the best clean one
                        "extra_requests": round(most / least - 1, 3),
                    }
                ),
                flush=True,
            )


def throughput(args: argparse.Namespace, destinations: list[str]) -> None:
    """Each target against the sandbox (and the baseline), with its stage costs."""
    baseline = None
    repeat = max(1, args.repeat)
    if not args.no_baseline:
        baseline, base_rss, base_cpu = baseline_rate(args.events)
        print(
            json.dumps(
                {
                    "baseline": "no-op singer-sdk BatchSink target, defaults",
                    "events": args.events,
                    "records_per_s": round(baseline),
                    "peak_rss_mb": round(base_rss / 2**20, 1),
                    "cpu_seconds": round(base_cpu, 2),
                }
            ),
            flush=True,
        )
    for latency in args.latency_ms:
        for destination in destinations:
            runs = []
            for attempt in range(repeat):
                runs.append(bench(destination, args.events, latency, baseline, args.in_flight))
                if baseline and attempt + 1 < repeat:  # interleaved: both see the same machine
                    again, _rss, cpu = baseline_rate(args.events)
                    if cpu < base_cpu:
                        baseline, base_cpu = again, cpu
            result = min(runs, key=lambda run: run["cpu_seconds"])
            if repeat > 1:
                result["runs"] = repeat
                result["cpu_seconds_all_runs"] = [run["cpu_seconds"] for run in runs]
            if baseline:
                result["baseline_cpu_seconds"] = round(base_cpu, 2)
                # CPU time is steadier than wall time on a shared machine: the bar
                result["cpu_ratio_to_baseline"] = round(base_cpu / result["cpu_seconds"], 2)
                stages = stage_costs_in_child(destination, args.events)
                # sending (HTTP, gzip, the delivery threads): the CPU a dry run of the
                # same input does not spend, least of as many dry runs as real ones
                dry = min(
                    bench(destination, args.events, latency, None, args.in_flight, dry_run=True)[
                        "cpu_seconds"
                    ]
                    for _ in range(repeat)
                )
                stages["cpu_us_per_record_send"] = round(
                    max(0.0, result["cpu_seconds"] - dry) / args.events * 1e6, 1
                )
                result.update(stages)
                # reading lines, ids, batching, start-up
                result["cpu_us_per_record_rest"] = round(
                    result["cpu_us_per_record"] - sum(stages.values()), 1
                )
            print(json.dumps(result), flush=True)


def bench_fanout(destination: str, args: argparse.Namespace) -> None:
    """Dry runs (bodies to /dev/null) with 1, 2, 10 ... mappings on one stream, interleaved
    ``--repeat`` times; the least CPU time of each, and mapping alone in a child."""
    runs: dict[int, list[dict]] = {n: [] for n in args.mappings}
    for _attempt in range(max(1, args.repeat)):
        for n in args.mappings:
            runs[n].append(bench(destination, args.events, 0.0, None, None, dry_run=True, mappings=n))
    for n in args.mappings:
        best = min(runs[n], key=lambda run: run["cpu_seconds"])
        done = subprocess.run(
            [
                *(sys.executable, __file__, "--stage-costs", destination),
                *("--events", str(args.events), "--fanout-map-cost", str(n)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = {
            "destination": destination,
            "mappings": n,
            "events": args.events,
            "items_written": best["items_sent"],
            "cpu_seconds_all_runs": [run["cpu_seconds"] for run in runs[n]],
            "cpu_us_per_record": best["cpu_us_per_record"],
            "peak_rss_mb": best["peak_rss_mb"],
            **json.loads(done.stdout),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
