"""Anthropic Messages through the gateway, driven by the official SDKs.

Three set-ups:
- the `anthropic` SDK to a Messages provider: passthrough (bytes relayed, credentials swapped);
- the `anthropic` SDK to a Chat provider: translation (Claude Code on any model);
- the `openai` SDK to a Messages provider: translation the other way.
Raw bytes are compared with http.client, everything else goes through the SDKs.
"""
import base64
import http.client
import json
import logging
import re
import secrets
import time

import anthropic
import openai
import pytest

from conftest import FIXTURES, provider_section
from mock_upstream import prompt_tokens

USER_HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
CHAT_WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
# A 1x1 transparent PNG.
PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


# ---- clients and gateways -------------------------------------------------------------------

def claude(gw, path: str = "", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url + path, api_key="sk-ant-client", max_retries=0, **kw)


def gpt(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0)


@pytest.fixture
def messages_gw(gateway_factory, mock):
    """Every model goes to `anth`, an Anthropic Messages provider: passthrough for Anthropic clients."""
    return gateway_factory(provider_section("anth", mock, "messages") + "[routes]\n* = anth\n")


@pytest.fixture
def chat_gw(gateway_factory, mock):
    """Every model goes to `oa`, an OpenAI Chat provider: Anthropic clients are translated."""
    return gateway_factory(provider_section("oa", mock, "chat") + "[routes]\n* = oa\n")


def post_raw(gw, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """POST with http.client: the status, headers and exact body bytes (chunked framing removed)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    try:
        conn.request("POST", path, data, {"content-type": "application/json", "x-api-key": "sk-ant-client",
                                          "anthropic-version": "2023-06-01", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[tuple[str | None, dict | str]]:
    """(event name, parsed data) pairs of an SSE body."""
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            text = "\n".join(data)
            events.append((name, text if text == "[DONE]" else json.loads(text)))
    return events


def chat_reply(text: str, *, prompt: int = 3, completion: int = 2) -> dict:
    """A whole chat.completion, to script a provider that answers JSON whatever it was asked."""
    return {"id": "chatcmpl-fixed", "object": "chat.completion", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def logged_usage(caplog, path: str, timeout: float = 3.0) -> tuple[int, int, int]:
    """(in, out, cache_read) of the gateway's request log line for `path` (written as the request ends)."""
    pattern = re.compile(rf"path={re.escape(path)} .* in=(\d+) out=(\d+) cache_read=(\d+)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if match := pattern.search(record.getMessage()):
                return tuple(int(group) for group in match.groups())  # type: ignore[return-value]
        time.sleep(0.02)
    raise AssertionError(f"no request log line for {path}: {[r.getMessage() for r in caplog.records]}")


# ================================================================================================
# anthropic SDK → Messages provider (passthrough)
# ================================================================================================

def test_passthrough_stream_reaches_the_client_byte_for_byte(messages_gw, mock):
    captured = (FIXTURES / "anthropic_response_stream_text_then_tool_use.sse").read_bytes()
    mock.enqueue({"body": captured, "headers": {"content-type": "text/event-stream; charset=utf-8"}})
    status, headers, body = post_raw(messages_gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 100, "stream": True, "messages": USER_HI})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body == captured


def test_passthrough_chunked_live_stream_is_byte_identical_to_the_provider_stream(messages_gw, mock, monkeypatch):
    # fixed random ids (the mock's message id) so the provider's stream can be recorded once directly
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes=None: "5eed" * 6)
    spec = {"reasoning": "Think first.", "text": "Then answer.", "interval": 0.005,
            "tool_calls": [{"id": "toolu_fixed", "name": "get_weather", "arguments": '{"city": "Nice"}'}]}
    request = {"model": "claude-opus-4-8", "max_tokens": 100, "stream": True, "messages": USER_HI}
    mock.enqueue(spec, spec)
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=20)
    conn.request("POST", "/v1/messages", json.dumps(request), {"content-type": "application/json"})
    direct = conn.getresponse().read()
    conn.close()
    status, _, relayed = post_raw(messages_gw, "/v1/messages", request)
    assert status == 200
    assert {"thinking_delta", "signature_delta", "text_delta", "input_json_delta"} <= {
        data["delta"]["type"] for name, data in sse_events(direct) if name == "content_block_delta"}
    assert relayed == direct


def test_passthrough_live_stream_relays_every_event_the_provider_sent(messages_gw, mock):
    mock.enqueue({"text": "Hello there friend", "deltas": 3, "interval": 0.01})
    status, _, body = post_raw(messages_gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 100, "stream": True, "messages": USER_HI})
    assert status == 200
    events = sse_events(body)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "ping" in names                                   # the provider's own ping is relayed too
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["Hello ", "there ", "friend"]
    # the same stream read by the SDK
    mock.enqueue({"text": "Hello there friend", "deltas": 3})
    with claude(messages_gw).messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI) as stream:
        assert "".join(stream.text_stream) == "Hello there friend"


def test_passthrough_sends_the_exact_request_body_with_unknown_fields(messages_gw, mock):
    body = (b'{"model":"claude-opus-4-8","max_tokens":100,"messages":[{"role":"user","content":"hi"}],'
            b'"context_management":{"edits":[{"type":"clear_thinking_20251015","keep":"all"}]},'
            b'"vendor_knob":{"deep":[1,2.50,null]},"output_config":{"effort":"high"}}')
    mock.enqueue({"text": "ok"})
    status, _, _ = post_raw(messages_gw, "/v1/messages", body)
    assert status == 200
    assert mock.requests[-1].body == body


def test_passthrough_sdk_extra_body_fields_arrive_untouched(messages_gw, mock):
    mock.enqueue({"text": "ok"})
    claude(messages_gw).messages.create(
        model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
        extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
                    "vendor_knob": {"deep": [1, 2]}})
    sent = mock.requests[-1].json
    assert sent["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}
    assert sent["vendor_knob"] == {"deep": [1, 2]}


def test_passthrough_forwards_anthropic_headers_and_unknown_headers(messages_gw, mock):
    mock.enqueue({"text": "ok"})
    claude(messages_gw, default_headers={"anthropic-version": "2099-01-01"}).messages.create(
        model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27",
                       "x-claude-code-session-id": "sess-123", "x-app": "cli"})
    sent = mock.requests[-1]
    assert sent.header("anthropic-beta") == "interleaved-thinking-2025-05-14,context-management-2025-06-27"
    assert [v for k, v in sent.headers if k == "anthropic-version"] == ["2099-01-01"]   # the client's, once
    assert sent.header("x-claude-code-session-id") == "sess-123"
    assert sent.header("x-app") == "cli"


@pytest.mark.parametrize("credential", ["api_key", "auth_token", "both"])
def test_passthrough_replaces_client_credentials_with_the_provider_key(messages_gw, mock, credential):
    # Claude Code sends x-api-key (ANTHROPIC_API_KEY), Authorization: Bearer (ANTHROPIC_AUTH_TOKEN), or both
    mock.enqueue({"text": "ok"})
    keys = {"api_key": {"api_key": "sk-ant-client"}, "auth_token": {"api_key": None, "auth_token": "tok-client"},
            "both": {"api_key": "sk-ant-client",
                     "default_headers": {"authorization": "Bearer tok-client"}}}[credential]
    anthropic.Anthropic(base_url=messages_gw.url, max_retries=0, **keys).messages.create(
        model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    sent = mock.requests[-1]
    assert [v for k, v in sent.headers if k == "x-api-key"] == ["sk-test-anth"]
    assert sent.header("authorization") is None
    assert "sk-ant-client" not in str(sent.headers) and "tok-client" not in str(sent.headers)


def test_beta_query_is_accepted(messages_gw, mock):
    mock.enqueue({"text": "beta ok"})
    message = claude(messages_gw).beta.messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
                                                       betas=["context-management-2025-06-27"])
    assert message.content[0].text == "beta ok"
    sent = mock.requests[-1]
    assert sent.route == "/v1/messages"
    assert sent.header("anthropic-beta") == "context-management-2025-06-27"


def test_anthropic_prefixed_path_works(messages_gw, mock):
    mock.enqueue({"text": "prefixed"})
    message = claude(messages_gw, "/anthropic").messages.create(model="claude-opus-4-8", max_tokens=100,
                                                                 messages=USER_HI)
    assert message.content[0].text == "prefixed"
    assert mock.requests[-1].route == "/v1/messages"
    mock.enqueue({"text": "prefixed stream"})
    with claude(messages_gw, "/anthropic").messages.stream(model="claude-opus-4-8", max_tokens=100,
                                                           messages=USER_HI) as stream:
        assert stream.get_final_text() == "prefixed stream"


def test_passthrough_usage_reaches_the_client_and_the_gateway_log(messages_gw, mock, caplog):
    caplog.set_level(logging.INFO, logger="tokligence")
    mock.enqueue({"text": "counted", "usage": {"input": 11, "output": 7, "cached": 5, "cache_creation": 2}})
    with claude(messages_gw).messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI) as stream:
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (5, 2)
    assert logged_usage(caplog, "/v1/messages") == (11, 7, 5)


def test_passthrough_non_stream_usage_is_read(messages_gw, mock, caplog):
    caplog.set_level(logging.INFO, logger="tokligence")
    mock.enqueue({"text": "counted", "usage": {"input": 21, "output": 4}})
    message = claude(messages_gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 4)
    assert logged_usage(caplog, "/v1/messages") == (21, 4, 0)


def test_passthrough_provider_errors_keep_their_status_and_body(messages_gw, mock):
    mock.enqueue({"status": 529, "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(anthropic.InternalServerError) as caught:
        claude(messages_gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    assert caught.value.status_code == 529
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_count_tokens_is_forwarded_to_a_messages_provider(messages_gw, mock):
    counted = claude(messages_gw).messages.count_tokens(
        model="claude-opus-4-8", system="You are terse.", messages=[{"role": "user", "content": "x" * 400}])
    sent = mock.requests[-1]
    assert sent.route == "/v1/messages/count_tokens"
    assert sent.header("x-api-key") == "sk-test-anth"
    assert sent.json["system"] == "You are terse."
    assert counted.input_tokens == prompt_tokens(sent.json)      # the provider's own count, relayed


# ================================================================================================
# anthropic SDK → Chat provider (translation)
# ================================================================================================

def test_text_answer_is_translated_both_ways(chat_gw, mock):
    mock.enqueue({"text": "Bonjour", "usage": {"input": 9, "output": 2}})
    message = claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=256, system="Be brief.",
                                              messages=USER_HI, stop_sequences=["END"])
    assert message.type == "message" and message.role == "assistant"
    assert [(b.type, b.text) for b in message.content] == [("text", "Bonjour")]
    assert message.stop_reason == "end_turn" and message.model == "claude-opus-4-8"
    assert message.id.startswith("msg_")
    sent = mock.requests[-1]
    assert sent.route == "/v1/chat/completions"
    assert sent.header("authorization") == "Bearer sk-test-oa" and sent.header("x-api-key") is None
    assert sent.header("anthropic-version") is None and "sk-ant-client" not in str(sent.headers)
    assert sent.json["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert sent.json["max_tokens"] == 256 and sent.json["stop"] == ["END"]
    assert sent.json.get("stream") is not True


def test_streamed_text_answer_reads_like_anthropic(chat_gw, mock):
    mock.enqueue({"text": "one two three", "deltas": 3, "usage": {"input": 4, "output": 3}})
    with claude(chat_gw).messages.stream(model="claude-opus-4-8", max_tokens=256, messages=USER_HI) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "one two three" and len(texts) == 3
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 3)
    sent = mock.requests[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_streamed_events_follow_the_anthropic_sequence(chat_gw, mock):
    mock.enqueue({"text": "hey", "deltas": 1})
    status, headers, body = post_raw(chat_gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 50, "stream": True, "messages": USER_HI})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert [name for name, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                            "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)     # every event has its `event:` line
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "hey"}


def test_tool_round_trip_streams_input_json_and_sends_the_result_as_a_tool_message(chat_gw, mock):
    client = claude(chat_gw)
    mock.enqueue({"tool_calls": [{"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
                  "deltas": 3})
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.messages.stream(model="claude-opus-4-8", max_tokens=256, tools=[WEATHER_TOOL],
                                messages=[question]) as stream:
        events = list(stream)
        first = stream.get_final_message()
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, b.id, b.name, b.input) for b in starts] == [("tool_use", "call_w1", "get_weather", {})]
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert first.stop_reason == "tool_use"
    assert [(b.type, b.input) for b in first.content] == [("tool_use", {"city": "Paris"})]
    sent = mock.requests[-1].json
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_TOOL["input_schema"]}}]

    mock.enqueue({"text": "It is sunny."})
    answer = client.messages.create(model="claude-opus-4-8", max_tokens=256, tools=[WEATHER_TOOL], messages=[
        question, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_w1", "content": "sunny, 24C"},
                                     {"type": "text", "text": "and tomorrow?"}]}])
    assert answer.content[0].text == "It is sunny."
    history = mock.requests[-1].json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "user"]
    assert history[1]["tool_calls"] == [{"id": "call_w1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert history[2] == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 24C"}
    assert history[3] == {"role": "user", "content": "and tomorrow?"}


def test_parallel_tool_calls_become_tool_use_blocks_and_results_become_tool_messages(chat_gw, mock):
    client = claude(chat_gw)
    mock.enqueue({"text": "Checking both.",
                  "tool_calls": [{"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                                 {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'}]})
    question = {"role": "user", "content": "Paris and Rome?"}
    with client.messages.stream(model="claude-opus-4-8", max_tokens=256, tools=[WEATHER_TOOL],
                                messages=[question]) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["text", "tool_use", "tool_use"]
    assert [(b.id, b.input) for b in first.content[1:]] == [("call_a", {"city": "Paris"}),
                                                            ("call_b", {"city": "Rome"})]
    assert first.stop_reason == "tool_use"

    mock.enqueue({"text": "Both sunny."})
    client.messages.create(model="claude-opus-4-8", max_tokens=256, tools=[WEATHER_TOOL], messages=[
        question, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": [{"type": "text", "text": "18C"}]},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "25C", "is_error": False}]}])
    history = mock.requests[-1].json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool"]
    assert history[1]["content"] == "Checking both."
    assert [c["id"] for c in history[1]["tool_calls"]] == ["call_a", "call_b"]
    assert [(m["tool_call_id"], m["content"]) for m in history[2:]] == [("call_a", "18C"), ("call_b", "25C")]


@pytest.mark.parametrize("choice, expected", [
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
])
def test_tool_choice_is_translated(chat_gw, mock, choice, expected):
    mock.enqueue({"text": "ok"})
    claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
                                    tools=[WEATHER_TOOL], tool_choice=choice)
    sent = mock.requests[-1].json
    assert {key: sent.get(key) for key in expected} == expected


def test_claude_code_sized_max_tokens_are_clamped_for_a_chat_provider(gateway_factory, mock):
    # Claude Code asks for max_tokens 64000; most chat models reject more than their own cap
    gw = gateway_factory(provider_section("oa", mock, "chat", extra="max_output_tokens = 8192")
                         + "[routes]\n* = oa\n")
    mock.enqueue({"text": "ok"})
    claude(gw).messages.create(model="claude-opus-4-8", max_tokens=64000, messages=USER_HI, timeout=30)
    assert mock.requests[-1].json["max_tokens"] == 8192


def test_thinking_request_sets_reasoning_effort_unless_the_provider_declines_it(gateway_factory, mock):
    gw = gateway_factory(provider_section("oa", mock, "chat")
                         + provider_section("plain", mock, "chat", extra="reasoning = false")
                         + "[routes]\nplain-* = plain\n* = oa\n")
    ask = {"max_tokens": 20000, "messages": USER_HI, "thinking": {"type": "adaptive"},
           "output_config": {"effort": "high"}}
    mock.enqueue({"text": "ok"}, {"text": "ok"})
    claude(gw).messages.create(model="claude-opus-4-8", **ask)
    assert mock.requests[-1].json["reasoning_effort"] == "high"
    claude(gw).messages.create(model="plain-model", **ask)
    assert "reasoning_effort" not in mock.requests[-1].json


def test_reasoning_content_becomes_a_thinking_block(chat_gw, mock):
    mock.enqueue({"reasoning": "Let me think about it.", "text": "42", "deltas": 2})
    with claude(chat_gw).messages.stream(model="claude-opus-4-8", max_tokens=2048, messages=USER_HI,
                                         thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think about it." and final.content[1].text == "42"
    assert any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)
    assert mock.requests[-1].json["reasoning_effort"] == "low"       # budget 1024 → the low effort

    mock.enqueue({"reasoning": "Hmm.", "text": "43"})
    message = claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=2048, messages=USER_HI)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "Hmm."), ("text", "43")]


def test_images_are_sent_as_data_urls(chat_gw, mock):
    mock.enqueue({"text": "a pixel"})
    claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_BASE64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is this?"}]}])
    content = mock.requests[-1].json["messages"][0]["content"]
    assert content == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is this?"}]
    assert base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])[:4] == b"\x89PNG"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("finish, stop_reason", [("stop", "end_turn"), ("length", "max_tokens"),
                                                 ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_finish_reasons_become_anthropic_stop_reasons(chat_gw, mock, finish, stop_reason, stream):
    spec = {"text": "partial", "finish": finish}
    if finish == "tool_calls":
        spec["tool_calls"] = [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    mock.enqueue(spec)
    client = claude(chat_gw)
    if stream:
        with client.messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
                                    tools=[WEATHER_TOOL]) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI,
                                         tools=[WEATHER_TOOL])
    assert message.stop_reason == stop_reason


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_usage_counts_cached_prompt_tokens_apart(chat_gw, mock, stream, caplog):
    caplog.set_level(logging.INFO, logger="tokligence")
    # chat: prompt_tokens 100 of which 60 cached → Anthropic: 40 uncached input, 60 cache reads
    mock.enqueue({"text": "cached", "usage": {"input": 40, "cached": 60, "output": 8}})
    client = claude(chat_gw)
    if stream:
        with client.messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI) as events:
            usage = events.get_final_message().usage
    else:
        usage = client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (40, 60, 8)
    assert not usage.cache_creation_input_tokens
    assert logged_usage(caplog, "/v1/messages") == (40, 8, 60)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status, error_class, error_type", [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
])
def test_provider_errors_become_anthropic_errors(chat_gw, mock, status, error_class, error_type, stream):
    mock.enqueue({"status": status, "error": {"message": f"upstream says {status}"}})
    client = claude(chat_gw)
    with pytest.raises(error_class) as caught:
        if stream:
            with client.messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI) as events:
                events.get_final_message()
        else:
            client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    assert caught.value.status_code == status
    assert caught.value.body == {"type": "error", "error": {"type": error_type, "message": f"upstream says {status}"}}


def test_provider_rate_limit_keeps_retry_after(chat_gw, mock):
    mock.enqueue({"status": 429, "headers": {"retry-after": "7"}})
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    assert caught.value.response.headers.get("retry-after") == "7"


def test_invalid_request_is_a_bad_request_in_anthropic_shape(chat_gw, mock):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(chat_gw).messages.create(model="claude-opus-4-8", max_tokens=100,
                                        messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "messages.0.role" in caught.value.body["error"]["message"]
    assert mock.requests == []


def test_count_tokens_is_estimated_locally_for_a_chat_provider(chat_gw, mock):
    client = claude(chat_gw)
    short = client.messages.count_tokens(model="claude-opus-4-8", messages=USER_HI)
    long = client.messages.count_tokens(model="claude-opus-4-8", system="You are a careful assistant.",
                                        tools=[WEATHER_TOOL],
                                        messages=[{"role": "user", "content": "word " * 700}])
    assert 0 < short.input_tokens < 20
    assert 700 < long.input_tokens < 2000
    beta = client.beta.messages.count_tokens(model="claude-opus-4-8", messages=USER_HI)   # ?beta=true
    assert beta.input_tokens == short.input_tokens
    assert mock.requests == []


def test_mid_stream_provider_failure_becomes_an_error_event(chat_gw, mock):
    mock.enqueue({"text": "aaaabbbbccccdddd", "deltas": 4, "fault": "error_event", "after": 2})
    status, _, body = post_raw(chat_gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 50, "stream": True, "messages": USER_HI})
    assert status == 200
    events = sse_events(body)
    assert events[-1][0] == "error"
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "aaaabbbb"
    assert not any(name == "message_stop" for name, _ in events)

    mock.enqueue({"text": "aaaabbbbccccdddd", "deltas": 4, "fault": "error_event", "after": 2})
    with pytest.raises(anthropic.APIStatusError) as caught:
        with claude(chat_gw).messages.stream(model="claude-opus-4-8", max_tokens=50, messages=USER_HI) as stream:
            stream.get_final_message()
    assert caught.value.body["error"]["type"] == "api_error"


def test_provider_cutting_the_stream_becomes_an_error_event(chat_gw, mock):
    mock.enqueue({"text": "one two three", "deltas": 3, "fault": "cut_stream", "after": 1})
    status, _, body = post_raw(chat_gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 50, "stream": True, "messages": USER_HI})
    assert status == 200
    events = sse_events(body)
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert not any(name == "message_stop" for name, _ in events)


def slow_ping_gateway(gateway_factory, mock):
    return gateway_factory("[gateway]\nping_interval = 0.05\n" + provider_section("oa", mock, "chat")
                           + "[routes]\n* = oa\n")


def test_pings_keep_the_client_alive_while_the_provider_is_silent(gateway_factory, mock):
    gw = slow_ping_gateway(gateway_factory, mock)
    mock.enqueue({"text": "slow answer", "deltas": 1, "interval": 0.3})     # 0.3 s between upstream chunks
    status, _, body = post_raw(gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 50, "stream": True, "messages": USER_HI})
    assert status == 200
    events = sse_events(body)
    names = [name for name, _ in events]
    pings = [data for name, data in events if name == "ping"]
    assert len(pings) >= 2 and all(data == {"type": "ping"} for data in pings)
    assert names[0] == "message_start" and "message_stop" in names
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "slow answer"
    mock.enqueue({"text": "slow answer", "deltas": 1, "interval": 0.15})
    with claude(gw).messages.stream(model="claude-opus-4-8", max_tokens=50, messages=USER_HI) as stream:
        assert stream.get_final_text() == "slow answer"


def test_nothing_follows_message_stop_while_the_provider_lingers(gateway_factory, mock):
    # the chat provider sends its usage chunk, then [DONE] 0.3 s later: the Anthropic stream is complete
    # at the usage chunk, and no ping may follow message_stop
    gw = slow_ping_gateway(gateway_factory, mock)
    mock.enqueue({"text": "slow answer", "deltas": 1, "interval": 0.3})
    _, _, body = post_raw(gw, "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 50, "stream": True, "messages": USER_HI})
    names = [name for name, _ in sse_events(body)]
    assert names[-1] == "message_stop", names[names.index("message_stop"):]


def test_system_messages_inside_messages_join_the_chat_system_prompt(chat_gw, mock):
    mock.enqueue({"text": "ok"})
    claude(chat_gw).messages.create(
        model="claude-opus-4-8", max_tokens=100,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.c40; cc_entrypoint=cli;"},
                {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "run echo hello",
                                                "cache_control": {"type": "ephemeral"}}]},
                  {"role": "system", "content": "<system-reminder>today is Friday</system-reminder>"}])
    sent = mock.requests[-1].json["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert "You are Claude Code." in sent[0]["content"]
    assert "<system-reminder>today is Friday</system-reminder>" in sent[0]["content"]
    assert "x-anthropic-billing-header" not in json.dumps(sent)
    assert sent[1]["content"] == "run echo hello"


def test_claude_code_first_request_is_translated(chat_gw, mock):
    body = json.loads((FIXTURES / "claude_code_full_request_turn1.json").read_text())["body"]
    mock.enqueue({"text": "hello"})
    status, _, raw = post_raw(chat_gw, "/v1/messages?beta=true", body)
    assert status == 200, raw
    assert "".join(d["delta"]["text"] for n, d in sse_events(raw) if n == "content_block_delta") == "hello"
    sent = mock.requests[-1].json
    assert sent["messages"][0]["role"] == "system"
    assert {tool["function"]["name"] for tool in sent["tools"]} >= {"Bash", "Read", "Edit"}


def test_models_list_has_anthropic_shape_for_anthropic_clients(gateway_factory, mock):
    gw = gateway_factory(provider_section("oa", mock, "chat", extra="models = gpt-x, deepseek-y")
                         + "[aliases]\nclaude-sonnet = gpt-x\n")
    models = list(claude(gw).models.list())
    assert [m.id for m in models] == ["gpt-x", "deepseek-y", "claude-sonnet"]
    assert all(m.type == "model" and m.display_name == m.id and m.created_at.year >= 2024 for m in models)
    page = claude(gw).models.list()
    assert page.has_more is False and page.first_id == "gpt-x" and page.last_id == "claude-sonnet"
    assert [m.id for m in gpt(gw).models.list()] == ["gpt-x", "deepseek-y", "claude-sonnet"]   # OpenAI shape
    assert mock.requests == []


def test_stream_request_answered_with_json_is_replayed_as_a_stream(chat_gw, mock):
    mock.enqueue({"body": chat_reply("whole answer", prompt=6, completion=2)})   # JSON despite stream: true
    with claude(chat_gw).messages.stream(model="claude-opus-4-8", max_tokens=100, messages=USER_HI) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "whole answer"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 2
    assert mock.requests[-1].json["stream"] is True


def test_non_stream_request_gets_a_whole_message(chat_gw, mock):
    # Claude Code falls back to stream: false when a stream fails; that must work on its own
    mock.enqueue({"text": "fallback answer", "tool_calls": [{"id": "call_z", "name": "get_weather",
                                                             "arguments": '{"city": "Lima"}'}]})
    status, headers, raw = post_raw(chat_gw, "/v1/messages?beta=true", {
        "model": "claude-opus-4-8", "max_tokens": 100, "stream": False, "tools": [WEATHER_TOOL],
        "messages": USER_HI})
    assert status == 200 and headers["content-type"].startswith("application/json")
    message = json.loads(raw)
    assert message["type"] == "message" and message["stop_reason"] == "tool_use"
    assert message["content"] == [{"type": "text", "text": "fallback answer"},
                                  {"type": "tool_use", "id": "call_z", "name": "get_weather",
                                   "input": {"city": "Lima"}}]
    assert set(message["usage"]) >= {"input_tokens", "output_tokens"}
    assert mock.requests[-1].json.get("stream") is not True


def test_unroutable_model_is_a_not_found_error_in_anthropic_shape(gateway_factory, mock):
    gw = gateway_factory(provider_section("oa", mock, "chat") + "[routes]\ngpt* = oa\n")
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude(gw).messages.create(model="claude-opus-4-8", max_tokens=100, messages=USER_HI)
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert mock.requests == []


# ================================================================================================
# openai SDK → Messages provider (translation)
# ================================================================================================

def test_chat_client_gets_a_text_answer_from_a_messages_provider(messages_gw, mock):
    mock.enqueue({"text": "Hi from Claude", "usage": {"input": 12, "output": 4, "cached": 3}})
    reply = gpt(messages_gw).chat.completions.create(model="claude-opus-4-8", messages=[
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hi from Claude"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (15, 4)
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    sent = mock.requests[-1]
    assert sent.route == "/v1/messages"
    assert sent.header("x-api-key") == "sk-test-anth" and sent.header("authorization") is None
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.json["system"] == "Be kind."
    assert sent.json["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_chat_stream_tool_calls_are_indexed_from_zero(messages_gw, mock):
    mock.enqueue({"text": "Let me check.",
                  "tool_calls": [{"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                                 {"id": "toolu_2", "name": "get_weather", "arguments": '{"city": "Rome"}'}],
                  "deltas": 3})
    chunks = list(gpt(messages_gw).chat.completions.create(
        model="claude-opus-4-8", messages=[{"role": "user", "content": "?"}], tools=[CHAT_WEATHER_TOOL],
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "args": ""})
            entry["args"] += call.function.arguments or ""
    assert text == "Let me check."
    assert sorted(calls) == [0, 1]
    assert [(c["id"], c["name"], json.loads(c["args"])) for c in calls.values()] == [
        ("toolu_1", "get_weather", {"city": "Paris"}), ("toolu_2", "get_weather", {"city": "Rome"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    sent = mock.requests[-1].json
    assert sent["stream"] is True
    assert sent["tools"] == [{"name": "get_weather", "input_schema": CHAT_WEATHER_TOOL["function"]["parameters"]}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("finish, finish_reason", [("end_turn", "stop"), ("max_tokens", "length"),
                                                   ("tool_use", "tool_calls"), ("stop_sequence", "stop")])
def test_chat_finish_reasons_from_anthropic_stop_reasons(messages_gw, mock, finish, finish_reason, stream):
    spec = {"text": "x", "finish": finish}
    if finish == "tool_use":
        spec["tool_calls"] = [{"name": "get_weather", "arguments": "{}"}]
    mock.enqueue(spec)
    client = gpt(messages_gw)
    kwargs = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "?"}], "tools": [CHAT_WEATHER_TOOL]}
    if stream:
        reasons = [c.choices[0].finish_reason for c in client.chat.completions.create(stream=True, **kwargs)
                   if c.choices and c.choices[0].finish_reason]
        assert reasons == [finish_reason]
    else:
        assert client.chat.completions.create(**kwargs).choices[0].finish_reason == finish_reason


def test_chat_stream_usage_chunk_only_when_asked(messages_gw, mock):
    client = gpt(messages_gw)
    mock.enqueue({"text": "a b", "usage": {"input": 10, "output": 2, "cached": 4}})
    plain = list(client.chat.completions.create(model="claude-opus-4-8", stream=True,
                                                messages=[{"role": "user", "content": "?"}]))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "a b"

    mock.enqueue({"text": "a b", "usage": {"input": 10, "output": 2, "cached": 4}})
    counted = list(client.chat.completions.create(model="claude-opus-4-8", stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "?"}]))
    assert counted[-1].choices == []
    usage = counted[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (14, 2, 16)
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert all(c.usage is None for c in counted[:-1])


def test_max_tokens_defaulted_and_clamped_to_the_provider_cap(gateway_factory, mock):
    gw = gateway_factory(provider_section("anth", mock, "messages",
                                          extra="max_output_tokens = 1000\ndefault_max_tokens = 500")
                         + "[routes]\n* = anth\n")
    client = gpt(gw)
    ask = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "?"}]}
    for extra, expected in [({}, 500), ({"max_tokens": 5000}, 1000), ({"max_completion_tokens": 300}, 300),
                            ({"max_completion_tokens": 4000}, 1000)]:
        mock.enqueue({"text": "ok"})
        client.chat.completions.create(**ask, **extra)
        assert mock.requests[-1].json["max_tokens"] == expected, extra


def test_max_tokens_defaults_to_8192_for_a_messages_provider(messages_gw, mock):
    mock.enqueue({"text": "ok"})
    gpt(messages_gw).chat.completions.create(model="claude-opus-4-8", messages=[{"role": "user", "content": "?"}])
    assert mock.requests[-1].json["max_tokens"] == 8192


def test_consecutive_tool_messages_become_one_user_turn_of_tool_results(messages_gw, mock):
    mock.enqueue({"text": "Paris 18C, Rome 25C."})
    gpt(messages_gw).chat.completions.create(model="claude-opus-4-8", tools=[CHAT_WEATHER_TOOL], messages=[
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "25C"},
        {"role": "user", "content": "Summarise."}])
    history = mock.requests[-1].json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == [
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Rome"}}]
    assert history[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "18C"}]},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": [{"type": "text", "text": "25C"}]},
        {"type": "text", "text": "Summarise."}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_signed_thinking_is_restored_on_the_next_turn(messages_gw, mock, stream):
    client = gpt(messages_gw)
    call_id = f"toolu_think_{int(stream)}"
    mock.enqueue({"reasoning": "I should look it up.", "signature": "sig-Abc123==",
                  "tool_calls": [{"id": call_id, "name": "get_weather", "arguments": '{"city": "Oslo"}'}]})
    ask = {"model": "claude-opus-4-8", "tools": [CHAT_WEATHER_TOOL], "reasoning_effort": "high"}
    question = {"role": "user", "content": "Oslo?"}
    if stream:
        chunks = list(client.chat.completions.create(messages=[question], stream=True, **ask))
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(messages=[question], **ask)
        reasoning = reply.choices[0].message.reasoning_content
        assert reply.choices[0].message.tool_calls[0].id == call_id
    assert reasoning == "I should look it up."              # thinking surfaced as reasoning_content
    first = mock.requests[-1].json
    assert first["thinking"]["type"] == "enabled" and first["thinking"]["budget_tokens"] < first["max_tokens"]

    mock.enqueue({"text": "Cold."})
    client.chat.completions.create(messages=[
        question,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "-3C"}], **ask)
    second = mock.requests[-1].json
    assistant = second["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"][0] == {"type": "thinking", "thinking": "I should look it up.",
                                       "signature": "sig-Abc123=="}
    assert assistant["content"][1]["type"] == "tool_use" and assistant["content"][1]["id"] == call_id
    assert second["thinking"]["type"] == "enabled"           # thinking stays on across the tool loop


def test_chat_client_errors_from_a_messages_provider_keep_their_class(messages_gw, mock):
    mock.enqueue({"status": 429, "error": {"type": "rate_limit_error", "message": "slow down"}})
    with pytest.raises(openai.RateLimitError) as caught:
        gpt(messages_gw).chat.completions.create(model="claude-opus-4-8", messages=[{"role": "user", "content": "?"}])
    assert caught.value.body["message"] == "slow down"
    mock.enqueue({"status": 529})
    with pytest.raises(openai.APIStatusError) as caught:
        gpt(messages_gw).chat.completions.create(model="claude-opus-4-8", messages=[{"role": "user", "content": "?"}])
    assert caught.value.status_code == 529
