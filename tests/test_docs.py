"""docs/claude-code.md, docs/codex.md and README.md say only what is true.

The two CLI guides: a ```sh block either starts with `# needs …` (what this machine lacks: network,
a provider account, a terminal) or is run here. The runnable blocks of a guide run in order as one
bash script (`set -e`; exports carry over, as in a reader's shell) in a fresh home, with the real CLI,
from a directory holding a copy of tokligence.py; the gateway gets a free port through
TOKLIGENCE_PORT, which also replaces 8081 in the commands. Every block, run or not, and README.md
too: each `python tokligence.py` command names a real command, each ```ini block is a valid settings
file whose aliases and routes reach a provider, and each TOKLIGENCE_ variable exists.
"""
from __future__ import annotations

import configparser
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import tokligence as tk
from team_edition import clean_env, free_port
from test_launchers import stop

ROOT = Path(__file__).resolve().parents[1]
GUIDES = {"claude": ROOT / "docs" / "claude-code.md", "codex": ROOT / "docs" / "codex.md"}
README = ROOT / "README.md"
NEEDS = {"network", "a terminal", "a provider account", "a team-edition gateway", "Ollama"}
LOOPBACK_ANSWER = "echo: "        # the loopback provider's answer, with no provider configured


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def needs(block: str) -> str | None:
    """What a block needs that this machine lacks, from its `# needs …` first line."""
    first = block.splitlines()[0]
    return first.removeprefix("# needs ") if first.startswith("# needs ") else None


def runnable(path: Path) -> list[str]:
    return [block for block in blocks(path, "sh") if needs(block) is None]


def commands_named(text: str) -> list[str]:
    """The command word of every `python tokligence.py …` in text, after the global options."""
    return re.findall(r"python tokligence\.py((?: --(?:config|host|port|log-level) \S+)*) ([a-z]+)", text)


def subcommands() -> set[str]:
    """The commands `python tokligence.py --help` lists."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tk.main(["--help"])
    return set(re.search(r"\{(serve,[a-z,]+)\}", out.getvalue()).group(1).split(","))


# ---- the guides' blocks, run --------------------------------------------------------------------
@pytest.mark.parametrize("cli", GUIDES)
def test_every_block_is_run_here_or_says_what_it_needs(cli):
    found = blocks(GUIDES[cli], "sh")
    marked = {needs(block) for block in found} - {None}
    assert marked <= NEEDS, f"unknown reasons: {marked - NEEDS}"
    assert len(runnable(GUIDES[cli])) >= 5
    for block in found:
        if needs(block) == "a terminal":
            assert all(f"tokligence.py {cli}" in line for line in block.splitlines()[1:]), block


@pytest.mark.parametrize("cli", GUIDES)
def test_guide_runs_here_step_by_step(cli, tmp_path):
    missing = [tool for tool in (cli, "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed, so {GUIDES[cli].name} cannot run here")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    shutil.copy(ROOT / "tokligence.py", work)
    port = free_port()
    steps = runnable(GUIDES[cli])
    script = "set -e\n" + "".join(f"echo '@@@ step {i}'\n{step.replace('8081', str(port))}\n"
                                  for i, step in enumerate(steps))
    env = clean_env(home, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    TOKLIGENCE_PORT=str(port), LANG="C.UTF-8")
    output = ""
    try:
        done = subprocess.run(["bash", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        output = done.stdout
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the guide did not finish within 300 s:\n{output[-4000:]}")
    finally:        # the gateway the first launch started in the background
        for pid in re.findall(r"in the background \(pid (\d+)", output):
            stop(int(pid))
    assert done.returncode == 0, f"a step failed:\n{output[-4000:]}"
    outputs = output.split("@@@ step ")[1:]
    assert len(outputs) == len(steps)
    for step, out in zip(steps, outputs):
        if '"say hi"' in step:
            assert LOOPBACK_ANSWER in out and "say hi" in out, f"{step}\n---\n{out[-2000:]}"
    assert output.count("started the gateway on") == 1, "the first launch starts it, the others reuse it"
    usage = next(out for step, out in zip(steps, outputs) if "tokligence.py usage" in step)
    totals = usage.split("totals\n", 1)[1].splitlines()
    assert totals[0].split()[0] == "requests" and int(totals[1].split()[0]) >= 2, usage
    health = next(out for step, out in zip(steps, outputs) if "/health" in step)
    assert '"status": "ok"' in health


def test_claude_guide_shows_what_env_claude_prints(monkeypatch, tmp_path):
    shown = next(b for b in blocks(GUIDES["claude"], "text") if "ANTHROPIC_BASE_URL" in b)
    assert env_output("claude", monkeypatch, tmp_path) == shown


def test_codex_guide_shows_what_env_codex_prints_and_writes(monkeypatch, tmp_path):
    shown = next(b for b in blocks(GUIDES["codex"], "text") if "CODEX_HOME" in b)
    assert env_output("codex", monkeypatch, tmp_path).replace(str(tmp_path), "/home/you") == shown
    written = (tmp_path / ".tokligence" / "codex" / "config.toml").read_text()
    [generated] = blocks(GUIDES["codex"], "toml")
    assert generated == written
    [by_hand] = re.findall(r"<<'EOF'\n(.*?)^EOF$", GUIDES["codex"].read_text(), re.S | re.M)[:1]
    assert tomllib.loads(by_hand) == tomllib.loads(written)          # the same provider, as a table


def env_output(cli: str, monkeypatch, home: Path) -> str:
    """`python tokligence.py env CLI` with the default settings, in home."""
    for name in os.environ:
        if name.startswith(("TOKLIGENCE_", "OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert tk.main(["env", cli]) == 0
    return out.getvalue()


# ---- every doc: commands, settings and variables that exist ----------------------------------------
DOCS = [README, *GUIDES.values()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_tokligence_command_exists(doc):
    named = commands_named(doc.read_text())
    assert named, "no commands found: the pattern is stale"
    unknown = {command for _, command in named} - subcommands()
    assert not unknown, unknown


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_ini_block_is_valid_settings_and_its_rules_reach_a_provider(doc, tmp_path):
    found = blocks(doc, "ini")
    assert found or doc == README
    for number, text in enumerate(found):
        path = tmp_path / f"block{number}.ini"
        path.write_text(text)
        # the keys it names, and the built-in providers' (the docs say to set them)
        env = {name: "sk-test" for name in [*re.findall(r"\$\{(\w+)\}", text), *tk.FALLBACK_ENV]}
        settings = tk.load_settings(path, env)
        router = tk.Router(settings, env)
        parser = configparser.RawConfigParser(delimiters=("=",))
        parser.optionxform = str
        parser.read_string(text)
        names = [*parser["aliases"]] if parser.has_section("aliases") else []
        names += [*parser["routes"]] if parser.has_section("routes") else []
        for pattern in names:
            model = pattern.replace("*", "x")
            upstream, sent = router.resolve(model)
            assert upstream.name in settings.providers, f"block {number}: {model} -> {upstream.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_tokligence_variable_exists(doc):
    gateway_keys = {f"TOKLIGENCE_{key.upper()}" for key in tk.GATEWAY_TYPES}
    known = gateway_keys | set(tk.ENV_NAMES) | {tk.KEY_ENV, "TOKLIGENCE_CONFIG", "TOKLIGENCE_ROUTES",
                                                 "TOKLIGENCE_MODEL_ALIASES"}
    for name in set(re.findall(r"\bTOKLIGENCE_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text())):
        provider = re.fullmatch(r"TOKLIGENCE_PROVIDER_[A-Z0-9]+_([A-Z_]+)", name)
        assert name in known or (provider and provider.group(1).lower() in tk.PROVIDER_TYPES), name


# ---- README.md ------------------------------------------------------------------------------------
def test_readme_keeps_the_two_set_up_commands():
    text = README.read_text()
    assert "pip install -r requirements.txt && python tokligence.py\n" in text
    assert "pip install -r requirements-dev.txt && python -m pytest\n" in text


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for guide in ("docs/api_mapping.md", "docs/claude-code.md", "docs/codex.md", "docs/docker.md"):
        assert f"]({guide})" in README.read_text(), guide


def quick_start() -> str:
    return README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]


def test_readme_sdk_quick_starts_run(gateway_factory, capsys):
    gw = gateway_factory()                            # no provider: loopback echoes
    snippets = re.findall(r"```python\n(.*?)```", quick_start(), re.S)
    assert len(snippets) == 2
    for snippet in snippets:
        exec(snippet.replace("8081", str(gw.port)), {})
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 3 and all(LOOPBACK_ANSWER in line and "Hello" in line for line in answers), answers


def test_readme_curl_quick_starts_run(gateway_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    gw = gateway_factory()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", quick_start(), re.S) if b.startswith("curl")]
    commands = block.replace("\\\n", " ").splitlines()
    assert len(commands) == 2
    for command in commands:
        done = subprocess.run(["bash", "-c", command.replace("8081", str(gw.port))], capture_output=True,
                              text=True, timeout=30)
        assert LOOPBACK_ANSWER in done.stdout and "Hello" in done.stdout, done.stdout


def test_readme_codex_config_is_the_guides(monkeypatch, tmp_path):
    [config] = re.findall(r"```toml\n(.*?)```", quick_start(), re.S)
    env_output("codex", monkeypatch, tmp_path)
    written = (tmp_path / ".tokligence" / "codex" / "config.toml").read_text()
    assert tomllib.loads(config) == tomllib.loads(written)


def test_readme_has_a_benchmarks_section_made_by_bench_run():
    section = README.read_text().split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    assert "`python bench/run.py`" in section and "TODO" not in section
    assert (ROOT / "bench" / "run.py").exists()
