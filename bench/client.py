"""A small, fast HTTP/1.1 keep-alive client for load generation (asyncio.Protocol, no h11).

It understands just what the gateway and the mock send: a status line, headers, then a body framed by
Content-Length or chunked transfer encoding (no trailers). One request at a time per connection.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

# A paced mock delta carries the mock's CLOCK_MONOTONIC send time in nanoseconds (see mock.py).
STAMP_RE = re.compile(rb"@(\d{6,})@")
OVERHEAD_HEADER = b"x-tokligence-overhead-ms"


@dataclass(slots=True)
class Result:
    status: int
    sent_ns: int                          # CLOCK_MONOTONIC when the request was written
    latency: float                        # seconds from writing the request to the last body byte
    overhead_ms: float | None             # the gateway's x-tokligence-overhead-ms header, if any
    stamps: list[tuple[int, int]] = field(default_factory=list)   # (mock sent ns, client got ns)


def build_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
             f"content-length: {len(body)}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection; `await request(raw)` sends a prepared request and reads the reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Result] | None = None
        self._buffer = b""
        self._sent = 0.0
        self._sent_ns = 0
        self._status = 0
        self._overhead: float | None = None
        self._length = 0                  # body bytes still expected (Content-Length framing)
        self._chunked = False
        self._in_head = True
        self._stamps: list[tuple[int, int]] | None = None
        self.answered = 0                 # complete responses received

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        return protocol

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("server closed the connection mid-response"))

    def request(self, raw: bytes, stamps: bool = False) -> asyncio.Future[Result]:
        assert self.transport is not None and self._waiter is None, "one request at a time"
        self._waiter = asyncio.get_running_loop().create_future()
        self._buffer, self._in_head, self._length, self._chunked, self._overhead = b"", True, 0, False, None
        self._stamps = [] if stamps else None
        self._sent_ns = time.monotonic_ns()
        self._sent = time.perf_counter()
        self.transport.write(raw)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        if self._stamps is not None:
            arrived = time.monotonic_ns()
            self._stamps.extend((int(sent), arrived) for sent in STAMP_RE.findall(data))
        if self._in_head:
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self._buffer[:end])
            data, self._buffer = self._buffer[end + 4:], b""
        if self._chunked:
            self._buffer += data
            done = self._consume_chunks()
        else:
            self._length -= len(data)
            done = self._length <= 0
        if done:
            self._finish()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        self._length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._length = int(value)
            elif name == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            elif name == OVERHEAD_HEADER:
                self._overhead = float(value)
        self._in_head = False

    def _consume_chunks(self) -> bool:
        """Drops complete chunks from the buffer; True once the last (empty) chunk has arrived."""
        buffer, position = self._buffer, 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(buffer[position:line_end].split(b";", 1)[0], 16)
            chunk_end = line_end + 2 + size + 2
            if len(buffer) < chunk_end:
                break
            position = chunk_end
            if size == 0:
                self._buffer = b""
                return True
        self._buffer = buffer[position:]
        return False

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        self.answered += 1
        if waiter is not None and not waiter.done():
            waiter.set_result(Result(self._status, self._sent_ns, time.perf_counter() - self._sent,
                                     self._overhead, self._stamps or []))
