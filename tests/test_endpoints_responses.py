"""OpenAI Responses through the gateway, driven by the official SDKs.

The `openai` SDK's `client.responses.create` / `client.responses.stream` reach each provider wire
(a mock Chat Completions, Anthropic Messages and Responses upstream); every stream the client reads
also goes through the event-order checker of test_wire_responses. The reverse direction, Chat and
Messages clients to a Responses provider, is at the end, with the stored-response endpoints,
tool filtering and duplicate tool-call detection.
"""
import json
import logging
import re
import time

import anthropic
import httpx2
import openai
import pytest

from conftest import FIXTURES, provider_section
from test_wire_responses import check_responses_sse, split_sse

MODEL = "gpt-5.5"
CLAUDE_MODEL = "claude-opus-4-8"
PROVIDER_WIRES = ["chat", "messages", "responses"]
TRANSLATED_WIRES = ["chat", "messages"]
PROVIDER_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
WEATHER_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"type": "function", "name": "get_time", "description": "Time in a zone",
     "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}},
]
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/s"}}
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch"


# ---- harness -------------------------------------------------------------------------------------
class RecordingTransport(httpx2.HTTPTransport):
    """The SDK's transport, keeping a copy of every response body exactly as the gateway sent it."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytearray] = []

    def handle_request(self, request):
        response = super().handle_request(request)
        body = bytearray()
        self.bodies.append(body)
        inner = response.stream

        class Tee(httpx2.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    body.extend(chunk)
                    yield chunk

            def close(self):
                inner.close()

        response.stream = Tee()
        return response

    @property
    def last(self) -> bytes:
        return bytes(self.bodies[-1])


class Client:
    """An openai.OpenAI pointed at the gateway, with the raw bodies it received."""

    def __init__(self, gw, **options) -> None:
        self.transport = RecordingTransport()
        self.sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0,
                                 http_client=httpx2.Client(transport=self.transport, timeout=30), **options)
        self.responses = self.sdk.responses

    def checked_stream(self, **params) -> tuple[list, list[dict]]:
        """responses.create(stream=True): the SDK's typed events, and the raw events once checked."""
        events = list(self.responses.create(stream=True, **params))
        return events, check_responses_sse(self.transport.last)


def gateway_for(gateway_factory, mock, wire: str, extra: str = "", gateway: str = ""):
    settings = (f"[gateway]\n{gateway}\n" if gateway else "") + provider_section("up", mock, wire, extra)
    return gateway_factory(settings + "[routes]\n* = up\n")


@pytest.fixture(params=PROVIDER_WIRES)
def wire(request) -> str:
    return request.param


@pytest.fixture
def gw(gateway_factory, mock, wire):
    return gateway_for(gateway_factory, mock, wire)


# What the upstream was sent, read the same way whatever its wire.
def upstream_tool_names(sent: dict) -> list[str]:
    return [t["function"]["name"] if "function" in t else t.get("name") or t["type"] for t in sent.get("tools") or []]


def upstream_system(sent: dict) -> str:
    texts = []
    system = sent.get("system")
    if isinstance(system, str):
        texts.append(system)
    elif isinstance(system, list):
        texts += [block.get("text", "") for block in system]
    if sent.get("instructions"):
        texts.append(sent["instructions"])
    for item in sent.get("messages") or (sent.get("input") if isinstance(sent.get("input"), list) else []):
        if item.get("role") in ("system", "developer"):
            content = item.get("content")
            texts += [content] if isinstance(content, str) else [p.get("text", "") for p in content or []]
    return "\n".join(texts)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if isinstance(p, dict) else "" for p in content or [])


def upstream_tool_traffic(sent: dict) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(tool calls as (id, name, arguments text), tool results as (call id, text)) in the history."""
    calls, results = [], []
    for message in sent.get("messages") or []:
        for call in message.get("tool_calls") or []:
            calls.append((call["id"], call["function"]["name"], call["function"]["arguments"]))
        if message.get("role") == "tool":
            results.append((message["tool_call_id"], _text_of(message["content"])))
        for block in message.get("content") if isinstance(message.get("content"), list) else []:
            if block.get("type") == "tool_use":
                calls.append((block["id"], block["name"], json.dumps(block["input"])))
            elif block.get("type") == "tool_result":
                results.append((block["tool_use_id"], _text_of(block.get("content"))))
    for item in sent.get("input") if isinstance(sent.get("input"), list) else []:
        if item.get("type") in ("function_call", "custom_tool_call"):
            calls.append((item["call_id"], item["name"], item.get("arguments", item.get("input"))))
        elif item.get("type") in ("function_call_output", "custom_tool_call_output"):
            results.append((item["call_id"], _text_of(item["output"])))
    return calls, results


def last_user_text_sent(sent: dict) -> str:
    turns = sent.get("messages") or sent.get("input") or []
    for turn in reversed(turns if isinstance(turns, list) else []):
        if turn.get("role") == "user" and _text_of(turn.get("content")):
            return _text_of(turn.get("content"))
    return turns if isinstance(turns, str) else ""


def logged_usage(caplog, path: str = "/v1/responses", timeout: float = 5.0) -> tuple[int, int]:
    """(in, out) of the gateway's last request log line for `path` (written just after the reply ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "tokligence.requests" and f"path={path} " in r.getMessage()]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert lines, f"no request log line for {path}"
    found = re.search(r" in=(\d+) out=(\d+)", lines[-1])
    return int(found[1]), int(found[2])


def item_dicts(response) -> list[dict]:
    return [item.model_dump(exclude_none=True) for item in response.output]


# ---- text ----------------------------------------------------------------------------------------
def test_text_answer_with_usage(gw, mock, wire):
    mock.enqueue({"text": "Hello there", "usage": {"input": 11, "output": 3}})
    response = Client(gw).responses.create(model=MODEL, input="Say hello", instructions="Be brief.")
    assert response.status == "completed"
    assert response.output_text == "Hello there"
    assert response.model == MODEL
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (11, 3, 14)
    sent = mock.requests[-1]
    assert sent.route == {"chat": "/v1/chat/completions", "messages": "/v1/messages",
                          "responses": "/v1/responses"}[wire]
    assert last_user_text_sent(sent.json) == "Say hello"
    assert "Be brief." in upstream_system(sent.json)


def test_streamed_text_arrives_in_order_and_adds_up(gw, mock, wire):
    mock.enqueue({"text": "The quick brown fox jumps", "deltas": 5, "usage": {"input": 9, "output": 5}})
    client = Client(gw)
    events, raw = client.checked_stream(model=MODEL, input="Tell me about the fox")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "The quick brown fox jumps"
    assert events[-1].type == "response.completed"
    final = events[-1].response
    assert final.output_text == "The quick brown fox jumps"
    assert final.usage.input_tokens == 9 and final.usage.output_tokens == 5
    assert {p["response"]["id"] for p in raw if "response" in p} == {final.id}
    assert mock.requests[-1].json["stream"] is True


def test_stream_helper_gives_the_final_response(gw, mock, wire):
    mock.enqueue({"text": "Streaming works", "deltas": 3})
    client = Client(gw)
    with client.responses.stream(model=MODEL, input="go") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    check_responses_sse(client.transport.last)
    assert "".join(texts) == "Streaming works"
    assert final.status == "completed" and final.output_text == "Streaming works"


# ---- tool calls ----------------------------------------------------------------------------------
TEXT_THEN_TWO_CALLS = {"text": "Let me check both.",
                       "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                      {"name": "get_time", "arguments": {"tz": "CET"}}],
                       "deltas": 3}


def assert_text_then_two_calls(output) -> None:
    assert [item.type for item in output] == ["message", "function_call", "function_call"]
    assert output[0].content[0].text == "Let me check both."
    assert [(item.name, json.loads(item.arguments)) for item in output[1:]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert output[1].call_id != output[2].call_id
    assert all(item.call_id for item in output[1:])


def test_text_before_several_tool_calls(gw, mock, wire):
    mock.enqueue(TEXT_THEN_TWO_CALLS)
    response = Client(gw).responses.create(model=MODEL, input="Weather and time in Paris?", tools=WEATHER_TOOLS)
    assert_text_then_two_calls(response.output)
    assert response.status == "completed"
    assert set(upstream_tool_names(mock.requests[-1].json)) == {"get_weather", "get_time"}


def test_streamed_text_before_several_tool_calls(gw, mock, wire):
    mock.enqueue(TEXT_THEN_TWO_CALLS)
    client = Client(gw)
    events, raw = client.checked_stream(model=MODEL, input="Weather and time in Paris?", tools=WEATHER_TOOLS)
    assert_text_then_two_calls(events[-1].response.output)
    arguments = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert {e.output_index for e in arguments} == {1, 2}
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [
        item.arguments for item in events[-1].response.output[1:]]


def test_several_tool_calls_without_text_stream(gw, mock, wire):
    mock.enqueue({"tool_calls": [{"name": "get_weather", "arguments": {"city": c}} for c in ("Oslo", "Rome", "Lima")]})
    events, raw = Client(gw).checked_stream(model=MODEL, input="Three cities", tools=WEATHER_TOOLS)
    output = events[-1].response.output
    assert [(i.type, json.loads(i.arguments)["city"]) for i in output] == [
        ("function_call", "Oslo"), ("function_call", "Rome"), ("function_call", "Lima")]
    assert len({i.call_id for i in output}) == 3


def test_function_call_output_round_trip(gw, mock, wire):
    client = Client(gw)
    mock.enqueue({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=WEATHER_TOOLS)
    [call] = first.output
    assert call.type == "function_call"
    mock.enqueue({"text": "It is 18 degrees in Paris."})
    history = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}]
    second = client.responses.create(model=MODEL, input=history, tools=WEATHER_TOOLS)
    assert second.output_text == "It is 18 degrees in Paris."
    calls, results = upstream_tool_traffic(mock.requests[-1].json)
    assert [(i, n, json.loads(a)) for i, n, a in calls] == [(call.call_id, "get_weather", {"city": "Paris"})]
    assert results == [(call.call_id, "18C and sunny")]


# ---- custom (freeform) and namespace tools -------------------------------------------------------
def custom_call_reply(wire: str, name: str, text: str) -> dict:
    """The model calling a freeform tool: chat and messages providers were given a function taking
    {"input": string}; a Responses provider has the tool natively."""
    if wire == "responses":
        return {"tool_calls": [{"name": name, "arguments": text, "custom": True}]}
    return {"tool_calls": [{"name": name, "arguments": {"input": text}}]}


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_custom_tool_is_bridged_to_a_one_string_function(gw, mock, wire):
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input="patch it", tools=[APPLY_PATCH, *WEATHER_TOOLS])
    sent = mock.requests[-1].json
    spec = next(t for t in sent["tools"] if (t.get("function") or t)["name"] == "apply_patch")
    schema = spec["function"]["parameters"] if wire == "chat" else spec["input_schema"]
    assert schema["type"] == "object" and list(schema["properties"]) == ["input"]
    assert schema["properties"]["input"]["type"] == "string"


def test_custom_tool_call_comes_back_as_custom_tool_call(gw, mock, wire):
    mock.enqueue(custom_call_reply(wire, "apply_patch", PATCH))
    response = Client(gw).responses.create(model=MODEL, input="add hello.txt", tools=[APPLY_PATCH])
    [item] = response.output
    assert (item.type, item.name, getattr(item, "input", None)) == ("custom_tool_call", "apply_patch", PATCH)


def test_streamed_custom_tool_call_comes_back_as_custom_tool_call(gw, mock, wire):
    mock.enqueue({**custom_call_reply(wire, "apply_patch", PATCH), "deltas": 4})
    events, raw = Client(gw).checked_stream(model=MODEL, input="add hello.txt", tools=[APPLY_PATCH])
    added = next(p["item"] for p in raw if p["type"] == "response.output_item.added")
    assert added["type"] == "custom_tool_call" and added["name"] == "apply_patch"
    assert "".join(p["delta"] for p in raw if p["type"] == "response.custom_tool_call_input.delta") == PATCH
    assert not any(p["type"].startswith("response.function_call_arguments") for p in raw)
    [item] = events[-1].response.output
    assert (item.type, getattr(item, "input", None)) == ("custom_tool_call", PATCH)


def test_custom_tool_call_output_round_trip(gw, mock, wire):
    client = Client(gw)
    mock.enqueue(custom_call_reply(wire, "apply_patch", PATCH))
    first = client.responses.create(model=MODEL, input="add hello.txt", tools=[APPLY_PATCH])
    call = first.output[0]
    mock.enqueue({"text": "Done."})
    history = [{"role": "user", "content": "add hello.txt"},
               {"type": "custom_tool_call", "call_id": call.call_id, "name": call.name, "input": call.input},
               {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Success. Updated hello.txt"}]
    assert client.responses.create(model=MODEL, input=history, tools=[APPLY_PATCH]).output_text == "Done."
    calls, results = upstream_tool_traffic(mock.requests[-1].json)
    assert results == [(call.call_id, "Success. Updated hello.txt")]
    [(call_id, name, arguments)] = calls
    assert (call_id, name) == (call.call_id, "apply_patch")
    assert arguments == PATCH if wire == "responses" else json.loads(arguments) == {"input": PATCH}


def codex_additional_tools() -> dict:
    body = json.loads((FIXTURES / "codex_default_gpt62sol_request2_responses_lite.json").read_text())["body"]
    return next(item for item in body["input"] if item["type"] == "additional_tools")


def flat_name(sent: dict, short: str) -> str:
    """The name the provider was given for a namespaced tool (whatever the flattening scheme)."""
    [name] = [n for n in upstream_tool_names(sent) if n.endswith(short) and n != short]
    return name


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_namespace_tools_are_flattened_for_the_provider(gw, mock, wire):
    tools_item = codex_additional_tools()
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input=[tools_item, {"role": "user", "content": "hi"}])
    names = upstream_tool_names(mock.requests[-1].json)
    declared = [(ns["name"], t["name"]) for ns in tools_item["tools"] for t in ns["tools"]]
    assert len(names) == len(set(names)) == len(declared)
    assert all(PROVIDER_NAME.match(n) for n in names)
    for namespace, short in declared:
        assert any(namespace in n and n.endswith(short) for n in names), (namespace, short)


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_namespace_tool_calls_map_back_to_their_namespace(gw, mock, wire, stream):
    def reply(request):
        sent = request.json
        return {"tool_calls": [{"name": flat_name(sent, "sleep"), "arguments": {"duration_ms": 10}},
                               {"name": flat_name(sent, "exec"), "arguments": {"input": "text('hi')"}}]}

    mock.handler = reply
    client = Client(gw)
    params = dict(model=MODEL, input=[codex_additional_tools(), {"role": "user", "content": "sleep, then exec"}])
    if stream:
        events, raw = client.checked_stream(**params)
        output = events[-1].response.output
        added = [p["item"] for p in raw if p["type"] == "response.output_item.added"]
        assert [(i["type"], i["name"], i.get("namespace")) for i in added] == [
            ("function_call", "sleep", "clock"), ("custom_tool_call", "exec", "functions")]
    else:
        output = client.responses.create(**params).output
    assert [(i.type, i.name, getattr(i, "namespace", None)) for i in output] == [
        ("function_call", "sleep", "clock"), ("custom_tool_call", "exec", "functions")]
    assert json.loads(output[0].arguments) == {"duration_ms": 10}
    assert output[1].input == "text('hi')"


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_namespaced_history_reaches_the_provider_under_the_flat_names(gw, mock, wire):
    body = json.loads((FIXTURES / "codex_default_gpt62sol_request2_responses_lite.json").read_text())["body"]
    mock.enqueue({"text": "hello was printed"})
    response = Client(gw).responses.create(**{k: body[k] for k in ("model", "input", "tool_choice",
                                                                     "parallel_tool_calls")})
    assert response.output_text == "hello was printed"
    sent = mock.requests[-1].json
    calls, results = upstream_tool_traffic(sent)
    [(call_id, name, arguments)] = calls
    assert call_id == "call_d1789f314103466d99c48060" and name == flat_name(sent, "exec")
    assert "echo hello" in json.loads(arguments)["input"]
    assert results[0][0] == call_id and "hello" in results[0][1]


# ---- reasoning, incomplete, failures -------------------------------------------------------------
def test_reasoning_becomes_a_reasoning_summary(gw, mock, wire):
    # chat: reasoning_content; messages: a thinking block; responses: a reasoning item.
    mock.enqueue({"reasoning": "The user wants a greeting.", "text": "Hello!"})
    response = Client(gw).responses.create(model=MODEL, input="greet me", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert [s.text for s in response.output[0].summary] == ["The user wants a greeting."]
    assert response.output_text == "Hello!"


def test_streamed_reasoning_summary_comes_before_the_text(gw, mock, wire):
    mock.enqueue({"reasoning": "Plan: answer briefly.", "text": "Brief.", "deltas": 3})
    events, raw = Client(gw).checked_stream(model=MODEL, input="be brief", reasoning={"effort": "low"})
    types = [p["type"] for p in raw]
    assert types.index("response.reasoning_summary_text.delta") < types.index("response.output_text.delta")
    summary = "".join(p["delta"] for p in raw if p["type"] == "response.reasoning_summary_text.delta")
    assert summary == "Plan: answer briefly."
    output = events[-1].response.output
    assert output[0].type == "reasoning" and output[0].summary[0].text == "Plan: answer briefly."


def test_length_limit_gives_an_incomplete_response(gw, mock, wire):
    mock.enqueue({"text": "This answer was cut", "finish": "length"})
    response = Client(gw).responses.create(model=MODEL, input="write a lot", max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "This answer was cut"


def test_streamed_length_limit_ends_with_response_incomplete(gw, mock, wire):
    mock.enqueue({"text": "This answer was cut", "finish": "length"})
    events, raw = Client(gw).checked_stream(model=MODEL, input="write a lot", max_output_tokens=16)
    assert raw[-1]["type"] == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def check_relayed_sse(raw: bytes) -> list[dict]:
    """What a relayed (passthrough) failure must still give a client: every event numbered in order
    with a matching event: name, and one terminal event, last. The items themselves are the
    provider's, relayed as they came."""
    events = [(name, json.loads(data)) for name, data in split_sse(raw)]
    for n, (name, payload) in enumerate(events):
        assert payload.get("sequence_number") == n, f"event {n}: {payload}"
        assert name is None or name == payload["type"]
    types = [payload["type"] for _, payload in events]
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert types[-1] in terminal and not terminal & set(types[:-1]), types
    return [payload for _, payload in events]


@pytest.mark.parametrize("fault", ["error_event", "cut_stream"])
def test_upstream_failure_mid_stream_ends_with_response_failed(gw, mock, wire, fault):
    # error_event: the provider reports the failure in its stream; cut_stream: the connection drops.
    mock.enqueue({"text": "partial answer that never ends", "deltas": 5, "fault": fault, "after": 2})
    client = Client(gw)
    events = list(client.responses.create(model=MODEL, input="go", stream=True))
    if wire == "responses":
        raw = check_relayed_sse(client.transport.last)
    else:
        raw = check_responses_sse(client.transport.last)
    assert raw[-1]["type"] == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.message
    assert {p["response"]["id"] for p in raw if "response" in p} == {failed.id}
    assert "".join(p["delta"] for p in raw if p["type"] == "response.output_text.delta").startswith("partial")


def test_unknown_model_is_a_404_in_openai_shape(gateway_factory, mock):
    gw = gateway_factory(provider_section("up", mock, "chat", "models = known-model"))
    client = Client(gw)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model="no-such-model", input="hi", stream=stream)
        error = caught.value.response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found" and "no-such-model" in error["message"]
    assert mock.requests == []


def test_provider_rate_limit_is_a_429_for_the_client(gw, mock, wire):
    client = Client(gw)
    for stream in (False, True):
        mock.enqueue({"status": 429, "headers": {"retry-after": "7"}})
        with pytest.raises(openai.RateLimitError) as caught:
            client.responses.create(model=MODEL, input="hi", stream=stream)
        assert caught.value.status_code == 429
        error = caught.value.response.json()["error"]
        assert set(error) >= {"message", "type", "code"} and error["message"]


# ---- passthrough to a Responses provider ---------------------------------------------------------
@pytest.mark.parametrize("wire", ["responses"])
def test_passthrough_keeps_unknown_fields_and_headers(gw, mock, wire):
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input="hi", store=False, include=["reasoning.encrypted_content"],
                                extra_body={"client_metadata": {"thread_id": "t-1"}, "vendor_knob": [1, {"a": 2}]},
                                extra_headers={"x-codex-turn-metadata": "turn-7", "session-id": "s-42"})
    sent = mock.requests[-1]
    assert sent.json["vendor_knob"] == [1, {"a": 2}] and sent.json["client_metadata"] == {"thread_id": "t-1"}
    assert sent.json["include"] == ["reasoning.encrypted_content"] and sent.json["store"] is False
    assert sent.header("x-codex-turn-metadata") == "turn-7" and sent.header("session-id") == "s-42"
    assert sent.header("authorization") == "Bearer sk-test-up"


@pytest.mark.parametrize("wire", ["responses"])
def test_passthrough_relays_the_stream_bytes_untouched_and_sniffs_usage(gw, mock, wire, caplog):
    caplog.set_level(logging.INFO, logger="tokligence")
    recorded = (FIXTURES / "responses_stream_function_call.sse").read_bytes()
    mock.enqueue({"status": 200, "body": recorded, "headers": {"content-type": "text/event-stream"}})
    client = Client(gw)
    events = list(client.responses.create(model=MODEL, input="run echo hello", stream=True))
    assert client.transport.last == recorded
    final = json.loads(split_sse(recorded)[-1][1])["response"]
    assert events[-1].response.id == final["id"]
    usage = final["usage"]
    assert logged_usage(caplog) == (usage["input_tokens"], usage["output_tokens"])


@pytest.mark.parametrize("wire", ["responses"])
def test_passthrough_relays_a_json_body_untouched_and_sniffs_usage(gw, mock, wire, caplog):
    caplog.set_level(logging.INFO, logger="tokligence")
    body = {"id": "resp_passthru", "object": "response", "created_at": 1, "status": "completed", "model": MODEL,
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "raw", "annotations": []}]}],
            "usage": {"input_tokens": 21, "output_tokens": 4, "total_tokens": 25},
            "vendor_extension": {"kept": True}}
    raw = json.dumps(body, indent=1).encode()
    mock.enqueue({"status": 200, "body": raw})
    client = Client(gw)
    response = client.responses.create(model=MODEL, input="hi")
    assert client.transport.last == raw
    assert response.output_text == "raw" and response.model_extra["vendor_extension"] == {"kept": True}
    assert logged_usage(caplog) == (21, 4)


# ---- the reverse: Chat and Messages clients to a Responses provider ------------------------------
@pytest.fixture
def responses_gw(gateway_factory, mock):
    return gateway_for(gateway_factory, mock, "responses")


def test_chat_sdk_reaches_a_responses_provider(responses_gw, mock):
    chat = openai.OpenAI(base_url=responses_gw.url + "/v1", api_key="sk-client", max_retries=0).chat.completions
    mock.enqueue({"text": "Bonjour", "usage": {"input": 8, "output": 2}})
    reply = chat.create(model=MODEL, messages=[{"role": "system", "content": "Speak French."},
                                               {"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "Bonjour" and reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (8, 2)
    sent = mock.requests[-1]
    assert sent.route == "/v1/responses"
    assert sent.json["instructions"] == "Speak French." and last_user_text_sent(sent.json) == "hello"


def test_chat_sdk_streams_tool_calls_from_a_responses_provider(responses_gw, mock):
    chat = openai.OpenAI(base_url=responses_gw.url + "/v1", api_key="sk-client", max_retries=0).chat.completions
    mock.enqueue(TEXT_THEN_TWO_CALLS)
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}
             for t in WEATHER_TOOLS]
    text, calls, finish, usage = "", {}, None, None
    for chunk in chat.create(model=MODEL, messages=[{"role": "user", "content": "both please"}], tools=tools,
                             stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": None, "arguments": ""})
                entry["name"] = call.function.name or entry["name"]
                entry["arguments"] += call.function.arguments or ""
    assert text == "Let me check both." and finish == "tool_calls" and usage.completion_tokens > 0
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert [t["name"] for t in mock.requests[-1].json["tools"]] == ["get_weather", "get_time"]


def test_anthropic_sdk_reaches_a_responses_provider(responses_gw, mock):
    client = anthropic.Anthropic(base_url=responses_gw.url, api_key="sk-ant-client", max_retries=0)
    mock.enqueue({"text": "Hi from Responses", "usage": {"input": 10, "output": 4}})
    message = client.messages.create(model=CLAUDE_MODEL, max_tokens=256, system="Be nice.",
                                     messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == "Hi from Responses" and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 4)
    sent = mock.requests[-1].json
    assert sent["instructions"] == "Be nice." and sent["max_output_tokens"] == 256


def test_anthropic_sdk_streams_a_tool_use_from_a_responses_provider(responses_gw, mock):
    client = anthropic.Anthropic(base_url=responses_gw.url, api_key="sk-ant-client", max_retries=0)
    mock.enqueue({"reasoning": "Need the weather.", "text": "Checking.",
                  "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "deltas": 3})
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_TOOLS[0]["parameters"]}]
    with client.messages.stream(model=CLAUDE_MODEL, max_tokens=512, tools=tools,
                                messages=[{"role": "user", "content": "weather in Paris"}]) as stream:
        message = stream.get_final_message()
    kinds = [block.type for block in message.content]
    assert kinds[-2:] == ["text", "tool_use"] and message.stop_reason == "tool_use"
    assert message.content[-1].name == "get_weather" and message.content[-1].input == {"city": "Paris"}


# ---- input token counting ------------------------------------------------------------------------
@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_input_tokens_are_estimated_locally_for_other_providers(gw, mock, wire):
    client = Client(gw)
    short = client.responses.input_tokens.count(model=MODEL, input="hi")
    long = client.responses.input_tokens.count(model=MODEL, input="a much longer question " * 50,
                                               instructions="Be brief.", tools=WEATHER_TOOLS)
    assert short.object == "response.input_tokens"
    assert 0 < short.input_tokens < long.input_tokens
    assert mock.requests == []


# ---- stored responses: store + previous_response_id, GET and DELETE -------------------------------
@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_previous_response_id_continues_a_stored_conversation(gw, mock, wire, stream):
    client = Client(gw)
    mock.enqueue({"text": "Nice to meet you, Ada."})
    if stream:
        events, _ = client.checked_stream(model=MODEL, input="My name is Ada.", instructions="Be kind.", store=True)
        first = events[-1].response
    else:
        first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be kind.", store=True)
    mock.enqueue({"text": "Your name is Ada."})
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     instructions="Be kind.")
    assert second.output_text == "Your name is Ada."
    sent = json.dumps(mock.requests[-1].json)
    positions = [sent.find(text) for text in ("My name is Ada.", "Nice to meet you, Ada.", "What is my name?")]
    assert -1 not in positions and positions == sorted(positions), "the whole conversation, in order"


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_continued_response_names_its_previous_response(gw, mock, wire, stream):
    client = Client(gw)
    mock.enqueue({"text": "first"}, {"text": "second"})
    first = client.responses.create(model=MODEL, input="one", store=True)
    params = dict(model=MODEL, input="two", previous_response_id=first.id)
    if stream:
        events, raw = client.checked_stream(**params)
        assert {p["response"]["previous_response_id"] for p in raw if "response" in p} == {first.id}
        second = events[-1].response
    else:
        second = client.responses.create(**params)
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).previous_response_id == first.id


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_previous_response_id_carries_tool_calls_into_the_next_turn(gw, mock, wire):
    client = Client(gw)
    mock.enqueue({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=WEATHER_TOOLS, store=True)
    call_id = first.output[0].call_id
    mock.enqueue({"text": "18 degrees."})
    client.responses.create(model=MODEL, previous_response_id=first.id, tools=WEATHER_TOOLS,
                            input=[{"type": "function_call_output", "call_id": call_id, "output": "18C"}])
    calls, results = upstream_tool_traffic(mock.requests[-1].json)
    assert [c[0] for c in calls] == [call_id] and results == [(call_id, "18C")]


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_chained_previous_response_ids_keep_every_turn(gw, mock, wire):
    client = Client(gw)
    previous = None
    for n in range(3):
        mock.enqueue({"text": f"answer {n}"})
        response = client.responses.create(model=MODEL, input=f"question {n}", store=True,
                                           **({"previous_response_id": previous} if previous else {}))
        previous = response.id
    sent = json.dumps(mock.requests[-1].json)
    assert all(f"question {n}" in sent for n in range(3)) and "answer 0" in sent and "answer 1" in sent


def test_unknown_previous_response_id_is_a_404_in_openai_shape(gateway_factory, mock):
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=MODEL, input="hi", previous_response_id="resp_doesnotexist", stream=stream)
        error = caught.value.response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and "resp_doesnotexist" in error["message"]
    assert mock.requests == []


@pytest.mark.parametrize("wire", TRANSLATED_WIRES)
def test_stored_response_can_be_retrieved_and_deleted(gw, mock, wire):
    client = Client(gw)
    mock.enqueue({"text": "Remember me", "usage": {"input": 5, "output": 2}})
    created = client.responses.create(model=MODEL, input="hi", store=True)
    fetched = client.responses.retrieve(created.id)
    assert (fetched.id, fetched.status, fetched.output_text) == (created.id, "completed", "Remember me")
    assert fetched.usage.output_tokens == 2
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="again", previous_response_id=created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_streamed_stored_response_can_be_retrieved_at_once(gateway_factory, mock):
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    mock.enqueue({"text": "streamed and stored", "deltas": 3})
    events, _ = client.checked_stream(model=MODEL, input="hi", store=True)
    fetched = client.responses.retrieve(events[-1].response.id)
    assert fetched.output_text == "streamed and stored" and fetched.status == "completed"


def test_unstored_responses_cannot_be_retrieved(gateway_factory, mock):
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    mock.enqueue({"text": "ephemeral"})
    created = client.responses.create(model=MODEL, input="hi", store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(created.id)
    assert set(caught.value.response.json()["error"]) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_neverexisted")


# ---- per-provider tool filtering -----------------------------------------------------------------
def codex_turn1() -> dict:
    return json.loads((FIXTURES / "codex_full_request_gpt55_turn1.json").read_text())["body"]


def send_codex_body(client: Client, body: dict) -> None:
    """A captured Codex request through the SDK; the fields the SDK does not name go as extra_body."""
    named = ("model", "input", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "store", "include")
    client.responses.create(**{k: body[k] for k in named if k in body},
                            extra_body={k: v for k, v in body.items() if k not in named and k != "stream"})


@pytest.mark.parametrize("wire", PROVIDER_WIRES)
def test_provider_drop_tools_removes_named_tools_and_their_tool_choice(gateway_factory, mock, wire):
    gw = gateway_for(gateway_factory, mock, wire, extra="drop_tools = get_time")
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input="time?", tools=WEATHER_TOOLS,
                                tool_choice={"type": "function", "name": "get_time"})
    sent = mock.requests[-1].json
    assert upstream_tool_names(sent) == ["get_weather"]
    assert sent.get("tool_choice", "auto") in ("auto", {"type": "auto"})


def test_provider_drop_tools_removes_tools_by_type(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat", extra="drop_tools = custom")
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input="hi", tools=[APPLY_PATCH, *WEATHER_TOOLS])
    assert upstream_tool_names(mock.requests[-1].json) == ["get_weather", "get_time"]


@pytest.mark.parametrize("wire", PROVIDER_WIRES)
def test_provider_drop_tools_reaches_codex_namespace_tools(gateway_factory, mock, wire):
    # Codex's default model declares every tool inside an additional_tools item, none in `tools`.
    gw = gateway_for(gateway_factory, mock, wire, extra="drop_tools = spawn_agent")
    mock.enqueue({"text": "ok"})
    Client(gw).responses.create(model=MODEL, input=[codex_additional_tools(), {"role": "user", "content": "hi"}])
    sent = mock.requests[-1].json
    if wire == "responses":
        items = [i for i in sent["input"] if i.get("type") == "additional_tools"]
        names = [t["name"] for item in items for ns in item["tools"] for t in ns.get("tools", [ns])]
    else:
        names = upstream_tool_names(sent)
    assert not [n for n in names if n.endswith("spawn_agent")], names
    assert any(n.endswith("wait_agent") for n in names)


def test_builtin_tools_are_dropped_by_default_for_a_responses_provider_that_is_not_openai(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "responses")
    body = codex_turn1()
    mock.enqueue({"text": "ok"})
    send_codex_body(Client(gw), body)
    sent = mock.requests[-1].json
    kinds = [t["type"] for t in sent["tools"]]
    assert "web_search" not in kinds and "tool_search" not in kinds
    assert upstream_tool_names(sent) == [t["name"] for t in body["tools"] if t["type"] in ("function", "custom")]


def test_builtin_tools_are_kept_for_the_openai_provider(gateway_factory, mock):
    gw = gateway_factory(provider_section("openai", mock, "responses") + "[routes]\n* = openai\n")
    body = codex_turn1()
    mock.enqueue({"text": "ok"})
    send_codex_body(Client(gw), body)
    assert [t["type"] for t in mock.requests[-1].json["tools"]] == [t["type"] for t in body["tools"]]


# ---- duplicate tool-call detection ---------------------------------------------------------------
def looping_history(repeats: int, arguments: str = '{"cmd":"ls"}') -> list[dict]:
    items: list[dict] = [{"role": "user", "content": "list the files"}]
    for n in range(repeats):
        items += [{"type": "function_call", "call_id": f"call_{n}", "name": "exec_command", "arguments": arguments},
                  {"type": "function_call_output", "call_id": f"call_{n}", "output": "a.txt"}]
    return items


EXEC_TOOL = [{"type": "function", "name": "exec_command", "description": "Run a command",
              "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}]


def test_repeated_tool_calls_add_a_warning_to_the_system_prompt(gw, mock, wire):
    client = Client(gw)
    systems = []
    for repeats in (2, 3):
        mock.enqueue({"text": "ok"})
        client.responses.create(model=MODEL, instructions="You are Codex.", tools=EXEC_TOOL,
                                input=looping_history(repeats))
        systems.append(upstream_system(mock.requests[-1].json))
    assert "You are Codex." in systems[0] and "You are Codex." in systems[1]
    warning = systems[1].replace("You are Codex.", "")
    assert warning.strip() and warning != systems[0].replace("You are Codex.", "")
    assert re.search(r"repeat|loop|same", warning, re.I), warning


def test_tool_calls_with_different_arguments_are_not_a_loop(gateway_factory, mock):
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    history = [{"role": "user", "content": "list"}]
    for n in range(6):
        history += [{"type": "function_call", "call_id": f"c{n}", "name": "exec_command",
                     "arguments": json.dumps({"cmd": f"ls dir{n}"})},
                    {"type": "function_call_output", "call_id": f"c{n}", "output": "x"}]
    mock.enqueue({"text": "fine"})
    assert client.responses.create(model=MODEL, instructions="sys", tools=EXEC_TOOL, input=history).output_text == "fine"
    assert upstream_system(mock.requests[-1].json) == "sys"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tool_loop_is_stopped_without_calling_the_provider(gw, mock, wire, stream):
    client = Client(gw)
    params = dict(model=MODEL, instructions="You are Codex.", tools=EXEC_TOOL, input=looping_history(5))
    if stream:
        events, raw = client.checked_stream(**params)
        assert raw[-1]["type"] == "response.completed"
        response = events[-1].response
    else:
        response = client.responses.create(**params)
    assert mock.requests == []
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["message"]
    assert re.search(r"repeat|loop|same", response.output_text, re.I)


def test_repeated_freeform_tool_calls_are_a_loop_too(gateway_factory, mock):
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    history = [{"role": "user", "content": "patch it"}]
    for n in range(5):
        history += [{"type": "custom_tool_call", "call_id": f"c{n}", "name": "apply_patch", "input": PATCH},
                    {"type": "custom_tool_call_output", "call_id": f"c{n}", "output": "error: context mismatch"}]
    response = client.responses.create(model=MODEL, tools=[APPLY_PATCH], input=history)
    assert mock.requests == [] and [item.type for item in response.output] == ["message"]


def test_a_new_user_message_after_a_stopped_loop_reaches_the_provider(gateway_factory, mock):
    # Codex resends the whole history each turn: the old loop must not block the user's next prompt.
    client = Client(gateway_for(gateway_factory, mock, "chat"))
    stopped = client.responses.create(model=MODEL, tools=EXEC_TOOL, input=looping_history(5))
    assert mock.requests == []
    mock.enqueue({"text": "Trying cat instead."})
    history = [*looping_history(5), {"role": "assistant", "content": stopped.output_text},
               {"role": "user", "content": "Then use cat instead."}]
    response = client.responses.create(model=MODEL, instructions="sys", tools=EXEC_TOOL, input=history)
    assert response.output_text == "Trying cat instead."
    assert len(mock.requests) == 1 and upstream_system(mock.requests[0].json) == "sys"


def test_loop_thresholds_come_from_settings(gateway_factory, mock):
    gw = gateway_for(gateway_factory, mock, "chat", gateway="loop_warn_after = 0\nloop_stop_after = 2")
    client = Client(gw)
    response = client.responses.create(model=MODEL, instructions="sys", tools=EXEC_TOOL, input=looping_history(2))
    assert mock.requests == [] and response.output[0].type == "message"
    mock.enqueue({"text": "ok"})
    client.responses.create(model=MODEL, instructions="sys", tools=EXEC_TOOL, input=looping_history(1))
    assert upstream_system(mock.requests[-1].json) == "sys"
