"""Mock upstream LLM providers for the test-suite.

`MockUpstream` is a real HTTP/1.1 server (asyncio + h11, in a background thread) that speaks the wire
formats the gateway talks to -- OpenAI Chat Completions, embeddings and models, Anthropic Messages
(+ count_tokens) and OpenAI Responses -- with their error bodies and SSE streams, in the shapes the
official SDKs and the Claude Code / Codex CLIs accept (see the captured streams in /work/shared/fixtures).

    with MockUpstream() as mock:
        mock.enqueue({"text": "Hello", "usage": {"input": 10, "output": 2}})
        mock.enqueue({"status": 429, "headers": {"retry-after": "1"}})
        client = openai.OpenAI(base_url=mock.base_url + "/v1", api_key="x")
        ...
        assert mock.requests[0].json["model"] == "gpt-4o-mini"

Replies are scripted with wire-neutral specs (dicts); each wire renders a spec in its own format.
Content keys (all optional; {} echoes the last user text):
    text, reasoning, refusal: str
    tool_calls: [{"name", "arguments": JSON str or dict, "id"?, "custom"?: bool (Responses custom_tool_call)}]
    finish: "stop" | "tool_calls" | "length" | "content_filter" or Anthropic's end_turn / tool_use / max_tokens /
            refusal (mapped per wire; default tool_calls when there are tool calls, else stop)
    usage: {"input" (uncached), "output", "cached", "cache_creation", "reasoning"} -- missing ones computed
    deltas: pieces each text / reasoning / arguments is streamed in (default 3)
    signature: Anthropic thinking signature (= Responses reasoning encrypted_content)
    model: overrides the echoed request model
Fault keys:
    status (+ error: {"message", "type", "code", "param"} over the wire's default error body) or a raw
    body (str / bytes / JSON value, status default 200); headers: added to any reply;
    fault: slow_first_byte (delay=1.0 s) | cut_stream (after=1 deltas; non-streaming: half the body) |
           garbage | slow_stream (interval=0.05 s, deltas=200) | gzip |
           error_event (after=1 deltas, error: {...} over the wire's mid-stream error);
    interval: seconds between the events of any stream.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import gzip
import hashlib
import json
import math
import random
import secrets
import struct
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import h11

Spec = dict[str, Any]

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"
GARBAGE = b"<html><body>\x00\xff garbage: neither JSON {nor SSE\n"
EMBEDDING_DIMS = 8
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4.1", "gpt-5.5", "text-embedding-3-small",
                  "claude-sonnet-4-5", "claude-opus-4-8")
# Request fields whose text counts as prompt (for default usage and count_tokens).
PROMPT_FIELDS = ("system", "messages", "input", "instructions", "tools")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- recorded requests

@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str                        # with the query string, e.g. "/v1/messages?beta=true"
    headers: list[tuple[str, str]]   # in received order, names lowercase
    body: bytes
    json: Any                        # the parsed body, or None (empty / not JSON)
    connection_id: int               # 1-based, in order of acceptance

    @property
    def route(self) -> str:
        """The path without its query string."""
        return self.path.partition("?")[0]

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


# --------------------------------------------------------------------------- SSE

@dataclass(frozen=True)
class SseEvent:
    event: Optional[str]   # the `event:` line, None for data-only streams (chat completions)
    data: Any              # a JSON-able payload, or a literal string such as "[DONE]"
    delta: bool = False    # carries generated content: what the cut_stream / error_event faults count

    def encode(self) -> bytes:
        data = self.data.encode() if isinstance(self.data, str) else _dumps(self.data)
        head = f"event: {self.event}\n".encode() if self.event else b""
        return head + b"data: " + data + b"\n\n"


def parse_sse(data: bytes) -> list[tuple[Optional[str], str]]:
    """Split an SSE body into (event name or None, data) pairs; comments and data-less events are skipped."""
    events = []
    text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        name, lines = None, []
        for line in block.split("\n"):
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                lines.append(value)
        if lines:
            events.append((name, "\n".join(lines)))
    return events


# --------------------------------------------------------------------------- the wire-neutral reply

def _tokens(*texts: Optional[str]) -> int:
    """A rough token count: one per 4 characters."""
    return sum((len(text) + 3) // 4 for text in texts if text)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def prompt_tokens(body: dict) -> int:
    """The mock's token count of a request's prompt (default input usage, and count_tokens)."""
    return max(1, _tokens(*(text for key in PROMPT_FIELDS for text in _strings(body.get(key)))))


def _texts(content: Any) -> list[str]:
    """The texts of a message content: a string, or parts with "text" (text / input_text) or tool_result."""
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "tool_result":
            texts += _texts(part.get("content"))
    return texts


def last_user_text(body: dict) -> str:
    """The last text of the last user turn (chat / Anthropic `messages`, Responses `input`)."""
    turns = body.get("messages") or body.get("input") or []
    if isinstance(turns, str):
        return turns
    for turn in reversed(turns if isinstance(turns, list) else []):
        if isinstance(turn, dict) and turn.get("role") == "user" and (texts := _texts(turn.get("content"))):
            return texts[-1]
    return ""


def split(text: Optional[str], count: int) -> list[str]:
    """`text` cut into `count` nearly equal non-empty pieces (fewer if it is shorter)."""
    if not text:
        return []
    count = max(1, min(count, len(text)))
    size, extra = divmod(len(text), count)
    pieces, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass
class ToolCall:
    name: str
    arguments: str                  # JSON text (or free-form input for a custom tool)
    id: Optional[str] = None        # None: each wire makes one with its own prefix
    custom: bool = False            # Responses custom_tool_call (other wires: a normal tool call)
    suffix: str = field(default_factory=lambda: secrets.token_hex(12))

    @classmethod
    def from_spec(cls, call: dict) -> "ToolCall":
        arguments = call.get("arguments", "{}")
        return cls(name=call["name"], id=call.get("id"), custom=bool(call.get("custom")),
                   arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))

    def id_for(self, prefix: str) -> str:
        return self.id or prefix + self.suffix


@dataclass
class Usage:
    input: int                      # uncached input tokens (Anthropic input_tokens)
    output: int
    cached: int = 0                 # cache reads
    cache_creation: int = 0         # cache writes (Anthropic only)
    reasoning: int = 0              # part of output

    @property
    def prompt(self) -> int:        # OpenAI prompt_tokens / input_tokens
        return self.input + self.cached + self.cache_creation

    @property
    def total(self) -> int:
        return self.prompt + self.output


@dataclass
class Reply:
    """One scripted answer, independent of the wire that renders it."""
    body: dict                      # the request body, for echoes (stream_options, include, tools, ...)
    stream: bool
    model: str
    key: str                        # random hex shared by this reply's ids: chatcmpl-KEY, msg_KEY, resp_KEY
    created: int
    text: Optional[str]
    reasoning: Optional[str]
    signature: str                  # Anthropic thinking signature / Responses reasoning encrypted_content
    refusal: Optional[str]
    tool_calls: list[ToolCall]
    finish: str                     # OpenAI or Anthropic vocabulary; each wire maps it
    usage: Usage
    deltas: int

    @classmethod
    def build(cls, spec: Spec, body: dict, stream: bool) -> "Reply":
        """The reply `spec` (see the module docstring) scripts for a request with this `body`."""
        slow = spec.get("fault") == "slow_stream"
        deltas = int(spec.get("deltas", 200 if slow else 3))
        calls = [ToolCall.from_spec(call) for call in spec.get("tool_calls", [])]
        text, reasoning, refusal = spec.get("text"), spec.get("reasoning"), spec.get("refusal")
        if text is None and not calls and refusal is None:   # default: echo (or filler for a long stream)
            text = "".join(f"tok{i} " for i in range(deltas)) if slow else last_user_text(body) or "OK"
        given = spec.get("usage", {})
        usage = Usage(input=given.get("input", prompt_tokens(body)),
                      output=given.get("output", max(1, _tokens(text, reasoning, refusal,
                                                                 *(c.arguments for c in calls)))),
                      cached=given.get("cached", 0), cache_creation=given.get("cache_creation", 0),
                      reasoning=given.get("reasoning", _tokens(reasoning)))
        signature = spec.get("signature") or base64.b64encode(
            hashlib.sha256((reasoning or "").encode()).digest() * 2).decode()
        return cls(body=body, stream=stream, model=spec.get("model") or body.get("model") or "mock-model",
                   key=secrets.token_hex(12), created=int(time.time()), text=text, reasoning=reasoning,
                   signature=signature, refusal=refusal, tool_calls=calls,
                   finish=spec.get("finish") or ("tool_calls" if calls else "stop"), usage=usage, deltas=deltas)

    def pieces(self, text: Optional[str]) -> list[str]:
        return split(text, self.deltas)


# Finish reasons across vocabularies.
OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                 "tool_use": "tool_calls", "max_tokens": "length", "refusal": "content_filter"}
ANTHROPIC_STOP = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                  "content_filter": "refusal"}
RESPONSES_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


# --------------------------------------------------------------------------- wires

class Wire:
    """Renders replies and errors in one API's format. Subclasses implement body / events / stream_error."""
    required: tuple[str, ...] = ()      # top-level body fields the real API rejects the request without
    streaming = True                    # honours "stream": true
    scripted = True                     # consumes enqueued specs / calls the handler
    request_id_header = "x-request-id"
    fault_status = 500                  # what {"fault": "error_event"} becomes on a non-streaming request

    def problem(self, body: Any) -> Optional[dict]:
        """The error (as given to error_body) the real API answers a malformed request with, or None."""
        if not isinstance(body, dict):
            return {"message": "We could not parse the JSON body of your request."}
        missing = [name for name in self.required if name not in body]
        return self.missing_field(missing[0]) if missing else None

    def missing_field(self, name: str) -> dict:
        raise NotImplementedError

    def error_body(self, status: int, error: dict, request_id: str) -> dict:
        raise NotImplementedError

    def body(self, reply: Reply) -> dict:
        raise NotImplementedError

    def events(self, reply: Reply) -> list[SseEvent]:
        raise NotImplementedError

    def stream_error(self, reply: Reply, sent: int, error: dict) -> list[SseEvent]:
        """The mid-stream error (`error` overriding its fields), after `sent` events of `events(reply)`."""
        raise NotImplementedError


# status -> (type, code, message) of OpenAI error bodies.
OPENAI_ERRORS = {
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: ("invalid_request_error", None, "The requested resource does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


class OpenAIWire(Wire):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def missing_field(self, name: str) -> dict:
        return {"message": f"Missing required parameter: '{name}'.", "param": name,
                "code": "missing_required_parameter"}

    def error_body(self, status: int, error: dict, request_id: str) -> dict:
        kind, code, message = OPENAI_ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status}"))
        return {"error": {"message": message, "type": kind, "param": None, "code": code, **error}}


class ChatWire(OpenAIWire):
    required = ("model", "messages")

    def _head(self, reply: Reply, kind: str) -> dict:
        return {"id": f"chatcmpl-{reply.key}", "object": kind, "created": reply.created, "model": reply.model,
                "service_tier": "default", "system_fingerprint": "fp_mock"}

    @staticmethod
    def _usage(usage: Usage) -> dict:
        return {"prompt_tokens": usage.prompt, "completion_tokens": usage.output, "total_tokens": usage.total,
                "prompt_tokens_details": {"cached_tokens": usage.cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": usage.reasoning, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

    def body(self, reply: Reply) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": reply.refusal,
                                   "annotations": []}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [{"id": call.id_for("call_"), "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in reply.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": OPENAI_FINISH.get(reply.finish, reply.finish)}
        return {**self._head(reply, "chat.completion"), "choices": [choice], "usage": self._usage(reply.usage)}

    def events(self, reply: Reply) -> list[SseEvent]:
        head = self._head(reply, "chat.completion.chunk")
        with_usage = bool((reply.body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: Optional[str] = None, counted: bool = False) -> SseEvent:
            data = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return SseEvent(None, {**data, "usage": None} if with_usage else data, counted)

        out = [chunk({"role": "assistant", "content": "", "refusal": None})]
        out += [chunk({"reasoning_content": piece}, counted=True) for piece in reply.pieces(reply.reasoning)]
        out += [chunk({"content": piece}, counted=True) for piece in reply.pieces(reply.text)]
        out += [chunk({"refusal": piece}, counted=True) for piece in reply.pieces(reply.refusal)]
        for index, call in enumerate(reply.tool_calls):
            out.append(chunk({"tool_calls": [{"index": index, "id": call.id_for("call_"), "type": "function",
                                              "function": {"name": call.name, "arguments": ""}}]}))
            out += [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, counted=True)
                    for piece in reply.pieces(call.arguments)]
        out.append(chunk({}, OPENAI_FINISH.get(reply.finish, reply.finish)))
        if with_usage:
            out.append(SseEvent(None, {**head, "choices": [], "usage": self._usage(reply.usage)}))
        return out + [SseEvent(None, "[DONE]")]

    def stream_error(self, reply: Reply, sent: int, error: dict) -> list[SseEvent]:
        return [SseEvent(None, self.error_body(500, error, ""))]


class EmbeddingsWire(OpenAIWire):
    required = ("model", "input")
    streaming = False

    @staticmethod
    def vector(value: Any, dims: int, as_base64: bool) -> Any:
        """A deterministic unit vector for `value` (float32 little-endian base64 when asked)."""
        rng = random.Random(hashlib.sha256(json.dumps(value).encode()).digest())
        vector = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
        norm = math.sqrt(sum(x * x for x in vector))
        vector = [x / norm for x in vector]
        return base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector

    def body(self, reply: Reply) -> dict:
        inputs = reply.body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):   # one text / one token list
            inputs = [inputs]
        dims = reply.body.get("dimensions") or EMBEDDING_DIMS
        as_base64 = reply.body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": index, "embedding": self.vector(value, dims, as_base64)}
                for index, value in enumerate(inputs)]
        return {"object": "list", "data": data, "model": reply.model,
                "usage": {"prompt_tokens": reply.usage.input, "total_tokens": reply.usage.input}}


# status -> (type, message) of Anthropic error bodies.
ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


class MessagesWire(Wire):
    """Anthropic Messages."""
    required = ("model", "messages", "max_tokens")
    request_id_header = "request-id"
    fault_status = 529

    def missing_field(self, name: str) -> dict:
        return {"message": f"{name}: Field required"}

    def error_body(self, status: int, error: dict, request_id: str) -> dict:
        kind, message = ANTHROPIC_ERRORS.get(
            status, ("api_error" if status >= 500 else "invalid_request_error", f"HTTP {status}"))
        error = {"type": error.get("type", kind), "message": error.get("message", message)}
        return {"type": "error", "error": error, "request_id": request_id}

    @staticmethod
    def _tool_input(call: ToolCall) -> str:
        """The call's arguments as a JSON object text (tool_use input must be an object)."""
        try:
            value = json.loads(call.arguments)
        except ValueError:
            value = None
        return call.arguments if isinstance(value, dict) else json.dumps({"input": call.arguments})

    def _blocks(self, reply: Reply) -> list[tuple[dict, dict, list[dict]]]:
        """(final block, block as content_block_start opens it, its deltas) for each content block."""
        blocks = []
        if reply.reasoning is not None:
            blocks.append(({"type": "thinking", "thinking": reply.reasoning, "signature": reply.signature},
                           {"type": "thinking", "thinking": "", "signature": ""},
                           [{"type": "thinking_delta", "thinking": p} for p in reply.pieces(reply.reasoning)]
                           + [{"type": "signature_delta", "signature": reply.signature}]))
        text = reply.text if reply.text is not None else reply.refusal
        if text is not None:
            blocks.append(({"type": "text", "text": text}, {"type": "text", "text": ""},
                           [{"type": "text_delta", "text": p} for p in reply.pieces(text)]))
        for call in reply.tool_calls:
            arguments, start = self._tool_input(call), {"type": "tool_use", "id": call.id_for("toolu_"),
                                                        "name": call.name}
            blocks.append(({**start, "input": json.loads(arguments)}, {**start, "input": {}},
                           [{"type": "input_json_delta", "partial_json": p}
                            for p in ["", *reply.pieces(arguments)]]))
        return blocks

    def _stop_reason(self, reply: Reply) -> str:
        if reply.refusal is not None and reply.finish == "stop":
            return "refusal"
        return ANTHROPIC_STOP.get(reply.finish, reply.finish)

    def _message(self, reply: Reply, content: list, stop_reason: Optional[str], output_tokens: int) -> dict:
        usage = {"input_tokens": reply.usage.input, "cache_creation_input_tokens": reply.usage.cache_creation,
                 "cache_read_input_tokens": reply.usage.cached, "output_tokens": output_tokens,
                 "service_tier": "standard"}
        return {"id": f"msg_{reply.key}", "type": "message", "role": "assistant", "model": reply.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}

    def body(self, reply: Reply) -> dict:
        content = [final for final, _, _ in self._blocks(reply)]
        return self._message(reply, content, self._stop_reason(reply), reply.usage.output)

    def events(self, reply: Reply) -> list[SseEvent]:
        def event(name: str, counted: bool = False, **fields: Any) -> SseEvent:
            return SseEvent(name, {"type": name, **fields}, counted)

        out = [event("message_start", message=self._message(reply, [], None, 1))]
        blocks = self._blocks(reply)
        for index, (_, opened, deltas) in enumerate(blocks):
            out.append(event("content_block_start", index=index, content_block=opened))
            if index == 0 and opened["type"] != "thinking":      # where the captured streams have their ping
                out.append(event("ping"))
            out += [event("content_block_delta", bool(d.get("text") or d.get("thinking") or d.get("partial_json")),
                          index=index, delta=d) for d in deltas]
            out.append(event("content_block_stop", index=index))
        if not blocks:
            out.append(event("ping"))
        out.append(event("message_delta", delta={"stop_reason": self._stop_reason(reply), "stop_sequence": None},
                         usage={"output_tokens": reply.usage.output}))
        return out + [event("message_stop")]

    def stream_error(self, reply: Reply, sent: int, error: dict) -> list[SseEvent]:
        body = self.error_body(529, error, "")
        return [SseEvent("error", {"type": "error", "error": body["error"]})]


class CountTokensWire(MessagesWire):
    """POST /v1/messages/count_tokens: never scripted."""
    required = ("model", "messages")
    streaming = False
    scripted = False

    def body(self, reply: Reply) -> dict:
        return {"input_tokens": reply.usage.input}


class ResponsesWire(OpenAIWire):
    """OpenAI Responses."""
    required = ("model",)
    # Request parameters the response object echoes, with the API's defaults.
    ECHOED = {"instructions": None, "max_output_tokens": None, "parallel_tool_calls": True,
              "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": True,
              "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
              "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {}}

    def _response(self, reply: Reply, status: str, output: list, usage: Optional[dict],
                  error: Optional[dict] = None) -> dict:
        reason = RESPONSES_INCOMPLETE.get(OPENAI_FINISH.get(reply.finish, reply.finish))
        response = {"id": f"resp_{reply.key}", "object": "response", "created_at": reply.created,
                    "status": status, "error": error,
                    "incomplete_details": {"reason": reason} if status == "incomplete" else None,
                    "model": reply.model, "output": output, "usage": usage}
        response.update({name: reply.body.get(name, default) for name, default in self.ECHOED.items()})
        return response

    def _status(self, reply: Reply) -> str:
        return "incomplete" if OPENAI_FINISH.get(reply.finish, reply.finish) in RESPONSES_INCOMPLETE else "completed"

    @staticmethod
    def _usage(usage: Usage) -> dict:
        return {"input_tokens": usage.prompt, "input_tokens_details": {"cached_tokens": usage.cached},
                "output_tokens": usage.output, "output_tokens_details": {"reasoning_tokens": usage.reasoning},
                "total_tokens": usage.total}

    def _items(self, reply: Reply) -> list[tuple[dict, dict, list[tuple[str, dict, bool]]]]:
        """(final item, item as output_item.added opens it, the events in between) for each output item."""
        items = []
        if reply.reasoning is not None:
            summary = {"type": "summary_text", "text": reply.reasoning}
            final = {"type": "reasoning", "id": f"rs_{reply.key}", "summary": [summary]}
            if "reasoning.encrypted_content" in (reply.body.get("include") or []):
                final["encrypted_content"] = reply.signature
            at = {"summary_index": 0}
            items.append((final, {"type": "reasoning", "id": final["id"], "summary": []}, [
                ("response.reasoning_summary_part.added", {**at, "part": {**summary, "text": ""}}, False),
                *[("response.reasoning_summary_text.delta", {**at, "delta": p}, True)
                  for p in reply.pieces(reply.reasoning)],
                ("response.reasoning_summary_text.done", {**at, "text": reply.reasoning}, False),
                ("response.reasoning_summary_part.done", {**at, "part": summary}, False)]))
        parts: list[tuple[dict, str, str]] = []    # (final part, event name stem, its text field)
        if reply.text is not None:
            parts.append(({"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []},
                          "response.output_text", "text"))
        if reply.refusal is not None:
            parts.append(({"type": "refusal", "refusal": reply.refusal}, "response.refusal", "refusal"))
        if parts:
            between: list[tuple[str, dict, bool]] = []
            for index, (part, stem, key) in enumerate(parts):
                at = {"content_index": index}
                extra = {"logprobs": []} if key == "text" else {}
                between += [("response.content_part.added", {**at, "part": {**part, key: ""}}, False),
                            *[(f"{stem}.delta", {**at, "delta": p, **extra}, True) for p in reply.pieces(part[key])],
                            (f"{stem}.done", {**at, key: part[key], **extra}, False),
                            ("response.content_part.done", {**at, "part": part}, False)]
            status = "completed" if self._status(reply) == "completed" else "incomplete"
            start = {"type": "message", "id": f"msg_{reply.key}", "status": "in_progress", "role": "assistant"}
            items.append(({**start, "status": status, "content": [part for part, _, _ in parts]},
                          {**start, "content": []}, between))
        for call in reply.tool_calls:
            kind, prefix, key, stem = (("custom_tool_call", "ctc_", "input", "response.custom_tool_call_input")
                                       if call.custom else
                                       ("function_call", "fc_", "arguments", "response.function_call_arguments"))
            start = {"type": kind, "id": prefix + call.suffix, "call_id": call.id_for("call_"), "name": call.name}
            items.append(({**start, key: call.arguments, "status": "completed"},
                          {**start, key: "", "status": "in_progress"},
                          [*[(f"{stem}.delta", {"delta": p}, True) for p in reply.pieces(call.arguments)],
                           (f"{stem}.done", {key: call.arguments}, False)]))
        return items

    def body(self, reply: Reply) -> dict:
        output = [final for final, _, _ in self._items(reply)]
        return self._response(reply, self._status(reply), output, self._usage(reply.usage))

    def events(self, reply: Reply) -> list[SseEvent]:
        out: list[SseEvent] = []

        def emit(name: str, counted: bool = False, **fields: Any) -> None:
            out.append(SseEvent(name, {"type": name, "sequence_number": len(out), **fields}, counted))

        emit("response.created", response=self._response(reply, "in_progress", [], None))
        emit("response.in_progress", response=self._response(reply, "in_progress", [], None))
        items = self._items(reply)
        for index, (final, opened, between) in enumerate(items):
            emit("response.output_item.added", output_index=index, item=opened)
            for name, fields, counted in between:
                emit(name, counted, item_id=final["id"], output_index=index, **fields)
            emit("response.output_item.done", output_index=index, item=final)
        status = self._status(reply)
        emit(f"response.{status}", response=self._response(reply, status, [final for final, _, _ in items],
                                                             self._usage(reply.usage)))
        return out

    def stream_error(self, reply: Reply, sent: int, error: dict) -> list[SseEvent]:
        error = {"code": "server_error", "message": "The server had an error while processing your request.",
                 **error}
        response = self._response(reply, "failed", [], None, error)
        return [SseEvent("response.failed", {"type": "response.failed", "sequence_number": sent,
                                             "response": response})]


OPENAI = OpenAIWire()                    # error bodies for non-inference routes
WIRES: dict[str, Wire] = {               # POST routes
    "/v1/chat/completions": ChatWire(),
    "/v1/embeddings": EmbeddingsWire(),
    "/v1/messages": MessagesWire(),
    "/v1/messages/count_tokens": CountTokensWire(),
    "/v1/responses": ResponsesWire(),
}


# --------------------------------------------------------------------------- one client connection

class ClientGone(Exception):
    """The client closed the connection while a response was in progress."""


class _Link:
    """A client connection: h11 state, a reader task that notices the client leaving, and writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.h11 = h11.Connection(h11.SERVER)
        self.head_request = False              # HEAD: replies carry headers only
        self.gone = asyncio.Event()
        self._writer = writer
        self._readable = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        # Reads continuously (also while answering) so a client leaving mid-stream is seen at once;
        # pipelined requests wait in h11's buffer.
        try:
            while data := await reader.read(65536):
                self.h11.receive_data(data)
                self._readable.set()
            self.h11.receive_data(b"")
        except (ConnectionError, OSError, RuntimeError):
            pass
        finally:
            self.gone.set()
            self._readable.set()

    async def receive(self) -> Optional[tuple[h11.Request, bytes]]:
        """The next request and its body, or None once the client has closed the connection."""
        request, body = None, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.gone.is_set():
                    return None
                self._readable.clear()
                await self._readable.wait()
            elif isinstance(event, h11.Request):
                request = event
                self.head_request = event.method == b"HEAD"
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:                                     # ConnectionClosed
                return None

    async def write(self, *events: h11.Event) -> None:
        """Send events; raises ClientGone if the client left before the response's end was written."""
        if self.gone.is_set():
            raise ClientGone
        self._writer.write(b"".join(self.h11.send(event) or b"" for event in events))
        try:
            await self._writer.drain()
        except ConnectionError:
            if not any(isinstance(event, h11.EndOfMessage) for event in events):
                raise ClientGone from None

    async def pause(self, seconds: float) -> None:
        """Sleep, raising ClientGone as soon as the client leaves."""
        try:
            await asyncio.wait_for(self.gone.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise ClientGone

    def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()


def _response_head(status: int, headers: dict[str, str]) -> h11.Response:
    """Dated, as every real provider's reply is, unless the spec's headers give a date."""
    return h11.Response(status_code=status, headers=list({"date": email.utils.formatdate(usegmt=True),
                                                          **headers}.items()))


# --------------------------------------------------------------------------- the server

Handler = Callable[[RecordedRequest], Optional[Spec]]


class MockUpstream:
    """Mock OpenAI + Anthropic upstream on http://127.0.0.1:<ephemeral port>, served by a background thread.

    Routes: POST /v1/chat/completions, /v1/embeddings, /v1/messages, /v1/messages/count_tokens,
    /v1/responses; GET /v1/models, /v1/models/{id}; anything else is a 404 in OpenAI's error shape.
    Replies: the next enqueued spec, else `handler(request)`, else the default (echo the last user text).
    Only the inference routes (chat, embeddings, messages, responses) consume specs.
    """

    def __init__(self, models: tuple[str, ...] | list[str] = DEFAULT_MODELS) -> None:
        self.models = list(models)                      # listed by GET /v1/models
        self.handler: Optional[Handler] = None          # called in the server thread: must not block
        self.connections_opened = 0
        self.disconnects = 0
        self._requests: list[RecordedRequest] = []
        self._queue: deque[Spec] = deque()
        self._lock = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._connections: set[asyncio.Task] = set()
        self._closed = False
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="mock-upstream", daemon=True)
        self._thread.start()
        self.port = started.result(timeout=5)
        self.base_url = f"http://127.0.0.1:{self.port}"

    # ---- test-side API

    def enqueue(self, *specs: Spec) -> None:
        """Queue replies (FIFO) for the next inference requests, whatever their wire."""
        with self._lock:
            self._queue.extend(specs)

    @property
    def pending(self) -> int:
        """How many enqueued specs are not consumed yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> Optional[RecordedRequest]:
        with self._lock:
            return self._requests[-1] if self._requests else None

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` requests have been received."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_for_disconnect(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until clients have dropped at least `count` connections mid-response."""
        with self._lock:
            return self._lock.wait_for(lambda: self.disconnects >= count, timeout)

    def close(self) -> None:
        """Close every connection and the listener, stop the loop and join the thread (within ~1s)."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=0.5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=1)

    def __enter__(self) -> "MockUpstream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MockUpstream {self.base_url} requests={len(self._requests)} pending={self.pending}>"

    # ---- server thread

    def _run(self, started: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        except BaseException as exc:   # noqa: BLE001 - reported to the constructor
            started.set_exception(exc)
            return
        started.set_result(self._server.sockets[0].getsockname()[1])
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await asyncio.sleep(0)          # let the transports finish closing

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        with self._lock:
            self.connections_opened += 1
            connection_id = self.connections_opened
        link = _Link(reader, writer)
        try:
            while (incoming := await link.receive()) is not None:
                request = self._record(*incoming, connection_id)
                try:
                    await self._respond(link, request)
                except ClientGone:
                    with self._lock:
                        self.disconnects += 1
                        self._lock.notify_all()
                    return
                if link.h11.our_state is not h11.DONE or link.h11.their_state is not h11.DONE:
                    return                              # Connection: close, or a fault cut the reply
                link.h11.start_next_cycle()
        except h11.RemoteProtocolError:
            pass
        except asyncio.CancelledError:
            pass    # close(): returning normally spares Python 3.11's start_server callback a traceback
        finally:
            link.close()
            self._connections.discard(task)

    def _record(self, request: h11.Request, body: bytes, connection_id: int) -> RecordedRequest:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        recorded = RecordedRequest(
            method=request.method.decode(), path=request.target.decode("latin-1"),
            headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers],
            body=body, json=parsed, connection_id=connection_id)
        with self._lock:
            self._requests.append(recorded)
            self._lock.notify_all()
        return recorded

    def _next_spec(self, request: RecordedRequest) -> Spec:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        handler = self.handler
        try:
            return (handler(request) if handler else None) or {}
        except Exception as exc:   # noqa: BLE001 - a broken test script becomes a visible 500
            traceback.print_exc()
            return {"status": 500, "error": {"message": f"mock handler raised {exc!r}"}}

    async def _respond(self, link: _Link, request: RecordedRequest) -> None:
        method, route = request.method, request.route
        if method == "GET" and route == "/v1/models":
            return await self._send(link, 200, {}, self._models_body(request))
        if method == "GET" and route.startswith("/v1/models/"):
            model = route.removeprefix("/v1/models/")
            if model in self.models:
                return await self._send(link, 200, {}, self._model(model))
            error = {"message": f"The model '{model}' does not exist", "code": "model_not_found"}
            return await self._send(link, 404, {}, OPENAI.error_body(404, error, ""))
        wire = WIRES.get(route) if method == "POST" else None
        if wire is None:
            error = {"message": f"Invalid URL ({method} {route})"}
            return await self._send(link, 404, {}, OPENAI.error_body(404, error, ""))
        if problem := wire.problem(request.json):
            request_id = _new_id("req_")
            return await self._send(link, 400, {wire.request_id_header: request_id},
                                    wire.error_body(400, problem, request_id))
        await self._answer(link, wire, request, self._next_spec(request) if wire.scripted else {})

    async def _answer(self, link: _Link, wire: Wire, request: RecordedRequest, spec: Spec) -> None:
        """Render `spec` on `wire`, applying its fault keys (see the module docstring)."""
        fault = spec.get("fault")
        request_id = _new_id("req_")
        headers = {wire.request_id_header: request_id,
                   **{name.lower(): str(value) for name, value in spec.get("headers", {}).items()}}
        if fault == "slow_first_byte":
            await link.pause(float(spec.get("delay", 1.0)))
        if "status" in spec or "body" in spec:
            status = int(spec.get("status", 200))
            body = spec["body"] if "body" in spec else wire.error_body(status, spec.get("error") or {}, request_id)
            return await self._send(link, status, headers, body)
        reply = Reply.build(spec, request.json, stream=wire.streaming and request.json.get("stream") is True)
        if fault == "garbage":
            return await self._send(link, 200, {"content-type": SSE_TYPE if reply.stream else JSON_TYPE,
                                                **headers}, GARBAGE)
        if fault == "error_event" and not reply.stream:
            status = wire.fault_status
            return await self._send(link, status, headers, wire.error_body(status, spec.get("error") or {},
                                                                            request_id))
        if reply.stream:
            return await self._stream(link, wire, reply, spec, headers)
        await self._send(link, 200, headers, wire.body(reply), compress=fault == "gzip", cut=fault == "cut_stream")

    @staticmethod
    async def _send(link: _Link, status: int, headers: dict[str, str], body: Any,
                    compress: bool = False, cut: bool = False) -> None:
        """A whole (Content-Length) reply; `cut` sends half the body and closes the connection."""
        data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else _dumps(body)
        headers = {"content-type": JSON_TYPE, **headers}
        if compress:
            data, headers["content-encoding"] = gzip.compress(data), "gzip"
        headers["content-length"] = str(len(data))
        if cut:
            await link.write(_response_head(status, headers), h11.Data(data=data[: len(data) // 2]))
            return link.close()
        await link.write(_response_head(status, headers), h11.Data(data=b"" if link.head_request else data),
                         h11.EndOfMessage())

    @staticmethod
    async def _stream(link: _Link, wire: Wire, reply: Reply, spec: Spec, headers: dict[str, str]) -> None:
        """A chunked SSE reply, paced by "interval", cut or failed after "after" deltas by the faults."""
        fault = spec.get("fault")
        interval = float(spec.get("interval", 0.05 if fault == "slow_stream" else 0))
        stop_after = int(spec.get("after", 1)) if fault in ("cut_stream", "error_event") else None
        zipper = zlib.compressobj(wbits=31) if fault == "gzip" else None   # wbits=31: gzip framing

        def encode(events: list[SseEvent], end: bool) -> bytes:
            data = b"".join(event.encode() for event in events)
            if zipper:
                data = zipper.compress(data) + (zipper.flush() if end else zipper.flush(zlib.Z_SYNC_FLUSH))
            return data

        head = {"content-type": SSE_TYPE, "cache-control": "no-cache", **headers}
        await link.write(_response_head(200, {**head, "content-encoding": "gzip"} if zipper else head))
        events, counted = wire.events(reply), 0
        for index, event in enumerate(events):
            last = index == len(events) - 1
            if stop_after is not None and (last or (event.delta and counted == stop_after)):
                if fault == "cut_stream":                 # no terminal event, no final chunk
                    return link.close()
                failure = wire.stream_error(reply, index, spec.get("error") or {})
                return await link.write(h11.Data(data=encode(failure, True)), h11.EndOfMessage())
            if index and interval:
                await link.pause(interval)
            if last:
                return await link.write(h11.Data(data=encode([event], True)), h11.EndOfMessage())
            await link.write(h11.Data(data=encode([event], False)))
            counted += event.delta

    def _model(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": "system"}

    def _models_body(self, request: RecordedRequest) -> dict:
        if request.header("anthropic-version"):           # Anthropic's shape of the listing
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                    for m in self.models]
            return {"data": data, "has_more": False, "first_id": self.models[0] if self.models else None,
                    "last_id": self.models[-1] if self.models else None}
        return {"object": "list", "data": [self._model(m) for m in self.models]}
