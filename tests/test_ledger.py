"""The token ledger: one row per inference request, for every client and provider wire, streamed or
not, with the provider's token counts, cost from [prices], the caller's user and key, and nothing lost
under load or across a SIGTERM. (Schema migrations are in test_storage.py.)"""
import http.client
import json
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import provider_section
from team_edition import ADMIN_KEY, TEAM_ENV, call, clean_env, ledger_rows, start_process

WIRES = ("chat", "messages", "responses")
CLIENT_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
USAGE = {"input": 10, "output": 5, "cached": 3}
PRICES = "[prices]\npriced-* = 2, 10, 0.5\n"
PRICED_COST = (10 * 2 + 5 * 10 + 3 * 0.5) / 1_000_000


def request_body(wire: str, model: str, stream: bool) -> dict:
    if wire == "chat":
        return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]}
    if wire == "messages":
        return {"model": model, "stream": stream, "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    return {"model": model, "stream": stream, "input": "hello"}


def gateway_for(gateway_factory, mock, provider_wire: str, env: dict | None = None):
    return gateway_factory(provider_section("p", mock, wire=provider_wire) + "[routes]\n* = p\n" + PRICES, env)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider_wire", WIRES)
@pytest.mark.parametrize("client_wire", WIRES)
def test_a_row_for_every_wire_pair_with_the_providers_token_counts(gateway_factory, mock, client_wire,
                                                                     provider_wire, stream):
    gw = gateway_for(gateway_factory, mock, provider_wire)
    mock.enqueue({"text": "hi there", "usage": USAGE})
    reply = call(gw, "POST", CLIENT_PATHS[client_wire], request_body(client_wire, "priced-model", stream))
    assert reply.status == 200, reply.body
    [row] = ledger_rows(gw, 1)
    assert row["id"] == reply.headers["x-request-id"]
    assert (row["endpoint"], row["client_wire"], row["provider"], row["provider_wire"]) == (
        CLIENT_PATHS[client_wire], client_wire, "p", provider_wire)
    assert (row["model_requested"], row["model_served"], row["stream"], row["status"], row["error_type"]) == (
        "priced-model", "priced-model", int(stream), 200, None)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (10, 5, 3)
    assert row["cost_usd"] == pytest.approx(PRICED_COST)
    assert (row["user_id"], row["key_id"]) == (None, None)
    assert 0 < row["ttfb_ms"] <= row["latency_ms"] and 0 <= row["overhead_ms"] <= row["latency_ms"]


def test_embeddings_get_a_row_too(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat")
    mock.enqueue({"usage": {"input": 7}})
    assert call(gw, "POST", "/v1/embeddings", {"model": "priced-emb", "input": ["a", "b"]}).status == 200
    [row] = ledger_rows(gw, 1)
    assert (row["endpoint"], row["provider"], row["input_tokens"], row["output_tokens"]) == ("/v1/embeddings", "p", 7, 0)
    assert row["cost_usd"] == pytest.approx(7 * 2 / 1_000_000)


def test_cache_writes_and_reasoning_are_counted_where_the_wire_carries_them(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "messages")
    mock.enqueue({"text": "ok", "usage": {"input": 4, "output": 2, "cached": 8, "cache_creation": 16}})
    call(gw, "POST", "/v1/messages", request_body("messages", "priced-m", False))
    gw_chat = gateway_for(gateway_factory, mock, "chat")
    mock.enqueue({"text": "ok", "reasoning": "hmm", "usage": {"input": 4, "output": 9, "reasoning": 6}})
    call(gw_chat, "POST", "/v1/chat/completions", request_body("chat", "priced-c", False))
    [messages_row], [chat_row] = ledger_rows(gw, 1), ledger_rows(gw_chat, 1)
    assert (messages_row["cache_read_tokens"], messages_row["cache_write_tokens"]) == (8, 16)
    assert messages_row["cost_usd"] == pytest.approx((4 * 2 + 2 * 10 + 8 * 0.5 + 16 * 2) / 1_000_000)
    assert (chat_row["output_tokens"], chat_row["reasoning_tokens"]) == (9, 6)


def test_an_unpriced_model_costs_null_not_zero(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat")
    mock.enqueue({"usage": USAGE})
    call(gw, "POST", "/v1/chat/completions", request_body("chat", "free-model", False))
    [row] = ledger_rows(gw, 1)
    assert row["input_tokens"] == 10 and row["cost_usd"] is None
    summary = call(gw, "GET", "/api/v1/usage/summary").json()["totals"]
    assert (summary["cost_usd"], summary["unpriced_requests"]) == (None, 1)


def test_errors_get_rows_with_their_status_and_kind(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat")
    mock.enqueue({"status": 429}, {"status": 500})
    for _ in range(2):
        call(gw, "POST", "/v1/chat/completions", request_body("chat", "m", False))
    call(gw, "POST", "/v1/messages", {"model": "m"})
    rows = ledger_rows(gw, 3)
    assert [(r["status"], r["error_type"]) for r in rows] == [(429, "rate_limit"), (500, "api_error"),
                                                             (400, "invalid_request")]
    assert all(r["input_tokens"] == 0 and r["cost_usd"] in (None, 0) for r in rows)


@pytest.mark.parametrize("client_wire", WIRES)
def test_a_stream_the_client_leaves_records_what_was_used_with_status_499(gateway_factory, mock, client_wire):
    gw = gateway_for(gateway_factory, mock, "messages")      # whose stream starts with the input count
    mock.enqueue({"fault": "slow_stream", "interval": 0.05, "deltas": 100, "usage": USAGE})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("POST", CLIENT_PATHS[client_wire], json.dumps(request_body(client_wire, "priced-x", True)),
                 {"content-type": "application/json"})
    response = conn.getresponse()
    response.read(200)
    conn.sock.shutdown(socket.SHUT_RDWR)     # the client leaves mid-stream
    conn.close()
    [row] = ledger_rows(gw, 1)
    assert (row["status"], row["stream"]) == (499, 1)
    assert (row["input_tokens"], row["cache_read_tokens"]) == (10, 3), "the counts at the stream's start are kept"
    assert row["cost_usd"] == pytest.approx((10 * 2 + 3 * 0.5 + row["output_tokens"] * 10) / 1_000_000)


def test_auth_on_rows_carry_the_user_and_key(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat", TEAM_ENV)
    user = call(gw, "POST", "/api/v1/admin/users", {"email": "u@example.com"}, key=ADMIN_KEY).json()
    key = call(gw, "POST", "/api/v1/admin/keys", {"user_id": user["id"]}, key=ADMIN_KEY).json()
    for path, wire in (("/v1/chat/completions", "chat"), ("/v1/messages", "messages"),
                       ("/v1/responses", "responses")):
        assert call(gw, "POST", path, request_body(wire, "m", False), key=key["key"]).status == 200
    assert call(gw, "POST", "/v1/embeddings", {"model": "m", "input": "x"}, key=key["key"]).status == 200
    rows = ledger_rows(gw, 4)
    assert [(r["user_id"], r["key_id"]) for r in rows] == [(user["id"], key["id"])] * 4
    listed = call(gw, "GET", f"/api/v1/admin/keys?user_id={user['id']}", key=ADMIN_KEY).json()["data"]
    assert listed[0]["last_used_at"] == pytest.approx(rows[-1]["ts"])


def test_no_row_is_lost_under_200_concurrent_requests(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat")
    bodies = [request_body(WIRES[i % 3], f"m-{i}", stream=i % 2 == 0) for i in range(200)]
    with ThreadPoolExecutor(max_workers=200) as pool:
        replies = list(pool.map(lambda i: call(gw, "POST", CLIENT_PATHS[WIRES[i % 3]], bodies[i]), range(200)))
    assert [reply.status for reply in replies] == [200] * 200
    rows = ledger_rows(gw, 200)
    assert len(rows) == 200
    assert {row["id"] for row in rows} == {reply.headers["x-request-id"] for reply in replies}
    assert {row["model_requested"] for row in rows} == {f"m-{i}" for i in range(200)}


def test_sigterm_writes_a_row_for_every_request_served(tmp_path, mock):
    ledger = tmp_path / "ledger.db"
    config = tmp_path / "settings.ini"
    config.write_text(provider_section("p", mock) + f"[routes]\n* = p\n[gateway]\nledger_path = {ledger}\n")
    process, port = start_process(config, clean_env(tmp_path))
    try:
        for i in range(30):
            assert call(port, "POST", "/v1/chat/completions", request_body("chat", f"quick-{i}", False)).status == 200
        streams: list[str] = []
        started = threading.Barrier(6)

        def stream(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps(request_body("chat", f"slow-{i}", True)),
                         {"content-type": "application/json"})
            response = conn.getresponse()
            response.readline()
            started.wait()
            streams.append(response.read().decode())

        mock.enqueue(*[{"fault": "slow_stream", "interval": 0.02, "deltas": 40}] * 5)
        readers = [threading.Thread(target=stream, args=(i,)) for i in range(5)]
        for reader in readers:
            reader.start()
        started.wait(10)
        process.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(10)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert len(streams) == 5 and all("data: [DONE]" in text for text in streams)
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT model_requested, status FROM requests").fetchall()
    assert len(rows) == 35
    assert sorted(model for model, _ in rows) == sorted([f"quick-{i}" for i in range(30)] +
                                                        [f"slow-{i}" for i in range(5)])
    assert {status for _, status in rows} == {200}


def test_with_the_ledger_off_nothing_is_recorded_and_requests_still_work(gateway_factory):
    gw = gateway_factory("", {"TOKLIGENCE_LEDGER_PATH": "off"})
    started = time.time()
    assert call(gw, "POST", "/v1/chat/completions", request_body("chat", "m", False)).status == 200
    assert gw.gateway.database is None and time.time() - started < 5
