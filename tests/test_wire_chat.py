import json
import time
from pathlib import Path

import pytest

from conftest import assert_neutral_stream
from tokligence import *  # noqa: E402,F403
from tokligence import CUSTOM_TOOL_INPUT  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"captured client traffic not found at {FIXTURES}")

PROFILE = UpstreamProfile()


def chunk(delta=None, finish=None, usage=None, id="chatcmpl-up", model="up-model", choices=True):
    body = {"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
            if choices else []}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def decode(datas, close=False):
    decoder = ChatStreamDecoder()
    events = [event for data in datas for event in decoder.feed(None, data)]
    return events + (decoder.close() if close else [])


def sse_datas(raw: bytes) -> list[str]:
    """The data payloads of an SSE body, asserting chat's framing (no event: lines)."""
    datas = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            assert frame.startswith("data: ") and "\n" not in frame
            datas.append(frame[len("data: "):])
    return datas


def encode(events, include_usage=True, id="chatcmpl-x", model="gpt-test"):
    encoder = ChatStreamEncoder(model, include_usage, id=id, created=1700000000)
    return b"".join(encoder.feed(event) for event in events)


def collect(events) -> Reply:
    collector = ReplyCollector()
    for event in events:
        collector.feed(event)
    return collector.reply


# ---- parse_request ---------------------------------------------------------------------------
def test_system_and_developer_messages_become_system_prompt_in_order():
    conv = chat_parse_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert conv.system == ["be brief", "a", "b"]
    assert conv.messages == [Message("user", [Text("hi")])]


def test_sampling_and_output_fields_are_parsed():
    conv = chat_parse_request({
        "model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 50, "max_completion_tokens": 100, "temperature": 1, "top_p": 0.5, "stop": "END",
        "stream": True, "stream_options": {"include_usage": True}, "reasoning_effort": "high",
        "user": "u-1", "parallel_tool_calls": False, "n": 1, "unknown_field": {"ignored": True},
    })
    assert conv.model == "gpt-4o"
    assert conv.max_tokens == 100   # max_completion_tokens wins over the deprecated max_tokens
    assert conv.temperature == 1.0 and isinstance(conv.temperature, float)
    assert conv.top_p == 0.5
    assert conv.stop == ["END"]
    assert conv.stream and conv.include_usage
    assert conv.reasoning_effort == "high" and conv.user == "u-1"
    assert conv.parallel_tool_calls is False


def test_legacy_max_tokens_and_stop_list():
    conv = chat_parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                               "max_tokens": 7, "stop": ["a", "b"]})
    assert conv.max_tokens == 7 and conv.stop == ["a", "b"]
    assert not conv.stream and not conv.include_usage


def test_user_images_from_data_urls_and_http_urls():
    conv = chat_parse_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
    ]}]})
    assert conv.messages[0].parts == [Text("what is this?"), Image(data="iVBORw0KGgo=", media_type="image/png"),
                                      Image(url="https://example.com/cat.jpg")]


def test_assistant_history_keeps_reasoning_text_refusal_and_tool_calls_in_order():
    conv = chat_parse_request({"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "think first", "refusal": "no",
         "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{\"p\":1}"}},
             {"id": "call_2", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}},
         ]},
    ]})
    assert conv.messages[1] == Message("assistant", [
        Thinking("think first"), Text("Checking."), Refusal("no"),
        ToolCall("call_1", "ls", "{\"p\":1}"), ToolCall("call_2", "apply_patch", "*** Begin", custom=True)])


def test_assistant_null_content_with_tool_calls_has_only_the_calls():
    conv = chat_parse_request({"model": "m", "messages": [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}]})
    assert conv.messages[0].parts == [ToolCall("c", "f", "")]


def test_consecutive_tool_messages_merge_into_one_user_turn_followed_by_user_text():
    conv = chat_parse_request({"model": "m", "messages": [
        {"role": "user", "content": "run both"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "custom", "custom": {"name": "g", "input": "x"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "A out"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "B out"}]},
        {"role": "user", "content": "thanks, now summarize"},
        {"role": "user", "content": "separately"},
    ]})
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "user"]
    assert conv.messages[2].parts == [ToolResult("a", [Text("A out")]),
                                      ToolResult("b", [Text("B out")], custom=True),
                                      Text("thanks, now summarize")]
    assert conv.messages[3].parts == [Text("separately")]


def test_tools_and_tool_choice_forms():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                                          "strict": True}},
        {"type": "function", "function": {"name": "no_params"}},
        {"type": "custom", "custom": {"name": "apply_patch", "description": "Patch",
                                      "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": "x"}}}},
    ]}
    conv = chat_parse_request({**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    weather, no_params, patch = conv.tools
    assert weather == Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    assert no_params.parameters == {"type": "object", "properties": {}}
    assert patch.custom and patch.format["type"] == "grammar" and patch.description == "Patch"
    assert (conv.tool_choice, conv.tool_choice_name) == ("tool", "get_weather")
    for choice in ("auto", "none", "required"):
        assert chat_parse_request({**body, "tool_choice": choice}).tool_choice == choice
    custom_choice = chat_parse_request({**body, "tool_choice": {"type": "custom", "custom": {"name": "apply_patch"}}})
    assert (custom_choice.tool_choice, custom_choice.tool_choice_name) == ("tool", "apply_patch")


def test_response_format_variants_are_flattened():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    assert chat_parse_request({**base, "response_format": {"type": "json_schema", "json_schema": {
        "name": "title", "schema": schema, "strict": True}}}).response_format == {
        "type": "json_schema", "name": "title", "schema": schema, "strict": True}
    assert chat_parse_request({**base, "response_format": {"type": "json_object"}}).response_format == {
        "type": "json_object"}
    assert chat_parse_request({**base, "response_format": {"type": "text"}}).response_format is None


def _user(content="x"):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("body, param, words", [
    ([], None, "JSON object"),
    ({"messages": _user()}, "model", "Missing required parameter: \'model\'"),
    ({"model": 4, "messages": _user()}, "model", "expected a string"),
    ({"model": "m"}, "messages", "Missing required parameter: \'messages\'"),
    ({"model": "m", "messages": "hi"}, "messages", "expected an array"),
    ({"model": "m", "messages": []}, "messages", "non-empty"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "Missing required parameter"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "'bot'"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "Missing required parameter"),
    ({"model": "m", "messages": _user(5)}, "messages[0].content", "string or an array"),
    ({"model": "m", "messages": _user([{"type": "input_audio", "input_audio": {}}])},
     "messages[0].content[0].type", "'input_audio' is not supported"),
    ({"model": "m", "messages": _user([{"type": "text"}])}, "messages[0].content[0].text", "Missing required parameter"),
    ({"model": "m", "messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}])},
     "messages[0].content[0].image_url.url", "base64 data URL"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "Missing required parameter"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages[0].tool_calls[0].function", "Missing required parameter"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[0].tool_calls[0].function.arguments", "expected a string"),
    ({"model": "m", "messages": _user(), "tools": [{"type": "web_search"}]}, "tools[0].type", "'function' or 'custom'"),
    ({"model": "m", "messages": _user(), "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name", "Missing required parameter"),
    ({"model": "m", "messages": _user(), "tool_choice": "always"}, "tool_choice", "tool_choice must be"),
    ({"model": "m", "messages": _user(), "temperature": "hot"}, "temperature", "expected a number"),
    ({"model": "m", "messages": _user(), "max_tokens": True}, "max_tokens", "expected an integer"),
    ({"model": "m", "messages": _user(), "max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({"model": "m", "messages": _user(), "stop": [1, 2]}, "stop", "array of strings"),
    ({"model": "m", "messages": _user(), "stream": "yes"}, "stream", "expected a boolean"),
    ({"model": "m", "messages": _user(), "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "expected a boolean"),
    ({"model": "m", "messages": _user(), "response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"model": "m", "messages": _user(), "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "Missing required parameter"),
])
def test_malformed_request_bodies_raise_400_naming_the_field(body, param, words):
    with pytest.raises(GatewayError) as caught:
        chat_parse_request(body)
    err = caught.value
    assert (err.status, err.kind, err.param) == (400, "invalid_request", param)
    assert words in err.message


# ---- render_request --------------------------------------------------------------------------
def test_tool_results_are_sent_as_tool_messages_before_the_user_text_of_that_turn():
    conv = Conversation("m", messages=[
        Message("user", [Text("do it")]),
        Message("assistant", [Text("ok"), ToolCall("a", "f", "{}"), ToolCall("b", "g", "")]),
        Message("user", [Text("also this"), ToolResult("a", [Text("A1"), Text("A2")]), ToolResult("b", [Text("B")])]),
    ])
    messages = chat_render_request(conv, PROFILE)["messages"]
    assert messages == [
        {"role": "user", "content": "do it"},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "A1\n\nA2"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "user", "content": "also this"},
    ]


def test_tool_result_images_follow_the_tool_messages_in_a_user_message():
    conv = Conversation("m", messages=[
        Message("assistant", [ToolCall("s", "screenshot", "{}")]),
        Message("user", [ToolResult("s", [Text("captured"), Image(data="QUJD", media_type="image/png")]),
                         Text("what do you see?")]),
    ])
    messages = chat_render_request(conv, PROFILE)["messages"]
    assert messages[0] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "s", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]}
    assert messages[1] == {"role": "tool", "tool_call_id": "s", "content": "captured"}
    assert messages[2] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
        {"type": "text", "text": "what do you see?"}]}
    assert len(messages) == 3


def test_thinking_is_dropped_and_refusal_is_kept_on_assistant_turns():
    conv = Conversation("m", system=["s1", "s2"], messages=[
        Message("user", [Text("q")]),
        Message("assistant", [Thinking("hmm", signature="sig"), Refusal("I can't help with that.")]),
        Message("assistant", [Thinking("only thoughts")]),
    ])
    messages = chat_render_request(conv, PROFILE)["messages"]
    assert messages[0] == {"role": "system", "content": "s1\n\ns2"}
    assert messages[2] == {"role": "assistant", "content": "", "refusal": "I can't help with that."}
    assert messages[3] == {"role": "assistant", "content": ""}
    assert "reasoning_content" not in json.dumps(messages)


def test_max_tokens_is_clamped_and_written_under_the_profile_field():
    conv = Conversation("m", messages=[Message("user", [Text("x")])], max_tokens=50_000)
    body = chat_render_request(conv, UpstreamProfile(max_output_tokens=8192, token_field="max_completion_tokens"))
    assert body["max_completion_tokens"] == 8192 and "max_tokens" not in body
    conv.max_tokens = 100
    assert chat_render_request(conv, UpstreamProfile(max_output_tokens=8192))["max_tokens"] == 100
    conv.max_tokens = None
    assert "max_tokens" not in chat_render_request(conv, PROFILE)


def test_tool_choice_and_parallel_tool_calls_are_sent_only_with_tools():
    conv = Conversation("m", messages=[Message("user", [Text("x")])], tool_choice="tool",
                        tool_choice_name="f", parallel_tool_calls=False)
    body = chat_render_request(conv, PROFILE)
    assert "tool_choice" not in body and "parallel_tool_calls" not in body and "tools" not in body
    conv.tools = [Tool("f", "does f")]
    body = chat_render_request(conv, PROFILE)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "does f", "parameters": {"type": "object", "properties": {}}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False
    conv.tool_choice, conv.parallel_tool_calls = "required", None
    body = chat_render_request(conv, PROFILE)
    assert body["tool_choice"] == "required" and "parallel_tool_calls" not in body


def test_schema_keys_are_dropped_recursively_but_property_names_and_values_survive():
    schema = {"$schema": "x", "type": "object", "additionalProperties": False, "properties": {
        "format": {"type": "string", "format": "uri"},
        "items": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                             "properties": {"id": {"type": "string", "format": "uuid"}}}},
        "mode": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}],
                 "default": {"format": "kept"}}}}
    conv = Conversation("m", messages=[Message("user", [Text("x")])], tools=[Tool("t", parameters=schema)],
                        response_format={"type": "json_schema", "name": "r", "schema": schema, "strict": True})
    body = chat_render_request(conv, UpstreamProfile(drop_schema_keys=frozenset({"$schema", "format",
                                                                                   "additionalProperties"})))
    assert body["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {
        "format": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "string"}}}},
        "mode": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": {"format": "kept"}}}}
    assert body["response_format"]["json_schema"]["schema"] == body["tools"][0]["function"]["parameters"]
    assert schema["$schema"] == "x"   # the conversation's own schema is untouched
    same = chat_render_request(conv, PROFILE)["tools"][0]["function"]["parameters"]
    assert same == schema


@needs_fixtures
def test_claude_code_tool_schemas_keep_their_property_names_when_keys_are_dropped():
    body = json.loads((FIXTURES / "claude_code_full_request_turn1.json").read_text())["body"]
    tools = [Tool(t["name"], t.get("description", ""), t["input_schema"]) for t in body["tools"]]
    conv = Conversation("m", messages=[Message("user", [Text("x")])], tools=tools)
    drop = frozenset({"$schema", "additionalProperties", "description"})
    rendered = chat_render_request(conv, UpstreamProfile(drop_schema_keys=drop))["tools"]
    assert len(rendered) == 24

    def keywords(node, names_level=False):
        if isinstance(node, list):
            return set().union(*(keywords(item) for item in node)) if node else set()
        if not isinstance(node, dict):
            return set()
        own = set() if names_level else set(node)
        return own.union(*(keywords(v, k == "properties") for k, v in node.items()), set())

    for tool in rendered:
        assert not keywords(tool["function"]["parameters"]) & drop
    bash = next(t["function"] for t in rendered if t["function"]["name"] == "Bash")
    assert set(bash["parameters"]["properties"]) == {"command", "timeout", "description", "run_in_background",
                                                     "dangerouslyDisableSandbox"}
    assert bash["parameters"]["required"] == ["command"]


def test_custom_tools_are_bridged_to_functions_with_one_string_input():
    conv = Conversation("m", tools=[Tool("apply_patch", "Patch files", custom=True,
                                         format={"type": "grammar", "syntax": "lark", "definition": "x"})],
                        messages=[Message("user", [Text("fix")]),
                                  Message("assistant", [ToolCall("c1", "apply_patch", 'line "1"\n', custom=True)]),
                                  Message("user", [ToolResult("c1", [Text("done")], custom=True)])])
    body = chat_render_request(conv, PROFILE)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "apply_patch", "description": "Patch files",
        "parameters": {"type": "object", "properties": {CUSTOM_TOOL_INPUT: {"type": "string"}},
                       "required": [CUSTOM_TOOL_INPUT]}}}]
    call = body["messages"][1]["tool_calls"][0]
    assert call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {CUSTOM_TOOL_INPUT: 'line "1"\n'}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "done"}


def test_reasoning_effort_is_sent_only_when_the_profile_accepts_it():
    conv = Conversation("m", messages=[Message("user", [Text("x")])], reasoning_effort="low")
    assert chat_render_request(conv, PROFILE)["reasoning_effort"] == "low"
    assert "reasoning_effort" not in chat_render_request(conv, UpstreamProfile(reasoning=False))


def test_streaming_requests_always_ask_for_usage():
    conv = Conversation("m", messages=[Message("user", [Text("x")])], stream=True, include_usage=False)
    body = chat_render_request(conv, PROFILE)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    conv.stream = False
    body = chat_render_request(conv, PROFILE)
    assert "stream" not in body and "stream_options" not in body


def test_request_round_trip_keeps_everything_chat_can_carry():
    body = {
        "model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2", "content": "two"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "", "refusal": "No."},
            {"role": "user", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}}}},
                  {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": "auto", "parallel_tool_calls": True, "max_tokens": 300, "temperature": 0.2, "top_p": 0.9,
        "stop": ["\n\n"], "stream": True, "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"},
                                                                   "strict": True}},
        "reasoning_effort": "medium", "user": "someone",
    }
    conv = chat_parse_request(body)
    again = chat_parse_request(chat_render_request(conv, PROFILE))
    assert again == conv
    rendered = chat_render_request(conv, PROFILE)
    assert [m["role"] for m in rendered["messages"]] == [m["role"] for m in body["messages"]]
    json.dumps(rendered)


# ---- whole responses -------------------------------------------------------------------------
def test_upstream_completion_is_parsed_with_openai_usage_converted():
    reply = chat_parse_response({
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "deepseek-reasoner",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "Let me look.", "reasoning_content": "need the file",
            "tool_calls": [{"id": "call_9", "type": "function",
                            "function": {"name": "read", "arguments": "{\"path\":\"a\"}"}}]}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                  "prompt_tokens_details": {"cached_tokens": 100},
                  "completion_tokens_details": {"reasoning_tokens": 12}},
    })
    assert reply.id == "chatcmpl-abc" and reply.model == "deepseek-reasoner"
    assert reply.parts == [Thinking("need the file"), Text("Let me look."),
                           ToolCall("call_9", "read", "{\"path\":\"a\"}")]
    assert reply.finish == "tool_calls"
    assert reply.usage == Usage(input_tokens=20, output_tokens=30, cache_read=100, reasoning=12)


@pytest.mark.parametrize("upstream, neutral", [
    ("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"), ("function_call", "tool_calls"),
    ("content_filter", "content_filter"), (None, "stop"), ("eos", "stop"),
])
def test_upstream_finish_reasons_map_to_neutral(upstream, neutral):
    reply = chat_parse_response({"choices": [{"message": {"content": "x"}, "finish_reason": upstream}]})
    assert reply.finish == neutral


def test_stop_after_tool_calls_is_reported_as_tool_calls():
    reply = chat_parse_response({"choices": [{"finish_reason": "stop", "message": {"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "prompt_cache_hit_tokens": 3}})
    assert reply.finish == "tool_calls"
    assert reply.usage == Usage(input_tokens=2, output_tokens=2, cache_read=3)


def test_malformed_upstream_completion_raises_502_and_error_body_keeps_its_status():
    with pytest.raises(GatewayError) as caught:
        chat_parse_response({"choices": [{"message": {"tool_calls": "nope"}}]})
    assert (caught.value.status, caught.value.kind) == (502, "api_error")
    assert "choices[0].message.tool_calls" in caught.value.message
    with pytest.raises(GatewayError) as caught:
        chat_parse_response({"error": {"message": "quota", "code": 429}})
    assert (caught.value.status, caught.value.kind, caught.value.message) == (429, "rate_limit", "quota")


def test_rendered_completion_has_the_openai_shape():
    reply = Reply("msg_01abc", "claude-x", [Thinking("plan", signature="s"), Text("Hi"), Refusal("partly"),
                                            ToolCall("toolu_1", "f", ""), ToolCall("toolu_2", "patch", "raw", custom=True)],
                  finish="stop_sequence", usage=Usage(10, 20, cache_read=5, cache_write=3, reasoning=4))
    body = chat_render_response(reply)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 5
    assert body["model"] == "claude-x"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "stop"
    assert choice["message"] == {
        "role": "assistant", "content": "Hi", "refusal": "partly", "reasoning_content": "plan",
        "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                       {"id": "toolu_2", "type": "custom", "custom": {"name": "patch", "input": "raw"}}]}
    assert body["usage"] == {"prompt_tokens": 18, "completion_tokens": 20, "total_tokens": 38,
                             "prompt_tokens_details": {"cached_tokens": 5},
                             "completion_tokens_details": {"reasoning_tokens": 4}}


def test_rendered_completion_without_text_or_thinking_has_null_content_and_no_reasoning():
    body = chat_render_response(Reply("chatcmpl-keep", "m", [ToolCall("c", "f", "{}")], finish="tool_calls"))
    assert body["id"] == "chatcmpl-keep"
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] is None and "reasoning_content" not in message
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("neutral, chat", [
    ("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"), ("content_filter", "content_filter"),
    ("stop_sequence", "stop"), ("pause", "stop"), ("refusal", "content_filter"),
])
def test_neutral_finish_reasons_render_as_chat(neutral, chat):
    assert chat_render_response(Reply("chatcmpl-1", "m", [Text("x")], finish=neutral))[
        "choices"][0]["finish_reason"] == chat


def test_response_round_trip():
    reply = Reply("chatcmpl-rt", "m", [Thinking("t"), Text("answer"), ToolCall("c1", "f", "{\"x\":2}")],
                  finish="tool_calls", usage=Usage(7, 9, cache_read=2, reasoning=1))
    assert chat_parse_response(chat_render_response(reply)) == reply


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, status, error_type, code", [
    ("invalid_request", 400, "invalid_request_error", None),
    ("authentication", 401, "invalid_request_error", "invalid_api_key"),
    ("permission", 403, "invalid_request_error", None),
    ("not_found", 404, "invalid_request_error", None),
    ("too_large", 413, "invalid_request_error", None),
    ("rate_limit", 429, "rate_limit_error", "rate_limit_exceeded"),
    ("overloaded", 503, "server_error", None),
    ("api_error", 500, "server_error", None),
    ("timeout", 504, "server_error", None),
])
def test_error_bodies_use_openai_types(kind, status, error_type, code):
    assert chat_error_body(GatewayError(status, kind, "boom")) == {
        "error": {"message": "boom", "type": error_type, "param": None, "code": code}}


def test_error_body_keeps_param_and_explicit_code():
    body = chat_error_body(GatewayError(404, "not_found", "The model `x` does not exist", param="model",
                                        code="model_not_found"))
    assert body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


def test_error_body_round_trips_through_parse_error():
    err = GatewayError(400, "invalid_request", "messages is required", param="messages")
    back = chat_parse_error(400, json.dumps(chat_error_body(err)).encode())
    assert (back.status, back.kind, back.message, back.param) == (400, "invalid_request", "messages is required",
                                                                 "messages")


@pytest.mark.parametrize("status, body, kind, message, code", [
    (401, b'{"error":{"message":"Incorrect API key provided: sk-...","type":"invalid_request_error",'
          b'"param":null,"code":"invalid_api_key"}}', "authentication", "Incorrect API key provided: sk-...",
     "invalid_api_key"),
    (429, b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}',
     "rate_limit", "Rate limit reached", "rate_limit_exceeded"),
    (503, b'{"error":"Server overloaded, please retry shortly"}', "overloaded",
     "Server overloaded, please retry shortly", None),
    (400, b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}',
     "invalid_request", "max_tokens is too large", None),
    (502, b"<html><body>Bad Gateway</body></html>", "api_error", "<html><body>Bad Gateway</body></html>", None),
    (500, b"", "api_error", "upstream returned HTTP 500", None),
    (404, b"\xff\xfe not json", "not_found", "\ufffd\ufffd not json", None),
])
def test_upstream_errors_are_read_keeping_status_and_message(status, body, kind, message, code):
    err = chat_parse_error(status, body)
    assert (err.status, err.kind, err.message, err.code) == (status, kind, message, code)


# ---- stream decoding -------------------------------------------------------------------------
def test_decoder_turns_a_text_stream_into_one_text_block_and_finishes_after_usage():
    datas = [chunk({"role": "assistant", "content": "", "refusal": None}),
             chunk({"content": "Hel"}), chunk({"content": "lo"}),
             chunk({}, finish="stop"),
             chunk(choices=False, usage={"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13,
                                         "prompt_tokens_details": {"cached_tokens": 1}}),
             "[DONE]"]
    decoder = ChatStreamDecoder()
    per_feed = [decoder.feed(None, data) for data in datas]
    assert per_feed[0] == [Start("chatcmpl-up", "up-model")]
    assert per_feed[3] == [BlockEnd(0)]   # the finish reason is held until usage is known
    assert per_feed[4] == [Finish("stop", Usage(10, 2, cache_read=1))]
    assert per_feed[5] == [] and decoder.close() == []
    events = [e for batch in per_feed for e in batch]
    assert events == [Start("chatcmpl-up", "up-model"), BlockStart(0, Text("")), Delta(0, "Hel"), Delta(0, "lo"),
                      BlockEnd(0), Finish("stop", Usage(10, 2, cache_read=1))]


def test_decoder_streams_parallel_tool_call_arguments_as_they_arrive():
    def call(index, id=None, name=None, arguments=""):
        entry = {"index": index, "function": {"arguments": arguments}}
        if id:
            entry.update(id=id, type="function")
            entry["function"]["name"] = name
        return chunk({"tool_calls": [entry]})

    datas = [chunk({"role": "assistant", "content": None}),
             call(0, "call_a", "get_weather"), call(0, arguments='{"ci'), call(0, arguments='ty":"Paris"}'),
             call(1, "call_b", "get_time"), call(1, arguments='{"tz":'), call(1, arguments='"CET"}'),
             chunk({}, finish="tool_calls"), chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4}),
             "[DONE]"]
    events = decode(datas)
    assert_neutral_stream(events)
    assert events[1:] == [
        BlockStart(0, ToolCall("call_a", "get_weather", "")), Delta(0, '{"ci', "arguments"),
        Delta(0, 'ty":"Paris"}', "arguments"), BlockEnd(0),
        BlockStart(1, ToolCall("call_b", "get_time", "")), Delta(1, '{"tz":', "arguments"),
        Delta(1, '"CET"}', "arguments"), BlockEnd(1),
        Finish("tool_calls", Usage(3, 4))]


def test_decoder_holds_back_interleaved_tool_calls_instead_of_reopening_blocks():
    def call(index, arguments, **first):
        entry = {"index": index, "function": {"arguments": arguments}}
        if first:
            entry.update(id=first["id"], type="function")
            entry["function"]["name"] = first["name"]
        return chunk({"tool_calls": [entry]})

    datas = [call(0, '{"a":', id="c0", name="f"), call(1, '{"b":', id="c1", name="g"),
             call(0, "1}"), call(1, "2}"), call(2, "{}", id="c2", name="h"),
             chunk({}, finish="tool_calls"), "[DONE]"]
    events = decode(datas)
    assert_neutral_stream(events)
    # the first call still streams live; the interleaved one waits for it
    assert events[1:4] == [BlockStart(0, ToolCall("c0", "f", "")), Delta(0, '{"a":', "arguments"),
                           Delta(0, "1}", "arguments")]
    reply = collect(events)
    assert reply.parts == [ToolCall("c0", "f", '{"a":1}'), ToolCall("c1", "g", '{"b":2}'), ToolCall("c2", "h", "{}")]
    assert reply.finish == "tool_calls"


def test_decoder_takes_whole_calls_sent_without_index_as_separate_calls():
    datas = [chunk({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
             chunk({"tool_calls": [{"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}}]}),
             chunk({}, finish="stop"), "[DONE]"]
    reply = collect(decode(datas))
    assert reply.parts == [ToolCall("c1", "f", "{}"), ToolCall("c2", "g", "{\"x\":1}")]
    assert reply.finish == "tool_calls"


def test_decoder_several_calls_in_one_chunk():
    datas = [chunk({"tool_calls": [
        {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"q\":1}"}},
        {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls"), "[DONE]"]
    events = decode(datas)
    assert_neutral_stream(events)
    assert collect(events).parts == [ToolCall("a", "f", "{\"q\":1}"), ToolCall("b", "g", "{}")]


@pytest.mark.parametrize("reasoning_key", ["reasoning_content", "reasoning"])
def test_decoder_puts_reasoning_in_a_thinking_block_before_the_text(reasoning_key):
    datas = [chunk({"role": "assistant", "content": ""}), chunk({reasoning_key: "Let me "}),
             chunk({reasoning_key: "think."}), chunk({"content": "Answer"}),
             chunk({}, finish="stop", usage={"prompt_tokens": 2, "completion_tokens": 9,
                                             "completion_tokens_details": {"reasoning_tokens": 5}}),
             "[DONE]"]
    events = decode(datas)
    assert_neutral_stream(events)
    assert events[1:] == [BlockStart(0, Thinking()), Delta(0, "Let me ", "thinking"), Delta(0, "think.", "thinking"),
                          BlockEnd(0), BlockStart(1, Text("")), Delta(1, "Answer"), BlockEnd(1),
                          Finish("stop", Usage(2, 9, reasoning=5))]


def test_decoder_refusal_block():
    events = decode([chunk({"refusal": "I can't"}), chunk({"refusal": " do that."}),
                     chunk({}, finish="content_filter"), "[DONE]"])
    assert events[1:] == [BlockStart(0, Refusal("")), Delta(0, "I can't", "refusal"), Delta(0, " do that.", "refusal"),
                          BlockEnd(0), Finish("content_filter", Usage())]


def test_decoder_finishes_at_done_when_no_usage_chunk_comes():
    decoder = ChatStreamDecoder()
    decoder.feed(None, chunk({"content": "x"}))
    assert decoder.feed(None, chunk({}, finish="length")) == [BlockEnd(0)]
    assert decoder.feed(None, "[DONE]") == [Finish("length", Usage())]


def test_decoder_without_done_still_finishes_once():
    with_usage = decode([chunk({"content": "x"}), chunk({}, finish="stop"),
                         chunk(choices=False, usage={"prompt_tokens": 1, "completion_tokens": 1})], close=True)
    assert with_usage[-1] == Finish("stop", Usage(1, 1))
    assert sum(isinstance(e, Finish) for e in with_usage) == 1
    without_usage = decode([chunk({"content": "x"}), chunk({}, finish="stop")], close=True)
    assert without_usage[-2:] == [BlockEnd(0), Finish("stop", Usage())]


def test_decoder_reports_a_cut_stream_as_failure():
    events = decode([chunk({"content": "partial"})], close=True)
    assert_neutral_stream(events, cut_off=True)
    failure = events[-1]
    assert isinstance(failure, StreamFailure)
    assert (failure.error.status, failure.error.kind, failure.error.message) == (
        502, "api_error", "upstream stream ended early")
    (nothing_came,) = decode([], close=True)
    assert isinstance(nothing_came, StreamFailure) and nothing_came.error.status == 502


def test_decoder_turns_error_chunks_into_stream_failure_and_ignores_the_rest():
    decoder = ChatStreamDecoder()
    decoder.feed(None, chunk({"content": "x"}))
    events = decoder.feed(None, json.dumps({"error": {"message": "Rate limit exceeded", "type": "rate_limit_error",
                                                      "code": 429}}))
    assert len(events) == 1 and isinstance(events[0], StreamFailure)
    assert (events[0].error.status, events[0].error.kind, events[0].error.message) == (
        429, "rate_limit", "Rate limit exceeded")
    assert decoder.feed(None, chunk({"content": "more"})) == [] and decoder.close() == []
    other = decode([json.dumps({"error": {"message": "internal", "type": "server_error", "code": None}})])
    assert (other[0].error.status, other[0].error.kind, other[0].error.message) == (502, "api_error", "internal")


def test_decoder_rejects_chunks_that_are_not_json():
    events = decode([chunk({"content": "x"}), "{not json"])
    assert isinstance(events[-1], StreamFailure) and events[-1].error.status == 502


# ---- stream encoding -------------------------------------------------------------------------
SAMPLE_STREAMS = {
    "text": [Start("chatcmpl-x", "gpt-test"), BlockStart(0, Text("")), Delta(0, "Hello"), Delta(0, ", wörld \"✓\""),
             BlockEnd(0), Finish("stop", Usage(12, 3, cache_read=4))],
    "thinking_text_tools": [
        Start("chatcmpl-x", "gpt-test"), BlockStart(0, Thinking()), Delta(0, "plan", "thinking"), BlockEnd(0),
        BlockStart(1, Text("")), Delta(1, "Doing it."), BlockEnd(1),
        BlockStart(2, ToolCall("call_1", "read", "")), Delta(2, '{"path":', "arguments"),
        Delta(2, '"a.txt"}', "arguments"), BlockEnd(2),
        BlockStart(3, ToolCall("call_2", "ls", "")), Delta(3, "{}", "arguments"), BlockEnd(3),
        Finish("tool_calls", Usage(100, 50, cache_read=10, reasoning=20))],
    "refusal": [Start("chatcmpl-x", "gpt-test"), BlockStart(0, Refusal("")), Delta(0, "No.", "refusal"), BlockEnd(0),
                Finish("content_filter", Usage(1, 1))],
}


def test_encoder_chunks_have_the_openai_chunk_shape():
    datas = sse_datas(encode(SAMPLE_STREAMS["thinking_text_tools"]))
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(data) for data in datas[:-1]]
    for body in chunks[:-1]:
        assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
        assert (body["id"], body["object"], body["created"], body["model"], body["usage"]) == (
            "chatcmpl-x", "chat.completion.chunk", 1700000000, "gpt-test", None)
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None and "delta" in choice
    deltas = [body["choices"][0]["delta"] for body in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "plan"},
        {"content": "Doing it."},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "read", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"a.txt"}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "ls", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert [body["choices"][0]["finish_reason"] for body in chunks[:-1]] == [None] * 8 + ["tool_calls"]
    assert chunks[-1] == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1700000000,
                          "model": "gpt-test", "choices": [], "usage": {
                              "prompt_tokens": 110, "completion_tokens": 50, "total_tokens": 160,
                              "prompt_tokens_details": {"cached_tokens": 10},
                              "completion_tokens_details": {"reasoning_tokens": 20}}}


def test_encoder_omits_usage_when_the_client_did_not_ask():
    datas = sse_datas(encode(SAMPLE_STREAMS["text"], include_usage=False))
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(data) for data in datas[:-1]]
    assert all("usage" not in body and len(body["choices"]) == 1 for body in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "".join(body["choices"][0]["delta"].get("content", "") for body in chunks) == 'Hello, wörld "✓"'
    assert "wörld" in encode(SAMPLE_STREAMS["text"]).decode()   # not \u-escaped


def test_encoder_maps_neutral_finish_reasons_and_skips_signatures():
    events = [Start("i", "m"), BlockStart(0, Thinking()), Delta(0, "t", "thinking"), Delta(0, "sig", "signature"),
              BlockEnd(0), Finish("refusal")]
    chunks = [json.loads(d) for d in sse_datas(encode(events, include_usage=False))[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""},
                                                          {"reasoning_content": "t"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_encoder_writes_custom_tool_calls_in_chat_custom_shape():
    events = [Start("i", "m"), BlockStart(0, ToolCall("c", "apply_patch", "", custom=True)),
              Delta(0, "*** Begin\n", "arguments"), BlockEnd(0), Finish("tool_calls")]
    chunks = [json.loads(d) for d in sse_datas(encode(events, include_usage=False))[:-1]]
    assert chunks[1]["choices"][0]["delta"] == {"tool_calls": [
        {"index": 0, "id": "c", "type": "custom", "custom": {"name": "apply_patch", "input": ""}}]}
    assert chunks[2]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "custom": {"input": "*** Begin\n"}}]}
    assert collect(decode(sse_datas(encode(events)))).parts == [ToolCall("c", "apply_patch", "*** Begin\n", custom=True)]


def test_encoder_sends_an_openai_error_chunk_on_failure_and_then_nothing():
    encoder = ChatStreamEncoder("m", True, id="chatcmpl-e", created=1)
    encoder.feed(Start("s", "m"))
    encoder.feed(BlockStart(0, Text("")))
    out = encoder.feed(StreamFailure(GatewayError(529, "overloaded", "Overloaded")))
    assert sse_datas(out) == [json.dumps({"error": {"message": "Overloaded", "type": "server_error",
                                                    "param": None, "code": None}}, separators=(",", ":"))]
    assert encoder.feed(Delta(0, "late")) == b"" and encoder.feed(Finish("stop")) == b""


@pytest.mark.parametrize("name", sorted(SAMPLE_STREAMS))
def test_decoding_the_encoder_output_gives_back_the_events(name):
    events = SAMPLE_STREAMS[name]
    assert decode(sse_datas(encode(events))) == events


def test_a_reply_survives_encoding_and_decoding():
    reply = Reply("chatcmpl-x", "gpt-test", [Thinking("why"), Text("because"), ToolCall("call_1", "f", "")],
                  finish="tool_calls", usage=Usage(3, 4, cache_read=1, reasoning=2))
    events = reply_events(reply)
    decoded = collect(decode(sse_datas(encode(events))))
    reply.parts[2].arguments = ""   # an empty argument string has nothing to stream
    assert decoded == reply


