"""Distribution: the Docker image, docker-compose.yml, the pip package and docs/docker.md.

There is no Docker engine here, so the image is checked without one: the Dockerfile's stages and
instructions are read, and its entry and health-check commands are run by hand in a clean virtual
environment holding only requirements.txt, with the image's environment (its /app built in a
temporary directory by the Dockerfile's COPY and compile steps, its /data mapped to another). The
venvs are slow to make, so each is shared by the whole module.
"""
import fnmatch
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tokligence as tk

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DOC = ROOT / "docs" / "docker.md"


# ---- the Dockerfile, read ------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def parse_dockerfile() -> tuple[dict[str, str], list[dict]]:
    """The global ARG defaults and the stages, each {"base", "name", "instructions"}."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for word, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if word == "FROM":
            tokens = rest.split()
            name = tokens[2] if len(tokens) == 3 and tokens[1].lower() == "as" else None
            stages.append({"base": tokens[0], "name": name, "instructions": []})
        elif not stages:
            assert word == "ARG", f"only ARG may come before the first FROM, not {word}"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1]["instructions"].append((word, rest))
    return global_args, stages


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image(edition: str | None = None) -> dict:
    """What `docker build [--build-arg EDITION=edition]` makes: the stage chain from the external
    base image up, and the configuration the final image ends with."""
    global_args, stages = parse_dockerfile()
    args = dict(global_args, **({"EDITION": edition} if edition else {}))
    by_name = {stage["name"]: stage for stage in stages if stage["name"]}
    chain, base = [], substitute(stages[-1]["base"], args)
    chain.append(stages[-1])
    while base in by_name:
        chain.append(by_name[base])
        base = substitute(by_name[base]["base"], args)
    chain.reverse()
    config: dict = {"from": base, "stages": [s["name"] for s in chain], "env": {}, "user": None,
                    "entrypoint": [], "cmd": [], "healthcheck": None, "expose": [], "volumes": [],
                    "copies": [], "runs": [], "workdir": "/", "labels": {}}
    for stage in chain:
        for word, rest in stage["instructions"]:
            if word == "ENV":
                config["env"].update(item.split("=", 1) for item in shlex.split(rest))
            elif word == "LABEL":
                config["labels"].update(item.split("=", 1) for item in shlex.split(rest))
            elif word == "USER":
                config["user"] = rest
            elif word == "ENTRYPOINT":
                config["entrypoint"], config["cmd"] = exec_form(rest), []
            elif word == "CMD":
                config["cmd"] = exec_form(rest)
            elif word == "HEALTHCHECK":
                config["healthcheck"] = rest
            elif word == "EXPOSE":
                config["expose"] += rest.split()
            elif word == "VOLUME":
                config["volumes"] += exec_form(rest) if rest.startswith("[") else rest.split()
            elif word == "WORKDIR":
                config["workdir"] = rest
            elif word == "RUN":
                config["runs"].append(rest)
            elif word in ("COPY", "ADD"):
                tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
                config["copies"].append((word, tokens[:-1], tokens[-1], rest))
    return config


def healthcheck_command(config: dict) -> tuple[dict[str, str], list[str]]:
    options, _, command = config["healthcheck"].partition(" CMD ")
    flags = dict(option.lstrip("-").split("=", 1) for option in options.split())
    return flags, exec_form(command)


# ---- the image's commands, run by hand -----------------------------------------------------------
def on_host(value: str, app: Path, data: Path | None = None) -> str:
    """An image path as this machine has it: /app is the image's /app built here, /data the volume."""
    for image_dir, host_dir in (("/app", app), ("/data", data)):
        if host_dir is not None and (value == image_dir or value.startswith(image_dir + "/")):
            return str(host_dir) + value[len(image_dir):]
    return value


def host_argv(argv: list[str], app: Path, python: Path) -> list[str]:
    """An image command as this machine runs it: the venv's python, the image's files from app."""
    return [str(python) if arg == "python" else on_host(arg, app) for arg in argv]


def host_env(config: dict, app: Path, data: Path, **extra: str) -> dict[str, str]:
    """The image's environment with its paths mapped here, and nothing of this machine's but PATH."""
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    env.update((key, on_host(value, app, data)) for key, value in config["env"].items())
    env.update(extra)
    return env


def build_app(python: Path, into: Path) -> Path:
    """The image's /app as its COPY and RUN steps leave it: the copied files, then compiled."""
    config = image()
    app = into / "app"
    app.mkdir()
    for _, sources, dest, _ in config["copies"]:
        shutil.copy(ROOT / sources[0], on_host(dest, app))
    for step in config["runs"]:
        if step.startswith("python -m py_compile "):
            run(host_argv(shlex.split(step), app, python))
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class ImageProcess:
    """The image's ENTRYPOINT + CMD for one edition, running here with the image's environment."""

    def __init__(self, python: Path, app: Path, edition: str, data: Path, **env: str):
        self.config = image(edition)
        self.data = data
        data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.output = data.parent / f"{data.name}-{self.port}.out"
        argv = host_argv(self.config["entrypoint"] + self.config["cmd"], app, python)
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=data, stdout=out, stderr=subprocess.STDOUT,
                                         env=host_env(self.config, app, data, TOKLIGENCE_PORT=str(self.port), **env))
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited with {self.proc.returncode}:\n{self.text()}")
            try:
                if get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the gateway did not answer /health:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int:
        """What `docker stop` does first: SIGTERM, then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def pip(python: Path, *args) -> subprocess.CompletedProcess:
    return run([python, "-m", "pip", "--disable-pip-version-check", *args])


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    """A clean venv with only requirements.txt installed, as the image's pip install step does."""
    python = make_venv(tmp_path_factory.mktemp("runtime") / "venv")
    pip(python, "install", "--no-cache-dir", "-r", ROOT / "requirements.txt")
    return python


@pytest.fixture(scope="module")
def app(runtime_python, tmp_path_factory) -> Path:
    return build_app(runtime_python, tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def personal(runtime_python, app, tmp_path_factory):
    process = ImageProcess(runtime_python, app, "personal", tmp_path_factory.mktemp("personal") / "data")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def team(runtime_python, app, tmp_path_factory):
    process = ImageProcess(runtime_python, app, "team", tmp_path_factory.mktemp("team") / "data")
    yield process
    process.stop()


def printed_admin_key(process: ImageProcess) -> str:
    found = re.findall(r"shown only once:\s+(tok_\S+)", process.text())
    assert len(found) == 1, process.text()
    return found[0]


# ---- Dockerfile ----------------------------------------------------------------------------------
def test_base_image_is_alpine_python_3_11_or_later():
    for edition in ("personal", "team"):
        base = image(edition)["from"]
        match = re.fullmatch(r"python:3\.(\d+)-alpine[\d.]*", base)
        assert match and int(match.group(1)) >= 11, base


def test_editions_come_from_the_EDITION_build_argument_or_a_target():
    global_args, stages = parse_dockerfile()
    assert global_args["EDITION"] == "personal"
    assert stages[-1]["base"] == "${EDITION}" and not stages[-1]["instructions"]
    assert image()["stages"] == image("personal")["stages"] == ["base", "personal", None]
    assert image("team")["stages"] == ["base", "team", None]
    assert image("personal")["env"]["TOKLIGENCE_AUTH_DISABLED"] == "true"
    assert image("team")["env"]["TOKLIGENCE_AUTH_DISABLED"] == "false"
    for edition in ("personal", "team"):
        assert image(edition)["labels"]["io.tokligence.edition"] == edition


def test_runs_as_a_non_root_user():
    for edition in ("personal", "team"):
        user = image(edition)["user"]
        assert user, "no USER: the container would run as root"
        name, _, group = user.partition(":")
        assert name not in ("root", "0") and group not in ("root", "0"), user
        assert name.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot check it"
    assert any(re.search(rf"adduser .*-u {image()['user'].split(':')[0]}\b", step) for step in image()["runs"])


def test_exposes_8081_and_keeps_data_in_the_data_volume():
    config = image()
    assert config["expose"] == ["8081"] and config["env"]["TOKLIGENCE_PORT"] == "8081"
    assert config["volumes"] == ["/data"]
    env = config["env"]
    assert env["TOKLIGENCE_HOST"] == "0.0.0.0"
    assert env["HOME"] == "/data"
    for key in ("LEDGER_PATH", "LOG_FILE", "CLI_LOG_FILE", "ALIASES_FILE"):
        assert env[f"TOKLIGENCE_{key}"].startswith("/data/"), key
    assert any("chown -R 10001:10001 /data" in step for step in config["runs"]), "/data must be the user's"


def test_every_TOKLIGENCE_variable_in_the_image_is_a_real_setting():
    for key in image("team")["env"]:
        if key.startswith("TOKLIGENCE_"):
            assert key[len("TOKLIGENCE_"):].lower() in tk.GATEWAY_TYPES, key


def test_only_h11_and_certifi_are_installed_with_pip_from_requirements_txt():
    names = [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(names) == ["certifi", "h11"]
    config = image()
    installs = [step for step in config["runs"] if "pip install" in step]
    assert len(installs) == 1
    assert "--no-cache-dir" in installs[0] and "-r /app/requirements.txt" in installs[0]
    assert ("COPY", ["requirements.txt"], "/app/requirements.txt") in [c[:3] for c in config["copies"]]
    assert not any(re.search(r"\bapk add\b", step) for step in config["runs"]), "nothing from apk"


def test_healthcheck_uses_python_not_curl_or_wget():
    flags, command = healthcheck_command(image())
    assert command[0] == "python" and command[1] == "-c"
    assert not {"curl", "wget", "sh", "/bin/sh"} & set(command)
    assert "/health" in command[2] and "TOKLIGENCE_PORT" in command[2]
    assert set(flags) >= {"interval", "timeout", "start-period", "retries"}


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or a directory above it, decides."""
    excluded = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_every_copied_file_exists_and_is_in_the_build_context():
    copies = image()["copies"]
    assert copies
    for word, sources, _, raw in copies:
        assert word == "COPY" and "--from" not in raw
        for source in sources:
            assert (ROOT / source).is_file(), source
            assert not dockerignore_excludes(source), f"{source} is left out by .dockerignore"
    assert any(dest == "/app/tokligence.py" for _, _, dest, _ in copies)
    # `docker exec … tokligence …`: the file is executable, linked onto PATH, and finds python itself
    assert any("--chmod=755 tokligence.py /app/tokligence.py" in raw for _, _, _, raw in copies)
    assert any("ln -s /app/tokligence.py /usr/local/bin/tokligence" in step for step in image()["runs"])
    assert (ROOT / "tokligence.py").read_text().startswith("#!/usr/bin/env python3\n")


def test_the_image_serves_from_the_bytecode_compiled_when_it_was_built(runtime_python, app, tmp_path):
    # The entry command runs the module from PYTHONPATH, and the image writes no bytecode at run
    # time (PYTHONDONTWRITEBYTECODE): the code object must be the one compiled by the build.
    config = image()
    assert config["entrypoint"] == ["python", "-P", "-m", "tokligence"] and config["env"]["PYTHONPATH"] == "/app"
    assert config["env"]["PYTHONDONTWRITEBYTECODE"] == "1"
    compiled = sorted((app / "__pycache__").glob("tokligence.*.pyc"))
    assert len(compiled) == 1
    result = subprocess.run(host_argv(config["entrypoint"] + ["--version"], app, runtime_python), cwd=tmp_path,
                            env=host_env(config, app, tmp_path, PYTHONVERBOSE="1"), capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == f"tokligence {tk.__version__}"
    assert f"# code object from '{compiled[0]}'" in result.stderr


def test_secrets_and_clutter_stay_out_of_the_build_context():
    for path in (".env", ".env.example", ".git/config", "tests/test_distribution.py", "docs/docker.md",
                 "bench/run.py", "settings.ini", "data/ledger.db"):
        assert dockerignore_excludes(path), path
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ---- the image's commands, run by hand -----------------------------------------------------------
def test_the_clean_venv_holds_only_the_requirements(runtime_python):
    frozen = pip(runtime_python, "freeze").stdout.split()
    assert sorted(line.split("==")[0].lower() for line in frozen) == ["certifi", "h11"]


def test_personal_entry_command_serves_with_data_and_logs_in_the_volume(personal):
    status, body = get(personal.port, "/health", {"Host": "localhost:8081"})
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["version"] == tk.__version__
    assert (personal.data / "ledger.db").is_file()
    log = (personal.data / "logs" / "gateway.log").read_text()
    assert f"listening on http://0.0.0.0:{personal.port}" in log and "auth off" in log
    assert "auth is off but the gateway listens on 0.0.0.0" in personal.text()   # stdout: docker logs


def test_personal_edition_serves_only_loopback_host_names(personal):
    # What Docker's port publishing delivers: the client's own Host header, untouched.
    for host in ("localhost:8081", "127.0.0.1:8081"):
        assert get(personal.port, "/v1/models", {"Host": host})[0] == 200, host
    status, body = get(personal.port, "/v1/models", {"Host": "gateway.example"})
    assert status == 403 and b"allowed_hosts" in body


def test_team_edition_prints_the_first_admin_key_once_and_requires_keys(team, runtime_python, app):
    key = printed_admin_key(team)
    assert get(team.port, "/health")[0] == 200                               # no key needed
    assert get(team.port, "/v1/models")[0] == 401
    assert get(team.port, "/v1/models", {"Authorization": f"Bearer {key}"})[0] == 200
    assert get(team.port, "/v1/models", {"Host": "gateway.example", "x-api-key": key})[0] == 200
    second = ImageProcess(runtime_python, app, "team", team.data)             # same volume, next start
    try:
        assert "tok_" not in second.text()
        assert get(second.port, "/v1/models", {"Authorization": f"Bearer {key}"})[0] == 200
    finally:
        second.stop()


def test_team_edition_takes_the_admin_key_from_the_environment(runtime_python, app, tmp_path):
    key = "tok_" + "k" * 40
    process = ImageProcess(runtime_python, app, "team", tmp_path / "data", TOKLIGENCE_ADMIN_KEY=key)
    try:
        assert key not in process.text()
        assert get(process.port, "/v1/models", {"x-api-key": key})[0] == 200
    finally:
        process.stop()


def test_the_image_runs_cli_commands_given_after_its_name(team, runtime_python, app):
    config = image("team")
    env = host_env(config, app, team.data)

    def command(*args: str) -> str:
        return run(host_argv(config["entrypoint"] + list(args), app, runtime_python), env=env,
                   cwd=team.data).stdout

    assert f"ledger_path = {team.data}/ledger.db" in command("config")
    command("user", "add", "alice@example.com")
    key = command("key", "create", "alice@example.com").split()[-1]
    assert key.startswith("tok_")
    # The running gateway looks for new keys at most once a second (KEY_CHECK_INTERVAL_SECONDS).
    deadline = time.monotonic() + 1 + tk.KEY_CHECK_INTERVAL_SECONDS
    while (status := get(team.port, "/v1/models", {"Authorization": f"Bearer {key}"})[0]) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert (team.data / "logs" / "cli.log").is_file()


def test_healthcheck_command_passes_while_up_and_fails_once_stopped(runtime_python, app, tmp_path):
    config = image()
    _, command = healthcheck_command(config)
    process = ImageProcess(runtime_python, app, "personal", tmp_path / "data")

    def check() -> int:
        env = host_env(config, app, tmp_path / "data", TOKLIGENCE_PORT=str(process.port),
                       HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
        return subprocess.run(host_argv(command, app, runtime_python), env=env, capture_output=True,
                              timeout=30).returncode

    try:
        assert check() == 0
    finally:
        assert process.stop() == 0, process.text()          # SIGTERM (docker stop): a clean exit
    assert check() == 1


# ---- docker-compose.yml and .env.example -----------------------------------------------------------
def _yaml_scalar(text: str):
    text = text.strip()
    if not text:
        return None
    if text.startswith("[") and text.endswith("]"):
        return [_yaml_scalar(item) for item in text[1:-1].split(",") if item.strip()]
    if len(text) > 1 and text[0] in "'\"" and text[-1] == text[0]:
        return text[1:-1]
    return text


def parse_yaml(text: str):
    """The YAML that docker-compose.yml uses: block mappings and lists, flow lists, plain or quoted
    scalars (no PyYAML needed)."""
    rows = [(len(line) - len(line.lstrip(" ")), line.strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]

    def block(i: int, indent: int):
        if rows[i][1].startswith("- "):
            items = []
            while i < len(rows) and rows[i][0] == indent and rows[i][1].startswith("- "):
                items.append(_yaml_scalar(rows[i][1][2:]))
                i += 1
            return items, i
        mapping = {}
        while i < len(rows) and rows[i][0] == indent:
            key, colon, rest = rows[i][1].partition(":")
            assert colon, f"not a mapping entry: {rows[i][1]}"
            i += 1
            if rest.strip():
                mapping[key] = _yaml_scalar(rest)
            elif i < len(rows) and rows[i][0] > indent:
                mapping[key], i = block(i, rows[i][0])
            else:
                mapping[key] = None
        return mapping, i

    value, end = block(0, 0)
    assert end == len(rows), f"cannot read line: {rows[end][1]}"
    return value


def test_compose_has_a_personal_and_a_team_profile_with_named_volumes():
    text = (ROOT / "docker-compose.yml").read_text()
    compose = parse_yaml(text)
    try:
        import yaml
    except ImportError:
        pass
    else:
        assert yaml.safe_load(text) == compose
    services = compose["services"]
    assert set(services) == {"personal", "team"}
    volumes = set()
    for edition, service in services.items():
        assert service["profiles"] == [edition]
        assert service["build"] == {"context": ".", "args": {"EDITION": edition}}
        assert ".env" in service["env_file"]
        assert [port.rsplit(":", 1)[-1] for port in service["ports"]] == ["8081"]
        [mount] = service["volumes"]
        volume, target = mount.split(":")
        assert target == "/data" and volume in compose["volumes"]
        volumes.add(volume)
    assert len(volumes) == 2
    assert all(port.startswith("127.0.0.1:") for port in services["personal"]["ports"])


def test_env_example_gives_valid_settings_once_uncommented():
    lines = (ROOT / ".env.example").read_text().splitlines()
    env = {}
    for line in lines:
        entry = line.lstrip("# ")
        if re.match(r"[A-Z][A-Z0-9_]*=\S", entry):
            key, _, value = entry.partition("=")
            env[key] = value.replace("...", "x" * 40)
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "TOKLIGENCE_ADMIN_KEY"} <= set(env)
    settings = tk.load_settings(None, {**env, "TOKLIGENCE_AUTH_DISABLED": "false"})
    assert {"openai", "anthropic", "deepseek"} <= set(settings.providers)
    assert ("deepseek-*", "deepseek") in settings.routes
    assert settings.admin_key == env["TOKLIGENCE_ADMIN_KEY"]
    with tk.open_database(":memory:") as database:
        assert tk.ensure_admin(database, settings.admin_key) == settings.admin_key
    assert not any(re.match(r"[A-Z_]+=", line) for line in lines), "every value starts commented out"


# ---- pip -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """The project as `pip install .` sees it, copied so builds leave nothing in the work tree."""
    target = tmp_path_factory.mktemp("source") / "tokligence"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".benchmarks", "bench", "tests", ".env")
    shutil.copytree(ROOT, target, ignore=junk)
    return target


def test_pip_install_dot_gives_the_tokligence_command(source_tree, tmp_path_factory):
    python = make_venv(tmp_path_factory.mktemp("pip-install") / "venv")
    pip(python, "install", "--no-cache-dir", source_tree)
    command = python.parent / "tokligence"
    assert run([command, "--version"]).stdout.strip() == f"tokligence {tk.__version__}"
    home = tmp_path_factory.mktemp("home")
    config = run([command, "config"], env={"PATH": os.environ["PATH"], "HOME": str(home)}).stdout
    assert "[gateway]" in config and "host = 127.0.0.1" in config
    where = run([python, "-c", "import tokligence; print(tokligence.__file__)"], cwd=home).stdout
    assert "site-packages" in where


def test_a_built_wheel_installs_the_command(source_tree, runtime_python, tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    build = pip(runtime_python, "wheel", "--no-deps", "--no-cache-dir", "-v", "-w", dist, source_tree)
    assert "SetuptoolsDeprecationWarning" not in build.stdout + build.stderr, "deprecated metadata"
    [wheel] = dist.glob("*.whl")
    assert wheel.name == f"tokligence-{tk.__version__}-py3-none-any.whl"
    python = make_venv(tmp_path_factory.mktemp("wheel-install") / "venv")
    pip(python, "install", "--no-cache-dir", wheel)
    assert run([python.parent / "tokligence", "--version"]).stdout.strip() == f"tokligence {tk.__version__}"


# ---- docs/docker.md --------------------------------------------------------------------------------
def doc_commands() -> tuple[list[str], list[str]]:
    """The commands of docs/docker.md's sh blocks: (those marked `# needs Docker`, the others)."""
    docker, here = [], []
    for block in re.findall(r"```sh\n(.*?)```", DOCKER_DOC.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        marked = lines[0] == "# needs Docker"
        commands = [" ".join(line.split()) for line in lines[1 if marked else 0:] if line.strip()]
        (docker if marked else here).extend(commands)
    return docker, here


HEALTH = "curl -s http://127.0.0.1:8081/health"
FOREIGN_HOST = "curl -s -o /dev/null -w '%{http_code}\\n' -H 'Host: gateway.example' http://127.0.0.1:8081/v1/models"
INIT = "python tokligence.py init --path ./settings.ini"
MAKE_KEY = "python -c \"import secrets; print('tok_' + secrets.token_urlsafe(32))\""
TEAM_CALL = 'curl -s http://127.0.0.1:8081/v1/models -H "Authorization: Bearer $TOKLIGENCE_KEY"'
COPY_ENV = "cp .env.example .env"


def test_docker_doc_marks_docker_commands_and_every_other_one_is_run_here():
    docker, here = doc_commands()
    assert docker and all(command.startswith("docker ") for command in docker), docker
    assert sorted(set(here)) == sorted({HEALTH, FOREIGN_HOST, INIT, MAKE_KEY, TEAM_CALL, COPY_ENV})
    text = " ".join(docker)
    assert "-p 127.0.0.1:8081:8081" in text and "--build-arg EDITION=team" in text
    assert "--profile personal" in text and "--profile team" in text


def shell(command: str, python: Path, port: int | None = None, cwd: Path | None = None, **env: str) -> str:
    """A doc command through bash, with the venv's python first on PATH and the gateway's real port."""
    if command.startswith("curl") and not shutil.which("curl"):
        pytest.skip("curl is not installed")
    if port is not None:
        command = command.replace("127.0.0.1:8081", f"127.0.0.1:{port}")
    path = f"{python.parent}{os.pathsep}{os.environ['PATH']}"
    return run(["bash", "-c", command], cwd=cwd, env={"PATH": path, "LANG": "C.UTF-8", **env}).stdout


def test_docker_doc_health_and_host_commands(personal, runtime_python):
    health = json.loads(shell(HEALTH, runtime_python, personal.port))
    assert health["status"] == "ok" and {"version", "uptime_s", "providers", "loops"} <= set(health)
    assert shell(FOREIGN_HOST, runtime_python, personal.port).strip() == "403"


def test_docker_doc_settings_file_is_read_and_the_image_env_still_wins(runtime_python, app, tmp_path):
    shutil.copy(ROOT / "tokligence.py", tmp_path)
    shell(INIT, runtime_python, cwd=tmp_path)
    settings = tmp_path / "settings.ini"
    assert "[gateway]" in settings.read_text()
    config = image()
    data = tmp_path / "data"
    data.mkdir()
    env = host_env(config, app, data, TOKLIGENCE_CONFIG=str(settings))   # -e TOKLIGENCE_CONFIG=/config/settings.ini
    out = run(host_argv(config["entrypoint"] + ["config"], app, runtime_python), env=env, cwd=data).stdout
    assert f"# settings file: {settings}\n" in out
    assert re.search(r"^host = 0\.0\.0\.0 +# env TOKLIGENCE_HOST$", out, re.M)
    assert re.search(rf"^ledger_path = {re.escape(str(data))}/ledger\.db +# env TOKLIGENCE_LEDGER_PATH$", out, re.M)


def test_docker_doc_admin_key_command_makes_a_valid_key(runtime_python):
    key = shell(MAKE_KEY, runtime_python).strip()
    assert re.fullmatch(r"tok_[A-Za-z0-9_-]{43}", key)
    with tk.open_database(":memory:") as database:
        assert tk.ensure_admin(database, key) == key


def test_docker_doc_team_call_with_a_key(team, runtime_python):
    models = json.loads(shell(TEAM_CALL, runtime_python, team.port, TOKLIGENCE_KEY=printed_admin_key(team)))
    assert isinstance(models["data"], list)


def test_docker_doc_env_file_step(runtime_python, tmp_path):
    shutil.copy(ROOT / ".env.example", tmp_path)
    shell(COPY_ENV, runtime_python, cwd=tmp_path)
    assert (tmp_path / ".env").read_text() == (ROOT / ".env.example").read_text()


def test_docker_doc_env_table_matches_the_image():
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|$", DOCKER_DOC.read_text(), re.M)
    table = dict(rows)
    personal, team = image("personal")["env"], image("team")["env"]
    assert table.pop("TOKLIGENCE_AUTH_DISABLED") == (f"`{personal['TOKLIGENCE_AUTH_DISABLED']}` (personal), "
                                                     f"`{team['TOKLIGENCE_AUTH_DISABLED']}` (team)")
    assert {key: value.strip("`") for key, value in table.items()} == {
        key: value for key, value in personal.items()
        if (key.startswith("TOKLIGENCE_") or key == "HOME") and key != "TOKLIGENCE_AUTH_DISABLED"}


def test_readme_docker_commands_are_marked():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = block.splitlines()
    assert lines[0] == "# needs Docker" and all(line.startswith("docker ") for line in lines[1:])
    assert "docs/docker.md" in section
    assert "```sh\npip install .\n```" in readme          # run by test_pip_install_dot_…


# ---- docs/api_mapping.md -----------------------------------------------------------------------------
API_DOC = ROOT / "docs" / "api_mapping.md"


def test_api_mapping_names_every_field_of_the_neutral_model():
    import dataclasses
    text = API_DOC.read_text().split("\n## 2. ", 1)[1].split("\n## 3. ", 1)[0]
    for cls in (tk.Conversation, tk.Message, tk.Text, tk.Image, tk.ToolCall, tk.ToolResult, tk.Thinking,
                tk.Refusal, tk.Tool, tk.Reply, tk.Usage):
        [row] = re.findall(rf"^\| `{cls.__name__}` \| (.+) \|$", text, re.M)
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in row]
        assert not missing, f"{cls.__name__}: {missing}"
    for cls in (tk.Start, tk.BlockStart, tk.Delta, tk.BlockEnd, tk.Finish, tk.StreamFailure):
        signature = f"`{cls.__name__}({', '.join(f.name for f in dataclasses.fields(cls))})`"
        assert signature in text, signature
    [reasons] = re.findall(r"Finish reasons: (.+?)\.\n\n", text, re.S)
    assert set(re.findall(r"`(\w+)`", reasons)) == set(tk._CHAT_FINISH)


def test_api_mapping_names_only_code_that_exists():
    names = set(re.findall(r"`((?:chat|messages|responses)_[a-z_]+|[A-Z]\w+(?:Decoder|Encoder|Memory|Unbridge)"
                           r"|strip_schema|reply_events|merge_usage|estimate_tokens|Gateway\.\w+)`",
                           API_DOC.read_text()))
    assert len(names) > 15
    for name in names:
        owner, _, attribute = name.rpartition(".")
        assert hasattr(getattr(tk, owner) if owner else tk, attribute), name
