"""Request policies: duplicate tool-call loop detection and per-provider tool filtering, on every
client protocol, streamed or not."""
import json

import anthropic
import openai
import pytest

import tokligence as tk
from conftest import provider_section


def chat_history(repeats: int, args: str = '{"cmd": "ls"}') -> list[dict]:
    messages = [{"role": "user", "content": "list files"}]
    for i in range(repeats):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "shell", "arguments": args}}]})
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": "a.txt"})
    return messages


def messages_history(repeats: int) -> list[dict]:
    messages = [{"role": "user", "content": "list files"}]
    for i in range(repeats):
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "shell", "input": {"cmd": "ls"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "a.txt"}]})
    return messages


def responses_history(repeats: int) -> list[dict]:
    items: list[dict] = [{"type": "message", "role": "user", "content": "list files"}]
    for i in range(repeats):
        items.append({"type": "function_call", "call_id": f"call_{i}", "name": "shell",
                      "arguments": '{"cmd":  "ls"}' if i % 2 else '{"cmd":"ls"}'})
        items.append({"type": "function_call_output", "call_id": f"call_{i}", "output": "a.txt"})
    return items


SHELL_CHAT = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]
SHELL_MESSAGES = [{"name": "shell", "input_schema": {"type": "object"}}]
SHELL_RESPONSES = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]


@pytest.fixture
def gw(gateway_factory, mock):
    return gateway_factory(provider_section("chatty", mock) + provider_section("claude", mock, "messages")
                           + "[routes]\nclaude* = claude\n* = chatty\n")


# ---- pure -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("wire, body", [
    ("chat", {"messages": chat_history(4)}),
    ("messages", {"messages": messages_history(4)}),
    ("responses", {"input": responses_history(4)}),
])
def test_repeated_calls_are_counted_by_meaning_not_spelling(wire, body):
    assert tk.repeated_tool_call(wire, body) == ("shell", 4)


def test_a_different_call_breaks_the_run():
    history = chat_history(2) + chat_history(3, '{"cmd": "pwd"}')[1:]
    assert tk.repeated_tool_call("chat", {"messages": history}) == ("shell", 3)
    assert tk.repeated_tool_call("chat", {"messages": [{"role": "user", "content": "hi"}]}) == ("", 0)
    assert tk.repeated_tool_call("chat", {"messages": "not a list"}) == ("", 0)


def test_tool_filter_drops_named_tools_and_resets_a_choice_that_named_one():
    body = {"tools": [{"type": "web_search"}, {"type": "function", "name": "shell"}],
            "tool_choice": {"type": "web_search"}}
    assert tk.drop_unsupported_tools("responses", body, frozenset({"web_search"})) == ["web_search"]
    assert body == {"tools": [{"type": "function", "name": "shell"}], "tool_choice": "auto"}
    only = {"tools": [{"type": "web_search"}], "tool_choice": "required", "parallel_tool_calls": True}
    tk.drop_unsupported_tools("responses", only, frozenset({"web_search"}))
    assert only == {}


# ---- warning at 3 ---------------------------------------------------------------------------------

def test_chat_loop_warning_reaches_the_provider_system_prompt(gw, mock):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="gpt-x", messages=chat_history(3), tools=SHELL_CHAT)
    system = mock.requests[-1].json["messages"][0]
    assert system["role"] == "system" and "3 identical calls to the tool 'shell'" in system["content"]
    client.chat.completions.create(model="gpt-x", messages=chat_history(2), tools=SHELL_CHAT)
    assert mock.requests[-1].json["messages"][0]["role"] == "user"


def test_messages_loop_warning_is_appended_to_the_system_prompt(gw, mock):
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    client.messages.create(model="claude-x", max_tokens=100, system="Be brief.", messages=messages_history(4),
                           tools=SHELL_MESSAGES)
    system = mock.requests[-1].json["system"]
    assert system.startswith("Be brief.\n\n") and "4 identical calls" in system


def test_responses_loop_warning_reaches_a_translated_provider(gw, mock):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.responses.create(model="gpt-x", instructions="Be brief.", input=responses_history(3),
                            tools=SHELL_RESPONSES, store=False)
    system = mock.requests[-1].json["messages"][0]
    assert system["role"] == "system" and "Be brief." in system["content"]
    assert "3 identical calls" in system["content"]


# ---- stop at 5 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_chat_loop_stop_ends_the_turn_without_calling_the_provider(gw, mock, stream):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="gpt-x", messages=chat_history(5), tools=SHELL_CHAT, stream=stream)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert "repeating myself" in text and "'shell'" in text
    assert finish == ["stop"]
    assert mock.requests == []
    health = openai.OpenAI(base_url=gw.url, api_key="x").get("/health", cast_to=object)
    assert health["loops"]["stopped"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_messages_loop_stop_answers_in_anthropic_shape(gw, mock, stream):
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    if stream:
        with client.messages.stream(model="claude-x", max_tokens=100, messages=messages_history(6),
                                    tools=SHELL_MESSAGES) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(model="claude-x", max_tokens=100, messages=messages_history(6),
                                         tools=SHELL_MESSAGES)
    assert message.stop_reason == "end_turn"
    assert "6 tool calls were the same call to 'shell'" in message.content[0].text
    assert mock.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_responses_loop_stop_answers_with_a_completed_response(gw, mock, stream):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    if stream:
        with client.responses.stream(model="gpt-x", input=responses_history(5), tools=SHELL_RESPONSES,
                                     store=False) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(model="gpt-x", input=responses_history(5), tools=SHELL_RESPONSES,
                                           store=False)
    assert response.status == "completed" and "repeating myself" in response.output_text
    assert mock.requests == []


def test_loop_thresholds_come_from_settings(gateway_factory, mock):
    gw = gateway_factory(provider_section("chatty", mock) + "[routes]\n* = chatty\n"
                         "[gateway]\nloop_warn_after = 0\nloop_stop_after = 0\n")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="gpt-x", messages=chat_history(9), tools=SHELL_CHAT)
    assert mock.requests[-1].json["messages"][0]["role"] == "user"


# ---- tool filtering -------------------------------------------------------------------------------

def test_builtin_tools_are_dropped_for_a_non_openai_responses_provider(gateway_factory, mock):
    gw = gateway_factory(provider_section("resp", mock, "responses") + "[routes]\n* = resp\n")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.responses.create(model="m", input="hi", store=False,
                            tools=[{"type": "web_search"}, *SHELL_RESPONSES], tool_choice={"type": "web_search"})
    sent = mock.requests[-1].json
    assert [t.get("name") or t["type"] for t in sent["tools"]] == ["shell"]
    assert sent["tool_choice"] == "auto"


def test_a_provider_drop_list_from_settings_applies_to_passthrough(gateway_factory, mock):
    gw = gateway_factory(provider_section("chatty", mock, extra="drop_tools = dangerous") + "[routes]\n* = chatty\n")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    tools = SHELL_CHAT + [{"type": "function", "function": {"name": "dangerous", "parameters": {"type": "object"}}}]
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=tools)
    assert [t["function"]["name"] for t in mock.requests[-1].json["tools"]] == ["shell"]
    untouched = json.loads(mock.requests[-1].body)
    assert untouched["messages"] == [{"role": "user", "content": "x"}]
