"""The upstream client as users feel it: connection reuse, decoding, timeouts, disconnects."""
import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import tokligence as tk
from conftest import provider_section


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0)


def ask(gw, text="hi", **kw):
    return client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture
def gw(gateway_factory, mock):
    return gateway_factory(provider_section("local", mock, extra="") + "[routes]\n* = local\n")


def test_one_upstream_connection_serves_many_requests(gw, mock):
    for i in range(6):
        assert ask(gw, f"q{i}").choices[0].message.content
        list(ask(gw, f"s{i}", stream=True))
    assert mock.connections_opened == 1


def test_compressed_upstream_reply_is_decoded(gw, mock):
    mock.enqueue({"text": "squeezed", "fault": "gzip"})
    assert ask(gw).choices[0].message.content == "squeezed"


def test_client_disconnect_mid_stream_closes_the_upstream_and_the_gateway_keeps_serving(gw, mock):
    mock.enqueue({"fault": "slow_stream", "interval": 0.05, "deltas": 200})
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "long"}]}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in sock.recv(65536)
        time.sleep(0.2)
    assert mock.wait_for_disconnect(timeout=5), "upstream connection was not closed after the client left"
    assert ask(gw, "after").choices[0].message.content


def test_slow_first_byte_beyond_the_read_timeout_is_a_502(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock) + "[routes]\n* = local\n[gateway]\nread_timeout = 0.3\n")
    mock.enqueue({"fault": "slow_first_byte", "delay": 2})
    with pytest.raises(openai.APIStatusError) as caught:
        ask(gw)
    assert caught.value.status_code == 502
    assert "did not answer within 0.3 s" in caught.value.body["message"]


def test_unreachable_provider_is_a_502_naming_it(gateway_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gw = gateway_factory(f"[provider.gone]\nbase_url = http://127.0.0.1:{port}/v1\n[routes]\n* = gone\n")
    with pytest.raises(openai.APIStatusError) as caught:
        ask(gw)
    assert caught.value.status_code == 502 and "provider gone" in caught.value.body["message"]


def test_cut_stream_ends_with_an_error_chunk(gw, mock):
    mock.enqueue({"text": "a b c d e", "deltas": 5, "fault": "cut_stream", "after": 2})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}), {"content-type": "application/json"})
    text = conn.getresponse().read().decode()
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert "mid-stream" in json.loads(last[6:])["error"]["message"]


def test_garbage_from_the_provider_is_relayed_as_is_in_passthrough(gw, mock):
    mock.enqueue({"fault": "garbage"})
    with pytest.raises(openai.APIError):
        ask(gw)
    assert ask(gw, "again").choices[0].message.content


def test_connections_of_a_wide_burst_are_all_kept_for_the_next_one(gw, mock):
    burst, shared = 48, client(gw)

    def concurrent_round() -> None:
        mock.enqueue(*[{"text": "ok", "fault": "slow_first_byte", "delay": 1.0}] * burst)
        with ThreadPoolExecutor(burst) as pool:
            replies = pool.map(lambda i: shared.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}]), range(burst))
            assert all(reply.choices[0].message.content == "ok" for reply in replies)

    concurrent_round()
    opened = mock.connections_opened
    assert opened > 32, "the burst was not wide enough to tell"
    assert idle_upstream_connections(gw, opened) == opened
    concurrent_round()
    assert mock.connections_opened == opened


def idle_upstream_connections(gw, expected: int) -> int:
    """How many connections the pool keeps, once the last relayed stream has let go of its own."""
    deadline = time.monotonic() + 2
    while (count := sum(map(len, gw.gateway.pool.idle.values()))) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return count


def test_a_chunked_stream_keeps_its_connection_unless_the_provider_says_close(gw, mock):
    list(ask(gw, "first", stream=True))
    assert idle_upstream_connections(gw, 1) == 1
    mock.enqueue({"text": "bye", "headers": {"connection": "close"}})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in ask(gw, "last", stream=True)
                   if chunk.choices) == "bye"
    assert idle_upstream_connections(gw, 0) == 0
    list(ask(gw, "again", stream=True))
    assert mock.connections_opened == 2


# ---- chunked bodies (sans-IO) ----------------------------------------------------------------------
CHUNKED = (b"5;name=value\r\nhello\r\n1d\r\n, and twenty-seven bytes more\r\n"
           b"0\r\nx-trailer: yes\r\n\r\n")


def read_chunked(*pieces: bytes) -> tuple[tk.ChunkedBody, bytes]:
    body = tk.ChunkedBody()
    return body, b"".join(b"".join(body.feed(piece)) for piece in pieces)


def test_a_chunked_body_reads_the_same_however_its_bytes_are_split():
    for cut in range(1, len(CHUNKED)):
        for second_cut in (cut + 1, cut + 7, len(CHUNKED)):
            body, payload = read_chunked(CHUNKED[:cut], CHUNKED[cut:second_cut], CHUNKED[second_cut:])
            assert (payload, body.done, body.extra) == (b"hello, and twenty-seven bytes more", True, b"")


def test_bytes_after_a_chunked_body_are_kept_apart_from_it():
    body, _ = read_chunked(CHUNKED + b"HTTP/1.1 200 OK\r\n")
    assert body.done and body.extra == b"HTTP/1.1 200 OK\r\n"


def test_an_incomplete_chunked_body_is_not_done():
    body, payload = read_chunked(CHUNKED[:-2])
    assert not body.done and payload == b"hello, and twenty-seven bytes more"


@pytest.mark.parametrize("pieces, problem", [
    ((b"zz\r\nhello\r\n",), "bad chunk size line"),
    ((b"5\r\nhelloXY0\r\n\r\n",), "does not end with CRLF"),
    ((b"1" * 5000,), "chunk line too long"),
    ((b"5\r\nhel", b""), "closed the connection mid-response"),
    ((b"11111111111111111\r\n",), "bad chunk size line"),
])
def test_broken_chunked_framing_is_an_upstream_error(pieces, problem):
    with pytest.raises(tk.UpstreamError, match=problem):
        read_chunked(*pieces)


# ---- bodies framed by length or by the end of the connection (sans-IO) ----------------------------
def read_length(length, *pieces: bytes) -> tuple[tk.LengthBody, bytes]:
    body = tk.LengthBody(length)
    return body, b"".join(b"".join(body.feed(piece)) for piece in pieces)


def test_a_content_length_body_reads_the_same_however_its_bytes_are_split_and_keeps_what_follows():
    data = b'{"id": "x"}HTTP/1.1 200 OK\r\n'
    for cut in range(1, 12):            # the read that completes the body carries the bytes after it
        body, payload = read_length(11, data[:cut], data[cut:])
        assert (payload, body.done, body.extra) == (b'{"id": "x"}', True, b"HTTP/1.1 200 OK\r\n")


def test_a_content_length_body_cut_short_is_an_upstream_error():
    body, payload = read_length(11, b'{"id"')
    assert not body.done and payload == b'{"id"'
    with pytest.raises(tk.UpstreamError, match="closed the connection mid-response"):
        body.feed(b"")


def test_an_empty_body_is_done_before_any_read_and_a_close_delimited_one_at_the_close():
    assert tk.LengthBody(0).done
    body, payload = read_length(None, b"part one, ", b"part two", b"")
    assert body.done and payload == b"part one, part two"


class RawProvider:
    """A provider that answers every request on a connection with the same bytes, as an old or
    minimal HTTP server would; it counts the connections it was given."""

    def __init__(self, answer: bytes, close: bool):
        self.answer, self.close, self.connections = answer, close, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer_all, args=(conn,), daemon=True).start()

    def answer_all(self, conn):
        with conn:
            buffer = b""
            while data := conn.recv(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:                      # a whole request: head and body
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
                    if len(rest) < length:
                        break
                    buffer = rest[length:]
                    conn.sendall(self.answer)
                    if self.close:
                        return


CHAT_REPLY = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "old server"}}]}).encode()


def test_a_body_that_ends_with_the_connection_is_read_whole_and_the_connection_not_reused(gateway_factory):
    provider = RawProvider(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n" + CHAT_REPLY, close=True)
    gw = gateway_factory(provider_section("old", provider) + "[routes]\n* = old\n")
    for _ in range(2):
        assert ask(gw).choices[0].message.content == "old server"
    assert provider.connections == 2
    assert idle_upstream_connections(gw, 0) == 0


def test_a_connection_with_bytes_after_the_body_is_not_reused(gateway_factory):
    provider = RawProvider(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                           b"HTTP/1.1 200 OK\r\n" % (len(CHAT_REPLY), CHAT_REPLY), close=False)
    gw = gateway_factory(provider_section("stray", provider) + "[routes]\n* = stray\n")
    for _ in range(2):
        assert ask(gw).choices[0].message.content == "old server"
    assert provider.connections == 2


@pytest.mark.parametrize("data, rest, final", [
    (b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\n", True),
    (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\n", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 404", b"HTTP/1.1 404", True),
    (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n", False),
    (b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.", b"HTTP/1.", False),
    (b"HTTP/1.1", b"HTTP/1.1", False),
])
def test_interim_heads_before_the_final_response_are_dropped(data, rest, final):
    assert tk.after_interim_heads(data) == (rest, final)


def test_a_provider_that_sends_early_hints_first_is_answered_and_its_connection_reused(gateway_factory):
    provider = RawProvider(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                           % (len(CHAT_REPLY), CHAT_REPLY), close=False)
    gw = gateway_factory(provider_section("hinting", provider) + "[routes]\n* = hinting\n")
    for _ in range(2):
        assert ask(gw).choices[0].message.content == "old server"
    assert provider.connections == 1


# ---- TLS and proxies ------------------------------------------------------------------------------
import asyncio  # noqa: E402
import shutil  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402


class PipeServer:
    """A loopback TCP server in a thread that pipes each connection somewhere: a TLS terminator in
    front of the mock, or an HTTP CONNECT proxy (which also records the CONNECT targets it saw)."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, target: tuple[str, int] | None = None):
        self.tls, self.target, self.connects, self.connect_heads = tls, target, [], []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def main():
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.tls)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(main()),
                                                       self.loop.run_forever()), daemon=True)
        self.thread.start()
        started.wait(5)

    async def handle(self, reader, writer):
        target = self.target
        if target is None:                                  # act as a CONNECT proxy
            head = await reader.readuntil(b"\r\n\r\n")
            host, port = head.split(b" ")[1].decode().rsplit(":", 1)
            self.connects.append(f"{host}:{port}")
            self.connect_heads.append(head)
            target = (host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        up_reader, up_writer = await asyncio.open_connection(*target)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self):
        async def stop():
            self.server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


def test_https_provider_trusted_through_ca_bundle(gateway_factory, mock, certificate):
    cert, context = certificate
    tls = PipeServer(tls=context, target=("127.0.0.1", int(mock.base_url.rsplit(":", 1)[1])))
    try:
        gw = gateway_factory(f"[gateway]\nca_bundle = {cert}\n[provider.secure]\n"
                             f"base_url = https://localhost:{tls.port}/v1\n[routes]\n* = secure\n")
        mock.enqueue({"text": "over tls"})
        assert ask(gw).choices[0].message.content == "over tls"
    finally:
        tls.close()


def test_https_provider_with_an_unknown_ca_is_refused(gateway_factory, mock, certificate):
    _, context = certificate
    tls = PipeServer(tls=context, target=("127.0.0.1", int(mock.base_url.rsplit(":", 1)[1])))
    try:
        gw = gateway_factory(f"[provider.secure]\nbase_url = https://localhost:{tls.port}/v1\n[routes]\n* = secure\n")
        with pytest.raises(openai.APIStatusError) as caught:
            ask(gw)
        assert caught.value.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in caught.value.body["message"]
    finally:
        tls.close()


@pytest.mark.parametrize("credentials, authorization", [
    ("", None), ("user:secret@", b"proxy-authorization: Basic dXNlcjpzZWNyZXQ=\r\n")])
def test_https_proxy_is_used_through_connect(gateway_factory, mock, certificate, credentials, authorization):
    cert, context = certificate
    tls = PipeServer(tls=context, target=("127.0.0.1", int(mock.base_url.rsplit(":", 1)[1])))
    proxy = PipeServer()
    try:
        gw = gateway_factory(f"[gateway]\nca_bundle = {cert}\n[provider.secure]\n"
                             f"base_url = https://localhost:{tls.port}/v1\n[routes]\n* = secure\n",
                             env={"HTTPS_PROXY": f"http://{credentials}127.0.0.1:{proxy.port}"})
        mock.enqueue({"text": "tunnelled"})
        assert ask(gw).choices[0].message.content == "tunnelled"
        assert proxy.connects == [f"localhost:{tls.port}"]
        head = proxy.connect_heads[0]
        assert head.startswith(f"CONNECT localhost:{tls.port} HTTP/1.1\r\nhost: localhost:{tls.port}\r\n".encode())
        assert (b"proxy-authorization" in head) is bool(authorization) and (authorization or b"") in head
    finally:
        proxy.close()
        tls.close()


def test_no_proxy_bypasses_the_proxy(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock) + "[routes]\n* = local\n",
                         env={"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "localhost,127.0.0.1"})
    mock.enqueue({"text": "direct"})
    assert ask(gw).choices[0].message.content == "direct"
