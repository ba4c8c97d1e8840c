"""Helpers for the team-edition tests (auth, admin and usage APIs, ledger, CLI)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "tok_admin-key-for-the-tests-0123456789"
TEAM_ENV = {"TOKLIGENCE_AUTH_DISABLED": "false", "TOKLIGENCE_ADMIN_KEY": ADMIN_KEY}


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(base: Any, method: str, path: str, body: Any = None, key: str | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One HTTP request to a gateway (a RunningGateway or a port); key goes in Authorization: Bearer."""
    port = base if isinstance(base, int) else base.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    try:
        conn.request(method, path, None if body is None else json.dumps(body), sent)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def on_loop(gw: Any, coroutine: Any) -> Any:
    """Awaits coroutine on the gateway's event loop (e.g. gw.gateway.ledger.write_now(...))."""
    return asyncio.run_coroutine_threadsafe(coroutine, gw._loop).result(10)


def ledger_rows(gw: Any, count: int, timeout: float = 5.0) -> list[dict]:
    """The ledger's rows once there are count of them (a row lands just after its response)."""
    deadline = time.time() + timeout
    while True:
        rows = on_loop(gw, gw.gateway.ledger.write_now(
            lambda db: [dict(row) for row in db.execute("SELECT * FROM requests ORDER BY ts, rowid")]))
        if len(rows) >= count or time.time() > deadline:
            return rows
        time.sleep(0.02)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without the developer's tokligence or provider settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKLIGENCE_", "OPENAI_", "ANTHROPIC_"))}
    return {**env, "HOME": str(tmp_path), **extra}


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python tokligence.py --config CONFIG ARGS…, its output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "tokligence.py"), "--config", str(config), *args],
                          env=env or clean_env(config.parent), capture_output=True, text=True, timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(config: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, int]:
    """The gateway as a process of its own (args before --port, e.g. "serve"), serving config;
    returns once it accepts connections."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "tokligence.py"), "--config", str(config), *args,
                                "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("gateway did not start: " + process.communicate()[0])
