#!/usr/bin/env python3
"""Tokligence benchmarks: the gateway against direct calls to the same mock provider, in one run.

    python bench/run.py            # about 4 minutes on 2 cores
    python bench/run.py --quick    # about 1 minute, fewer and shorter rounds

Starts bench/mock.py, the gateway (three instances: ledger on, ledger off, auth on) and, as the
yardstick for paced streams, bench/relay.py on loopback ports; measures added latency, throughput
and CPU per request, streaming delays, memory and start-up; then writes bench/results/latest.md and
latest.json and prints the Markdown. bench/README.md says what each figure means.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import importlib.util
import json
import math
import os
import platform
import py_compile
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from client import Connection, Result, build_request

BENCH = Path(__file__).resolve().parent
DEFAULT_GATEWAY = BENCH.parent / "tokligence.py"
MOCK = BENCH / "mock.py"
RELAY = BENCH / "relay.py"
RESULTS = BENCH / "results"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}

SYSTEM = "You are a concise assistant. Answer in plain text."
PROMPT = "Write one short sentence about benchmarks."
DELTAS = 20
UNPACED = f"d{DELTAS}"
PACED = f"d{DELTAS}-t50-g5"          # the mock waits 50 ms, then sends a delta every 5 ms
ADMIN_KEY = "tok_bench_" + "k" * 32    # the gateway's admin key when auth is on
WIRE_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}


# ---- run sizes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    rounds: int                    # interleaved rounds of the throughput matrix
    seconds: float                 # per throughput cell, per target, per round
    latency_rounds: int
    latency_requests: int          # sequential requests per target per round
    paced_rounds: int
    paced_requests: int
    startups: int
    concurrency: tuple[int, ...] = (1, 16, 64)


FULL = Sizes(rounds=3, seconds=0.7, latency_rounds=5, latency_requests=250, paced_rounds=5, paced_requests=12,
             startups=9)
QUICK = Sizes(rounds=2, seconds=0.3, latency_rounds=3, latency_requests=150, paced_rounds=2, paced_requests=4,
              startups=3)


# ---- what is measured -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    wire: str          # the client's wire
    prefix: str        # model prefix, which routes at the gateway: chat-* to the chat provider, msg-* ...

    def request(self, shape: str, stream: bool, headers: dict[str, str] | None = None) -> bytes:
        return build_request(WIRE_PATHS[self.wire], self.body(shape, stream), headers)

    def body(self, shape: str, stream: bool) -> bytes:
        model = f"{self.prefix}-{shape}"
        if self.wire == "chat":
            body: dict[str, Any] = {"model": model, "max_tokens": 256, "stream": stream, "messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]}
        elif self.wire == "messages":
            body = {"model": model, "max_tokens": 256, "stream": stream, "system": SYSTEM,
                    "messages": [{"role": "user", "content": PROMPT}]}
        else:        # store false, as Codex sends: a stored response costs a database write of its own
            body = {"model": model, "max_output_tokens": 256, "stream": stream, "instructions": SYSTEM,
                    "input": PROMPT, "store": False}
        return json.dumps(body).encode()


CHAT = Scenario("chat", "Chat passthrough", "chat", "chat")
MESSAGES = Scenario("messages", "Messages passthrough", "messages", "msg")
MESSAGES_TO_CHAT = Scenario("messages_to_chat", "Messages→Chat", "messages", "chat")
RESPONSES_TO_CHAT = Scenario("responses_to_chat", "Responses→Chat", "responses", "chat")
SCENARIOS = (CHAT, MESSAGES, MESSAGES_TO_CHAT, RESPONSES_TO_CHAT)
# Throughput bodies: (model shape, stream). "stream" arrives from the mock in one burst; "paced" is
# spread out as a real provider's (50 ms to the first delta, then one every 5 ms).
BODIES = {"json": (UNPACED, False), "stream": (UNPACED, True), "paced": (PACED, True)}
# (scenario, body) pairs also measured with the ledger off and with auth on, at the top concurrency.
VARIANT_CELLS = ((CHAT, "json"), (CHAT, "stream"), (MESSAGES_TO_CHAT, "stream"))
PACED_LOAD_SCENARIOS = (CHAT, MESSAGES_TO_CHAT)       # paced streams under load, at the top concurrency
LATENCY_CASES = ((CHAT, False), (CHAT, True), (MESSAGES_TO_CHAT, True))
PACED_CASES = (CHAT, MESSAGES_TO_CHAT)


@dataclass(eq=False)
class Target:
    """Something to send requests to: the mock directly, one of the gateways, or the bare relay."""
    name: str
    port: int
    process: Process | None         # in front of the mock; its CPU is what a load charges. None for direct calls
    headers: dict[str, str] = field(default_factory=dict)
    answered: int = 0               # requests answered on connections that have been closed


# ---- statistics -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds."""
    return {key: median([r[key] for r in rounds]) for key in rounds[0]} if rounds else {}


# ---- processes ------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM if the driver dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Process:
    """A child process the driver started, with its CPU time and memory from /proc."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.pid = self.popen.pid

    def cpu_seconds(self) -> float:
        """utime + stime of every thread of the process."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_mib(self) -> dict[str, float]:
        status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                  if line.startswith(("VmRSS:", "VmHWM:"))}
        return {"rss_mib": values["VmRSS"], "peak_mib": values["VmHWM"]}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


# What the installed `tokligence` console script does: import the module (from bytecode) and run main().
INSTALLED_COMMAND = "import sys, tokligence; sys.argv[0] = 'tokligence'; sys.exit(tokligence.main())"


class Bench:
    """The processes of one run, in a temporary directory. The gateway runs from a copy taken when the
    run starts, so every measurement sees the same code while tokligence.py is being edited."""

    def __init__(self, workdir: Path, mock_port: int, source: Path) -> None:
        self.workdir = workdir
        self.mock_port = mock_port
        self.gateway = workdir / "tokligence.py"
        shutil.copyfile(source, self.gateway)
        # The installed `tokligence` command imports the module from bytecode compiled at install time;
        # `python tokligence.py` compiles the whole file at every start (time and memory).
        py_compile.compile(str(self.gateway), cfile=importlib.util.cache_from_source(str(self.gateway)))

    def gateway_config(self) -> Path:
        path = self.workdir / "settings.ini"
        base = f"http://{HOST}:{self.mock_port}/v1"
        path.write_text(f"""[gateway]
host = {HOST}
log_level = info

[provider.mock_chat]
wire = chat
base_url = {base}
api_key = sk-bench

[provider.mock_messages]
wire = messages
base_url = {base}
api_key = sk-bench

[provider.mock_responses]
wire = responses
base_url = {base}
api_key = sk-bench

[routes]
chat-* = mock_chat
msg-* = mock_messages
resp-* = mock_responses
""")
        return path

    def gateway_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The driver's environment without TOKLIGENCE_* or proxy settings, HOME in the temp dir."""
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("TOKLIGENCE_") and name.lower() not in PROXY_VARIABLES}
        return {**env, "HOME": str(self.workdir), **extra}

    def spawn_gateway(self, name: str, port: int, env: dict[str, str], installed: bool = False) -> Process:
        # -P: the module comes from PYTHONPATH (the compiled copy), never from the current directory.
        start = ([sys.executable, "-P", "-c", INSTALLED_COMMAND] if installed else [sys.executable, str(self.gateway)])
        argv = [*start, "--config", str(self.gateway_config()), "--port", str(port)]
        env = {**env, "PYTHONPATH": str(self.workdir)} if installed else env
        return Process(name, argv, self.gateway_env(env), self.workdir / f"{name}.log")

    async def start_gateway(self, name: str, env: dict[str, str], headers: dict[str, str] | None = None,
                            installed: bool = False) -> tuple[Target, float]:
        """A gateway answering requests, and the seconds from spawning it to its first answer."""
        port = free_port()
        started = time.perf_counter()
        process = self.spawn_gateway(name, port, env, installed)
        target = Target(name, port, process, headers or {})
        await wait_answering(target, CHAT.request(UNPACED, False, target.headers))
        return target, time.perf_counter() - started


async def wait_answering(target: Target, raw: bytes, timeout: float = 15.0) -> Result:
    """Retries until the target answers a request (any status), every 2 ms, bounded by `timeout`."""
    deadline = time.perf_counter() + timeout
    while True:
        if target.process is not None and not target.process.alive():
            raise RuntimeError(f"{target.name} exited:\n{target.process.log_tail()}")
        try:
            connection = await Connection.open(HOST, target.port)
        except OSError:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{target.name} did not answer within {timeout:g} s") from None
            await asyncio.sleep(0.002)
            continue
        try:
            result = await asyncio.wait_for(connection.request(raw), timeout)
        finally:
            connection.close()
        target.answered += 1
        return result


# ---- measurements ---------------------------------------------------------------------------------

async def open_connections(target: Target, count: int) -> list[Connection]:
    return list(await asyncio.gather(*(Connection.open(HOST, target.port) for _ in range(count))))


def close_all(target: Target, connections: list[Connection]) -> None:
    for connection in connections:
        target.answered += connection.answered
        connection.close()


def client_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def own_cpu_seconds() -> float:
    """The driver's CPU and that of its children that have been waited for (all of them, at the end)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent, all processes, from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


async def sequential(connection: Connection, raw: bytes, count: int, stamps: bool = False) -> list[Result]:
    results = []
    for _ in range(count):
        result = await connection.request(raw, stamps)
        if result.status != 200:
            raise RuntimeError(f"got HTTP {result.status}")
        results.append(result)
    return results


async def load(target: Target, raw: bytes, concurrency: int, seconds: float, mock: Process) -> dict[str, float]:
    """`concurrency` keep-alive connections sending back to back for `seconds`; rates and CPU per request."""
    connections = await open_connections(target, concurrency)
    try:
        await asyncio.gather(*(connection.request(raw) for connection in connections))   # warm: discarded
        completed = errors = 0

        async def worker(connection: Connection) -> None:
            nonlocal completed, errors
            while time.perf_counter() < deadline:
                result = await connection.request(raw)
                completed += 1
                errors += result.status != 200

        gateway_cpu = target.process.cpu_seconds() if target.process else 0.0
        mock_cpu, client_cpu = mock.cpu_seconds(), client_cpu_seconds()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.wait_for(asyncio.gather(*(worker(c) for c in connections)), seconds + 30)
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{target.name}: {errors} of {completed} requests failed")
        per_request = 1e6 / completed
        return {
            "rps": completed / elapsed,
            "gateway_cpu_us": (target.process.cpu_seconds() - gateway_cpu) * per_request if target.process
            else math.nan,
            "mock_cpu_us": (mock.cpu_seconds() - mock_cpu) * per_request,
            "client_cpu_us": (client_cpu_seconds() - client_cpu) * per_request,
            "requests": completed,
        }
    finally:
        close_all(target, connections)


def rotated(targets: list[Target], by: int) -> list[Target]:
    by %= len(targets)
    return targets[by:] + targets[:by]


async def measure_latency(direct: Target, gateways: list[Target], sizes: Sizes) -> dict[str, Any]:
    """Sequential keep-alive requests, one connection per target; rounds interleave the targets."""
    rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_index in range(sizes.latency_rounds):
        for scenario, stream in LATENCY_CASES:
            for target in rotated([direct, *gateways], round_index):
                raw = scenario.request(UNPACED, stream, target.headers)
                connections = await open_connections(target, 1)
                try:
                    await sequential(connections[0], raw, 20)                  # warm-up, discarded
                    results = await sequential(connections[0], raw, sizes.latency_requests)
                finally:
                    close_all(target, connections)
                latencies = [r.latency * 1000 for r in results]
                headers = [r.overhead_ms for r in results if r.overhead_ms is not None]
                rounds.setdefault((case_key(scenario, stream), target.name), []).append({
                    "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
                    "header_p50_ms": percentile(headers, 0.5) if headers else math.nan})
    report: dict[str, Any] = {}
    for scenario, stream in LATENCY_CASES:
        key = case_key(scenario, stream)
        base = median_of(rounds[(key, direct.name)])
        case: dict[str, Any] = {"title": f"{scenario.title}, {'stream' if stream else 'non-stream'}",
                                "direct": base}
        for gateway in gateways:
            figures = median_of(rounds[(key, gateway.name)])
            figures["added_p50_ms"] = figures["p50_ms"] - base["p50_ms"]
            figures["added_p99_ms"] = figures["p99_ms"] - base["p99_ms"]
            figures["unaccounted_p50_ms"] = figures["added_p50_ms"] - figures["header_p50_ms"]
            case[gateway.name] = figures
        report[key] = case
    return report


def case_key(scenario: Scenario, stream: bool) -> str:
    return f"{scenario.key}_{'stream' if stream else 'json'}"


async def measure_paced(direct: Target, gateway: Target, relay: Target, sizes: Sizes) -> dict[str, Any]:
    """Paced streams (50 ms to the first delta, then one every 5 ms): when each delta arrives, direct,
    through the gateway, and through the bare relay (bench/relay.py) as the yardstick for a hop."""
    rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_index in range(sizes.paced_rounds):
        for scenario in PACED_CASES:
            for target in rotated([direct, gateway, relay], round_index):
                raw = scenario.request(PACED, True, target.headers)
                connections = await open_connections(target, 1)
                try:
                    await sequential(connections[0], raw, 1, stamps=True)       # warm-up, discarded
                    results = await sequential(connections[0], raw, sizes.paced_requests, stamps=True)
                finally:
                    close_all(target, connections)
                if any(len(r.stamps) != DELTAS for r in results):
                    raise RuntimeError(f"{target.name}: a paced stream lost deltas")
                first = [(r.stamps[0][1] - r.sent_ns) / 1e6 for r in results]
                delays = [(arrived - sent) / 1e6 for r in results for sent, arrived in r.stamps]
                rounds.setdefault((scenario.key, target.name), []).append({
                    "first_delta_ms": percentile(first, 0.5),
                    "delay_p50_ms": percentile(delays, 0.5), "delay_p99_ms": percentile(delays, 0.99)})
    report: dict[str, Any] = {}
    for scenario in PACED_CASES:
        base = median_of(rounds[(scenario.key, direct.name)])
        via = median_of(rounds[(scenario.key, gateway.name)])
        hop = median_of(rounds[(scenario.key, relay.name)])
        report[scenario.key] = {
            "title": scenario.title, "direct": base, "gateway": via, "relay": hop,
            "ttfb_added_ms": via["first_delta_ms"] - base["first_delta_ms"],
            "delay_added_p50_ms": via["delay_p50_ms"] - base["delay_p50_ms"],
            "delay_added_p99_ms": via["delay_p99_ms"] - base["delay_p99_ms"],
            "relay_ttfb_added_ms": hop["first_delta_ms"] - base["first_delta_ms"],
            "relay_delay_added_p99_ms": hop["delay_p99_ms"] - base["delay_p99_ms"]}
    return report


async def measure_throughput(direct: Target, gateway: Target, variants: list[Target], mock: Process,
                             sizes: Sizes) -> list[dict[str, Any]]:
    """The scenario x body x concurrency matrix (paced bodies at the top concurrency only); in each round
    every cell runs direct and through the gateway back to back (order alternating), and the variant
    gateways on VARIANT_CELLS at the top concurrency."""
    top = max(sizes.concurrency)
    cells = [(scenario, body, c) for scenario in SCENARIOS for body in ("json", "stream") for c in sizes.concurrency]
    cells += [(scenario, "paced", top) for scenario in PACED_LOAD_SCENARIOS]
    rounds: dict[tuple[str, str, int, str], list[dict[str, float]]] = {}
    for round_index in range(sizes.rounds):
        for index, (scenario, body, concurrency) in enumerate(cells):
            targets = [direct, gateway]
            if concurrency == top and (scenario, body) in VARIANT_CELLS:
                targets += variants
            for target in rotated(targets, round_index + index):
                raw = scenario.request(*BODIES[body], target.headers)
                sample = await load(target, raw, concurrency, sizes.seconds, mock)
                rounds.setdefault((scenario.key, body, concurrency, target.name), []).append(sample)
    matrix = []
    for scenario, body, concurrency in cells:
        row: dict[str, Any] = {"scenario": scenario.key, "title": scenario.title, "body": body,
                               "concurrency": concurrency}
        for target in [direct, gateway, *variants]:
            samples = rounds.get((scenario.key, body, concurrency, target.name))
            if samples:
                row[target.name] = median_of(samples)
        row["ratio"] = row[gateway.name]["rps"] / row[direct.name]["rps"]
        matrix.append(row)
    return matrix


# ---- wrk, when installed -----------------------------------------------------------------------------
# The same loads from wrk (C, one thread), which costs a fraction of the Python client's CPU: a
# cross-check that the gateway's rates and CPU per request do not depend on the load generator.
WRK = shutil.which("wrk")
WRK_CELLS = ((CHAT, "json"), (CHAT, "stream"), (MESSAGES_TO_CHAT, "stream"))
WRK_SECONDS = 1                     # wrk takes whole seconds
WRK_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_script(scenario: Scenario, body: str, headers: dict[str, str]) -> str:
    """wrk's Lua settings for one scenario: a POST with its JSON body."""
    return "\n".join(['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"',
                      *(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()),
                      f"wrk.body = [==[{scenario.body(*BODIES[body]).decode()}]==]", ""])


def parse_wrk(output: str) -> dict[str, float]:
    """Requests, rate and latency percentiles from `wrk --latency`; errors if any request failed."""
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)", output)
    if failed or not done:
        raise RuntimeError(f"wrk: {failed.group(0) if failed else 'no result'}\n{output}")
    latency = {f"p{q}_ms": float(value) * WRK_UNITS_MS[unit]
               for q, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)}
    seconds = float(done.group(2)) * WRK_UNITS_MS[done.group(3)] / 1000
    return {"requests": int(done.group(1)), "rps": int(done.group(1)) / seconds, **latency}


async def wrk_load(target: Target, script: Path, path: str, concurrency: int) -> dict[str, float]:
    cpu = target.process.cpu_seconds() if target.process else 0.0
    child = await asyncio.create_subprocess_exec(
        WRK or "wrk", "-t1", f"-c{concurrency}", f"-d{WRK_SECONDS}s", "--latency", "-s", str(script),
        f"http://{HOST}:{target.port}{path}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await child.communicate()
    sample = parse_wrk(output.decode())
    sample["gateway_cpu_us"] = ((target.process.cpu_seconds() - cpu) * 1e6 / sample["requests"] if target.process
                                else math.nan)
    return sample


async def measure_wrk(direct: Target, gateway: Target, workdir: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """WRK_CELLS at the top concurrency, direct and through the gateway back to back in each round
    (order alternating); [] without wrk."""
    if WRK is None:
        return []
    top = max(sizes.concurrency)
    rows = []
    for index, (scenario, body) in enumerate(WRK_CELLS):
        samples: dict[str, list[dict[str, float]]] = {direct.name: [], gateway.name: []}
        for round_index in range(sizes.rounds):
            for target in rotated([direct, gateway], round_index + index):
                script = workdir / f"wrk-{scenario.key}-{body}-{target.name}.lua"
                script.write_text(wrk_script(scenario, body, target.headers))
                samples[target.name].append(await wrk_load(target, script, WIRE_PATHS[scenario.wire], top))
        row: dict[str, Any] = {"scenario": scenario.key, "title": scenario.title, "body": body, "concurrency": top,
                               **{name: median_of(runs) for name, runs in samples.items()}}
        row["ratio"] = row[gateway.name]["rps"] / row[direct.name]["rps"]
        rows.append(row)
    return rows


async def probe_auth(bench: Bench) -> tuple[Target | None, dict[str, Any]]:
    """HOOK(auth): a gateway with TOKLIGENCE_AUTH_DISABLED=false and TOKLIGENCE_ADMIN_KEY set. If it turns
    away a request without a key (401/403) and answers one with the key, auth is measured as a variant;
    otherwise it is reported as not yet enforced and left out. Nothing else to change once it lands."""
    env = {"TOKLIGENCE_LEDGER_PATH": str(bench.workdir / "auth.db"), "TOKLIGENCE_AUTH_DISABLED": "false",
           "TOKLIGENCE_ADMIN_KEY": ADMIN_KEY}
    try:
        target, _ = await bench.start_gateway("auth", env, {"authorization": f"Bearer {ADMIN_KEY}"})
    except RuntimeError as exc:
        return None, {"status": "gateway failed to start with auth on", "detail": str(exc)[-500:]}
    anonymous = await wait_answering(Target("auth", target.port, None), CHAT.request(UNPACED, False))
    keyed = await wait_answering(target, CHAT.request(UNPACED, False, target.headers))
    facts = {"without_key": anonymous.status, "with_key": keyed.status}
    if anonymous.status in (401, 403) and keyed.status == 200:
        return target, {"status": "enforced", **facts}
    assert target.process is not None
    target.process.stop()
    return None, {"status": "not enforced by this build (requests without a key are answered)"
                  if anonymous.status == 200 else "unexpected answers", **facts}


def ledger_rows(path: Path) -> int | None:
    if not path.exists():
        return None
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT count(*) FROM requests").fetchone()[0]
        except sqlite3.OperationalError:
            return None


async def measure_startup(bench: Bench, sizes: Sizes, installed: bool = False) -> dict[str, Any]:
    """Spawn to first answered request (a chat passthrough to the mock), the ledger on; with
    `installed`, also the idle RSS after that first answer."""
    times, idle = [], []
    for index in range(sizes.startups):
        target, seconds = await bench.start_gateway(f"startup{index}{'i' if installed else ''}", {
            "TOKLIGENCE_LEDGER_PATH": str(bench.workdir / "startup.db")}, installed=installed)
        assert target.process is not None
        idle.append(target.process.memory_mib()["rss_mib"])
        target.process.stop()
        times.append(seconds * 1000)
    return {"median_ms": median(times), "min_ms": min(times), "max_ms": max(times), "runs_ms": times,
            "idle_rss_mib": median(idle)}


# Python itself on this machine, for the gateway's start-up and memory to be read against: the bare
# interpreter, and one that has imported what the gateway needs and made its TLS context.
PYTHON_FLOORS = {
    "python alone": "",
    "python with asyncio, ssl, sqlite3, h11 and a certifi context":
        "import asyncio, sqlite3, ssl, h11, certifi; ssl.create_default_context(cafile=certifi.where())",
}


async def measure_python_floors(sizes: Sizes) -> dict[str, dict[str, float]]:
    """Spawn to the child's first output, and its RSS then, for each of PYTHON_FLOORS (medians)."""
    floors = {}
    for name, code in PYTHON_FLOORS.items():
        times, rss = [], []
        for _ in range(sizes.startups):
            began = time.perf_counter()
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"{code}\nprint(open('/proc/self/status').read(), flush=True)",
                stdout=asyncio.subprocess.PIPE)
            assert child.stdout is not None
            line = await child.stdout.readline()
            times.append((time.perf_counter() - began) * 1000)
            status = line + await child.stdout.read()
            await child.wait()
            rss.append(int(re.search(rb"VmRSS:\s*(\d+)", status).group(1)) / 1024)  # type: ignore[union-attr]
        floors[name] = {"startup_ms": median(times), "rss_mib": median(rss)}
    return floors


async def warm_up(targets: list[Target]) -> None:
    """Every scenario and shape once through every target, a few dozen times (discarded)."""
    for target in targets:
        connections = await open_connections(target, 1)
        try:
            for scenario in SCENARIOS:
                for stream in (False, True):
                    await sequential(connections[0], scenario.request(UNPACED, stream, target.headers), 30)
        finally:
            close_all(target, connections)


# ---- targets to report against ---------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    title: str
    path: tuple[Any, ...]           # where the figure is in the results
    limit: float
    unit: str
    at_most: bool = True
    strict: bool = False            # "<" rather than "<="

    def check(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.at_most:
            return value < self.limit if self.strict else value <= self.limit
        return value >= self.limit


def throughput_path(scenario: Scenario, body: str, concurrency: int, figure: str) -> tuple[Any, ...]:
    return ("throughput", (scenario.key, body, concurrency), "gateway", figure)


def goals(top: int) -> list[Goal]:
    return [
        Goal("Added latency p50, non-stream passthrough, ledger on", ("latency", "chat_json", "gateway",
                                                                      "added_p50_ms"), 0.5, "ms"),
        Goal(f"CPU/request, non-stream passthrough (c={top})", throughput_path(CHAT, "json", top, "gateway_cpu_us"),
             300, "µs"),
        Goal(f"CPU/request, {DELTAS}-delta stream passthrough (c={top})",
             throughput_path(CHAT, "stream", top, "gateway_cpu_us"), 600, "µs"),
        Goal(f"CPU/request, {DELTAS}-delta Messages→Chat stream (c={top})",
             throughput_path(MESSAGES_TO_CHAT, "stream", top, "gateway_cpu_us"), 900, "µs"),
        Goal(f"Throughput c={top}, non-stream passthrough", throughput_path(CHAT, "json", top, "rps"),
             2500, "req/s", at_most=False),
        Goal(f"Throughput c={top}, Messages→Chat stream", throughput_path(MESSAGES_TO_CHAT, "stream", top, "rps"),
             1200, "req/s", at_most=False),
        Goal(f"Throughput c={top}, Responses→Chat stream", throughput_path(RESPONSES_TO_CHAT, "stream", top, "rps"),
             1200, "req/s", at_most=False),
        Goal("Paced stream: time to first delta added, passthrough", ("paced", "chat", "ttfb_added_ms"), 1, "ms",
             strict=True),
        Goal("Paced stream: time to first delta added, Messages→Chat", ("paced", "messages_to_chat",
                                                                         "ttfb_added_ms"), 1, "ms", strict=True),
        Goal("Paced stream: p99 relay delay per delta, passthrough", ("paced", "chat", "delay_added_p99_ms"), 1,
             "ms", strict=True),
        Goal("Paced stream: p99 relay delay per delta, Messages→Chat", ("paced", "messages_to_chat",
                                                                         "delay_added_p99_ms"), 1, "ms", strict=True),
        Goal("Idle RSS", ("memory", "idle_rss_mib"), 35, "MiB", strict=True),
        Goal("Idle RSS, installed command", ("startup_installed", "idle_rss_mib"), 35, "MiB", strict=True),
        Goal("Peak RSS under load", ("memory", "peak_mib"), 60, "MiB", strict=True),
        Goal("Start-up to first answered request (median)", ("startup", "median_ms"), 200, "ms", strict=True),
        Goal("Start-up, installed command (median)", ("startup_installed", "median_ms"), 200, "ms", strict=True),
    ]


def lookup(results: dict[str, Any], path: tuple[Any, ...]) -> float:
    node: Any = results
    for step in path:
        if isinstance(step, tuple):      # a throughput row: (scenario, body, concurrency)
            node = next((row for row in node if (row["scenario"], row["body"], row["concurrency"]) == step), {})
        else:
            node = node.get(step, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, (int, float)) else math.nan


# ---- report -----------------------------------------------------------------------------------------

def machine(source: Path, snapshot: Path) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gateway = snapshot.read_bytes()
    version = next((line.split("=")[1].strip().strip('"') for line in gateway.decode().splitlines()
                    if line.startswith("__version__")), "?")
    head = subprocess.run(["git", "-C", str(source.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "kernel": platform.release(),
            "gateway": str(source), "gateway_version": version, "git_head": head or "?",
            "gateway_sha256": hashlib.sha256(gateway).hexdigest()[:16]}


def idle_wake_cost() -> dict[str, float]:
    """json.loads of a stream chunk, warm and at once after a 50 ms sleep (a paced stream's first
    wait), medians in µs. Where an idle CPU loses its caches, as on many VMs, the gateway's path to a
    paced stream's first delta runs at the second rate, not the first."""
    chunk = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [{"index": 0, "delta": {"content": "Hello "}, "finish_reason": None}]})

    def once() -> float:
        began = time.perf_counter_ns()
        json.loads(chunk)
        return (time.perf_counter_ns() - began) / 1000

    warm = [once() for _ in range(500)][-200:]
    woken = []
    for _ in range(20):
        time.sleep(0.05)
        woken.append(once())
    return {"warm_us": median(warm), "after_50ms_idle_us": median(woken)}


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def table(header: list[str], rows: Iterator[list[str]] | list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: dict[str, Any]) -> str:
    m, run = results["machine"], results["run"]
    out = [f"# Tokligence benchmarks ({run['mode']})", "",
           f"Machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, Linux {m['kernel']}. "
           f"Gateway {m['gateway']} {m['gateway_version']}, git HEAD {m['git_head']}, file sha256 "
           f"{m['gateway_sha256']}… (copied when the run started). "
           f"Run {run['started']}, {run['seconds']:.0f} s: `{run['command']}`. Other processes on the machine "
           f"used {run['other_processes_cores']:.2f} of its cores on average during the run (1-minute load "
           f"average {run['load_average'][0]:.1f} before, {run['load_average'][1]:.1f} after); timing figures "
           "suffer from that, CPU per request much less.", "",
           "Each figure is the median over interleaved rounds of the round's figure; \"added\" is the gateway's "
           "minus the direct call's to the same mock in the same round. CPU is utime+stime of the gateway "
           "process per request served.", "", "## Targets", ""]
    out += table(["figure", "target", "measured", ""], (
        [g["title"], f"{'≤' if g['at_most'] and not g['strict'] else '<' if g['at_most'] else '≥'} "
                     f"{g['limit']:,g} {g['unit']}",
         f"{fmt(g['value'], 0 if g['unit'] in ('req/s', 'µs') else 2)} {g['unit']}",
         "PASS" if g["pass"] else "**FAIL**"] for g in results["targets"]))

    out += ["", "## Added latency, sequential keep-alive (ms)", ""]
    gateways = [name for name in ("gateway", "ledger_off", "auth") if name in results["targets_run"]]
    rows = []
    for case in results["latency"].values():
        for name in gateways:
            g = case[name]
            rows.append([case["title"], GATEWAY_TITLES[name], fmt(case["direct"]["p50_ms"], 3),
                         fmt(g["p50_ms"], 3), fmt(g["added_p50_ms"], 3), fmt(case["direct"]["p99_ms"], 3),
                         fmt(g["p99_ms"], 3), fmt(g["added_p99_ms"], 3), fmt(g["header_p50_ms"], 3),
                         fmt(g["unaccounted_p50_ms"], 3)])
    out += table(["case", "gateway", "direct p50", "via p50", "added p50", "direct p99", "via p99", "added p99",
                  "overhead header p50", "added − header"], rows)

    out += ["", "## Throughput and gateway CPU per request", "",
            "req/s at concurrency c (keep-alive connections); CPU columns are µs of CPU per request "
            f"for the gateway, the mock and the load generator. Streams carry {DELTAS} deltas: `stream` arrives "
            "from the mock in one burst, `paced` as a real provider sends it (50 ms, then a delta every 5 ms).", ""]
    rows = []
    for row in results["throughput"]:
        d, g = row["direct"], row["gateway"]
        rows.append([row["title"], row["body"], str(row["concurrency"]),
                     fmt(d["rps"], 0), fmt(g["rps"], 0), fmt(row["ratio"], 2), fmt(g["gateway_cpu_us"], 0),
                     fmt(g["mock_cpu_us"], 0), fmt(g["client_cpu_us"], 0)])
    out += table(["scenario", "body", "c", "direct req/s", "gateway req/s", "ratio", "gateway CPU µs/req",
                  "mock µs/req", "client µs/req"], rows)

    variants = [name for name in ("ledger_off", "auth") if name in results["targets_run"]]
    out += ["", "## Ledger and auth variants (top concurrency)", ""]
    rows = []
    for row in results["throughput"]:
        if not any(name in row for name in variants):
            continue
        cells = [row["title"], row["body"]]
        for name in ["gateway", *variants]:
            cells += [fmt(row[name]["rps"], 0), fmt(row[name]["gateway_cpu_us"], 0)]
        rows.append(cells)
    header = ["scenario", "body"]
    for name in ["gateway", *variants]:
        header += [f"{GATEWAY_TITLES[name]} req/s", f"{GATEWAY_TITLES[name]} CPU µs/req"]
    out += table(header, rows)
    ledger, auth = results["ledger"], results["auth"]
    out += ["", f"Ledger: {ledger['status']} ({ledger['rows']} rows for {ledger['requests_sent']} requests sent "
                "to the ledger-on gateway).",
            f"Auth: {auth['status']}" + ("" if auth["status"] == "enforced" else
                                         " — the auth variant is skipped (HOOK(auth) in bench/run.py).")]

    out += ["", "## Throughput with wrk (top concurrency, one wrk thread)", ""]
    if results["wrk"]:
        out += [f"The same loads from wrk, {WRK_SECONDS} s per target per round; latency is wrk's, per request.", ""]
        out += table(["scenario", "body", "c", "direct req/s", "gateway req/s", "ratio", "gateway CPU µs/req",
                      "direct p50 / p99 ms", "gateway p50 / p99 ms"],
                     [[row["title"], row["body"], str(row["concurrency"]), fmt(row["direct"]["rps"], 0),
                       fmt(row["gateway"]["rps"], 0), fmt(row["ratio"], 2), fmt(row["gateway"]["gateway_cpu_us"], 0),
                       *(f"{fmt(row[name]['p50_ms'], 2)} / {fmt(row[name]['p99_ms'], 2)}"
                         for name in ("direct", "gateway"))] for row in results["wrk"]])
    else:
        out += ["wrk is not installed (Debian: `apt install wrk`), so this cross-check was skipped."]

    out += ["", "## Paced stream (50 ms to first delta, then one every 5 ms)", ""]
    rows = []
    for case in results["paced"].values():
        d, g = case["direct"], case["gateway"]
        rows.append([case["title"], fmt(d["first_delta_ms"], 2), fmt(g["first_delta_ms"], 2),
                     fmt(case["ttfb_added_ms"], 3), fmt(case["relay_ttfb_added_ms"], 3), fmt(d["delay_p50_ms"], 3),
                     fmt(g["delay_p50_ms"], 3), fmt(d["delay_p99_ms"], 3), fmt(g["delay_p99_ms"], 3),
                     fmt(case["delay_added_p99_ms"], 3), fmt(case["relay_delay_added_p99_ms"], 3)])
    out += table(["scenario", "direct first delta ms", "via first delta ms", "added", "bare relay added",
                  "direct delay p50", "via delay p50", "direct delay p99", "via delay p99", "added p99",
                  "bare relay added p99"], rows)
    wake = results["machine"]["idle_wake"]
    out += ["", "*Bare relay*: the same streams through bench/relay.py, which copies bytes both ways and parses "
                "nothing: what one more Python process on the path costs here, before any HTTP work.", "",
            f"Code that runs right after 50 ms asleep is slower on this machine: `json.loads` of a stream "
            f"chunk took {fmt(wake['warm_us'], 1)} µs warm and {fmt(wake['after_50ms_idle_us'], 1)} µs at once "
            "after a 50 ms sleep. The gateway's work between a provider's first bytes and the client's "
            "first delta runs at the second rate."]

    mem, start, installed = results["memory"], results["startup"], results["startup_installed"]
    out += ["", "## Memory and start-up", ""]
    out += table(["figure", "value"], [
        ["idle RSS (after start-up and one request)", f"{fmt(mem['idle_rss_mib'], 1)} MiB"],
        ["idle RSS, installed command (module from bytecode)", f"{fmt(installed['idle_rss_mib'], 1)} MiB"],
        ["RSS after load", f"{fmt(mem['rss_after_mib'], 1)} MiB"],
        ["peak RSS (VmHWM) over the run", f"{fmt(mem['peak_mib'], 1)} MiB"],
        ["peak RSS, ledger off", f"{fmt(mem['ledger_off_peak_mib'], 1)} MiB"],
        *[[f"start-up to first answer{label}, median (min–max)",
           f"{fmt(case['median_ms'], 0)} ms ({fmt(case['min_ms'], 0)}–{fmt(case['max_ms'], 0)})"]
          for label, case in (("", start), (", installed command", installed))],
        *[[f"{name}: start-up to first output / RSS", f"{fmt(floor['startup_ms'], 0)} ms / "
           f"{fmt(floor['rss_mib'], 1)} MiB"] for name, floor in results["python_floors"].items()]])
    return "\n".join(out) + "\n"


GATEWAY_TITLES = {"gateway": "ledger on", "ledger_off": "ledger off", "auth": "auth on"}


# ---- the run -----------------------------------------------------------------------------------------

async def run(sizes: Sizes, mode: str, command: str, source: Path) -> dict[str, Any]:
    began = time.perf_counter()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    busy, own, load_before = machine_busy_seconds(), own_cpu_seconds(), os.getloadavg()[0]
    wake = idle_wake_cost()
    with tempfile.TemporaryDirectory(prefix="tokligence-bench-") as tmp:
        workdir = Path(tmp)
        async with AsyncExitStack() as stack:
            mock_port = free_port()
            mock = Process("mock", [sys.executable, str(MOCK), "--port", str(mock_port)], dict(os.environ),
                           workdir / "mock.log")
            stack.callback(mock.stop)
            direct = Target("direct", mock_port, None)
            await wait_answering(direct, CHAT.request(UNPACED, False))
            bench = Bench(workdir, mock_port, source)

            progress("start-up")
            startup = await measure_startup(bench, sizes)
            startup_installed = await measure_startup(bench, sizes, installed=True)
            python_floors = await measure_python_floors(sizes)
            ledger_path = workdir / "ledger.db"
            gateway, _ = await bench.start_gateway("gateway", {"TOKLIGENCE_LEDGER_PATH": str(ledger_path)})
            ledger_off, _ = await bench.start_gateway("ledger_off", {"TOKLIGENCE_LEDGER_PATH": "off"})
            auth, auth_facts = await probe_auth(bench)
            gateways = [gateway, ledger_off, *([auth] if auth else [])]
            for target in gateways:
                assert target.process is not None
                stack.callback(target.process.stop)
            await asyncio.sleep(0.2)
            assert gateway.process is not None and ledger_off.process is not None
            idle = gateway.process.memory_mib()["rss_mib"]

            progress("warm-up")
            await warm_up([direct, *gateways])
            progress("added latency")
            latency = await measure_latency(direct, gateways, sizes)
            progress("paced streams")
            relay_port = free_port()
            relay_process = Process("relay", [sys.executable, str(RELAY), "--port", str(relay_port),
                                              "--upstream-port", str(mock_port)], dict(os.environ),
                                    workdir / "relay.log")
            stack.callback(relay_process.stop)
            relay = Target("relay", relay_port, relay_process)
            await wait_answering(relay, CHAT.request(UNPACED, False))
            paced = await measure_paced(direct, gateway, relay, sizes)
            progress("throughput matrix")
            throughput = await measure_throughput(direct, gateway, gateways[1:], mock, sizes)
            progress("wrk" if WRK else "wrk: not installed, skipped")
            wrk = await measure_wrk(direct, gateway, workdir, sizes)
            memory = {"idle_rss_mib": idle, "rss_after_mib": gateway.process.memory_mib()["rss_mib"],
                      "peak_mib": gateway.process.memory_mib()["peak_mib"],
                      "ledger_off_peak_mib": ledger_off.process.memory_mib()["peak_mib"]}
            gateway.process.stop()        # lets the ledger writer flush before its rows are counted
        rows = ledger_rows(ledger_path)
        facts = machine(source, bench.gateway)
    seconds = time.perf_counter() - began
    foreign = ((machine_busy_seconds() - busy) - (own_cpu_seconds() - own)) / seconds
    results: dict[str, Any] = {
        "machine": {**facts, "idle_wake": wake},
        "run": {"mode": mode, "command": command, "started": started_at, "seconds": seconds,
                "sizes": asdict(sizes), "other_processes_cores": max(foreign, 0.0),
                "load_average": [load_before, os.getloadavg()[0]]},
        "targets_run": [target.name for target in gateways],
        "latency": latency, "paced": paced, "throughput": throughput, "memory": memory, "startup": startup,
        "startup_installed": startup_installed, "python_floors": python_floors, "wrk": wrk,
        "ledger": {"rows": rows if rows is not None else 0, "requests_sent": gateway.answered,
                   "status": ("recorded" if rows else "NOT recorded by this build (no rows in the ledger file)")},
        "auth": auth_facts,
    }
    top = max(sizes.concurrency)
    results["targets"] = [{**asdict(goal), "value": lookup(results, goal.path), "path": list(map(str, goal.path))}
                          for goal in goals(top)]
    for goal, entry in zip(goals(top), results["targets"]):
        entry["pass"] = goal.check(entry["value"])
    return results


def progress(step: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {step}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the Tokligence gateway against direct calls.")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (about a minute)")
    parser.add_argument("--gateway", type=Path, default=DEFAULT_GATEWAY,
                        help="the gateway file to measure (default: the repository's tokligence.py)")
    args = parser.parse_args()
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    results = asyncio.run(run(sizes, mode, command, args.gateway.resolve()))
    RESULTS.mkdir(exist_ok=True)
    text = markdown(results)
    (RESULTS / "latest.md").write_text(text)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    print(text)
    print(f"wrote {RESULTS / 'latest.md'} and latest.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
