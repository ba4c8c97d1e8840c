"""Tests of the mock upstream itself: the official SDKs accept what it sends, its streams have the shapes of
the captured real streams, and its faults / connection handling do what the other tests rely on."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx2
import openai
import pytest

from mock_upstream import GARBAGE, MockUpstream, parse_sse

FIXTURES = Path("/work/shared/fixtures")
BASH = {"id": "toolu_1", "name": "Bash", "arguments": {"command": "echo hello"}}


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


def oai(mock: MockUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock.base_url + "/v1", api_key="x", max_retries=0)


def claude(mock: MockUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.base_url, api_key="x", max_retries=0)


def post(mock: MockUpstream, path: str, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A raw POST: status, headers (lowercase) and the undecoded body (partial if the mock cut it)."""
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
    response = conn.getresponse()
    try:
        data = response.read()
    except http.client.IncompleteRead as cut:
        data = cut.partial
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys kept, leaves replaced by their type name."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def signature(sse: bytes) -> list[tuple[Any, Any]]:
    """(event, data shape) per event, consecutive repeats (the number of deltas) collapsed."""
    out: list[tuple[Any, Any]] = []
    for event, data in parse_sse(sse):
        entry = (event, shape(json.loads(data)))
        if not out or out[-1] != entry:
            out.append(entry)
    return out


USER = [{"role": "user", "content": "run echo hello"}]


# ---------------------------------------------------------------- OpenAI chat completions

def test_chat_json_echo_usage_and_recording(mock: MockUpstream) -> None:
    completion = oai(mock).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.choices[0].message.content == "run echo hello"
    assert completion.model == "gpt-4o-mini" and completion.id.startswith("chatcmpl-")
    mock.enqueue({"text": "Hi", "usage": {"input": 10, "output": 5, "cached": 2, "reasoning": 3}})
    usage = oai(mock).chat.completions.create(model="m", messages=USER).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 5, 17)
    assert usage.prompt_tokens_details.cached_tokens == 2
    assert usage.completion_tokens_details.reasoning_tokens == 3

    request = mock.requests[0]
    assert (request.method, request.path, request.route) == ("POST", "/v1/chat/completions", "/v1/chat/completions")
    assert request.json["messages"] == USER and json.loads(request.body) == request.json
    assert request.header("Authorization") == "Bearer x"
    assert all(name == name.lower() for name, _ in request.headers)


def test_chat_stream_with_tool_calls_through_the_sdk_helper(mock: MockUpstream) -> None:
    mock.enqueue({"text": "Let me look.", "tool_calls": [BASH, {"name": "Read", "arguments": '{"path": "/x"}'}],
                  "usage": {"input": 7, "output": 9}})
    with oai(mock).chat.completions.stream(model="gpt-4o-mini", messages=USER,
                                          stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Let me look." and choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.id, c.function.name) for c in calls][0] == ("toolu_1", "Bash")
    assert json.loads(calls[0].function.arguments) == {"command": "echo hello"}
    assert calls[1].function.arguments == '{"path": "/x"}' and calls[1].id.startswith("call_")
    assert final.usage.total_tokens == 16


def test_chat_stream_chunks_are_openai_shaped(mock: MockUpstream) -> None:
    mock.enqueue({"reasoning": "think", "tool_calls": [BASH], "deltas": 2})
    _, headers, body = post(mock, "/v1/chat/completions", {"model": "m", "messages": USER, "stream": True})
    assert headers["content-type"].startswith("text/event-stream") and headers["transfer-encoding"] == "chunked"
    events = parse_sse(body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in c for c in chunks)                     # no include_usage: no usage at all
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "think"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function",
                        "function": {"name": "Bash", "arguments": ""}}
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert (deltas[-1], chunks[-1]["choices"][0]["finish_reason"]) == ({}, "tool_calls")

    _, _, body = post(mock, "/v1/chat/completions", {"model": "m", "messages": USER, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    chunks = [json.loads(data) for _, data in parse_sse(body)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


# ---------------------------------------------------------------- Anthropic messages

def test_anthropic_stream_through_the_sdk(mock: MockUpstream) -> None:
    mock.enqueue({"reasoning": "Let me think.", "signature": "sig==", "text": "I'll run it.", "tool_calls": [BASH],
                  "usage": {"input": 100, "output": 20, "cached": 50}})
    with claude(mock).messages.stream(model="claude-opus-4-8", max_tokens=1024, messages=USER) as stream:
        message = stream.get_final_message()
    thinking, text, tool = message.content
    assert (thinking.thinking, thinking.signature, text.text) == ("Let me think.", "sig==", "I'll run it.")
    assert (tool.id, tool.name, tool.input) == ("toolu_1", "Bash", {"command": "echo hello"})
    assert message.stop_reason == "tool_use" and message.model == "claude-opus-4-8"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        100, 50, 20)


@pytest.mark.parametrize("fixture, spec", [
    ("final_text", {"text": "The command finished."}),
    ("text_then_tool_use", {"text": "I'll run a command.", "tool_calls": [BASH]}),
    ("thinking_text_tool_use", {"reasoning": "Let me think.", "text": "I'll run a command.", "tool_calls": [BASH]}),
])
def test_anthropic_stream_matches_captured_fixture(mock: MockUpstream, fixture: str, spec: dict) -> None:
    mock.enqueue(spec)
    _, _, body = post(mock, "/v1/messages", {"model": "claude-opus-4-8", "max_tokens": 100, "messages": USER,
                                             "stream": True})
    captured = (FIXTURES / f"anthropic_response_stream_{fixture}.sse").read_bytes()
    assert signature(body) == signature(captured)


def test_anthropic_json_count_tokens_and_errors(mock: MockUpstream) -> None:
    mock.enqueue({"refusal": "I can't help with that."})
    message = claude(mock).messages.create(model="claude-x", max_tokens=10, messages=USER)
    assert message.content[0].text == "I can't help with that." and message.stop_reason == "refusal"
    count = claude(mock).messages.count_tokens(model="claude-x", messages=USER)
    assert count.input_tokens > 0 and mock.pending == 0

    mock.enqueue({"status": 529})
    with pytest.raises(anthropic.OverloadedError) as raised:
        claude(mock).messages.create(model="claude-x", max_tokens=10, messages=USER)
    assert raised.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert raised.value.body["request_id"] == raised.value.response.headers["request-id"]

    status, _, body = post(mock, "/v1/messages", {"model": "claude-x", "messages": USER})
    assert status == 400 and json.loads(body)["error"] == {"type": "invalid_request_error",
                                                           "message": "max_tokens: Field required"}


# ---------------------------------------------------------------- OpenAI responses

@pytest.mark.parametrize("fixture, spec, extra", [
    ("final_text", {"text": "The command finished."}, {"reasoning": {"effort": "medium"}}),
    ("function_call", {"tool_calls": [{"name": "exec_command", "arguments": '{"cmd": "echo hello"}'}]},
     {"reasoning": {"effort": "medium"}}),
    ("reasoning_then_function_call",
     {"reasoning": "**Planning**", "tool_calls": [{"name": "exec_command", "arguments": '{"cmd": "echo hello"}'}]},
     {"reasoning": {"effort": "medium"}, "include": ["reasoning.encrypted_content"]}),
    ("custom_tool_call_codemode", {"tool_calls": [{"name": "exec", "arguments": "text('hi')", "custom": True}]},
     {"reasoning": {"effort": "low", "context": "all_turns"}, "parallel_tool_calls": False}),
])
def test_responses_stream_matches_captured_fixture(mock: MockUpstream, fixture: str, spec: dict,
                                                   extra: dict) -> None:
    mock.enqueue(spec)
    _, _, body = post(mock, "/v1/responses", {"model": "gpt-5.5", "input": "hi", "stream": True, "store": False,
                                              **extra})
    captured = (FIXTURES / f"responses_stream_{fixture}.sse").read_bytes()
    assert signature(body) == signature(captured)
    assert [json.loads(data)["sequence_number"] for _, data in parse_sse(body)] == list(range(len(parse_sse(body))))


def test_responses_through_the_sdk(mock: MockUpstream) -> None:
    mock.enqueue({"reasoning": "plan", "text": "Running.", "usage": {"input": 8, "cached": 2, "output": 6},
                  "tool_calls": [{"name": "exec", "arguments": "ls", "custom": True}, BASH]})
    with oai(mock).responses.stream(model="gpt-5.5", input="hi") as stream:
        response = stream.get_final_response()
    reasoning, message, custom, function = response.output
    assert reasoning.summary[0].text == "plan" and response.output_text == "Running."
    assert (custom.type, custom.name, custom.input) == ("custom_tool_call", "exec", "ls")
    assert (function.call_id, json.loads(function.arguments)) == ("toolu_1", {"command": "echo hello"})
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (10, 2)

    mock.enqueue({"text": "cut short", "finish": "length"})
    response = oai(mock).responses.create(model="gpt-5.5", input="hi")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


# ---------------------------------------------------------------- embeddings, models, routing, queue

def test_embeddings_models_and_unknown_routes(mock: MockUpstream) -> None:
    first = oai(mock).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    again = oai(mock).embeddings.create(model="text-embedding-3-small", input="a")
    assert len(first.data) == 2 and len(first.data[0].embedding) == 8
    assert first.data[0].embedding == again.data[0].embedding != first.data[1].embedding
    _, _, body = post(mock, "/v1/embeddings", {"model": "e", "input": "a", "encoding_format": "base64"})
    packed = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    assert struct.unpack("<8f", packed) == pytest.approx(first.data[0].embedding, abs=1e-6)

    assert "gpt-4o-mini" in [model.id for model in oai(mock).models.list()]
    assert "claude-opus-4-8" in [model.id for model in claude(mock).models.list()]
    with pytest.raises(openai.NotFoundError) as raised:
        oai(mock).post("/nope", cast_to=object, body={})
    assert raised.value.body["message"] == "Invalid URL (POST /v1/nope)"
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    conn.request("HEAD", "/")                 # Claude Code's connectivity probe
    response = conn.getresponse()
    assert (response.status, response.read()) == (404, b"")
    conn.close()


def test_queue_is_fifo_across_wires_then_handler(mock: MockUpstream) -> None:
    mock.enqueue({"text": "one"}, {"text": "two"})
    mock.handler = lambda request: {"text": f"handled {request.route}"}
    assert oai(mock).chat.completions.create(model="m", messages=USER).choices[0].message.content == "one"
    assert claude(mock).messages.create(model="c", max_tokens=5, messages=USER).content[0].text == "two"
    assert oai(mock).responses.create(model="m", input="x").output_text == "handled /v1/responses"


def test_handler_scripts_a_tool_conversation(mock: MockUpstream) -> None:
    def script(request):
        last = request.json["messages"][-1]["content"]
        if isinstance(last, list) and last[0].get("type") == "tool_result":
            return {"text": f"The output was {last[0]['content']}."}
        return {"tool_calls": [BASH]}

    mock.handler = script
    client = claude(mock)
    first = client.messages.create(model="c", max_tokens=100, messages=USER)
    assert first.stop_reason == "tool_use"
    tool_result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[0].id,
                                                "content": "hello"}]}
    second = client.messages.create(model="c", max_tokens=100,
                                    messages=[*USER, {"role": "assistant", "content": first.content}, tool_result])
    assert second.content[0].text == "The output was hello."


# ---------------------------------------------------------------- faults

def test_error_status_with_headers_and_raw_body(mock: MockUpstream) -> None:
    mock.enqueue({"status": 429, "headers": {"retry-after": "1"}}, {"status": 502, "body": "<html>bad gateway"})
    with pytest.raises(openai.RateLimitError) as raised:
        oai(mock).chat.completions.create(model="m", messages=USER)
    assert raised.value.response.headers["retry-after"] == "1"
    assert raised.value.body["code"] == "rate_limit_exceeded"
    status, _, body = post(mock, "/v1/chat/completions", {"model": "m", "messages": USER})
    assert (status, body) == (502, b"<html>bad gateway")


def test_slow_first_byte(mock: MockUpstream) -> None:
    mock.enqueue({"fault": "slow_first_byte", "delay": 0.3})
    start = time.monotonic()
    oai(mock).chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - start >= 0.3


def test_cut_stream_and_cut_json(mock: MockUpstream) -> None:
    mock.enqueue({"text": "abcdef", "deltas": 6, "fault": "cut_stream", "after": 2})
    _, _, body = post(mock, "/v1/chat/completions", {"model": "m", "messages": USER, "stream": True})
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in parse_sse(body)]
    assert contents == ["", "a", "b"]
    mock.enqueue({"fault": "cut_stream"})
    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
        with claude(mock).messages.stream(model="c", max_tokens=10, messages=USER) as stream:
            stream.get_final_message()
    mock.enqueue({"fault": "cut_stream"})
    with pytest.raises(openai.APIConnectionError):
        oai(mock).chat.completions.create(model="m", messages=USER)


def test_garbage_and_gzip(mock: MockUpstream) -> None:
    mock.enqueue({"fault": "garbage"})
    assert post(mock, "/v1/responses", {"model": "m", "input": "x", "stream": True})[2] == GARBAGE
    mock.enqueue({"fault": "gzip"})
    _, headers, body = post(mock, "/v1/messages", {"model": "c", "max_tokens": 5, "messages": USER, "stream": True},
                            **{"accept-encoding": "identity"})
    assert headers["content-encoding"] == "gzip"
    assert parse_sse(gzip.decompress(body))[-1][0] == "message_stop"
    mock.enqueue({"fault": "gzip"})            # httpx decodes it, so the SDK still works
    assert oai(mock).chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_error_events_in_each_wire(mock: MockUpstream) -> None:
    mock.enqueue({"fault": "error_event"})
    with pytest.raises(anthropic.APIStatusError) as raised:
        with claude(mock).messages.stream(model="c", max_tokens=10, messages=USER) as stream:
            stream.get_final_message()
    assert raised.value.body["error"]["type"] == "overloaded_error"

    mock.enqueue({"fault": "error_event", "error": {"message": "boom"}})
    with pytest.raises(openai.APIError, match="boom"):
        list(oai(mock).chat.completions.create(model="m", messages=USER, stream=True))

    mock.enqueue({"fault": "error_event"})
    events = list(oai(mock).responses.create(model="m", input="x", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "server_error"


# ---------------------------------------------------------------- connections

def test_client_disconnect_mid_stream_is_counted(mock: MockUpstream) -> None:
    mock.enqueue({"fault": "slow_stream", "interval": 0.02})
    stream = oai(mock).chat.completions.create(model="m", messages=USER, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    assert mock.wait_for_disconnect(timeout=2) and mock.disconnects == 1


def test_keep_alive_and_pipelining(mock: MockUpstream) -> None:
    client = oai(mock)
    for _ in range(3):
        client.chat.completions.create(model="m", messages=USER)
    assert mock.connections_opened == 1

    def request(text: str) -> bytes:
        payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(payload), payload))

    class Unclosable:                         # lets http.client read several responses from one stream
        def __init__(self, file: Any) -> None:
            self.file = file

        def makefile(self, *args: Any) -> "Unclosable":
            return self

        def close(self) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as sock:
        sock.sendall(request("first") + request("second"))          # both before any reply
        stream, replies = Unclosable(sock.makefile("rb")), []
        for _ in range(2):
            response = http.client.HTTPResponse(stream)  # type: ignore[arg-type]
            response.begin()
            replies.append(json.loads(response.read())["choices"][0]["message"]["content"])
        stream.file.close()
    assert replies == ["first", "second"]
    assert mock.requests[-1].connection_id == mock.requests[-2].connection_id == 2


def test_close_is_quick_with_a_stream_in_flight() -> None:
    mock = MockUpstream()
    mock.enqueue({"fault": "slow_stream", "interval": 0.5})
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            list(oai(mock).chat.completions.create(model="m", messages=USER, stream=True))
        except BaseException as exc:   # noqa: BLE001 - expected: the mock goes away
            failures.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert mock.wait_for_requests(1)
    start = time.monotonic()
    mock.close()
    assert time.monotonic() - start < 1.5
    consumer.join(timeout=5)
    assert failures and not consumer.is_alive()


def test_parse_sse_reads_the_fixtures() -> None:
    events = parse_sse((FIXTURES / "anthropic_response_stream_final_text.sse").read_bytes())
    assert events[0][0] == "message_start" and events[-1] == ("message_stop", '{"type": "message_stop"}')
    assert parse_sse(b": comment\r\ndata: a\r\ndata: b\r\n\r\nevent: x\n\n") == [(None, "a\nb")]
