"""Per-provider options as users set them: extra headers, the client's own credentials, output caps,
the token field, schema keys a provider rejects, and reasoning off."""
import anthropic
import openai
import pytest

from conftest import provider_section
from team_edition import ADMIN_KEY, TEAM_ENV, call, clean_env, run_cli


def sent_headers(mock) -> dict[str, str]:
    return dict(mock.requests[-1].headers)


def test_extra_headers_from_settings_go_upstream(gateway_factory, mock):
    gw = gateway_factory(provider_section("router", mock, extra="headers =\n  HTTP-Referer: https://example.org\n"
                                                                 "  X-Title: tokligence") + "[routes]\n* = router\n")
    openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    headers = sent_headers(mock)
    assert headers["http-referer"] == "https://example.org" and headers["x-title"] == "tokligence"


CLAUDE_BODY = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_FORWARDING = "[provider.anthropic]\nwire = messages\nbase_url = {}\nforward_client_auth = true\n" \
                       "[routes]\n* = anthropic\n"


@pytest.mark.parametrize("section, env", [
    ("headers =\n  Bad Name: value\n", {}),
    ("", {"TOKLIGENCE_PROVIDER_ROUTER_API_KEY": "sk-key\nX-Injected: yes"}),
])
def test_a_provider_header_http_cannot_carry_stops_the_gateway_at_start(tmp_path, section, env):
    config = tmp_path / "settings.ini"
    config.write_text(f"[provider.router]\nbase_url = http://127.0.0.1:9/v1\n{section}")
    started = run_cli(config, "--port", "0", env={**clean_env(tmp_path), **env})
    assert started.returncode == 2
    assert "provider router: its base_url host, api_key or headers hold characters" in started.stderr


def test_forward_client_auth_sends_the_clients_own_key(gateway_factory, mock):
    gw = gateway_factory(ANTHROPIC_FORWARDING.format(mock.base_url))
    reply = call(gw, "POST", "/v1/messages", CLAUDE_BODY, headers={"x-api-key": "sk-ant-users-own"})
    assert reply.status == 200
    headers = sent_headers(mock)
    assert headers["x-api-key"] == "sk-ant-users-own" and "authorization" not in headers


def test_with_auth_on_the_gateway_key_stays_home_and_the_other_credential_goes_upstream(gateway_factory, mock):
    gw = gateway_factory(ANTHROPIC_FORWARDING.format(mock.base_url), env=TEAM_ENV)
    reply = call(gw, "POST", "/v1/messages", CLAUDE_BODY,    # as Claude Code sends both headers
                 headers={"x-api-key": ADMIN_KEY, "authorization": "Bearer users-subscription-token"})
    assert reply.status == 200
    headers = sent_headers(mock)
    assert headers["authorization"] == "Bearer users-subscription-token"
    assert "x-api-key" not in headers and ADMIN_KEY not in str(mock.requests[-1].headers)


def test_passthrough_clamps_output_tokens_only_above_the_cap(gateway_factory, mock):
    gw = gateway_factory(provider_section("claude", mock, "messages", "max_output_tokens = 4096")
                         + "[routes]\n* = claude\n")
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    client.messages.create(model="c", max_tokens=64000, messages=[{"role": "user", "content": "hi"}], timeout=30)
    assert mock.requests[-1].json["max_tokens"] == 4096
    client.messages.create(model="c", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert mock.requests[-1].json["max_tokens"] == 100


def test_translation_uses_the_providers_token_field_and_strips_rejected_schema_keys(gateway_factory, mock):
    gw = gateway_factory(provider_section("gpt", mock, "chat", "token_field = max_completion_tokens\n"
                                          "drop_schema_keys = $schema, additionalProperties\nreasoning = false")
                         + "[routes]\n* = gpt\n")
    anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0).messages.create(
        model="gpt-x", max_tokens=2000, messages=[{"role": "user", "content": "hi"}],
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[{"name": "read", "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
            "properties": {"additionalProperties": {"type": "string"}}}}])
    sent = mock.requests[-1].json
    assert sent["max_completion_tokens"] == 2000 and "max_tokens" not in sent
    assert "reasoning_effort" not in sent
    assert sent["tools"][0]["function"]["parameters"] == {
        "type": "object", "properties": {"additionalProperties": {"type": "string"}}}
