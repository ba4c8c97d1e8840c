"""The gateway as a process: `python tokligence.py` serves, and SIGTERM drains in-flight streams."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import provider_section

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(tmp_path: Path, settings: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    path = tmp_path / "settings.ini"
    path.write_text(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKLIGENCE_", "OPENAI_", "ANTHROPIC_"))}
    env.update({"TOKLIGENCE_LEDGER_PATH": ":memory:", "HOME": str(tmp_path)})
    process = subprocess.Popen([sys.executable, str(ROOT / "tokligence.py"), "--config", str(path), *args,
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("gateway did not start: " + process.communicate()[0])


@pytest.mark.parametrize("command", [(), ("serve",)])
def test_plain_run_and_serve_both_answer(tmp_path, command):
    process, port = start_gateway(tmp_path, "", *command)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(tmp_path, mock):
    mock.enqueue({"fault": "slow_stream", "interval": 0.05, "deltas": 20})
    process, port = start_gateway(tmp_path, provider_section("local", mock) + "[routes]\n* = local\n")
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    result: dict = {}

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        result["first"] = response.readline()
        result["rest"] = response.read().decode()

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.time() + 5
    while "first" not in result and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    reader.join(10)
    assert "data: [DONE]" in result["rest"], "the in-flight stream was cut by the shutdown"
    assert process.wait(10) == 0
    output = process.stdout.read()
    assert "shutting down" in output and "Traceback" not in output


def test_sigterm_with_a_stream_longer_than_the_grace_period_still_exits(tmp_path, mock):
    mock.enqueue({"fault": "slow_stream", "interval": 0.2, "deltas": 100})
    process, port = start_gateway(tmp_path, provider_section("local", mock) +
                                  "[routes]\n* = local\n[gateway]\nshutdown_grace = 0.5\n")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}),
        {"content-type": "application/json"})
    response = conn.getresponse()
    response.readline()
    started = time.time()
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert time.time() - started < 5
