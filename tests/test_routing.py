"""Routing: aliases, provider/model prefixes, ordered patterns, model lists, loopback and hot reload."""
import os
import time

import pytest

import tokligence as tk


def router(tmp_path, text: str, env: dict | None = None) -> tk.Router:
    path = tmp_path / "settings.ini"
    path.write_text(text)
    env = {"TOKLIGENCE_ALIASES_FILE": "", **(env or {})}
    return tk.Router(tk.load_settings(path, env), env)


PROVIDERS = ("[provider.openai]\napi_key = k\n[provider.anthropic]\napi_key = k\n"
             "[provider.ollama]\nbase_url = http://127.0.0.1:11434\nmodels = llama3.2, qwen2.5-coder:7b\n"
             "[provider.openrouter]\nbase_url = https://openrouter.ai/api/v1\n")


def resolve(r: tk.Router, model: str) -> tuple[str, str]:
    upstream, served = r.resolve(model)
    return upstream.name, served


def test_with_no_provider_everything_goes_to_loopback(tmp_path):
    r = router(tmp_path, "")
    assert resolve(r, "claude-opus-4-8") == ("loopback", "claude-opus-4-8")


def test_builtin_routes_send_claude_and_gpt_to_their_providers(tmp_path):
    r = router(tmp_path, PROVIDERS)
    assert resolve(r, "claude-sonnet-4-5") == ("anthropic", "claude-sonnet-4-5")
    assert resolve(r, "gpt-5.5") == ("openai", "gpt-5.5")


def test_first_matching_rule_wins_before_builtin_routes(tmp_path):
    r = router(tmp_path, PROVIDERS + "[routes]\nclaude-haiku* = ollama\nclaude* = openrouter\n")
    assert resolve(r, "claude-haiku-4-5") == ("ollama", "claude-haiku-4-5")
    assert resolve(r, "claude-opus-4-8") == ("openrouter", "claude-opus-4-8")


def test_a_providers_models_list_routes_its_models(tmp_path):
    r = router(tmp_path, PROVIDERS)
    assert resolve(r, "qwen2.5-coder:7b") == ("ollama", "qwen2.5-coder:7b")


def test_provider_prefix_is_stripped_only_when_it_names_a_provider(tmp_path):
    r = router(tmp_path, PROVIDERS + "[routes]\nmeta-llama/* = openrouter\n")
    assert resolve(r, "ollama/llama3.2") == ("ollama", "llama3.2")
    assert resolve(r, "openrouter/meta-llama/llama-3-70b") == ("openrouter", "meta-llama/llama-3-70b")
    assert resolve(r, "meta-llama/llama-3-70b") == ("openrouter", "meta-llama/llama-3-70b")


def test_aliases_rewrite_before_routing_with_globs_and_exact_names_first(tmp_path):
    r = router(tmp_path, PROVIDERS + "[aliases]\nclaude-* = gpt-5.5\nclaude-haiku-4-5 = ollama/llama3.2\n")
    assert resolve(r, "claude-opus-4-8") == ("openai", "gpt-5.5")
    assert resolve(r, "claude-haiku-4-5") == ("ollama", "llama3.2")


def test_unmatched_model_is_model_not_found_naming_the_routes(tmp_path):
    r = router(tmp_path, PROVIDERS)
    with pytest.raises(tk.GatewayError) as caught:
        r.resolve("mistral-large")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "claude*=anthropic" in caught.value.message


def test_routing_is_deterministic_across_routers(tmp_path):
    text = PROVIDERS + "[routes]\n*-coder* = ollama\nqwen* = openrouter\n"
    first, second = router(tmp_path, text), router(tmp_path, text)
    for model in ("qwen2.5-coder:7b", "qwen-max", "gpt-4o", "claude-x"):
        assert resolve(first, model) == resolve(second, model)


def test_aliases_file_reloads_when_it_changes_and_keeps_the_last_good_map(tmp_path, caplog):
    aliases = tmp_path / "aliases.ini"
    aliases.write_text("# mine\nsmart = claude-opus-4-8\n")
    r = router(tmp_path, PROVIDERS, {"TOKLIGENCE_ALIASES_FILE": str(aliases)})
    assert resolve(r, "smart") == ("anthropic", "claude-opus-4-8")

    aliases.write_text("smart = gpt-5.5\nfast = ollama/llama3.2\n")
    os.utime(aliases, (time.time() + 5, time.time() + 5))
    r.reload_aliases()
    assert resolve(r, "smart") == ("openai", "gpt-5.5")
    assert resolve(r, "fast") == ("ollama", "llama3.2")

    aliases.write_text("this line is broken\n")
    os.utime(aliases, (time.time() + 10, time.time() + 10))
    r.reload_aliases()
    assert resolve(r, "smart") == ("openai", "gpt-5.5")
    assert "keeping the last good aliases" in caplog.text and "aliases.ini:1" in caplog.text


def test_aliases_file_is_watched_by_the_running_gateway(gateway_factory, tmp_path):
    import openai
    aliases = tmp_path / "watched.ini"
    aliases.write_text("")
    gw = gateway_factory(env={"TOKLIGENCE_ALIASES_FILE": str(aliases)})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    aliases.write_text("nick = loopback/real-name\n")
    deadline = time.time() + 12
    while time.time() < deadline and "nick" not in [m.id for m in client.models.list()]:
        time.sleep(0.25)
    assert "nick" in [m.id for m in client.models.list()]
