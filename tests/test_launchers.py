"""The launchers: `tokligence claude|codex [args…]` and `tokligence env claude|codex`.

Every launcher runs as a process of its own (it execs the CLI), in a home of its own, against a
settings file with a free port. A gateway the launcher starts in the background outlives it, so the
`launcher` fixture stops every one whose pid the launcher printed.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import provider_section
from team_edition import ADMIN_KEY, TEAM_ENV, call, clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]
# From the fixtures README: what keeps each real CLI from calling anything but the gateway.
CLAUDE_OFFLINE = {"DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
CODEX_OFFLINE = ["-c", "analytics.enabled=false", "--disable", "plugins", "--disable", "remote_plugin",
                 "--disable", "apps", "--disable", "in_app_updates"]
# A stand-in CLI: prints its arguments and environment as JSON, exits with $FAKE_EXIT.
FAKE_CLI = """#!{python}
import json, os, sys
print(json.dumps({{"args": sys.argv[1:], "env": dict(os.environ)}}))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def exports(text: str) -> dict[str, str]:
    """`export NAME=value` lines, read as a shell would."""
    found = {}
    for line in text.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export", line
        name, _, value = assignment.partition("=")
        found[name] = value
    return found


def stop(pid: int) -> None:
    """SIGTERM a background gateway and wait until it is gone (SIGKILL after 15 s); it is not our child,
    so there is nothing to wait() for."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while time.time() < deadline:
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Launcher:
    """`python tokligence.py --config SETTINGS ARGS…` with HOME, PATH and the settings of a test."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.bin = tmp_path / "bin"          # the only directory on PATH unless a test adds one
        self.bin.mkdir()
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.settings = tmp_path / "launcher.ini"
        self.port = free_port()
        self.write_settings()
        self.pids: list[int] = []

    def write_settings(self, extra_gateway: str = "", rest: str = "") -> None:
        self.settings.write_text(f"[gateway]\nport = {self.port}\nledger_path = {self.tmp / 'ledger.db'}\n"
                                 f"{extra_gateway}\n{rest}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fake(self, *names: str) -> None:
        for name in names:
            path = self.bin / name
            path.write_text(FAKE_CLI.format(python=sys.executable))
            path.chmod(0o755)

    def run(self, *args: str, path: str | None = None, timeout: float = 60, **env: str
            ) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "tokligence.py"), "--config", str(self.settings), *args]
        environment = clean_env(self.home, PATH=path or str(self.bin), **env)
        try:
            result = subprocess.run(command, env=environment, cwd=self.work, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            self.note_pids(stderr)
            pytest.fail(f"{shlex.join(args)} did not finish within {timeout} s; stderr:\n{stderr[-3000:]}")
        self.note_pids(result.stderr)
        return result

    def note_pids(self, stderr: str) -> None:
        self.pids += [int(pid) for pid in re.findall(r"in the background \(pid (\d+)", stderr)]

    def fake_run(self, *args: str, **env: str) -> tuple[dict, subprocess.CompletedProcess]:
        """A launcher run whose CLI is the fake: (what the fake saw, the launcher's result)."""
        result = self.run(*args, **env)
        assert result.stdout, result.stderr
        return json.loads(result.stdout), result

    def healthy(self) -> bool:
        try:
            return call(self.port, "GET", "/health").json()["status"] == "ok"
        except OSError:
            return False

    def close(self) -> None:
        for pid in self.pids:
            stop(pid)


@pytest.fixture
def launcher(tmp_path):
    runner = Launcher(tmp_path)
    yield runner
    runner.close()


def running_gateway(gateway_factory, launcher: Launcher, team: bool = False):
    """A gateway in this process (the team edition if team), and the launcher's settings pointed at it."""
    gw = gateway_factory("", TEAM_ENV if team else None)
    launcher.port = gw.port
    launcher.write_settings("auth_disabled = false" if team else "")
    return gw


# ---- env claude|codex --------------------------------------------------------------------------
def test_env_claude_prints_the_exports_and_starts_nothing(launcher):
    result = launcher.run("env", "claude")
    assert result.returncode == 0, result.stderr
    assert exports(result.stdout) == {"ANTHROPIC_BASE_URL": launcher.url, "ANTHROPIC_AUTH_TOKEN": "tokligence"}
    assert f"no gateway answers on {launcher.url} yet" in result.stderr
    assert not launcher.healthy() and not (launcher.home / ".tokligence").exists()


def test_env_output_is_for_eval(launcher):
    script = (f'eval "$({shlex.join([sys.executable, str(ROOT / "tokligence.py")])} '
              f'--config {launcher.settings} env claude)" && echo "$ANTHROPIC_BASE_URL $ANTHROPIC_AUTH_TOKEN"')
    done = subprocess.run(["bash", "-c", script], env=clean_env(launcher.home), capture_output=True, text=True,
                          timeout=30)
    assert done.stdout == f"{launcher.url} tokligence\n", done.stderr


def test_env_codex_writes_a_codex_home_with_the_gateway_as_provider(launcher):
    result = launcher.run("env", "codex")
    assert result.returncode == 0, result.stderr
    codex_home = launcher.home / ".tokligence" / "codex"
    assert exports(result.stdout) == {"CODEX_HOME": str(codex_home), "TOKLIGENCE_API_KEY": "tokligence"}
    config = tomllib.loads((codex_home / "config.toml").read_text())
    assert config == {"model_provider": "tokligence", "model_providers": {"tokligence": {
        "name": "Tokligence", "base_url": f"{launcher.url}/v1", "wire_api": "responses",
        "env_key": "TOKLIGENCE_API_KEY"}}}


def test_codex_config_keeps_what_the_user_added_below_the_block(launcher):
    launcher.run("env", "codex")
    path = launcher.home / ".tokligence" / "codex" / "config.toml"
    mine = 'model = "deepseek-chat"\n\n[mcp_servers.docs]\ncommand = "docs-server"\n'
    path.write_text(path.read_text() + mine)
    launcher.port = free_port()                     # the gateway moved: the block follows it
    launcher.write_settings()
    assert launcher.run("env", "codex").returncode == 0
    text = path.read_text()
    assert text.endswith(mine) and text.count("model_provider =") == 1
    config = tomllib.loads(text)
    assert config["model_providers"]["tokligence"]["base_url"] == f"{launcher.url}/v1"
    assert config["model"] == "deepseek-chat" and config["mcp_servers"]["docs"]["command"] == "docs-server"


def test_codex_config_that_clashes_with_the_block_is_reported_and_left_alone(launcher):
    path = launcher.home / ".tokligence" / "codex" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('model_provider = "openai"\n')          # written by hand, without the block
    result = launcher.run("env", "codex")
    assert result.returncode == 2 and result.stdout == ""
    assert f"tokligence: {path}: what is below tokligence's block does not fit with it" in result.stderr
    assert path.read_text() == 'model_provider = "openai"\n'
    path.write_text('model = "gpt-5.5"\n')                    # a file without the block is kept below it
    assert launcher.run("env", "codex").returncode == 0
    assert tomllib.loads(path.read_text())["model"] == "gpt-5.5"


def test_env_with_auth_on_needs_the_gateway_key(launcher):
    launcher.write_settings("auth_disabled = false")
    refused = launcher.run("env", "claude")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "auth is on: give your gateway key with --key or $TOKLIGENCE_API_KEY" in refused.stderr
    given = launcher.run("env", "claude", "--key", "tok_given")
    assert exports(given.stdout)["ANTHROPIC_AUTH_TOKEN"] == "tok_given"
    from_env = launcher.run("env", "codex", TOKLIGENCE_API_KEY="tok_from_env")
    assert exports(from_env.stdout)["TOKLIGENCE_API_KEY"] == "tok_from_env"


# ---- claude|codex [args…] ----------------------------------------------------------------------
def test_launcher_starts_a_gateway_in_the_background_and_then_reuses_it(launcher):
    launcher.fake("claude")
    assert not launcher.healthy()
    seen, first = launcher.fake_run("claude", "-p", "hi")
    assert first.returncode == 0, first.stderr
    log = launcher.home / ".tokligence" / "gateway.log"
    [pid] = launcher.pids
    assert (f"tokligence: started the gateway on {launcher.url} in the background (pid {pid}, log {log})"
            in first.stderr)
    assert launcher.healthy(), "the gateway outlives the launcher"
    assert f"listening on {launcher.url}" in log.read_text()

    _, second = launcher.fake_run("claude", "-p", "again")
    assert f"tokligence: using the gateway running on {launcher.url}" in second.stderr
    assert launcher.pids == [pid], "no second gateway"


def test_launcher_reuses_a_gateway_it_did_not_start(launcher, gateway_factory):
    running_gateway(gateway_factory, launcher)
    launcher.fake("codex")
    seen, result = launcher.fake_run("codex", "exec", "hi")
    assert result.returncode == 0
    assert f"using the gateway running on {launcher.url}" in result.stderr and not launcher.pids
    assert not (launcher.home / ".tokligence" / "gateway.log").exists()


def test_claude_launcher_passes_arguments_environment_and_exit_status(launcher, gateway_factory):
    running_gateway(gateway_factory, launcher)
    launcher.fake("claude")
    args = ["-p", "say hi", "--model", "deepseek-chat", "--help", "-c", "--", "--key"]
    seen, result = launcher.fake_run("claude", *args, FAKE_EXIT="3")
    assert result.returncode == 3
    assert seen["args"] == args
    assert seen["env"]["ANTHROPIC_BASE_URL"] == launcher.url
    assert seen["env"]["ANTHROPIC_AUTH_TOKEN"] == "tokligence"
    assert seen["env"]["HOME"] == str(launcher.home)                 # the rest of the environment is kept
    assert result.stdout == json.dumps(seen) + "\n", "the CLI's stdout is its own"
    assert f"tokligence: ANTHROPIC_BASE_URL={launcher.url}\n" in result.stderr
    assert f"tokligence: running {launcher.bin / 'claude'} -p 'say hi' --model deepseek-chat" in result.stderr


def test_tokligence_options_come_before_the_clis_arguments(launcher):
    launcher.fake("claude")
    for args in (["claude", "-p", "hi", "--key", "tok_late"], ["--bogus", "claude", "-p", "hi"]):
        result = launcher.run(*args)
        assert result.returncode == 2 and result.stdout == "", args
        assert "(tokligence's options go before claude's)" in result.stderr


def test_codex_launcher_passes_arguments_environment_and_exit_status(launcher, gateway_factory):
    running_gateway(gateway_factory, launcher)
    launcher.fake("codex")
    args = ["exec", "--skip-git-repo-check", *CODEX_OFFLINE, "say hi"]
    seen, result = launcher.fake_run("codex", *args, FAKE_EXIT="5")
    assert result.returncode == 5 and seen["args"] == args
    codex_home = Path(seen["env"]["CODEX_HOME"])
    assert codex_home == launcher.home / ".tokligence" / "codex"
    assert seen["env"]["TOKLIGENCE_API_KEY"] == "tokligence"
    provider = tomllib.loads((codex_home / "config.toml").read_text())["model_providers"]["tokligence"]
    assert provider["base_url"] == f"{launcher.url}/v1" and provider["wire_api"] == "responses"


def test_launcher_with_auth_on_sends_the_key_and_shows_it_masked(launcher, gateway_factory):
    gw = running_gateway(gateway_factory, launcher, team=True)
    launcher.fake("claude", "codex")
    refused = launcher.run("claude", "-p", "hi")
    assert refused.returncode == 2 and "auth is on" in refused.stderr and refused.stdout == ""

    seen, result = launcher.fake_run("claude", "--key", ADMIN_KEY, "-p", "hi")
    assert seen["args"] == ["-p", "hi"] and seen["env"]["ANTHROPIC_AUTH_TOKEN"] == ADMIN_KEY
    assert ADMIN_KEY not in result.stderr and "ANTHROPIC_AUTH_TOKEN=tok…" in result.stderr
    assert call(gw, "GET", "/v1/models", key=seen["env"]["ANTHROPIC_AUTH_TOKEN"]).status == 200

    seen, _ = launcher.fake_run("codex", "exec", "hi", TOKLIGENCE_API_KEY=ADMIN_KEY)
    assert seen["env"]["TOKLIGENCE_API_KEY"] == ADMIN_KEY


@pytest.mark.parametrize("cli, package", [("claude", "@anthropic-ai/claude-code"), ("codex", "@openai/codex")])
def test_a_missing_cli_exits_127_with_the_install_command(launcher, cli, package):
    result = launcher.run(cli, "-p", "hi")
    assert result.returncode == 127
    assert result.stderr == (f"tokligence: {cli} is not installed (not found on PATH); install it with:\n"
                             f"  npm install -g {package}\n")
    assert not launcher.healthy() and not (launcher.home / ".tokligence").exists(), "nothing started"


def test_a_gateway_that_cannot_start_is_reported_with_its_log(launcher):
    launcher.fake("claude")
    with socket.socket() as squatter:                    # the port is taken by something else
        squatter.bind(("127.0.0.1", launcher.port))
        squatter.listen()
        result = launcher.run("claude", "-p", "hi")
    assert result.returncode == 1 and result.stdout == "", "the CLI did not run"
    assert f"tokligence: the gateway did not start on {launcher.url}; the end of " in result.stderr
    assert "address already in use" in result.stderr.lower()


# ---- the real CLIs, through the launcher, to a mock Chat provider -----------------------------------
def real_cli(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = {"claude": "@anthropic-ai/claude-code@2.1.197", "codex": "@openai/codex@0.171.0"}[name]
        pytest.skip(f"{name} is not installed: npm install -g {package}")
    return path


def routed_to(launcher: Launcher, mock) -> str:
    """Settings sending every model to the mock; returns the answer the mock gives."""
    answer = "HELLO-" + secrets.token_hex(4)
    mock.handler = lambda request: {"text": answer}
    launcher.write_settings(rest=provider_section("up", mock) + "[routes]\n* = up\n")
    return answer


def test_real_claude_code_through_the_launcher(launcher, mock):
    real_cli("claude")
    answer = routed_to(launcher, mock)
    result = launcher.run("claude", "-p", "say hi", path=os.environ["PATH"], timeout=90, **CLAUDE_OFFLINE)
    assert result.returncode == 0, result.stderr
    assert answer in result.stdout, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert launcher.pids, "the launcher started the gateway"
    assert mock.requests and all(r.route == "/v1/chat/completions" for r in mock.requests)


def test_real_codex_through_the_launcher(launcher, mock):
    real_cli("codex")
    answer = routed_to(launcher, mock)
    result = launcher.run("codex", "exec", "--skip-git-repo-check", *CODEX_OFFLINE, "say hi",
                          path=os.environ["PATH"], timeout=90)
    assert result.returncode == 0, result.stderr
    assert answer in result.stdout, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert launcher.pids, "the launcher started the gateway"
    assert [r.route for r in mock.requests] == ["/v1/chat/completions"]
