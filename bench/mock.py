#!/usr/bin/env python3
"""A fast mock LLM provider for the Tokligence benchmarks.

It speaks just enough of three wires for the gateway and a client to be satisfied:

    POST /v1/chat/completions   OpenAI Chat: JSON, or SSE chunks ending in [DONE]
                                (a usage chunk only when stream_options.include_usage is true)
    POST /v1/messages           Anthropic Messages: JSON, or SSE with `event:` lines
    POST /v1/responses          OpenAI Responses: JSON, or SSE with `event:` lines

Everything else gets a 404. The reply's shape is chosen by the requested *model name*, which is the
one thing that reaches the mock unchanged both directly and through the gateway (passthrough or
translated). Dash-separated fields after the first, each a letter and a number, in any order:

    d<N>   deltas in a stream (and the words of a JSON reply); default 20
    t<MS>  wait this long before answering (time to first byte); default 0
    g<MS>  wait this long between stream events that carry a delta; default 0

e.g. `chat-d20-t50-g5`. A paced reply (t or g above 0) stamps each delta's text with the mock's
CLOCK_MONOTONIC in nanoseconds as `@<ns>@`, so a client on the same machine can tell how late each
delta arrived. Unpaced streams are written at once, but one HTTP chunk per SSE event, as real
providers frame them.

The mock is built to cost far less CPU than the gateway: an asyncio.Protocol with a hand-written
HTTP/1.1 keep-alive parser (Content-Length bodies only) and replies rendered once per shape and cached.

    python bench/mock.py --port 0      # prints "listening <port>" once it accepts connections
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable

CREATED = 1_700_000_000
INPUT_TOKENS = 12
MAX_HEAD_BYTES = 64 * 1024
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nnot found"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Shape:
    """What the model name asks for."""
    model: str
    deltas: int = 20
    ttfb: float = 0.0          # seconds
    gap: float = 0.0           # seconds between delta events

    @property
    def paced(self) -> bool:
        return self.ttfb > 0 or self.gap > 0


def parse_shape(model: str) -> Shape:
    fields: dict[str, float] = {}
    for token in model.split("-")[1:]:
        if len(token) > 1 and token[0] in "dtg" and token[1:].isdigit():
            fields[token[0]] = float(token[1:])
    return Shape(model, int(fields.get("d", 20)), fields.get("t", 0.0) / 1000, fields.get("g", 0.0) / 1000)


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sse(event: str | None, data: object) -> bytes:
    head = b"event: %s\n" % event.encode() if event else b""
    return head + b"data: " + (data if isinstance(data, bytes) else dumps(data)) + b"\n\n"


# ---- the three wires ----------------------------------------------------------------------------
# A stream is rendered as (events before the deltas, a function making one delta event from its text,
# events after the deltas), so a paced stream can stamp each delta as it sends it.

StreamParts = tuple[list[bytes], Callable[[str], bytes], list[bytes]]


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def chat_json(shape: Shape) -> bytes:
    text = "".join(words(shape.deltas))
    return dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED, "model": shape.model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                               "logprobs": None, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": shape.deltas,
                            "total_tokens": INPUT_TOKENS + shape.deltas}})


def chat_stream(shape: Shape, include_usage: bool) -> StreamParts:
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": shape.model}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse(None, {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}], **extra})

    before = [chunk({"role": "assistant", "content": ""})]
    after = [chunk({}, "stop")]
    if include_usage:
        after.append(sse(None, {**head, "choices": [], "usage": {
            "prompt_tokens": INPUT_TOKENS, "completion_tokens": shape.deltas,
            "total_tokens": INPUT_TOKENS + shape.deltas}}))
    after.append(sse(None, b"[DONE]"))
    return before, lambda text: chunk({"content": text}), after


def messages_json(shape: Shape) -> bytes:
    return dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": shape.model,
                  "content": [{"type": "text", "text": "".join(words(shape.deltas))}],
                  "stop_reason": "end_turn", "stop_sequence": None,
                  "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": shape.deltas}})


def messages_stream(shape: Shape, include_usage: bool) -> StreamParts:
    def event(name: str, **fields: object) -> bytes:
        return sse(name, {"type": name, **fields})

    message: dict[str, object] = {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": shape.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}
    before = [event("message_start", message=message),
              event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
              event("ping")]
    after = [event("content_block_stop", index=0),
             event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                   usage={"output_tokens": shape.deltas}),
             event("message_stop")]
    return before, lambda text: event("content_block_delta", index=0,
                                      delta={"type": "text_delta", "text": text}), after


def responses_object(shape: Shape, status: str, text: str | None) -> dict:
    output = [] if text is None else [{"type": "message", "id": "msg_bench", "status": "completed",
                                       "role": "assistant",
                                       "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    usage = None if text is None else {"input_tokens": INPUT_TOKENS, "output_tokens": shape.deltas,
                                       "total_tokens": INPUT_TOKENS + shape.deltas}
    return {"id": "resp_bench", "object": "response", "created_at": CREATED, "status": status, "error": None,
            "incomplete_details": None, "model": shape.model, "output": output, "usage": usage}


def responses_json(shape: Shape) -> bytes:
    return dumps(responses_object(shape, "completed", "".join(words(shape.deltas))))


def responses_stream(shape: Shape, include_usage: bool) -> StreamParts:
    def event(name: str, **fields: object) -> bytes:
        return sse(name, {"type": name, **fields})

    text = "".join(words(shape.deltas))
    at = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    item = {"type": "message", "id": "msg_bench", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": text, "annotations": []}
    before = [event("response.created", response=responses_object(shape, "in_progress", None)),
              event("response.in_progress", response=responses_object(shape, "in_progress", None)),
              event("response.output_item.added", output_index=0, item=item),
              event("response.content_part.added", **at, part={**part, "text": ""})]
    after = [event("response.output_text.done", **at, text=text),
             event("response.content_part.done", **at, part=part),
             event("response.output_item.done", output_index=0,
                   item={**item, "status": "completed", "content": [part]}),
             event("response.completed", response=responses_object(shape, "completed", text))]
    return before, lambda text: event("response.output_text.delta", **at, delta=text), after


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Wire:
    json_body: Callable[[Shape], bytes]
    stream_parts: Callable[[Shape, bool], StreamParts]

    def render(self, shape: Shape, stream: bool, include_usage: bool) -> bytes:
        """The whole unpaced response, head included."""
        if not stream:
            body = self.json_body(shape)
            return JSON_HEAD % len(body) + body
        before, delta, after = self.stream_parts(shape, include_usage)
        events = before + [delta(word) for word in words(shape.deltas)] + after
        return SSE_HEAD + b"".join(chunked(event) for event in events) + LAST_CHUNK


WIRES = {
    b"/v1/chat/completions": Wire(chat_json, chat_stream),
    b"/v1/messages": Wire(messages_json, messages_stream),
    b"/v1/responses": Wire(responses_json, responses_stream),
}


def stamp() -> str:
    return f"@{time.monotonic_ns()}@ "


class MockProtocol(asyncio.Protocol):
    """One keep-alive connection; requests are answered in order, one at a time."""

    cache: dict[tuple[bytes, bool, bool, str], bytes] = {}

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.pacing: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pacing is not None:
            self.pacing.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.pacing is None:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        assert self.transport is not None
        while self.pacing is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.transport.write(BAD_REQUEST)
                    self.transport.close()
                return
            head = self.buffer[:end]
            match = CONTENT_LENGTH_RE.search(head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.answer(head.split(b" ", 2)[1].partition(b"?")[0], body)

    def answer(self, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        wire = WIRES.get(path.rstrip(b"/"))
        match = MODEL_RE.search(body)
        if wire is None or match is None:
            self.transport.write(NOT_FOUND)
            return
        stream, include_usage = bool(STREAM_RE.search(body)), bool(INCLUDE_USAGE_RE.search(body))
        shape = parse_shape(match.group(1).decode())
        if shape.paced:
            self.pacing = asyncio.get_running_loop().create_task(self.paced(wire, shape, stream, include_usage))
            return
        key = (path, stream, include_usage, shape.model)
        reply = self.cache.get(key)
        if reply is None:
            reply = self.cache[key] = wire.render(shape, stream, include_usage)
        self.transport.write(reply)

    async def paced(self, wire: Wire, shape: Shape, stream: bool, include_usage: bool) -> None:
        assert self.transport is not None
        await asyncio.sleep(shape.ttfb)
        if not stream:
            self.transport.write(wire.render(shape, stream, include_usage))
        else:
            before, delta, after = wire.stream_parts(shape, include_usage)
            self.transport.write(SSE_HEAD + b"".join(chunked(event) for event in before))
            for index in range(shape.deltas):
                if index and shape.gap:
                    await asyncio.sleep(shape.gap)
                self.transport.write(chunked(delta(stamp())))
            self.transport.write(b"".join(chunked(event) for event in after) + LAST_CHUNK)
        self.pacing = None
        self.serve_buffered()



async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
