#!/usr/bin/env python3
"""Profile the gateway under one benchmark load and print where its CPU goes.

    python bench/profile_gateway.py --scenario chat_json           # py-spy (pip install py-spy)
    python bench/profile_gateway.py --scenario messages_to_chat_stream --tool cprofile

py-spy samples the running gateway from outside (little distortion); cProfile runs it under
`python -m cProfile` (exact call counts, but every Python call costs more, so small functions look
heavier). Both report each function's share and that share of the gateway's measured CPU per
request, in µs, so the figures compare with bench/run.py's. The raw profile is kept under
bench/results/ (profile-<scenario>.txt for py-spy's collapsed stacks, .prof for cProfile).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from run import (CHAT, DEFAULT_GATEWAY, MESSAGES, MESSAGES_TO_CHAT, MOCK, RESPONSES_TO_CHAT, RESULTS, UNPACED,
                 Bench, Process, Scenario, Target, free_port, load, wait_answering)

SCENARIOS: dict[str, tuple[Scenario, bool]] = {
    f"{scenario.key}_{'stream' if stream else 'json'}": (scenario, stream)
    for scenario in (CHAT, MESSAGES, MESSAGES_TO_CHAT, RESPONSES_TO_CHAT) for stream in (False, True)}


def area(frame: str) -> str:
    """The package or module a frame belongs to, e.g. 'h11' for 'Request.__init__ (h11/_events.py)'."""
    where = frame.partition(" (")[2].rstrip(")")
    return where.split("/", 1)[0] if "/" in where else where or frame


def top_pyspy(collapsed: Path, cpu_us: float, count: int) -> str:
    """Self and inclusive sample shares per function, and self shares per area, from py-spy's collapsed
    stacks (collected with --nolineno)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        weight = int(samples)
        total += weight
        own[frames[-1]] += weight
        areas[area(frames[-1])] += weight
        for frame in set(frames):
            inclusive[frame] += weight

    def listing(title: str, counter: Counter[str], limit: int) -> list[str]:
        return ["", title, f"{'share':>7} {'µs/req':>7}"] + [
            f"{n / total:7.1%} {n / total * cpu_us:7.1f}  {name}" for name, n in counter.most_common(limit)]

    return "\n".join([f"{total} samples; gateway CPU {cpu_us:.0f} µs/request"]
                     + listing("self time by area (package or file of the running code):", areas, 15)
                     + listing("self time (the function's own code):", own, count)
                     + listing("inclusive time (with what it calls):", inclusive, count))


def top_cprofile(prof: Path, requests: int, count: int) -> str:
    buffer = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buffer)
    total = stats.total_tt    # type: ignore[attr-defined]
    buffer.write(f"main thread, profiled: {total / requests * 1e6:.0f} µs/request over {requests} requests "
                 "(inflated by cProfile, start-up included; a coroutine counts one call per resumption)\n")
    stats.sort_stats("tottime").print_stats(count)
    stats.sort_stats("cumulative").print_stats(count)
    return buffer.getvalue()


async def profile(source: Path, key: str, tool: str, seconds: float, concurrency: int, count: int) -> str:
    scenario, stream = SCENARIOS[key]
    raw = scenario.request(UNPACED, stream)
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokligence-profile-") as tmp:
        workdir = Path(tmp)
        mock_port = free_port()
        mock = Process("mock", [sys.executable, str(MOCK), "--port", str(mock_port)], dict(os.environ),
                       workdir / "mock.log")
        gateway: Process | None = None
        try:
            await wait_answering(Target("direct", mock_port, None), CHAT.request(UNPACED, False))
            bench = Bench(workdir, mock_port, source)
            port = free_port()
            argv = [sys.executable, str(bench.gateway), "--config", str(bench.gateway_config()), "--port", str(port)]
            prof = RESULTS / f"profile-{key}.prof"
            if tool == "cprofile":
                argv[1:1] = ["-m", "cProfile", "-o", str(prof)]
            env = bench.gateway_env({"TOKLIGENCE_LEDGER_PATH": str(workdir / "ledger.db")})
            gateway = Process("gateway", argv, env, workdir / "gateway.log")
            target = Target("gateway", port, gateway)
            await wait_answering(target, raw)
            await load(target, raw, concurrency, 1.0, mock)               # warm-up, discarded
            if tool == "cprofile":
                await load(target, raw, concurrency, seconds, mock)
                gateway.stop()                                            # SIGTERM: cProfile writes its file
                return top_cprofile(prof, target.answered, count)        # the process's whole life
            collapsed = RESULTS / f"profile-{key}.txt"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(gateway.pid), "--rate", "250", "--nolineno",
                                    "--duration", str(int(seconds)), "--format", "raw", "--output", str(collapsed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await asyncio.sleep(0.5)                                       # py-spy attaches
            sample = await load(target, raw, concurrency, seconds - 1.0, mock)
            _, errors = await asyncio.to_thread(spy.communicate, timeout=seconds + 30)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
            return top_pyspy(collapsed, sample["gateway_cpu_us"], count)
        finally:
            if gateway is not None:
                gateway.stop()
            mock.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="Profile the gateway under one benchmark load.")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="chat_json")
    parser.add_argument("--tool", choices=("py-spy", "cprofile"), default="py-spy")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--gateway", type=Path, default=DEFAULT_GATEWAY, help="the gateway file to profile")
    args = parser.parse_args()
    if args.tool == "py-spy" and shutil.which("py-spy") is None:
        parser.error("py-spy is not installed: pip install py-spy, or use --tool cprofile")
    print(asyncio.run(profile(args.gateway.resolve(), args.scenario, args.tool, args.seconds, args.concurrency,
                              args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
