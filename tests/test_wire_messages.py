import copy
import json
from pathlib import Path

import pytest

from tokligence import *  # noqa: E402,F403

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"captured client traffic not found at {FIXTURES}")
PROFILE = UpstreamProfile()


def fixture_body(name: str) -> dict:
    body = json.loads((FIXTURES / name).read_text())["body"]
    for tool in body.get("tools", []):
        if tool.get("input_schema") == "<omitted>":    # the short captures elide schemas
            tool["input_schema"] = {"type": "object", "properties": {}}
    return body


def sse_events(name: str) -> list[tuple[str | None, str]]:
    """Blank-line separated SSE events as (event, data) pairs."""
    events = []
    for chunk in (FIXTURES / name).read_text().split("\n\n"):
        event, data = None, []
        for line in chunk.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((event, "\n".join(data)))
    return events


def sse_bytes_events(raw: bytes) -> list[tuple[str | None, str]]:
    events = []
    for chunk in raw.decode().split("\n\n"):
        if chunk:
            lines = chunk.split("\n")
            assert lines[0].startswith("event: ") and lines[1].startswith("data: "), chunk
            events.append((lines[0][7:], lines[1][6:]))
    return events


def decode_all(pairs) -> list:
    decoder = MessagesStreamDecoder()
    events = [event for name, data in pairs for event in decoder.feed(name, data)]
    return events + decoder.close()


def request(**fields) -> dict:
    return {"model": "claude-x", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}], **fields}


# ---- request parsing: captured Claude Code traffic --------------------------------------------
@needs_fixtures
def test_claude_code_turn1_reaches_the_neutral_model():
    body = fixture_body("claude_code_full_request_turn1.json")
    conv = messages_parse_request(body)

    assert conv.model == "claude-opus-4-8" and conv.max_tokens == 64000 and conv.stream
    assert [tool.name for tool in conv.tools] == [tool["name"] for tool in body["tools"]]
    assert len(conv.tools) == 24
    assert all(tool.parameters == raw["input_schema"] and tool.description == raw["description"]
               for tool, raw in zip(conv.tools, body["tools"]))
    # the billing line is dropped; the other system blocks and the in-list system message are kept in order
    assert conv.system == [block["text"] for block in body["system"][1:]] + [body["messages"][1]["content"]]
    assert len(conv.messages) == 1 and conv.messages[0].role == "user"
    assert [part.text for part in conv.messages[0].parts] == [b["text"] for b in body["messages"][0]["content"]]
    assert conv.reasoning_effort == "high"    # thinking adaptive + output_config.effort
    assert conv.user == body["metadata"]["user_id"]


@needs_fixtures
def test_claude_code_turn2_tool_use_and_tool_result_round_trip():
    body = fixture_body("claude_code_full_request_turn2_tool_result.json")
    conv = messages_parse_request(body)

    assistant, result_turn = conv.messages[1], conv.messages[2]
    text, call = assistant.parts
    assert text == Text("I'll run a command.")
    assert call.id == "toolu_89e911be64db422d828ba2da" and call.name == "Bash"
    assert json.loads(call.arguments) == {"command": "echo hello", "description": "Print hello"}
    assert result_turn.parts == [ToolResult("toolu_89e911be64db422d828ba2da", [Text("hello")], False)]

    rendered = messages_render_request(conv, PROFILE)
    assert rendered["messages"][1]["content"][1] == {
        "type": "tool_use", "id": call.id, "name": "Bash",
        "input": {"command": "echo hello", "description": "Print hello"}}
    assert rendered["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "hello"}]}]}
    # the last assistant turn calls a tool without signed thinking: Anthropic would reject thinking
    assert "thinking" not in rendered


@needs_fixtures
@pytest.mark.parametrize("name", ["claude_code_full_request_turn1.json",
                                  "claude_code_full_request_turn2_tool_result.json", "claude_request1.json",
                                  "claude_request2_with_tool_result.json", "claude_request_haiku.json"])
def test_every_captured_block_and_tool_survives_parse_and_render(name):
    body = fixture_body(name)
    rendered = messages_render_request(messages_parse_request(body), PROFILE)

    assert [(tool["name"], tool["input_schema"]) for tool in rendered["tools"]] == \
        [(tool["name"], tool["input_schema"]) for tool in body["tools"]]
    original = [(m["role"], block["type"]) for m in body["messages"] if m["role"] != "system"
                for block in m["content"]]
    assert [(m["role"], block["type"]) for m in rendered["messages"] for block in m["content"]] == original
    assert body["messages"][0]["content"][-1]["text"] in json.dumps(rendered["messages"])
    assert all(text in rendered["system"] for text in (block["text"] for block in body["system"][1:]))


@needs_fixtures
def test_haiku_thinking_budget_is_kept():
    conv = messages_parse_request(fixture_body("claude_request_haiku.json"))
    assert conv.thinking_budget == 31999 and conv.reasoning_effort == "high"

    rendered = messages_render_request(conv, PROFILE)
    assert rendered["thinking"] == {"type": "enabled", "budget_tokens": 31999}
    assert rendered["max_tokens"] == 32000


# ---- request parsing: hand-written edge cases -------------------------------------------------
def test_every_block_kind_reaches_the_neutral_model():
    conv = messages_parse_request(request(system="Be brief.", messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
            {"type": "document", "title": "spec", "source": {"type": "base64", "media_type": "application/pdf",
                                                             "data": "JVBER"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {"q": "é"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": [
                {"type": "text", "text": "failed"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j"}}]}]},
    ]))

    user, assistant, results = conv.messages
    assert conv.system == ["Be brief."]
    assert user.parts[:4] == [Text("look"), Image(data="iVBO", media_type="image/png"),
                              Image(url="https://example.com/a.jpg"), Text("notes")]
    assert "application/pdf" in user.parts[4].text and "omitted" in user.parts[4].text
    assert assistant.parts == [Thinking("hmm", "sig"), Thinking(redacted="opaque"),
                               ToolCall("toolu_1", "shot", '{"q":"é"}')]
    assert results.parts == [ToolResult("toolu_1", [Text("failed"), Image(data="/9j", media_type="image/jpeg")],
                                        is_error=True)]


def test_server_tools_are_skipped_and_reported():
    body = request(tools=[
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}}])
    conv = messages_parse_request(body)
    assert [tool.name for tool in conv.tools] == ["get_weather", "lookup"]
    assert conv.unportable_tools == ["web_search", "bash"]


def test_server_tool_blocks_in_history_are_dropped():
    conv = messages_parse_request(request(messages=[
        {"role": "user", "content": "search"},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "text", "text": "found it"}]}]))
    assert conv.messages[1].parts == [Text("found it")]


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, ("auto", "", None)),
    ({"type": "any"}, ("required", "", None)),
    ({"type": "tool", "name": "f"}, ("tool", "f", None)),
    ({"type": "none"}, ("none", "", None)),
    ({"type": "auto", "disable_parallel_tool_use": True}, ("auto", "", False)),
])
def test_tool_choice_maps_both_ways(choice, expected):
    conv = messages_parse_request(request(tools=[{"name": "f", "input_schema": {"type": "object"}}],
                                          tool_choice=choice))
    assert (conv.tool_choice, conv.tool_choice_name, conv.parallel_tool_calls) == expected
    assert messages_render_request(conv, PROFILE)["tool_choice"] == choice


@pytest.mark.parametrize("fields, budget, effort", [
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, 2000, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, 8000, "medium"),
    ({"thinking": {"type": "adaptive"}}, None, "medium"),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, None, "low"),
    ({"thinking": {"type": "disabled"}, "output_config": {"effort": "low"}}, None, None),
    ({"output_config": {"effort": "high"}}, None, "high"),
    ({}, None, None),
])
def test_thinking_settings_become_budget_and_effort(fields, budget, effort):
    conv = messages_parse_request(request(**fields))
    assert (conv.thinking_budget, conv.reasoning_effort) == (budget, effort)


def test_sampling_and_metadata_fields_are_parsed():
    conv = messages_parse_request(request(temperature=0.2, top_p=0.9, stop_sequences=["END"], stream=False,
                                          metadata={"user_id": "u1"}, cache_control={"type": "ephemeral"},
                                          context_management={"edits": []}))
    assert (conv.temperature, conv.top_p, conv.stop, conv.stream, conv.user) == (0.2, 0.9, ["END"], False, "u1")


def test_count_tokens_body_without_max_tokens_is_accepted():
    body = request()
    del body["max_tokens"]
    assert messages_parse_request(body).max_tokens is None


@pytest.mark.parametrize("body, param", [
    ([], "body"),
    ({"messages": []}, "model"),
    (request(model=""), "model"),
    (request(model=5), "model"),
    (request(messages="hi"), "messages"),
    (request(messages=[{"role": "user"}]), "messages.0.content"),
    (request(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (request(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
    (request(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages.0.content.0.type"),
    (request(messages=[{"role": "user", "content": [7]}]), "messages.0.content.0"),
    (request(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                     "content": 3}]}]), "messages.0.content.0.content"),
    (request(max_tokens="100"), "max_tokens"),
    (request(max_tokens=True), "max_tokens"),
    (request(max_tokens=0), "max_tokens"),
    (request(temperature="hot"), "temperature"),
    (request(stream="yes"), "stream"),
    (request(stop_sequences=["a", 1]), "stop_sequences"),
    (request(system=5), "system"),
    (request(tools=[{"description": "x"}]), "tools.0.name"),
    (request(tools=[{"name": "f", "input_schema": "<omitted>"}]), "tools.0.input_schema"),
    (request(tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (request(tool_choice={"type": "tool"}), "tool_choice.name"),
    (request(thinking={"type": "enabled"}), "thinking.budget_tokens"),
    (request(metadata={"user_id": 5}), "metadata.user_id"),
])
def test_malformed_bodies_raise_a_clear_400(body, param):
    with pytest.raises(GatewayError) as caught:
        messages_parse_request(body)
    assert (caught.value.status, caught.value.kind, caught.value.param) == (400, "invalid_request", param)
    assert caught.value.message.startswith(param)


# ---- request rendering ------------------------------------------------------------------------
def conversation(*messages: Message, **fields) -> Conversation:
    return Conversation("claude-x", list(messages), **fields)


def test_render_merges_roles_and_puts_tool_results_first():
    rendered = messages_render_request(conversation(
        Message("user", [Text("go")]),
        Message("assistant", [ToolCall("c1", "a", "{}"), ToolCall("c2", "b", '{"x":1}')]),
        Message("user", [ToolResult("c1", [Text("one")])]),
        Message("user", [Text("also this"), ToolResult("c2", [Text("two")], is_error=True)]),
        system=["first", "second"]), PROFILE)

    assert rendered["system"] == "first\n\nsecond"
    assert [m["role"] for m in rendered["messages"]] == ["user", "assistant", "user"]
    assert rendered["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1", "content": [{"type": "text", "text": "one"}]},
        {"type": "tool_result", "tool_use_id": "c2", "content": [{"type": "text", "text": "two"}], "is_error": True},
        {"type": "text", "text": "also this"}]


def test_render_keeps_signed_thinking_and_drops_unsigned():
    rendered = messages_render_request(conversation(
        Message("user", [Text("q")]),
        Message("assistant", [Thinking("mine", "sig"), Thinking(redacted="blob"), Thinking("openai summary"),
                              Thinking(encrypted="enc"), Text("answer")])), PROFILE)
    assert rendered["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "mine", "signature": "sig"},
        {"type": "redacted_thinking", "data": "blob"},
        {"type": "text", "text": "answer"}]


def test_render_drops_messages_left_empty():
    rendered = messages_render_request(conversation(
        Message("user", [Text("a")]), Message("assistant", [Thinking("unsigned"), Text("")]),
        Message("user", [Text("b")])), PROFILE)
    assert rendered["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]


def test_render_images():
    rendered = messages_render_request(conversation(Message("user", [
        Image(data="AAA", media_type="image/png"), Image(url="https://x/y.png"),
        Image(url="data:image/gif;base64,R0lG")])), PROFILE)
    assert [block["source"] for block in rendered["messages"][0]["content"]] == [
        {"type": "base64", "media_type": "image/png", "data": "AAA"},
        {"type": "url", "url": "https://x/y.png"},
        {"type": "base64", "media_type": "image/gif", "data": "R0lG"}]


def test_custom_tools_are_bridged_through_an_input_string():
    rendered = messages_render_request(conversation(
        Message("user", [Text("patch it")]),
        Message("assistant", [ToolCall("c1", "apply_patch", "*** Begin Patch", custom=True)]),
        Message("user", [ToolResult("c1", [Text("ok")], custom=True)]),
        tools=[Tool("apply_patch", "Apply a patch", custom=True, format={"type": "grammar"})]), PROFILE)
    assert rendered["tools"] == [{"name": "apply_patch", "description": "Apply a patch", "input_schema": {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}]
    assert rendered["messages"][1]["content"][0]["input"] == {"input": "*** Begin Patch"}


def test_schema_keys_the_provider_rejects_are_dropped_but_not_property_names():
    tool = Tool("f", parameters={"type": "object", "$schema": "x", "additionalProperties": False,
                                 "properties": {"format": {"type": "string", "format": "date"},
                                                "items": {"type": "array", "items": {"format": "uri"}}}})
    profile = UpstreamProfile(drop_schema_keys=frozenset({"format", "$schema"}))
    schema = messages_render_request(conversation(Message("user", [Text("x")]), tools=[tool]),
                                     profile)["tools"][0]["input_schema"]
    assert schema == {"type": "object", "additionalProperties": False,
                      "properties": {"format": {"type": "string"}, "items": {"type": "array", "items": {}}}}


def test_response_format_becomes_a_system_instruction_with_the_schema():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    rendered = messages_render_request(conversation(
        Message("user", [Text("x")]), system=["Be terse."],
        response_format={"type": "json_schema", "name": "t", "schema": schema, "strict": True}), PROFILE)
    assert rendered["system"].startswith("Be terse.\n\n")
    assert json.dumps(schema, separators=(",", ":")) in rendered["system"]
    assert "JSON" in messages_render_request(conversation(
        Message("user", [Text("x")]), response_format={"type": "json_object"}), PROFILE)["system"]


@pytest.mark.parametrize("effort, budget", [("low", 1024), ("medium", 4096), ("high", 16384), ("xhigh", 16384),
                                            ("minimal", None), (None, None)])
def test_reasoning_effort_becomes_a_thinking_budget(effort, budget):
    rendered = messages_render_request(conversation(Message("user", [Text("x")]), reasoning_effort=effort,
                                                    max_tokens=32000, temperature=0.5), PROFILE)
    assert rendered.get("thinking") == (budget and {"type": "enabled", "budget_tokens": budget})
    # Anthropic rejects temperature with thinking
    assert ("temperature" in rendered) == (budget is None)


def test_thinking_budget_raises_max_tokens_within_the_cap():
    conv = conversation(Message("user", [Text("x")]), reasoning_effort="high", max_tokens=1000)
    rendered = messages_render_request(conv, PROFILE)
    assert rendered["thinking"]["budget_tokens"] == 16384 and rendered["max_tokens"] == 16384 + 1024

    capped = messages_render_request(conv, UpstreamProfile(max_output_tokens=8192))
    assert capped["max_tokens"] == 8192 and capped["thinking"]["budget_tokens"] == 8192 - 1024
    assert capped["thinking"]["budget_tokens"] < capped["max_tokens"]

    tiny = messages_render_request(conv, UpstreamProfile(max_output_tokens=1500))
    assert "thinking" not in tiny and tiny["max_tokens"] == 1000


def test_no_thinking_without_provider_support_or_with_forced_tool_choice():
    conv = conversation(Message("user", [Text("x")]), reasoning_effort="high")
    assert "thinking" not in messages_render_request(conv, UpstreamProfile(reasoning=False))
    forced = conversation(Message("user", [Text("x")]), reasoning_effort="high", tools=[Tool("f")],
                          tool_choice="required")
    assert "thinking" not in messages_render_request(forced, PROFILE)


def test_thinking_kept_when_last_tool_turn_carries_signed_thinking():
    conv = conversation(Message("user", [Text("x")]),
                        Message("assistant", [Thinking("plan", "sig"), ToolCall("c1", "f", "{}")]),
                        Message("user", [ToolResult("c1", [Text("done")])]), reasoning_effort="low")
    assert messages_render_request(conv, PROFILE)["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_max_tokens_defaults_and_is_clamped():
    conv = conversation(Message("user", [Text("x")]))
    assert messages_render_request(conv, UpstreamProfile(default_max_tokens=4000))["max_tokens"] == 4000
    conv.max_tokens = 100_000
    assert messages_render_request(conv, UpstreamProfile(max_output_tokens=64000))["max_tokens"] == 64000


def test_render_sampling_stop_user_and_stream():
    rendered = messages_render_request(conversation(
        Message("user", [Text("x")]), temperature=0.3, top_p=0.8, stop=["END", "  "], user="u1", stream=True),
        PROFILE)
    assert rendered["temperature"] == 0.3 and "top_p" not in rendered
    assert rendered["stop_sequences"] == ["END"]
    assert rendered["metadata"] == {"user_id": "u1"} and rendered["stream"] is True
    only_top_p = messages_render_request(conversation(Message("user", [Text("x")]), top_p=0.8), PROFILE)
    assert only_top_p["top_p"] == 0.8


# ---- responses --------------------------------------------------------------------------------
ANTHROPIC_MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
    "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "Let me check.", "citations": None},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 3,
              "cache_read_input_tokens": 40, "service_tier": "standard"}}


def test_response_round_trip():
    reply = messages_parse_response(ANTHROPIC_MESSAGE)
    assert reply.parts == [Thinking("t", "s"), Text("Let me check."), ToolCall("toolu_1", "f", '{"a":[1,2]}')]
    assert reply.finish == "tool_calls" and reply.usage == Usage(10, 20, 40, 3)
    rendered = messages_render_response(reply)
    expected = copy.deepcopy(ANTHROPIC_MESSAGE)
    del expected["content"][1]["citations"], expected["usage"]["service_tier"]
    assert rendered == expected


@pytest.mark.parametrize("anthropic, neutral", [("end_turn", "stop"), ("max_tokens", "length"),
                                                ("tool_use", "tool_calls"), ("stop_sequence", "stop_sequence"),
                                                ("refusal", "refusal"), ("pause_turn", "pause")])
def test_stop_reasons_map_both_ways(anthropic, neutral):
    reply = messages_parse_response({**ANTHROPIC_MESSAGE, "stop_reason": anthropic})
    assert reply.finish == neutral
    assert messages_render_response(reply)["stop_reason"] == anthropic


def test_content_filter_and_refusal_render_as_refusal_text():
    rendered = messages_render_response(Reply("chatcmpl-1", "m", [Refusal("I can't help with that.")],
                                              finish="content_filter"))
    assert rendered["stop_reason"] == "refusal" and rendered["id"].startswith("msg_")
    assert rendered["content"] == [{"type": "text", "text": "I can't help with that."}]


@pytest.mark.parametrize("arguments", ['{"a": 1', "[1, 2]", "not json"])
def test_invalid_tool_arguments_do_not_crash(arguments):
    rendered = messages_render_response(Reply("msg_1", "m", [ToolCall("call_1", "f", arguments)], "tool_calls"))
    note, tool_use = rendered["content"]
    assert note["type"] == "text" and "invalid arguments" in note["text"] and arguments in note["text"]
    assert tool_use == {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}


def test_long_invalid_tool_arguments_are_truncated_in_the_note():
    rendered = messages_render_response(Reply("msg_1", "m", [ToolCall("c", "f", "{" + "x" * 5000)]))
    assert len(rendered["content"][0]["text"]) < 700


def test_empty_tool_arguments_mean_no_arguments():
    rendered = messages_render_response(Reply("msg_1", "m", [ToolCall("c", "f", "")]))
    assert rendered["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]


def test_malformed_upstream_message_is_a_502():
    with pytest.raises(GatewayError) as caught:
        messages_parse_response({"content": [{"type": "text"}]})
    assert (caught.value.status, caught.value.kind) == (502, "api_error")


# ---- stream decoder ---------------------------------------------------------------------------
@needs_fixtures
def test_decoder_reads_the_text_stream():
    events = decode_all(sse_events("anthropic_response_stream_final_text.sse"))
    assert events[0] == Start("msg_7e94f2999c764ab391553f63", "claude-opus-4-8", Usage(1762, 0, 0, 0))
    assert events[1:] == [BlockStart(0, Text("")), Delta(0, "The command finished; "),
                          Delta(0, "the tool result "), Delta(0, "was received. Done."), BlockEnd(0),
                          Finish("stop", Usage(1762, 21, 0, 0))]


@needs_fixtures
def test_decoder_reads_text_then_tool_use():
    events = decode_all(sse_events("anthropic_response_stream_text_then_tool_use.sse"))
    assert events[-1] == Finish("tool_calls", Usage(1669, 46, 0, 0))
    assert BlockStart(1, ToolCall("toolu_89e911be64db422d828ba2da", "Bash")) in events
    collector = ReplyCollector()
    for event in events:
        collector.feed(event)
    text, call = collector.reply.parts
    assert text.text == "I'll run a command."
    assert json.loads(call.arguments) == {"command": "echo hello", "description": "Print hello"}
    # the empty input_json_delta is not forwarded
    assert all(event.text for event in events if isinstance(event, Delta))


@needs_fixtures
def test_decoder_reads_thinking_with_signature():
    events = decode_all(sse_events("anthropic_response_stream_thinking_text_tool_use.sse"))
    assert events[1:5] == [BlockStart(0, Thinking()), Delta(0, "Let me think about this request briefly.", "thinking"),
                           Delta(0, "1g/iYgMfxG9953ckPcM5Qu4/ezPSvwYRP3PxrwSKSH5MjXdhs+tj2AjkAsuAgdNc", "signature"),
                           BlockEnd(0)]
    assert [event.index for event in events if isinstance(event, BlockStart)] == [0, 1, 2]


def anthropic_sse(*payloads: dict) -> list[tuple[str, str]]:
    return [(payload["type"], json.dumps(payload)) for payload in payloads]


MESSAGE_START = {"type": "message_start", "message": {"id": "msg_9", "model": "claude-x", "usage": {
    "input_tokens": 5, "cache_read_input_tokens": 7, "cache_creation_input_tokens": None, "output_tokens": 1}}}


def test_decoder_skips_server_tool_blocks_and_renumbers():
    events = decode_all(anthropic_sse(
        MESSAGE_START,
        {"type": "content_block_start", "index": 0, "content_block": {
            "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "citations_delta", "citation": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Found."}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 9, "input_tokens": 6, "cache_read_input_tokens": 7}},
        {"type": "message_stop"}))
    assert events == [Start("msg_9", "claude-x", Usage(5, 0, 7, 0)), BlockStart(0, Text("")), Delta(0, "Found."),
                      BlockEnd(0), Finish("stop", Usage(6, 9, 7, 0))]


def test_decoder_error_event_is_a_stream_failure():
    events = decode_all(anthropic_sse(MESSAGE_START, {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    failure = events[-1]
    assert isinstance(failure, StreamFailure)
    assert (failure.error.status, failure.error.kind, failure.error.message) == (529, "overloaded", "Overloaded")
    assert len(events) == 2    # close() after a failure adds nothing


def test_decoder_close_without_end_fails_and_after_message_delta_finishes():
    cut = decode_all(anthropic_sse(MESSAGE_START, {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}}))
    assert isinstance(cut[-1], StreamFailure) and cut[-1].error.kind == "api_error"

    no_stop = decode_all(anthropic_sse(
        MESSAGE_START, {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 3}}))
    assert no_stop[-1] == Finish("length", Usage(5, 3, 7, 0))


def test_decoder_rejects_invalid_json():
    events = decode_all([("message_start", "{not json")])
    assert isinstance(events[0], StreamFailure) and len(events) == 1


def test_decoder_streams_tool_input_given_whole_in_the_start_block():
    events = decode_all(anthropic_sse(
        MESSAGE_START,
        {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"}))
    assert events[1:4] == [BlockStart(0, ToolCall("t1", "f")), Delta(0, '{"a":1}', "arguments"), BlockEnd(0)]


# ---- stream encoder ---------------------------------------------------------------------------
STREAM = [Start("msg_abc", "claude-x", Usage(100, 0, 50, 10)),
          BlockStart(0, Thinking()), Delta(0, "pondering", "thinking"), Delta(0, "c2ln", "signature"), BlockEnd(0),
          BlockStart(1, Text("")), Delta(1, "Héllo "), Delta(1, "world \u2603"), BlockEnd(1),
          BlockStart(2, ToolCall("toolu_1", "Bash")), Delta(2, '{"command":', "arguments"),
          Delta(2, '"ls"}', "arguments"), BlockEnd(2),
          BlockStart(3, Thinking(redacted="opaque")), BlockEnd(3),
          Finish("tool_calls", Usage(100, 42, 50, 10))]


def test_encoder_writes_real_anthropic_events():
    encoder = MessagesStreamEncoder("claude-x", "msg_abc")
    raw = b"".join(encoder.feed(event) for event in STREAM)
    pairs = sse_bytes_events(raw)
    payloads = [json.loads(data) for _, data in pairs]

    assert all(name == payload["type"] for (name, _), payload in zip(pairs, payloads))
    assert [name for name, _ in pairs][:2] == ["message_start", "content_block_start"]
    assert [name for name, _ in pairs][-2:] == ["message_delta", "message_stop"]
    assert payloads[0]["message"]["usage"] == {"input_tokens": 100, "output_tokens": 1,
                                               "cache_creation_input_tokens": 10, "cache_read_input_tokens": 50}
    starts = [p for p in payloads if p["type"] == "content_block_start"]
    assert [p["index"] for p in starts] == [0, 1, 2, 3]
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}
    tool_deltas = [p["delta"] for p in payloads if p["type"] == "content_block_delta" and p["index"] == 2]
    assert tool_deltas == [{"type": "input_json_delta", "partial_json": '{"command":'},
                           {"type": "input_json_delta", "partial_json": '"ls"}'}]
    assert payloads[-2] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                            "usage": {"input_tokens": 100, "output_tokens": 42, "cache_creation_input_tokens": 10,
                                      "cache_read_input_tokens": 50}}
    assert "Héllo".encode() in raw    # no ASCII escaping


def test_decoder_of_encoder_output_gives_back_the_events():
    encoder = MessagesStreamEncoder("claude-x", "msg_abc")
    assert decode_all(sse_bytes_events(b"".join(encoder.feed(event) for event in STREAM))) == STREAM


@needs_fixtures
@pytest.mark.parametrize("name", ["anthropic_response_stream_final_text.sse",
                                  "anthropic_response_stream_text_then_tool_use.sse",
                                  "anthropic_response_stream_thinking_text_tool_use.sse"])
def test_fixture_streams_survive_decode_encode_decode(name):
    events = decode_all(sse_events(name))
    encoder = MessagesStreamEncoder(events[0].model, events[0].id)
    assert decode_all(sse_bytes_events(b"".join(encoder.feed(event) for event in events))) == events


def test_encoder_sends_refusal_as_text_and_failures_as_error_events():
    encoder = MessagesStreamEncoder("m")
    encoder.feed(Start("x", "m"))
    assert b'"content_block":{"type":"text","text":""}' in encoder.feed(BlockStart(0, Refusal("")))
    assert b'"delta":{"type":"text_delta","text":"no"}' in encoder.feed(Delta(0, "no", "refusal"))
    error = encoder.feed(StreamFailure(GatewayError(429, "rate_limit", "slow down")))
    assert sse_bytes_events(error) == [("error", json.dumps(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}, separators=(",", ":")))]
    assert encoder.id.startswith("msg_")


def test_ping():
    assert MessagesStreamEncoder("m").ping() == b'event: ping\ndata: {"type":"ping"}\n\n'


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, error_type", [
    ("invalid_request", "invalid_request_error"), ("authentication", "authentication_error"),
    ("permission", "permission_error"), ("not_found", "not_found_error"), ("too_large", "request_too_large"),
    ("rate_limit", "rate_limit_error"), ("api_error", "api_error"), ("overloaded", "overloaded_error"),
    ("timeout", "timeout_error")])
def test_error_bodies_use_anthropic_types(kind, error_type):
    assert messages_error_body(GatewayError(400, kind, "boom")) == {
        "type": "error", "error": {"type": error_type, "message": "boom"}}


def test_upstream_errors_are_parsed():
    err = messages_parse_error(529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    assert (err.status, err.kind, err.message) == (529, "overloaded", "Overloaded")
    err = messages_parse_error(402, b'{"type":"error","error":{"type":"billing_error","message":"pay"}}')
    assert err.kind == "permission"
    err = messages_parse_error(429, b"<html>Too Many Requests</html>")
    assert (err.kind, err.message) == ("rate_limit", "<html>Too Many Requests</html>")
    assert messages_parse_error(503, b"").kind == "overloaded"
    assert messages_parse_error(504, b"").message == "upstream returned HTTP 504"


# ---- token estimate ---------------------------------------------------------------------------
@needs_fixtures
def test_estimate_is_sane_for_the_claude_code_request_with_24_tools():
    body = fixture_body("claude_code_full_request_turn1.json")
    estimate = estimate_tokens(messages_parse_request(body))
    characters = len(json.dumps(body))
    assert characters / 6 < estimate < characters / 2


def test_estimate_grows_with_text_length():
    counts = [estimate_tokens(conversation(Message("user", [Text("word " * n)]))) for n in (0, 10, 100, 1000, 10000)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert 1000 < counts[-1] < 20000


def test_estimate_counts_cjk_about_one_token_per_character():
    chinese = estimate_tokens(conversation(Message("user", [Text("汉" * 1000)])))
    latin = estimate_tokens(conversation(Message("user", [Text("a" * 1000)])))
    assert 900 < chinese < 1100 and latin < 400


def test_estimate_counts_every_kind_of_part_and_tools():
    base = estimate_tokens(conversation(Message("user", [Text("x")])))
    with_image = estimate_tokens(conversation(Message("user", [Text("x"), Image(url="https://x/y.png")])))
    assert with_image - base == 1600
    long_args = "{" + '"a":"' + "b" * 4000 + '"}'
    for part in (ToolCall("c", "f", long_args), ToolResult("c", [Text("r" * 4000)]), Thinking("t" * 4000),
                 ToolResult("c", [Image(data="AAA", media_type="image/png")])):
        assert estimate_tokens(conversation(Message("user", [Text("x"), part]))) > base + 900
    tool = Tool("search", "d" * 4000, {"type": "object", "properties": {"q": {"type": "string"}}})
    assert estimate_tokens(conversation(Message("user", [Text("x")]), tools=[tool])) > base + 346 + 1000
    assert estimate_tokens(conversation(Message("user", [Text("x")]), system=["s" * 4000])) > base + 1000


def test_estimate_survives_lone_surrogates():
    assert estimate_tokens(conversation(Message("user", [Text("bad \ud800 text")]))) > 0
