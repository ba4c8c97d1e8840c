"""The gateway as a process: `python tokligence.py` serves, and SIGTERM drains in-flight streams."""
import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import provider_section
from team_edition import clean_env, start_process

def start_gateway(tmp_path: Path, settings: str, *args: str) -> tuple[subprocess.Popen, int]:
    path = tmp_path / "settings.ini"
    path.write_text(settings)
    return start_process(path, clean_env(tmp_path, TOKLIGENCE_LEDGER_PATH=":memory:"), *args)


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


def test_a_reply_finished_while_draining_tells_the_client_to_close_the_connection(tmp_path, mock):
    mock.enqueue({"fault": "slow_first_byte", "delay": 0.5})
    process, port = start_gateway(tmp_path, provider_section("local", mock) + "[routes]\n* = local\n")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None         # kept alive before the shutdown
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "x"}]}), {"content-type": "application/json"})
    time.sleep(0.2)                                                      # the provider is still thinking
    process.send_signal(signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["choices"]
    assert response.getheader("connection") == "close"
    assert process.wait(10) == 0


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
