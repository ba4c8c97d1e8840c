"""End to end with the real Codex CLI: `codex exec` with a custom provider pointing at the gateway,
which routes every model to a scripted mock Chat Completions or Anthropic Messages upstream.

Codex speaks only the Responses API (stream: true, store: false, full history every turn), so each
test is a Responses client → translated provider round trip, tools included: `exec_command` (a
function tool) with `-m gpt-5.5`, and the default model's freeform `exec` tool, which the gateway
bridges to a one-string function for the provider and maps back to a custom_tool_call.
"""
import json
import os
import secrets
import shutil
import subprocess

import pytest

from conftest import provider_section

CODEX = shutil.which("codex")
pytestmark = pytest.mark.skipif(
    CODEX is None, reason="Codex CLI not installed: npm install -g @openai/codex@0.171.0 (see .ci/run)")

# From the fixtures README: what keeps codex exec from calling anything but the gateway.
OFFLINE = ["-c", "analytics.enabled=false", "--disable", "plugins", "--disable", "remote_plugin",
           "--disable", "apps", "--disable", "in_app_updates"]
KEY_ENV = "TOKLIGENCE_E2E_KEY"
RUN_TIMEOUT = 50


def tool_names(sent: dict) -> list[str]:
    return [t["function"]["name"] if "function" in t else t["name"] for t in sent.get("tools") or []]


def tool_results(sent: dict) -> list[tuple[str, str]]:
    """(call id, output text) of every tool result in a chat or messages request."""
    found = []
    for message in sent["messages"]:
        if message.get("role") == "tool":
            content = message["content"]
            found.append((message["tool_call_id"], content if isinstance(content, str)
                          else "".join(p.get("text", "") for p in content)))
        for block in message["content"] if isinstance(message.get("content"), list) else []:
            if block.get("type") == "tool_result":
                content = block.get("content")
                found.append((block["tool_use_id"], content if isinstance(content, str)
                              else "".join(p.get("text", "") for p in content or [])))
    return found


def tool_calls(sent: dict) -> list[tuple[str, str, dict]]:
    """(id, name, arguments) of every tool call in a chat or messages request's history."""
    found = []
    for message in sent["messages"]:
        for call in message.get("tool_calls") or []:
            found.append((call["id"], call["function"]["name"], json.loads(call["function"]["arguments"])))
        for block in message["content"] if isinstance(message.get("content"), list) else []:
            if block.get("type") == "tool_use":
                found.append((block["id"], block["name"], block["input"]))
    return found


class Codex:
    """A gateway routing every model to `mock` over `wire`, and `codex exec` configured to use it."""

    def __init__(self, gateway_factory, mock, wire: str, tmp_path):
        self.mock = mock
        self.gw = gateway_factory(provider_section("up", mock, wire) + "[routes]\n* = up\n")
        self.home = tmp_path / "codex-home"
        self.home.mkdir()
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        (self.home / "config.toml").write_text(
            'model_provider = "tokligence"\n\n'
            "[model_providers.tokligence]\n"
            'name = "Tokligence"\n'
            f'base_url = "{self.gw.url}/v1"\n'
            'wire_api = "responses"\n'
            f'env_key = "{KEY_ENV}"\n'
            "request_max_retries = 0\n"
            "stream_max_retries = 0\n")
        self.client_requests: list[dict] = []
        self._record_client_requests()

    def _record_client_requests(self) -> None:
        """Keeps what Codex sent to POST /v1/responses (the provider only sees the translation)."""
        gateway = self.gw.gateway
        handle = gateway.endpoints["/v1/responses"]["POST"]

        async def recording(request, responder):
            self.client_requests.append(json.loads(request.body))
            return await handle(request, responder)

        gateway.endpoints["/v1/responses"]["POST"] = recording

    def run(self, prompt: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CODEX_HOME": str(self.home), KEY_ENV: "sk-codex-e2e", "NO_COLOR": "1"}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CODEX_API_KEY"):
            env.pop(name, None)
        command = [CODEX, "exec", "--skip-git-repo-check", *OFFLINE,
                   "--dangerously-bypass-approvals-and-sandbox", "-C", str(self.workdir), *args, prompt]
        try:
            return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT, env=env, cwd=self.workdir)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"codex exec did not finish within {RUN_TIMEOUT} s; stderr:\n{exc.stderr}")

    def report(self, result: subprocess.CompletedProcess) -> str:
        return (f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}\n"
                f"upstream requests: {[r.route for r in self.mock.requests]}")


@pytest.fixture(params=["chat", "messages"])
def codex(request, gateway_factory, mock, tmp_path):
    return Codex(gateway_factory, mock, request.param, tmp_path)


def test_codex_gets_a_text_answer(codex, mock):
    token = secrets.token_hex(8)
    mock.enqueue({"text": f"The answer is {token}."})
    result = codex.run("Reply with the answer.")
    assert result.returncode == 0, codex.report(result)
    assert f"The answer is {token}." in result.stdout, codex.report(result)
    [sent] = mock.requests
    assert sent.json["stream"] is True
    assert "Reply with the answer." in json.dumps(sent.json["messages"][-1])
    [asked] = codex.client_requests
    assert asked["stream"] is True and asked["store"] is False


def test_codex_runs_exec_command_and_sends_its_output_back(codex, mock):
    token = secrets.token_hex(8)

    def script(request):
        if not tool_results(request.json):
            assert "exec_command" in tool_names(request.json)
            return {"text": "Running it.", "tool_calls": [{"name": "exec_command",
                                                           "arguments": {"cmd": f"echo {token}"}}]}
        return {"text": f"Done: the command printed {token}."}

    mock.handler = script
    result = codex.run("Run the echo command.", "-m", "gpt-5.5")
    assert result.returncode == 0, codex.report(result)
    assert f"Done: the command printed {token}." in result.stdout, codex.report(result)
    assert len(mock.requests) == 2, codex.report(result)
    follow_up = mock.requests[1].json
    [(call_id, name, arguments)] = tool_calls(follow_up)
    assert name == "exec_command" and arguments == {"cmd": f"echo {token}"}
    [(result_id, output)] = tool_results(follow_up)
    assert result_id == call_id and token in output, output
    outputs = [item for item in codex.client_requests[1]["input"] if item.get("type") == "function_call_output"]
    assert [item["call_id"] for item in outputs] == [call_id]


def test_codex_default_model_runs_its_freeform_exec_tool(codex, mock):
    token = secrets.token_hex(8)
    script_text = f'const r = await tools.exec_command({{cmd: "echo {token}"}});\ntext(r.output);'

    def script(request):
        if not tool_results(request.json):
            # the default model declares `exec` as a freeform tool in the `functions` namespace
            [bridged] = [n for n in tool_names(request.json) if n.endswith("exec")]
            return {"tool_calls": [{"name": bridged, "arguments": {"input": script_text}}]}
        return {"text": f"Done: {token} printed."}

    mock.handler = script
    result = codex.run("Run the echo command.")
    assert result.returncode == 0, codex.report(result)
    assert f"Done: {token} printed." in result.stdout, codex.report(result)
    assert len(mock.requests) == 2, codex.report(result)
    follow_up = mock.requests[1].json
    [(call_id, name, arguments)] = tool_calls(follow_up)
    assert name.endswith("exec") and arguments == {"input": script_text}
    [(result_id, output)] = tool_results(follow_up)
    assert result_id == call_id and token in output, codex.report(result) + f"\ntool output: {output!r}"
    items = codex.client_requests[1]["input"]
    [call] = [item for item in items if item.get("type") == "custom_tool_call"]
    assert (call["call_id"], call["name"], call["input"]) == (call_id, "exec", script_text)
    [answer] = [item for item in items if item.get("type") == "custom_tool_call_output"]
    assert answer["call_id"] == call_id and token in json.dumps(answer["output"])
