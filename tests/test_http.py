"""The HTTP server: keep-alive, pipelining, 100-continue, limits, timeouts, errors and shutdown."""
import asyncio
import email.utils
import http.client
import json
import re
import socket
import time

import anthropic
import openai
import pytest

import tokligence as tk
from conftest import provider_section
from team_edition import ledger_rows


def raw_exchange(port: int, data: bytes, read_until_close: bool = True, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def chat_body(text: str = "hi", **extra) -> bytes:
    return json.dumps({"model": "any-model", "messages": [{"role": "user", "content": text}], **extra}).encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_keep_alive_serves_many_requests_on_one_connection(gateway_factory):
    gw = gateway_factory()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    for i in range(5):
        conn.request("POST", "/v1/chat/completions", chat_body(f"n{i}"), {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["choices"][0]["message"]["content"] == f"echo: n{i}"
    assert conn.sock is not None          # still the same open socket
    conn.close()


def test_pipelined_requests_are_answered_in_order(gateway_factory):
    gw = gateway_factory()
    data = b"".join(post("/v1/chat/completions", chat_body(f"p{i}")) for i in range(3))
    data += b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(gw.port, data)
    assert reply.count(b"HTTP/1.1 200") == 4
    positions = [reply.index(f"echo: p{i}".encode()) for i in range(3)]
    assert positions == sorted(positions)
    assert reply.rindex(b'"status": "ok"') > positions[-1]


def test_a_body_split_across_packets_then_a_pipelined_request_are_both_answered(gateway_factory):
    gw = gateway_factory()
    first = post("/v1/chat/completions", chat_body("split body"))
    second = post("/v1/chat/completions", chat_body("right after"), "Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        for piece in (first[:40], first[40:-7], first[-7:] + second[:30], second[30:]):
            sock.sendall(piece)
            time.sleep(0.05)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.count(b"HTTP/1.1 200") == 2
    assert reply.index(b"echo: split body") < reply.index(b"echo: right after")


def test_a_chunked_request_body_is_read_and_the_connection_serves_the_next_request(gateway_factory):
    gw = gateway_factory()
    body = chat_body("chunked upload")
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
            + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    reply = raw_exchange(gw.port, data)
    assert reply.count(b"HTTP/1.1 200") == 2 and b"echo: chunked upload" in reply


def test_a_slow_body_times_out_with_408_and_a_client_leaving_mid_body_is_forgotten(gateway_factory):
    gw = gateway_factory("[gateway]\nread_timeout = 0.3\n")
    partial = post("/v1/chat/completions", chat_body("never finished"))[:-5]
    started = time.monotonic()
    assert raw_exchange(gw.port, partial).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(partial)
    assert b"200 OK" in raw_exchange(gw.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")


def test_expect_100_continue_gets_an_interim_response(gateway_factory):
    gw = gateway_factory()
    body = chat_body("continued")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b"echo: continued" in reply


def test_body_over_the_limit_gets_413_in_openai_shape_before_it_is_sent(gateway_factory):
    gw = gateway_factory("[gateway]\nmax_body_bytes = 1000\n")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n")
    reply = raw_exchange(gw.port, head)
    assert reply.startswith(b"HTTP/1.1 413")
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert "exceeds the limit of 1000 bytes" in error["message"]


def test_body_over_the_limit_on_the_messages_route_gets_413_in_anthropic_shape(gateway_factory):
    gw = gateway_factory("[gateway]\nmax_body_bytes = 1000\n")
    for _ in range(2):      # also on a kept-alive connection that served a chat request first
        reply = raw_exchange(gw.port, post("/v1/chat/completions", chat_body("first"))
                             + b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n")
        last = reply.rsplit(b"HTTP/1.1 ", 1)[1]
        assert last.startswith(b"413")
        error = json.loads(last.split(b"\r\n\r\n", 1)[1])
        assert error["type"] == "error" and error["error"]["type"] == "request_too_large"


def test_chunked_body_over_the_limit_gets_413(gateway_factory):
    gw = gateway_factory("[gateway]\nmax_body_bytes = 1000\n")
    chunk = b"x" * 600
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"258\r\n" + chunk + b"\r\n" + b"258\r\n" + chunk + b"\r\n0\r\n\r\n")
    assert raw_exchange(gw.port, data).startswith(b"HTTP/1.1 413")


def test_malformed_http_gets_400_and_the_server_keeps_serving(gateway_factory):
    gw = gateway_factory()
    assert raw_exchange(gw.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert b"200 OK" in raw_exchange(gw.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")


def test_slow_headers_time_out_with_408(gateway_factory):
    gw = gateway_factory("[gateway]\nheader_timeout = 0.3\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 3


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(gateway_factory):
    gw = gateway_factory("[gateway]\nidle_timeout = 0.3\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.1)
        assert b"200 OK" in sock.recv(65536)
        assert sock.recv(65536) == b""      # closed by the server, quietly


def test_unknown_path_is_404_and_wrong_method_405_in_openai_shape(gateway_factory):
    gw = gateway_factory()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/v1/nothing-here")
    response = conn.getresponse()
    assert response.status == 404
    error = json.loads(response.read())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    conn.request("GET", "/v1/chat/completions")
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("allow") == "POST"
    assert json.loads(response.read())["error"]["message"].startswith("GET is not allowed")


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "body is empty"),
    (json.dumps({"messages": []}).encode(), "'model' is required"),
    (json.dumps({"model": 42, "messages": []}).encode(), "'model' is required"),
    (json.dumps({"model": "m", "messages": [], "stream": "yes"}).encode(), "'stream' must be a boolean"),
])
def test_bad_request_bodies_get_400_in_openai_shape(gateway_factory, body, fragment):
    gw = gateway_factory()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400
    error = json.loads(response.read())["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("data", [b'{"a":[1,2.5,"\\u00e9",null]}', '{"a": "\u00e9"}', b'{"a": 1}\n', b' {"a": 1}',
                                  b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"), b'{"a": 1} x', b'{"a": ',
                                  b'{"a": "\xff"}', b"", "[1, 2]"])
def test_the_fast_json_reader_gives_what_json_loads_gives(data):
    try:
        expected = json.loads(data)
    except ValueError as error:
        with pytest.raises(type(error)) as raised:
            tk.json_loads(data)
        assert str(raised.value) == str(error)
    else:
        assert tk.json_loads(data) == expected


def test_a_fault_in_the_gateway_is_a_500_in_the_clients_wire_and_is_recorded(gateway_factory, monkeypatch):
    gw = gateway_factory()

    async def fault(*args):
        raise RuntimeError("a bug in the gateway")

    monkeypatch.setattr(gw.gateway, "answer_locally", fault)
    messages = anthropic.Anthropic(base_url=gw.url, api_key="sk-client", max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as raised:
        messages.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "api_error"
    chat = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="the gateway failed on this request"):
        chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    monkeypatch.undo()
    assert chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
    rows = ledger_rows(gw, 3)
    assert [(row["endpoint"], row["status"], row["error_type"]) for row in rows] == [
        ("/v1/messages", 500, "api_error"), ("/v1/chat/completions", 500, "api_error"),
        ("/v1/chat/completions", 200, None)]


def test_health_reports_version_uptime_and_providers(gateway_factory):
    gw = gateway_factory()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["version"] == tk.__version__
    assert [p["name"] for p in health["providers"]] == ["loopback"]


def test_head_root_answers_for_preconnects(gateway_factory):
    gw = gateway_factory()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("HEAD", "/")
    assert conn.getresponse().status == 200


def test_a_head_request_gets_the_head_a_get_would_get_and_the_connection_serves_the_next(gateway_factory):
    gw = gateway_factory()
    get = raw_exchange(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    reply = raw_exchange(gw.port, b"HEAD /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    models, not_allowed, rest = reply.split(b"\r\n\r\n", 2)
    length = re.search(rb"content-length: (\d+)", get).group(1)
    assert models.startswith(b"HTTP/1.1 200") and b"\r\ncontent-length: " + length in models
    assert not_allowed.startswith(b"HTTP/1.1 405") and b"\r\nallow: POST" in not_allowed
    assert rest.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in rest


def dates_of(port: int, method: str, path: str, body: bytes | None = None) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body, {"content-type": "application/json"} if body else {})
    response = conn.getresponse()
    response.read()
    return response.headers.get_all("date") or []


def test_every_response_is_dated_now_and_a_relayed_reply_keeps_the_providers_date(gateway_factory, mock):
    gw = gateway_factory(provider_section("dated", mock) + "[routes]\n* = dated\n")
    messages = json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    gateway_made = [dates_of(gw.port, "GET", "/health"), dates_of(gw.port, "HEAD", "/v1/models"),
                    dates_of(gw.port, "GET", "/nowhere"),                                       # a 404
                    dates_of(gw.port, "POST", "/v1/messages", messages.encode())]               # translated
    for dates in gateway_made:
        assert len(dates) == 1
        assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                            r"\d{4} \d\d:\d\d:\d\d GMT", dates[0])
        assert abs(email.utils.parsedate_to_datetime(dates[0]).timestamp() - time.time()) < 5
    provider_date = "Tue, 03 Jun 2025 08:00:00 GMT"
    mock.enqueue({"text": "relayed", "headers": {"date": provider_date}},
                 {"text": "relayed", "headers": {"date": provider_date}})
    assert dates_of(gw.port, "POST", "/v1/chat/completions", chat_body()) == [provider_date]
    assert dates_of(gw.port, "POST", "/v1/chat/completions", chat_body(stream=True)) == [provider_date]


def test_the_date_is_the_clock_in_imf_fixdate_form_with_english_names(monkeypatch):
    date = tk.HTTPDate()
    monkeypatch.setattr(tk.time, "time", lambda: 784111777.9)    # RFC 9110's own example
    assert date.now() == b"Sun, 06 Nov 1994 08:49:37 GMT"
    monkeypatch.setattr(tk.time, "time", lambda: 1772323200.0)
    assert date.now() == b"Sun, 01 Mar 2026 00:00:00 GMT"


def stream_reply(port: int, version: str) -> tuple[dict[str, str], bytes]:
    """A streamed chat reply to a request made in HTTP/version, read until the server closes."""
    body = chat_body("streamed", stream=True)
    reply = raw_exchange(port, (f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1\r\n"
                                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    head, _, payload = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    assert status == "HTTP/1.1 200 OK"
    return dict(line.lower().split(": ", 1) for line in lines), payload


def test_a_stream_is_chunked_for_http11_and_ended_by_the_close_for_http10(gateway_factory, mock):
    gw = gateway_factory(provider_section("streaming", mock) + "[routes]\n* = streaming\n")
    headers, chunked = stream_reply(gw.port, "1.1")
    assert headers["transfer-encoding"] == "chunked" and headers["connection"] == "close"
    assert chunked.endswith(b"\r\n0\r\n\r\n")
    headers, plain = stream_reply(gw.port, "1.0")
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    assert plain.startswith(b"data: {") and plain.endswith(b"data: [DONE]\n\n")
    assert plain.count(b"\n\n") == chunked.count(b"\n\n") > 3        # the same events, framed apart


@pytest.mark.parametrize("name, value, valid", [
    ("content-type", "application/json", True),
    ("x-ratelimit-reset", "", True),
    ("x-note", "a  b\tc", True),
    ("x-obs-text", "caf\xe9", True),                 # obs-text from a provider is relayed as sent
    ("x-injected", "a\r\nset-cookie: b", False),
    ("x-bare-lf", "a\nset-cookie:b", False),         # would pass a check that splits lines on LF
    ("x-padded", " a", False),
    ("bad name", "a", False),
    ("x-nul", "a\x00b", False),
    ("x-wide", "\u2603", False),
])
def test_a_response_head_is_checked_by_http_grammar_before_it_is_written(name, value, valid):
    request = tk.Request("GET", "/", "/", {"host": "x"}, [], b"", "127.0.0.1", 0.0)
    responder = tk.Responder(None, None, request)  # type: ignore[arg-type]
    if valid:
        assert tk.checked_headers([("content-type", "text/plain"), (name, value)])[1] == (
            name.encode("latin-1"), value.encode("latin-1"))
        responder.start(200, [(name, value)])
        assert b"\r\n" + name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n" in responder._head
    else:
        with pytest.raises(ValueError, match="not a valid HTTP header line"):
            responder.start(200, [("content-type", "text/plain"), (name, value)])


def test_read_deadlines_time_out_each_read_at_its_own_deadline_only():
    async def scenario():
        reader, loop = asyncio.StreamReader(), asyncio.get_running_loop()
        deadline = tk.ReadDeadline()
        loop.call_later(0.05, reader.feed_data, b"first")
        assert await deadline.read(reader, 5) == b"first"       # its timer stays pending, 5 s out
        began = loop.time()
        with pytest.raises(TimeoutError):
            await deadline.read(reader, 0.1)                     # a shorter deadline than the pending timer
        assert 0.09 < loop.time() - began < 1
        loop.call_later(0.15, reader.feed_data, b"second")
        assert await deadline.read(reader, 0.3) == b"second"     # its timer fires at 0.3 s, idle by then
        began = loop.time()
        with pytest.raises(TimeoutError):
            await deadline.read(reader, 0.5)                     # waits its full 0.5 s, not the old timer's
        assert 0.45 < loop.time() - began < 1.5
        deadline.close()

    asyncio.run(scenario())


def test_a_read_cancelled_from_outside_stays_cancelled():
    async def scenario():
        reader, deadline = asyncio.StreamReader(), tk.ReadDeadline()
        task = asyncio.ensure_future(deadline.read(reader, 5))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline.close()

    asyncio.run(scenario())
