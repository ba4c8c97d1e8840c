"""Settings: file, environment and flags in order; errors that name the culprit; init and config."""
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

import tokligence as tk

ROOT = Path(__file__).resolve().parents[1]


def load(tmp_path: Path, text: str = "", env: dict | None = None, flags: dict | None = None) -> tk.Settings:
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return tk.load_settings(path, env or {}, flags)


def test_example_file_is_the_embedded_template():
    assert (ROOT / "settings.example.ini").read_text() == tk.SETTINGS_TEMPLATE


def test_every_gateway_setting_is_documented_in_the_example_and_nothing_more():
    parser = configparser.RawConfigParser(delimiters=("=",))
    parser.read_string(tk.SETTINGS_TEMPLATE)
    assert set(parser["gateway"]) == set(tk.GATEWAY_TYPES)
    for key in tk.PROVIDER_TYPES:
        assert f"#   {key} " in tk.SETTINGS_TEMPLATE, f"provider key {key} is not documented"


def test_defaults_without_a_file_listen_on_loopback_8081(tmp_path):
    settings = tk.load_settings(tmp_path / "missing.ini", {})
    assert (settings.host, settings.port, settings.auth_disabled) == ("127.0.0.1", 8081, True)
    assert settings.providers == {}
    assert settings.max_body_bytes == 32 * 1024 * 1024


def test_environment_beats_file_and_flags_beat_environment(tmp_path):
    text = "[gateway]\nport = 9001\nlog_level = debug\n"
    assert load(tmp_path, text).port == 9001
    assert load(tmp_path, text, {"TOKLIGENCE_PORT": "9002"}).port == 9002
    assert load(tmp_path, text, {"TOKLIGENCE_FACADE_PORT": "9004"}).port == 9004
    settings = load(tmp_path, text, {"TOKLIGENCE_PORT": "9002"}, {"port": 9003})
    assert settings.port == 9003
    assert settings.origins["gateway.port"] == "flag --port"
    assert settings.origins["gateway.log_level"].endswith("settings.ini:3")


def test_env_references_and_home_expand_in_values(tmp_path):
    text = "[gateway]\nledger_path = ~/x/${DBNAME}.db\n[provider.local]\nbase_url = http://${HOST}:8000\n"
    settings = load(tmp_path, text, {"DBNAME": "ledger", "HOST": "127.0.0.1"})
    assert settings.ledger_path == str(Path.home() / "x" / "ledger.db")
    assert settings.providers["local"].base_url == "http://127.0.0.1:8000/v1"


def test_builtin_providers_appear_when_their_keys_are_set(tmp_path):
    assert load(tmp_path).providers == {}
    settings = load(tmp_path, env={"OPENAI_API_KEY": "sk-fallback", "TOKLIGENCE_ANTHROPIC_API_KEY": "sk-ant"})
    assert settings.providers["openai"].api_key == "sk-fallback"
    assert settings.providers["openai"].wire == "chat"
    assert settings.providers["anthropic"].wire == "messages"
    assert settings.providers["anthropic"].base_url == "https://api.anthropic.com/v1"
    explicit = load(tmp_path, env={"OPENAI_API_KEY": "sk-fallback", "TOKLIGENCE_OPENAI_API_KEY": "sk-mine"})
    assert explicit.providers["openai"].api_key == "sk-mine"


def test_a_whole_provider_can_come_from_the_environment(tmp_path):
    env = {"TOKLIGENCE_PROVIDER_MY_VLLM_BASE_URL": "http://127.0.0.1:8000/v1",
           "TOKLIGENCE_PROVIDER_MY_VLLM_MODELS": "qwen2.5-coder:7b,llama3",
           "TOKLIGENCE_PROVIDER_MY_VLLM_MAX_OUTPUT_TOKENS": "4096"}
    provider = load(tmp_path, env=env).providers["my_vllm"]
    assert (provider.wire, provider.models, provider.max_output_tokens) == ("chat", ("qwen2.5-coder:7b", "llama3"), 4096)


def test_routes_and_aliases_keep_order_case_and_colons(tmp_path):
    text = ("[provider.ollama]\nbase_url = http://localhost:11434\n"
            "[routes]\nLlama3:8b = ollama\nqwen* = ollama\n[aliases]\nclaude-* = ollama/Llama3:8b\n")
    settings = load(tmp_path, text)
    assert settings.routes[:2] == [("Llama3:8b", "ollama"), ("qwen*", "ollama")]
    assert settings.aliases == [("claude-*", "ollama/Llama3:8b")]


def test_environment_routes_use_the_one_line_syntax(tmp_path):
    env = {"TOKLIGENCE_OPENAI_API_KEY": "k", "TOKLIGENCE_ANTHROPIC_API_KEY": "k",
           "TOKLIGENCE_ROUTES": "claude*=>anthropic, gpt*=openai", "TOKLIGENCE_MODEL_ALIASES": "fast=>gpt-5-mini\nsmart=>claude-opus-4-8"}
    settings = load(tmp_path, "[routes]\nx* = openai\n", env)
    assert settings.routes[:2] == [("claude*", "anthropic"), ("gpt*", "openai")]
    assert settings.aliases == [("fast", "gpt-5-mini"), ("smart", "claude-opus-4-8")]


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nport = eighty\n", "settings.ini:2: [gateway] port = 'eighty': expected a number"),
    ("[gateway]\n\nauth_disabled = maybe\n", "settings.ini:3: [gateway] auth_disabled = 'maybe': expected true or false"),
    ("[gateway]\nprot = 80\n", "settings.ini:2: [gateway] unknown key 'prot'"),
    ("[provider.x]\nwire = grpc\nbase_url = http://h\n", "settings.ini:2: [provider.x] wire = 'grpc': expected one of chat, responses, messages"),
    ("[provider.x]\nbase_url = ftp://h\n", "settings.ini:2: [provider.x] base_url must be an http(s) URL"),
    ("[routes]\ngpt* = nowhere\n", "settings.ini:2: route 'gpt*' names provider 'nowhere', which is not configured"),
    ("port = 1\n", "settings.ini:1: File contains no section headers"),
    ("[gateway]\nport = 1\nport = 2\n", "settings.ini:3: While reading from"),
])
def test_bad_settings_name_file_line_and_key(tmp_path, text, message):
    with pytest.raises(tk.SettingsError) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKLIGENCE_", "OPENAI_", "ANTHROPIC_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "tokligence.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


def test_bad_settings_file_exits_2_without_a_traceback(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[gateway]\nport = x\n")
    result = run_cli("--config", str(path), "config")
    assert result.returncode == 2
    assert f"{path}:2: [gateway] port" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_writes_the_template_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "home" / ".tokligence" / "settings.ini"
    result = run_cli("init", "--path", str(target))
    assert result.returncode == 0, result.stderr
    assert target.read_text() == tk.SETTINGS_TEMPLATE
    again = run_cli("init", "--path", str(target))
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli("init", "--path", str(target), "--force").returncode == 0


def test_init_defaults_to_the_home_directory(tmp_path):
    result = run_cli("init", env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".tokligence" / "settings.ini").read_text() == tk.SETTINGS_TEMPLATE


def test_config_prints_effective_values_with_origins_and_masks_secrets(tmp_path):
    path = tmp_path / "s.ini"
    path.write_text("[gateway]\nport = 9100\n[provider.deepseek]\nbase_url = https://api.deepseek.com\n"
                    "api_key = sk-verysecretvalue123\n")
    result = run_cli("--config", str(path), "config", env={"TOKLIGENCE_LOG_LEVEL": "debug"})
    assert result.returncode == 0, result.stderr
    assert "sk-verysecretvalue123" not in result.stdout
    lines = {line.split("=")[0].strip(): line for line in result.stdout.splitlines() if "=" in line}
    assert lines["port"].endswith(f"# {path}:2")
    assert "debug" in lines["log_level"] and lines["log_level"].endswith("# env TOKLIGENCE_LOG_LEVEL")
    assert "https://api.deepseek.com/v1" in result.stdout
