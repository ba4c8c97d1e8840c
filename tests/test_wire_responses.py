import base64
import json
import re
from pathlib import Path

import pytest

from conftest import assert_neutral_stream
from tokligence import *  # noqa: E402,F403

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"captured traffic not found at {FIXTURES}")
REQUEST_FIXTURES = sorted(p.name for p in FIXTURES.glob("codex_*.json")) if FIXTURES.is_dir() else []
STREAM_FIXTURES = sorted(p.name for p in FIXTURES.glob("responses_stream_*.sse")) if FIXTURES.is_dir() else []
PROVIDER_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def fixture_body(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["body"]


# ---- SSE helpers and ordering checkers ---------------------------------------------------------
def split_sse(raw: bytes | str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def decode(raw: bytes | str) -> list[Event]:
    decoder = ResponsesStreamDecoder()
    events = [e for name, data in split_sse(raw) for e in decoder.feed(name, data)]
    return events + decoder.close()


def check_responses_sse(raw: bytes | str) -> list[dict]:
    """Asserts the ordering rules a Responses client relies on; returns the parsed events.

    sequence_number counts up by 1 from 0; event: names match types; created/in_progress open the
    stream; every delta/done names an added, not yet done item by item_id and output_index (and an
    open content or summary part); deltas add up to the done text; every added item is done; the
    terminal event comes last and lists the items.
    """
    events = [(name, json.loads(data)) for name, data in split_sse(raw)]
    payloads = [p for _, p in events]
    for n, (name, payload) in enumerate(events):
        assert payload["sequence_number"] == n, f"event {n} has sequence_number {payload['sequence_number']}"
        assert name is None or name == payload["type"]
    types = [p["type"] for p in payloads]
    assert types[:2] == ["response.created", "response.in_progress"]
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert types[-1] in terminal and not terminal & set(types[:-1])
    items: dict[int, dict] = {}
    done: set[int] = set()
    open_parts: dict[tuple, str] = {}   # (output_index, kind, sub-index) → text so far
    for payload in payloads[2:-1]:
        kind = payload["type"]
        index = payload["output_index"]
        if kind == "response.output_item.added":
            assert index == len(items), "items are added in output order"
            assert all(i in done for i in items), "one item streams at a time"
            items[index] = payload["item"]
            continue
        assert index in items and index not in done, f"{kind} for an item not open"
        if kind == "response.output_item.done":
            assert payload["item"]["id"] == items[index]["id"]
            assert not any(key[0] == index for key in open_parts), "parts closed before their item"
            done.add(index)
            continue
        assert payload["item_id"] == items[index]["id"], f"{kind} names the wrong item"
        if "content_index" in payload:
            key = (index, "content", payload["content_index"])
        elif "summary_index" in payload:
            key = (index, "summary", payload["summary_index"])
        else:
            key = (index, "call", 0)
        if kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            assert key not in open_parts
            open_parts[key] = ""
        elif kind.endswith(".delta"):
            if key[1] == "call":
                open_parts.setdefault(key, "")
            assert key in open_parts, f"{kind} outside an open part"
            open_parts[key] += payload["delta"]
        elif kind in ("response.content_part.done", "response.reasoning_summary_part.done"):
            part = payload["part"]
            assert open_parts.pop(key) == part.get("text", part.get("refusal"))
        elif kind.endswith(".done"):
            final = next(payload[k] for k in ("text", "refusal", "arguments", "input") if k in payload)
            assert open_parts.get(key, "") == final, f"{kind} text differs from its deltas"
            if key[1] == "call":
                open_parts.pop(key, None)
    assert set(items) == done, "every added item is done"
    response = payloads[-1]["response"]
    assert [item["id"] for item in response["output"]] == [items[i]["id"] for i in sorted(items)]
    return payloads


# ---- requests: Codex fixtures ------------------------------------------------------------------
def declared_tools(body: dict) -> list[tuple[str, str, dict]]:
    """(namespace, name, spec) of every function/custom tool a request declares."""
    found = []
    groups = [("", body.get("tools") or [])]
    groups += [("", item["tools"]) for item in body["input"] if item.get("type") == "additional_tools"]
    for namespace, specs in groups:
        for spec in specs:
            if spec["type"] == "namespace":
                found += [(spec["name"], t["name"], t) for t in spec["tools"]]
            elif spec["type"] in ("function", "custom"):
                found.append((namespace, spec["name"], spec))
    return found


@needs_fixtures
@pytest.mark.parametrize("name", REQUEST_FIXTURES)
def test_every_codex_request_reaches_the_conversation(name):
    body = fixture_body(name)
    conv = responses_parse_request(body)
    assert conv.model == body["model"] and conv.stream is True
    assert conv.reasoning_effort == body["reasoning"]["effort"]
    assert conv.tool_choice == "auto" and conv.parallel_tool_calls == body["parallel_tool_calls"]

    tools = {tool.name: tool for tool in conv.tools}
    declared = declared_tools(body)
    assert len(tools) == len(declared)
    reverse = {original: flat for flat, original in conv.tool_namespaces.items()}
    for namespace, tool_name, spec in declared:
        sent = reverse[(namespace, tool_name)] if namespace else tool_name
        assert PROVIDER_NAME.match(sent)
        assert tools[sent].custom == (spec["type"] == "custom")
        assert tools[sent].description == spec["description"]
        if spec["type"] == "custom" and isinstance(spec["format"], dict):
            assert tools[sent].format == spec["format"]
        if spec["type"] == "function" and isinstance(spec["parameters"], dict):
            assert tools[sent].parameters == spec["parameters"]

    developer_texts = [part["text"] for item in body["input"]
                       if item.get("type") == "message" and item["role"] == "developer" for part in item["content"]]
    assert conv.system == developer_texts

    roles = [message.role for message in conv.messages]
    assert all(a != b for a, b in zip(roles, roles[1:])), "turns alternate"
    calls = [p for m in conv.messages if m.role == "assistant" for p in m.parts if isinstance(p, ToolCall)]
    results = [p for m in conv.messages if m.role == "user" for p in m.parts if isinstance(p, ToolResult)]
    call_items = [i for i in body["input"] if i["type"] in ("function_call", "custom_tool_call")]
    output_items = [i for i in body["input"] if i["type"] in ("function_call_output", "custom_tool_call_output")]
    assert [(c.id, c.custom) for c in calls] == [(i["call_id"], i["type"] == "custom_tool_call") for i in call_items]
    assert [(r.call_id, r.custom) for r in results] == [
        (i["call_id"], i["type"] == "custom_tool_call_output") for i in output_items]
    for call in calls:
        assert call.name in tools, "history calls use the names the provider is given"
    for result in results:
        position = next(n for n, m in enumerate(conv.messages) if result in m.parts)
        assert any(c.id == result.call_id for c in conv.messages[position - 1].parts if isinstance(c, ToolCall))


@needs_fixtures
@pytest.mark.parametrize("name", REQUEST_FIXTURES)
def test_every_codex_request_renders_back_for_a_responses_provider(name):
    body = fixture_body(name)
    conv = responses_parse_request(body)
    rendered = responses_render_request(conv, UpstreamProfile())
    assert rendered["model"] == body["model"]
    assert rendered["instructions"] == "\n\n".join(conv.system)
    assert rendered["store"] is False and rendered["stream"] is True
    assert rendered["reasoning"] == {"effort": body["reasoning"]["effort"]}
    assert [t["name"] for t in rendered["tools"]] == [t.name for t in conv.tools]
    wanted = ("function_call", "custom_tool_call", "function_call_output", "custom_tool_call_output")
    assert [(i["type"], i["call_id"]) for i in rendered["input"] if i["type"] in wanted] == [
        (i["type"], i["call_id"]) for i in body["input"] if i["type"] in wanted]
    assert responses_parse_request(rendered).messages == conv.messages


@needs_fixtures
def test_namespace_tools_flatten_to_reversible_provider_safe_names():
    conv = responses_parse_request(fixture_body("codex_default_gpt62sol_request2_responses_lite.json"))
    exec_tool = next(t for t in conv.tools if t.name == "functions__exec")
    assert exec_tool.custom and exec_tool.format["type"] == "grammar"
    assert conv.tool_namespaces["functions__exec"] == ("functions", "exec")
    assert conv.tool_namespaces["clock__sleep"] == ("clock", "sleep")
    call = conv.messages[1].parts[0]
    assert call == ToolCall("call_d1789f314103466d99c48060", "functions__exec", call.arguments, True)
    result = conv.messages[2].parts[0]
    assert result.custom and [p.text for p in result.content] == [
        "Script completed\nWall time 0.2 seconds\nOutput:\n", "hello\n"]


def test_unsafe_or_long_namespaced_names_stay_valid_unique_and_reversible():
    long_name = "t" * 70
    body = {"model": "m", "tools": [{"type": "namespace", "name": "my.ns", "description": "", "tools": [
        {"type": "function", "name": long_name}, {"type": "function", "name": long_name + "x"},
        {"type": "function", "name": "run"}]}]}
    conv = responses_parse_request(body)
    names = [t.name for t in conv.tools]
    assert len(set(names)) == 3 and all(PROVIDER_NAME.match(n) for n in names)
    assert "my_ns__run" in names
    assert sorted(conv.tool_namespaces.values()) == sorted([("my.ns", long_name), ("my.ns", long_name + "x"),
                                                       ("my.ns", "run")])


def test_history_calls_resolve_with_or_without_their_namespace():
    body = {"model": "m", "tools": [{"type": "function", "name": "exec_command"}],
            "input": [{"type": "additional_tools", "tools": [{"type": "namespace", "name": "clock", "description": "",
                                                              "tools": [{"type": "function", "name": "sleep"}]}]},
                {"type": "function_call", "call_id": "a", "name": "exec_command", "namespace": "functions",
                 "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "sleep", "namespace": "clock", "arguments": "{}"},
                {"type": "function_call", "call_id": "c", "name": "sleep", "arguments": "{}"},
                {"type": "function_call", "call_id": "d", "name": "gone", "namespace": "old.ns", "arguments": "{}"}]}
    calls = responses_parse_request(body).messages[0].parts
    assert [c.name for c in calls] == ["exec_command", "clock__sleep", "clock__sleep", "old_ns__gone"]


@needs_fixtures
def test_builtin_tools_are_skipped_and_named_for_logging():
    conv = responses_parse_request(fixture_body("codex_full_request_gpt55_turn1.json"))
    assert conv.unportable_tools == ["tool_search", "web_search"]
    assert "web_search" not in {t.name for t in conv.tools}


@needs_fixtures
def test_title_generation_request_asks_for_its_json_schema():
    body = fixture_body("codex_tui_title_generation_request.json")
    conv = responses_parse_request(body)
    fmt = body["text"]["format"]
    assert conv.response_format == {"type": "json_schema", "name": fmt["name"], "schema": fmt["schema"],
                                    "strict": True}
    assert responses_render_request(conv, UpstreamProfile())["text"] == {"format": conv.response_format}


# ---- requests: constructed bodies --------------------------------------------------------------
def test_string_input_becomes_one_user_message_after_instructions():
    conv = responses_parse_request({"model": "m", "instructions": "Be brief.", "input": "hi",
                                    "input_ignored_field": 1})
    assert conv.system == ["Be brief."]
    assert conv.messages == [Message("user", [Text("hi")])]


def test_items_group_into_alternating_turns_and_unportable_items_are_ignored():
    body = {"model": "m", "input": [
        {"type": "message", "role": "system", "content": "sys"},
        {"role": "user", "content": "first"},
        {"type": "configuration_update", "settings": {"x": 1}},
        {"type": "item_reference", "id": "msg_1"},
        {"type": "mystery", "payload": True},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "plan"},
                                                       {"type": "summary_text", "text": "more"}],
         "encrypted_content": "gAAA"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "g", "input": "raw"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": "two"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "next"}]},
        {"type": "message", "role": "developer", "content": "dev"},
    ]}
    conv = responses_parse_request(body)
    assert conv.system == ["sys", "dev"]
    assert conv.messages == [
        Message("user", [Text("first")]),
        Message("assistant", [Thinking("plan\n\nmore", encrypted="gAAA"), Text("calling"),
                              ToolCall("c1", "f", "{\"a\":1}"), ToolCall("c2", "g", "raw", True)]),
        Message("user", [ToolResult("c1", [Text("one")]), ToolResult("c2", [Text("two")], custom=True),
                         Text("next")]),
    ]


def test_images_files_and_refusals_convert_to_neutral_parts():
    text_file = base64.b64encode(b"print('hi')\n").decode()
    body = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0K", "detail": "high"},
        {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
        {"type": "input_image", "file_id": "file-abc"},
        {"type": "input_file", "filename": "a.py", "file_data": f"data:text/x-python;base64,{text_file}"},
        {"type": "input_file", "filename": "notes.md", "file_data": text_file},
        {"type": "input_file", "filename": "r.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"},
        {"type": "input_audio", "input_audio": {}},
    ]}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]}
    user, assistant = responses_parse_request(body).messages
    image, url_image, file_note, py, md, pdf = user.parts
    assert image == Image(data="iVBORw0K", media_type="image/png")
    assert url_image == Image(url="https://example.com/cat.jpg")
    assert "file-abc" in file_note.text and "omitted" in file_note.text
    assert "print('hi')" in py.text and 'name="a.py"' in py.text
    assert "print('hi')" in md.text
    assert "r.pdf" in pdf.text and "omitted" in pdf.text
    assert assistant.parts == [Refusal("no")]


def test_tool_output_arrays_keep_text_and_images():
    body = {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "https://x/y.png"}]}]}
    [result] = responses_parse_request(body).messages[0].parts
    assert result == ToolResult("c", [Text("see"), Image(url="https://x/y.png")])


@pytest.mark.parametrize("choice, expected", [
    ("none", ("none", "")),
    ("required", ("required", "")),
    ({"type": "function", "name": "f"}, ("tool", "f")),
    ({"type": "custom", "name": "sleep", "namespace": "clock"}, ("tool", "clock__sleep")),
    ({"type": "allowed_tools", "mode": "required", "tools": []}, ("required", "")),
    ({"type": "allowed_tools", "mode": "auto", "tools": []}, ("auto", "")),
    ({"type": "web_search_preview"}, ("auto", "")),
])
def test_tool_choice_forms_map_to_neutral_choice(choice, expected):
    body = {"model": "m", "tool_choice": choice, "tools": [
        {"type": "function", "name": "f"},
        {"type": "namespace", "name": "clock", "description": "", "tools": [{"type": "custom", "name": "sleep"}]}]}
    conv = responses_parse_request(body)
    assert (conv.tool_choice, conv.tool_choice_name) == expected


def test_generation_settings_reach_the_conversation():
    conv = responses_parse_request({
        "model": "m", "input": [], "max_output_tokens": 300, "temperature": 0.2, "top_p": 0.9,
        "parallel_tool_calls": False, "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "json_object"}}, "user": "u-1", "store": True,
        "previous_response_id": "resp_1"})
    assert (conv.max_tokens, conv.temperature, conv.top_p, conv.parallel_tool_calls) == (300, 0.2, 0.9, False)
    assert conv.reasoning_effort == "high" and conv.user == "u-1"
    assert conv.response_format == {"type": "json_object"}
    assert responses_parse_request({"model": "m", "user": "old", "safety_identifier": "new"}).user == "new"
    assert responses_parse_request({"model": "m", "text": {"format": {"type": "text"}}}).response_format is None


@pytest.mark.parametrize("body, param", [
    ([], "body"),
    ({}, "model"),
    ({"model": 5}, "model"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": [5]}, "input[0]"),
    ({"model": "m", "input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"type": "message", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"model": "m", "input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0].arguments"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png,x"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"type": "additional_tools", "tools": [{"type": "function"}]}]},
     "input[0].tools[0].name"),
    ({"model": "m", "tools": {}}, "tools"),
    ({"model": "m", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "tools": [{"name": "x"}]}, "tools[0].type"),
    ({"model": "m", "tools": [{"type": "namespace", "name": "ns"}]}, "tools[0].tools"),
    ({"model": "m", "max_output_tokens": "100"}, "max_output_tokens"),
    ({"model": "m", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "temperature": True}, "temperature"),
    ({"model": "m", "stream": "yes"}, "stream"),
    ({"model": "m", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "m", "tool_choice": 1}, "tool_choice"),
    ({"model": "m", "tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"model": "m", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"model": "m", "reasoning": {"effort": 3}}, "reasoning.effort"),
])
def test_malformed_bodies_are_rejected_with_400_naming_the_field(body, param):
    with pytest.raises(GatewayError) as caught:
        responses_parse_request(body)
    err = caught.value
    assert (err.status, err.kind, err.param) == (400, "invalid_request", param)
    assert param in err.message


# ---- requests: neutral → Responses provider -----------------------------------------------------
def sample_conversation() -> Conversation:
    return Conversation(
        "gpt-x", system=["You are terse.", "Use tools."], stream=True, max_tokens=50_000, temperature=0.5,
        tools=[Tool("f", "does f", {"type": "object", "properties": {"a": {"type": "string"}}}),
               Tool("patch", "edits", custom=True, format={"type": "grammar", "syntax": "lark", "definition": "x"})],
        tool_choice="tool", tool_choice_name="patch", parallel_tool_calls=True, stop=["END"],
        reasoning_effort="low", response_format={"type": "json_object"}, user="u",
        messages=[
            Message("user", [Text("look"), Image(data="AAAA", media_type="image/png")]),
            Message("assistant", [Thinking("hmm", signature="sig"), Text("ok"), ToolCall("c1", "f", "{}"),
                                  ToolCall("c2", "patch", "*** Begin", True)]),
            Message("user", [ToolResult("c1", [Text("done")]),
                             ToolResult("c2", [Text("img:"), Image(url="https://x/y.png")], custom=True),
                             Text("thanks")]),
        ])


def test_render_request_builds_a_responses_body():
    body = responses_render_request(sample_conversation(), UpstreamProfile(max_output_tokens=32_000))
    assert body["instructions"] == "You are terse.\n\nUse tools."
    assert body["input"] == [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}]},
        {"type": "message", "role": "assistant", "content": "ok"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "patch", "input": "*** Begin"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "img:"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
    ]
    assert body["tools"] == [
        {"type": "function", "name": "f", "description": "does f",
         "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}, "strict": False},
        {"type": "custom", "name": "patch", "description": "edits",
         "format": {"type": "grammar", "syntax": "lark", "definition": "x"}}]
    assert body["tool_choice"] == {"type": "custom", "name": "patch"}
    assert body["max_output_tokens"] == 32_000
    assert body["reasoning"] == {"effort": "low"}
    assert body["text"] == {"format": {"type": "json_object"}}
    assert (body["parallel_tool_calls"], body["temperature"], body["safety_identifier"]) == (True, 0.5, "u")
    assert body["store"] is False and body["stream"] is True
    assert "stop" not in body and "top_p" not in body


def test_rendered_requests_validate_against_the_openai_sdk():
    params = pytest.importorskip("openai.types.responses.response_create_params",
                                 reason="openai SDK (requirements-dev.txt) not installed")
    from pydantic import TypeAdapter
    request_type = TypeAdapter(params.ResponseCreateParamsStreaming)
    request_type.validate_python(responses_render_request(sample_conversation(), UpstreamProfile()))
    for name in REQUEST_FIXTURES:
        conv = responses_parse_request(fixture_body(name))
        request_type.validate_python(responses_render_request(conv, UpstreamProfile()))


def test_render_request_keeps_only_reasoning_openai_can_verify_and_strips_rejected_schema_keys():
    conv = Conversation("m", reasoning_effort="high",
                        tools=[Tool("f", parameters={"type": "object", "$schema": "x",
                                                     "properties": {"a": {"type": "string", "format": "uri"}}})],
                        response_format={"type": "json_schema", "name": "n", "strict": True,
                                         "schema": {"type": "object", "format": "x"}},
                        messages=[Message("user", [Text("q")]),
                                  Message("assistant", [Thinking("t", encrypted="gAAA"), Text("a")])])
    profile = UpstreamProfile(drop_schema_keys=frozenset({"$schema", "format"}))
    body = responses_render_request(conv, profile)
    assert body["input"][1] == {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}],
                                "encrypted_content": "gAAA"}
    assert body["tools"][0]["parameters"] == {"type": "object", "properties": {"a": {"type": "string"}}}
    assert body["text"]["format"]["schema"] == {"type": "object"}
    assert conv.tools[0].parameters["$schema"] == "x", "the conversation is not modified"
    plain = responses_render_request(conv, UpstreamProfile(reasoning=False))
    assert "reasoning" not in plain and all(i["type"] != "reasoning" for i in plain["input"])


# ---- responses: whole objects ------------------------------------------------------------------
def sample_reply(finish: str = "tool_calls") -> Reply:
    return Reply("msg_upstream", "claude-x", [
        Thinking("pondering", signature="sig"),
        Text("Running it."),
        ToolCall("toolu_1", "functions__exec", "text('hi')", True),
        ToolCall("toolu_2", "get_goal", "{}"),
    ], finish, usage=Usage(input_tokens=100, output_tokens=20, cache_read=30, cache_write=5, reasoning=7))


def test_render_response_shapes_items_usage_and_original_tool_names():
    body = responses_render_response(sample_reply(), created_at=1700000000,
                                     name_map={"functions__exec": ("functions", "exec")})
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert (body["created_at"], body["status"], body["model"]) == (1700000000, "completed", "claude-x")
    assert body["error"] is None and body["incomplete_details"] is None
    reasoning, message, custom, function = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": "pondering"}]
    assert "encrypted_content" not in reasoning
    assert message["id"].startswith("msg_") and message["status"] == "completed" and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Running it.", "annotations": [], "logprobs": []}]
    assert custom["id"].startswith("ctc_")
    assert {k: custom[k] for k in ("type", "call_id", "name", "namespace", "input")} == {
        "type": "custom_tool_call", "call_id": "toolu_1", "name": "exec", "namespace": "functions",
        "input": "text('hi')"}
    assert function["id"].startswith("fc_") and "namespace" not in function
    assert {k: function[k] for k in ("type", "call_id", "name", "arguments", "status")} == {
        "type": "function_call", "call_id": "toolu_2", "name": "get_goal", "arguments": "{}", "status": "completed"}
    assert body["usage"] == {"input_tokens": 135, "input_tokens_details": {"cached_tokens": 30,
                                                                           "cache_write_tokens": 5},
                             "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 7},
                             "total_tokens": 155}


@needs_fixtures
def test_render_response_echoes_the_request_settings():
    request = fixture_body("codex_full_request_gpt55_turn1.json")
    body = responses_render_response(Reply("r", "gpt-5.5", [Text("hi")]), request=request)
    assert body["tools"] == request["tools"] and body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is True and body["store"] is False
    assert body["reasoning"] == {"effort": "medium"}
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "low"}
    assert body["previous_response_id"] is None and body["metadata"] == {}
    bare = responses_render_response(Reply("r", "m", [Text("hi")]))
    assert (bare["tools"], bare["temperature"], bare["top_p"], bare["truncation"]) == ([], 1.0, 1.0, "disabled")


@pytest.mark.parametrize("finish, reason", [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_truncated_replies_render_as_incomplete(finish, reason):
    body = responses_render_response(Reply("r", "m", [Text("cut")], finish))
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": reason}
    assert responses_parse_response(body).finish == finish


def test_parse_response_reads_back_what_render_response_writes():
    reply = sample_reply()
    reply.parts[0] = Thinking("pondering", encrypted="gAAA")
    parsed = responses_parse_response(responses_render_response(reply))
    assert parsed.parts == reply.parts
    assert parsed.finish == "tool_calls" and parsed.model == "claude-x"
    assert parsed.usage == reply.usage


def test_parse_response_of_a_failed_response_raises_the_upstream_error():
    body = {"id": "resp_1", "status": "failed", "output": [],
            "error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    with pytest.raises(GatewayError) as caught:
        responses_parse_response(body)
    assert (caught.value.status, caught.value.kind, caught.value.code) == (429, "rate_limit", "rate_limit_exceeded")
    assert caught.value.message == "slow down"


# ---- stream decoder ----------------------------------------------------------------------------
EXPECTED_FIXTURE_PARTS = {
    "responses_stream_custom_tool_call_codemode.sse": [ToolCall(
        "call_d1789f314103466d99c48060", "exec",
        'const r = await tools.exec_command({cmd: "echo hello"});\ntext(r.output);', True)],
    "responses_stream_final_text.sse": [Text("The command finished; the tool output was received. Done.")],
    "responses_stream_function_call.sse": [ToolCall("call_ed37a485cbc44f7889060bba", "exec_command",
                                                    '{"cmd": "echo hello"}')],
    "responses_stream_minimal_accepted.sse": [ToolCall("call_63302f4998ac4aae9d5f3fa8", "exec_command",
                                                       '{"cmd": "echo hello"}')],
    "responses_stream_reasoning_then_function_call.sse": [
        Thinking("**Planning** I will answer briefly."),
        ToolCall("call_a86f9e2920f14da1b29cf24a", "exec_command", '{"cmd": "echo hello"}')],
}


@needs_fixtures
@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_decoder_turns_every_stream_fixture_into_well_ordered_events(name):
    events = decode((FIXTURES / name).read_text())
    assert_neutral_stream(events)
    collector = ReplyCollector()
    for event in events:
        collector.feed(event)
    assert collector.done and collector.failure is None
    assert collector.reply.parts == EXPECTED_FIXTURE_PARTS[name]
    finish = events[-1]
    assert finish.reason == ("stop" if name == "responses_stream_final_text.sse" else "tool_calls")
    assert finish.usage.output_tokens == 12 and finish.usage.input_tokens > 0


@needs_fixtures
def test_decoder_replays_items_that_arrive_only_when_done():
    events = decode((FIXTURES / "responses_stream_minimal_accepted.sse").read_text())
    assert [type(e).__name__ for e in events] == ["Start", "BlockStart", "Delta", "BlockEnd", "Finish"]
    assert events[2] == Delta(0, '{"cmd": "echo hello"}', "arguments")


def sse_lines(*payloads: dict) -> str:
    """Events without `event:` lines, as some servers send them."""
    return "".join(f"data: {json.dumps(p)}\n\n" for p in payloads)


def test_decoder_accepts_deltas_without_content_part_events_and_joins_summary_parts():
    raw = sse_lines(
        {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-oss"}},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "reasoning", "id": "rs_1"}},
        {"type": "response.reasoning_summary_part.added", "output_index": 0, "summary_index": 0},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "one"},
        {"type": "response.reasoning_summary_part.added", "output_index": 0, "summary_index": 1},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "two"},
        {"type": "response.output_item.done", "output_index": 0, "item": {"type": "reasoning", "id": "rs_1"}},
        {"type": "response.output_item.added", "output_index": 1, "item": {"type": "message", "id": "m"}},
        {"type": "response.output_text.delta", "output_index": 1, "delta": "Hi"},
        {"type": "response.output_item.done", "output_index": 1, "item": {"type": "message", "id": "m"}},
        {"type": "response.completed", "response": {"status": "completed"}})
    events = decode(raw)
    assert_neutral_stream(events)
    assert events == [Start("resp_1", "gpt-oss"), BlockStart(0, Thinking()), Delta(0, "one", "thinking"),
                      Delta(0, "\n\n", "thinking"), Delta(0, "two", "thinking"), BlockEnd(0),
                      BlockStart(1, Text("")), Delta(1, "Hi"), BlockEnd(1), Finish("stop")]


def test_decoder_replays_a_final_response_that_was_never_streamed():
    raw = sse_lines({"type": "response.completed", "response": {"id": "resp_1", "model": "m", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "all at once"}]}]}})
    events = decode(raw)
    assert_neutral_stream(events)
    assert events[1:4] == [BlockStart(0, Text("")), Delta(0, "all at once"), BlockEnd(0)]


@pytest.mark.parametrize("details, reason", [({"reason": "max_output_tokens"}, "length"),
                                              ({"reason": "content_filter"}, "content_filter")])
def test_decoder_reports_incomplete_responses_as_their_finish_reason(details, reason):
    raw = sse_lines({"type": "response.incomplete", "response": {
        "status": "incomplete", "incomplete_details": details, "usage": {"input_tokens": 9, "output_tokens": 4}}})
    assert decode(raw)[-1] == Finish(reason, Usage(9, 4))


@pytest.mark.parametrize("payload, status, kind", [
    ({"type": "response.failed", "response": {"status": "failed", "error": {
        "code": "server_error", "message": "boom"}}}, 502, "api_error"),
    ({"type": "response.failed", "response": {"status": "failed", "error": {
        "code": "context_length_exceeded", "message": "too long"}}}, 400, "invalid_request"),
    ({"type": "error", "code": "rate_limit_exceeded", "message": "slow", "param": None}, 429, "rate_limit"),
])
def test_decoder_turns_failures_into_stream_failure(payload, status, kind):
    decoder = ResponsesStreamDecoder()
    decoder.feed(None, json.dumps({"type": "response.created", "response": {"id": "r", "model": "m"}}))
    [failure] = decoder.feed(None, json.dumps(payload))
    assert isinstance(failure, StreamFailure)
    assert (failure.error.status, failure.error.kind) == (status, kind)
    assert decoder.feed(None, json.dumps({"type": "response.completed", "response": {}})) == []
    assert decoder.close() == []


def test_decoder_failure_before_any_output_comes_without_start():
    [failure] = ResponsesStreamDecoder().feed("error", json.dumps(
        {"type": "error", "code": "server_is_overloaded", "message": "busy"}))
    assert isinstance(failure, StreamFailure) and (failure.error.status, failure.error.kind) == (503, "overloaded")


def test_decoder_close_before_completion_is_a_failure():
    decoder = ResponsesStreamDecoder()
    decoder.feed("response.created", json.dumps({"type": "response.created", "response": {"id": "r", "model": "m"}}))
    [failure] = decoder.close()
    assert isinstance(failure, StreamFailure) and "response.completed" in failure.error.message
    assert isinstance(ResponsesStreamDecoder().feed(None, "{not json")[0], StreamFailure)


# ---- stream encoder ----------------------------------------------------------------------------
RID = "resp_test0001"


def text_block(index: int, *chunks: str) -> list[Event]:
    return [BlockStart(index, Text("")), *(Delta(index, c) for c in chunks), BlockEnd(index)]


def call_block(index: int, call_id: str, name: str, *chunks: str, custom: bool = False) -> list[Event]:
    return [BlockStart(index, ToolCall(call_id, name, "", custom)),
            *(Delta(index, c, "arguments") for c in chunks), BlockEnd(index)]


SCENARIOS: dict[str, list[Event]] = {
    "text": [Start(RID, "m"), *text_block(0, "Hel", "lo"), Finish("stop", Usage(12, 3, 4))],
    "text_then_tool_calls": [Start(RID, "m"), *text_block(0, "Let me check."),
                             *call_block(1, "call_1", "exec_command", '{"cmd":', '"ls"}'),
                             *call_block(2, "call_2", "write_stdin", "{}"),
                             Finish("tool_calls", Usage(50, 20))],
    "several_tool_calls": [Start(RID, "m"), *call_block(0, "a", "f", "{}"), *call_block(1, "b", "g", '{"x":1}'),
                           *call_block(2, "c", "h", '{"y":', "2}"), Finish("tool_calls", Usage(5, 5))],
    "custom_tool_call": [Start(RID, "m"), *call_block(0, "call_x", "apply_patch", "*** Begin Patch\n", "*** End",
                                                      custom=True), Finish("tool_calls", Usage(7, 9))],
    "reasoning": [Start(RID, "m"), BlockStart(0, Thinking()), Delta(0, "Think", "thinking"),
                  Delta(0, "ing.", "thinking"), BlockEnd(0), *text_block(1, "Answer."),
                  Finish("stop", Usage(8, 30, 0, 0, 22))],
    "refusal": [Start(RID, "m"), BlockStart(0, Refusal("")), Delta(0, "I can't help", "refusal"), BlockEnd(0),
                Finish("stop", Usage(3, 4))],
}


def encode(events: list[Event], **options) -> tuple[bytes, ResponsesStreamEncoder]:
    encoder = ResponsesStreamEncoder("m", id=RID, **options)
    return b"".join(encoder.feed(e) for e in events), encoder


@pytest.mark.parametrize("name", SCENARIOS)
def test_encoder_output_passes_the_event_order_checker(name):
    raw, encoder = encode(SCENARIOS[name])
    payloads = check_responses_sse(raw)
    assert raw.startswith(b"event: response.created\ndata: ")
    assert payloads[-1]["type"] == "response.completed"
    assert payloads[-1]["response"] == encoder.response
    assert all(p["response"]["id"] == RID for p in payloads if "response" in p)


def test_encoder_failure_mid_stream_passes_the_checker_and_reports_the_error():
    events = [Start(RID, "m"), *text_block(0, "partial"),
              StreamFailure(GatewayError(429, "rate_limit", "Rate limit reached, try again in 2s"))]
    raw, encoder = encode(events)
    payloads = check_responses_sse(raw)
    failed = payloads[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "rate_limit_exceeded",
                                           "message": "Rate limit reached, try again in 2s"}
    assert encoder.response == failed["response"]
    assert encoder.feed(Finish("stop")) == b""
    explicit = encode([Start(RID, "m"), StreamFailure(GatewayError(400, "invalid_request", "long",
                                                                   code="context_length_exceeded"))])[0]
    assert json.loads(split_sse(explicit)[-1][1])["response"]["error"]["code"] == "context_length_exceeded"


@needs_fixtures
@pytest.mark.parametrize("name", [n for n in STREAM_FIXTURES if "minimal" not in n])
def test_event_order_checker_accepts_the_real_streams(name):
    check_responses_sse((FIXTURES / name).read_text())


def shape(raw: bytes | str) -> list[tuple[str, list[str], list[str]]]:
    """Per event: type, its keys, and the keys of its item or part."""
    out = []
    for _, data in split_sse(raw):
        payload = json.loads(data)
        inner = payload.get("item") or payload.get("part") or {}
        out.append((payload["type"], sorted(payload), sorted(inner)))
    return out


@needs_fixtures
@pytest.mark.parametrize("name, events", [
    ("responses_stream_final_text.sse", [Start(RID, "m"), *text_block(0, "a", "b", "c"), Finish("stop")]),
    ("responses_stream_function_call.sse", [Start(RID, "m"), *call_block(0, "c", "f", "{", "}", "x"),
                                            Finish("tool_calls")]),
    ("responses_stream_custom_tool_call_codemode.sse", [Start(RID, "m"), *call_block(0, "c", "exec", "x", custom=True),
                                                        Finish("tool_calls")]),
    ("responses_stream_reasoning_then_function_call.sse", [
        Start(RID, "m"), BlockStart(0, Thinking(encrypted="gAAA")), Delta(0, "plan", "thinking"), BlockEnd(0),
        *call_block(1, "c", "f", "{", "}", "x"), Finish("tool_calls")]),
])
def test_encoder_emits_the_same_events_and_fields_as_the_real_streams(name, events):
    assert shape(encode(events)[0]) == shape((FIXTURES / name).read_text())


@pytest.mark.parametrize("name", SCENARIOS)
def test_decoding_the_encoder_output_gives_back_the_events(name):
    assert decode(encode(SCENARIOS[name])[0]) == SCENARIOS[name]


@pytest.mark.parametrize("name", SCENARIOS)
def test_encoder_events_and_final_response_validate_against_the_openai_sdk(name):
    types = pytest.importorskip("openai.types.responses", reason="openai SDK (requirements-dev.txt) not installed")
    from pydantic import TypeAdapter
    event_type = TypeAdapter(types.ResponseStreamEvent)
    raw, encoder = encode(SCENARIOS[name], name_map={"apply_patch": ("functions", "apply_patch")})
    for _, data in split_sse(raw):
        event_type.validate_python(json.loads(data))
    types.Response.model_validate(encoder.response)
    types.Response.model_validate(responses_render_response(sample_reply(), request={"model": "m"}))


def test_encoder_drops_signature_deltas_and_keeps_encrypted_reasoning():
    events = [Start(RID, "m"), BlockStart(0, Thinking(encrypted="gAAA")), Delta(0, "why", "thinking"),
              Delta(0, "c2lnbmF0dXJl", "signature"), BlockEnd(0), Finish("stop")]
    raw, encoder = encode(events)
    check_responses_sse(raw)
    assert b"c2lnbmF0dXJl" not in raw
    assert encoder.response["output"][0]["summary"] == [{"type": "summary_text", "text": "why"}]
    assert encoder.response["output"][0]["encrypted_content"] == "gAAA"


def test_encoder_names_flattened_tools_as_the_client_declared_them():
    events = [Start(RID, "m"), *call_block(0, "c1", "functions__exec", "x", custom=True),
              *call_block(1, "c2", "clock__sleep", "{}"), Finish("tool_calls")]
    raw, encoder = encode(events, name_map={"functions__exec": ("functions", "exec"),
                                            "clock__sleep": ("clock", "sleep")})
    added = [p["item"] for p in check_responses_sse(raw) if p["type"] == "response.output_item.added"]
    assert [(i["name"], i["namespace"]) for i in added] == [("exec", "functions"), ("sleep", "clock")]
    assert [(i["name"], i["namespace"]) for i in encoder.response["output"]] == [("exec", "functions"),
                                                                                ("sleep", "clock")]


@needs_fixtures
def test_encoder_keeps_the_final_response_with_request_echo_and_usage():
    request = fixture_body("codex_default_gpt62sol_request2_responses_lite.json")
    raw, encoder = encode(SCENARIOS["text_then_tool_calls"], request=request)
    created = json.loads(split_sse(raw)[0][1])["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert created["reasoning"] == {"effort": "low", "context": "all_turns"}
    assert created["parallel_tool_calls"] is False and created["store"] is False
    final = encoder.response
    assert final["status"] == "completed" and final["id"] == RID
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1]["arguments"] == '{"cmd":"ls"}'
    assert final["usage"]["input_tokens"] == 50 and final["usage"]["total_tokens"] == 70


def test_encoder_reports_length_as_incomplete():
    raw, encoder = encode([Start(RID, "m"), *text_block(0, "cut"), Finish("length", Usage(1, 2))])
    payloads = check_responses_sse(raw)
    assert payloads[-1]["type"] == "response.incomplete"
    assert encoder.response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert decode(raw)[-1].reason == "length"


def test_encoder_opens_the_stream_even_without_a_start_event():
    raw, _ = encode([StreamFailure(GatewayError(502, "api_error", "upstream down"))])
    types = [p["type"] for p in check_responses_sse(raw)]
    assert types == ["response.created", "response.in_progress", "response.failed"]


def test_fast_delta_events_are_byte_for_byte_what_the_general_event_writer_makes():
    for part, field_name, extra in ((Text(""), "text", {"logprobs": []}), (ToolCall("c", "f", ""), "arguments", {}),
                                    (Thinking(), "thinking", {})):
        encoder = ResponsesStreamEncoder("m", request={})
        encoder.feed(BlockStart(0, part))
        for text in ('h\u00e9"llo\n', "second"):
            raw = encoder.feed(Delta(0, text, field_name))
            event = raw[raw.rindex(b"event: "):]    # after a reasoning summary part's opening event
            fields = {"type": encoder._delta_type, "sequence_number": encoder._seq - 1, **encoder._ids,
                      "delta": text, **extra}
            assert event == sse_event(encoder._delta_type, fields)
