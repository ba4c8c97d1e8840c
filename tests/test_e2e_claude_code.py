"""The real Claude Code CLI (`claude -p`) through the gateway, to a scripted mock provider.

Claude Code speaks Anthropic Messages only; pointed at the gateway with ANTHROPIC_BASE_URL it must work
against an OpenAI Chat provider (translation) as well as an Anthropic one (passthrough).
"""
import json
import os
import secrets
import shutil
import subprocess

import pytest

from conftest import provider_section

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(
    CLAUDE is None, reason="Claude Code CLI not found on PATH: npm install -g @anthropic-ai/claude-code@2.1.197")
CLIENT_KEY = "sk-ant-e2e-client"
RUN_TIMEOUT = 90


def run_claude(gw, tmp_path, prompt: str, *flags: str) -> subprocess.CompletedProcess:
    """`claude -p` in a fresh HOME and working directory, offline except for the gateway."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": CLIENT_KEY,
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    # flags before the prompt: some (--allowedTools) take several values
    return subprocess.run([CLAUDE, "-p", *flags, prompt], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def describe(result: subprocess.CompletedProcess, mock) -> str:
    sent = [(r.method, r.path, (r.json or {}).get("model")) for r in mock.requests]
    return f"exit {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-1500:]}\nrequests: {sent}"


def tool_names(body: dict) -> set[str]:
    """Tool names of a chat or Messages request body."""
    return {(tool.get("function") or tool).get("name") for tool in body.get("tools") or []}


def is_main_turn(body: dict) -> bool:
    """The agent's own turns carry its tools; side requests (titles, quota checks) carry none."""
    return "Bash" in tool_names(body)


def chat_tool_messages(body: dict) -> list[dict]:
    return [m for m in body.get("messages", []) if m.get("role") == "tool"]


def messages_tool_results(body: dict) -> list[dict]:
    return [block for m in body.get("messages", []) if m.get("role") == "user" and isinstance(m["content"], list)
            for block in m["content"] if block.get("type") == "tool_result"]


def gateway_to(gateway_factory, mock, wire: str):
    return gateway_factory(provider_section("up", mock, wire) + "[routes]\n* = up\n")


# ---- Chat provider: the gateway translates ------------------------------------------------------

def text_answer_turns(gateway_factory, mock, tmp_path, wire: str) -> tuple[subprocess.CompletedProcess, list]:
    """Claude Code asked for one word through a provider of this wire: it prints the provider's
    answer; returns its run and the requests of its main turn (not the title request)."""
    answer = "PONG-" + secrets.token_hex(4)
    mock.handler = lambda request: {"text": answer if is_main_turn(request.json or {}) else "Title"}
    gw = gateway_to(gateway_factory, mock, wire)
    result = run_claude(gw, tmp_path, "Reply with the word pong.")
    assert result.returncode == 0, describe(result, mock)
    assert answer in result.stdout, describe(result, mock)
    main = [r for r in mock.requests if is_main_turn(r.json or {})]
    assert main, describe(result, mock)
    return result, main


def test_claude_code_prints_a_text_answer_from_a_chat_provider(gateway_factory, mock, tmp_path):
    result, main = text_answer_turns(gateway_factory, mock, tmp_path, "chat")
    assert all(r.route == "/v1/chat/completions" for r in mock.requests), describe(result, mock)
    body = main[0].json
    assert body["stream"] is True and body["model"].startswith("claude")
    assert body["messages"][0]["role"] == "system"                     # Claude Code's system prompt
    assert "x-anthropic-billing-header" not in body["messages"][0]["content"]
    assert "Reply with the word pong." in json.dumps(body["messages"][1:])
    assert main[0].header("authorization") == "Bearer sk-test-up"
    assert CLIENT_KEY not in str(main[0].headers)


# ---- Messages provider: the gateway relays --------------------------------------------------------

def test_claude_code_prints_a_text_answer_from_a_messages_provider(gateway_factory, mock, tmp_path):
    _, main = text_answer_turns(gateway_factory, mock, tmp_path, "messages")
    sent = main[0]
    assert sent.route == "/v1/messages"
    assert sent.header("x-api-key") == "sk-test-up" and sent.header("authorization") is None
    assert CLIENT_KEY not in str(sent.headers)
    assert sent.header("anthropic-version") == "2023-06-01" and sent.header("anthropic-beta")
    assert sent.header("user-agent").startswith("claude-cli/")
    # relayed untouched: Claude Code's own fields are all there
    assert sent.json["stream"] is True and "thinking" in sent.json
    assert sent.json["system"][0]["text"].startswith("x-anthropic-billing-header")


# ---- a Bash tool round trip, through either kind of provider ---------------------------------------

def chat_follow_up_carries_the_result(body: dict, call_id: str, token: str) -> None:
    history = body["messages"]
    at = next(i for i, m in enumerate(history) if m["role"] == "tool")
    assert history[at - 1]["role"] == "assistant"                      # the result right after its call
    assert [c["id"] for c in history[at - 1]["tool_calls"]] == [call_id]
    assert json.loads(history[at - 1]["tool_calls"][0]["function"]["arguments"])["command"] == f"echo {token}"
    assert history[at]["tool_call_id"] == call_id and token in history[at]["content"]


def messages_follow_up_carries_the_result(body: dict, call_id: str, token: str) -> None:
    result = messages_tool_results(body)[-1]
    assert result["tool_use_id"] == call_id and token in json.dumps(result)


TOOL_RESULTS = {"chat": chat_tool_messages, "messages": messages_tool_results}
FOLLOW_UP_CHECKS = {"chat": chat_follow_up_carries_the_result, "messages": messages_follow_up_carries_the_result}


@pytest.mark.parametrize("wire, call_id", [("chat", "call_bash_1"), ("messages", "toolu_bash_1")])
def test_claude_code_runs_a_bash_tool_and_sends_its_output_back(gateway_factory, mock, tmp_path, wire, call_id):
    token = "tok" + secrets.token_hex(6)
    final = "FINAL-" + secrets.token_hex(4)

    def handler(request):
        body = request.json or {}
        if not is_main_turn(body):
            return {"text": "Title"}
        results = TOOL_RESULTS[wire](body)
        if results:
            return {"text": f"{final} saw={token in json.dumps(results[-1])}"}
        return {"tool_calls": [{"id": call_id, "name": "Bash", "arguments": json.dumps(
            {"command": f"echo {token}", "description": "Print the token"})}]}

    mock.handler = handler
    gw = gateway_to(gateway_factory, mock, wire)
    result = run_claude(gw, tmp_path, "Run the echo command.", "--allowedTools=Bash")
    assert result.returncode == 0, describe(result, mock)
    assert f"{final} saw=True" in result.stdout, describe(result, mock)
    follow_up = next(r.json for r in mock.requests if TOOL_RESULTS[wire](r.json or {}))
    FOLLOW_UP_CHECKS[wire](follow_up, call_id, token)
