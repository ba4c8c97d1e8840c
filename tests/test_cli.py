"""The team edition's commands (`user`, `key`, `usage`) on a temporary database, their hooks and
log file, and the gateway's own logging (text or JSON lines, stdout and a rotating file).

Most commands run in this process through main() (a new Python per command would cost a third of a
second each); the ones that must be a real process use run_cli()."""
import contextlib
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tokligence as tk
from team_edition import call, clean_env, ledger_rows, run_cli


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """main() reads os.environ: none of the developer's settings, and a home of the test's own."""
    for name in os.environ:
        if name.startswith(("TOKLIGENCE_", "OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def config(tmp_path):
    """A settings file whose database is a temporary file."""
    path = tmp_path / "settings.ini"
    path.write_text(f"[gateway]\nledger_path = {tmp_path / 'ledger.db'}\n")
    return path


def main(config, *args: str) -> subprocess.CompletedProcess:
    """tokligence.main(["--config", config, *args]) with its output captured and the root logger
    (which setup_logging() takes over) put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tk.main(["--config", str(config), *args])
    except SystemExit as exit:          # argparse refusing the arguments
        code = exit.code
    finally:
        for handler in set(root.handlers) - set(saved[0]):
            handler.close()
        root.handlers[:], root.level = saved
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli(config, *args: str) -> str:
    """Runs a command that must succeed; returns its output."""
    done = main(config, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fails(config, *args: str) -> str:
    """Runs a command that must fail with status 1; returns its error message."""
    done = main(config, *args)
    assert done.returncode == 1, done.stdout
    return done.stderr.strip()


def table(output: str) -> list[dict[str, str]]:
    """A printed table as rows keyed by its header, cut where the header's columns start."""
    header, *lines = output.strip("\n").splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    cuts = list(zip(header.split(), starts, starts[1:] + [None]))
    return [{name: line[start:end].strip() for name, start, end in cuts} for line in lines]


def database(config) -> sqlite3.Connection:
    return sqlite3.connect(config.parent / "ledger.db")


# ---- users ---------------------------------------------------------------------------------------------
def test_users_are_added_listed_updated_disabled_and_deleted(config):
    added = table(cli(config, "user", "add", "Ann@Example.com", "--name", "Ann"))
    assert [(r["id"], r["email"], r["name"], r["role"], r["status"]) for r in added] == [
        ("1", "ann@example.com", "Ann", "user", "active")]
    cli(config, "user", "add", "bob@example.com", "--role", "admin")
    assert [(r["email"], r["role"]) for r in table(cli(config, "user", "list"))] == [
        ("ann@example.com", "user"), ("bob@example.com", "admin")]

    updated = table(cli(config, "user", "update", "ann@example.com", "--name", "Annie", "--role", "admin"))
    assert (updated[0]["name"], updated[0]["role"]) == ("Annie", "admin")
    assert table(cli(config, "user", "update", "1", "--email", "ann@corp.example"))[0]["email"] == "ann@corp.example"
    assert table(cli(config, "user", "disable", "2"))[0]["status"] == "disabled"
    assert table(cli(config, "user", "update", "2", "--status", "active"))[0]["status"] == "active"

    assert "deleted user 2 (bob@example.com)" in cli(config, "user", "delete", "bob@example.com")
    assert [r["email"] for r in table(cli(config, "user", "list"))] == ["ann@corp.example"]


def test_user_commands_report_mistakes_and_exit_1(config):
    cli(config, "user", "add", "ann@example.com")
    assert fails(config, "user", "add", "ann@example.com") == \
        "tokligence: a user with email ann@example.com already exists"
    assert fails(config, "user", "add", "nobody") == "tokligence: invalid email 'nobody'"
    assert fails(config, "user", "disable", "7") == "tokligence: no user 7"
    assert fails(config, "user", "delete", "who@example.com") == "tokligence: no user who@example.com"
    assert fails(config, "user", "update", "1") == \
        "tokligence: nothing to update: give --email, --name, --role or --status"
    wrong = main(config, "user", "add", "x@example.com", "--role", "root")
    assert wrong.returncode == 2 and "invalid choice: 'root'" in wrong.stderr


def test_users_are_imported_from_csv_skipping_existing_ones(config, tmp_path):
    cli(config, "user", "add", "ann@example.com")
    people = tmp_path / "people.csv"
    people.write_text("\ufeffEmail, Name ,role\nann@example.com,Ann,user\ncid@example.com,Cid,admin\n"
                      "dee@example.com,,\n", encoding="utf-8")
    output = cli(config, "user", "import", str(people))
    assert "created 2 users; skipped 1 that exist already\n  ann@example.com" in output
    assert [(r["email"], r["role"]) for r in table(cli(config, "user", "list"))] == [
        ("ann@example.com", "user"), ("cid@example.com", "admin"), ("dee@example.com", "user")]


def test_a_bad_csv_imports_nothing(config, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("email,role\nok@example.com,user\nnot-an-email,user\n")
    assert fails(config, "user", "import", str(bad)) == "tokligence: line 3: invalid email 'not-an-email'"
    headless = tmp_path / "headless.csv"
    headless.write_text("name\nAnn\n")
    assert "needs a header row with an email column" in fails(config, "user", "import", str(headless))
    assert table(cli(config, "user", "list")) == []
    missing = main(config, "user", "import", str(tmp_path / "nowhere.csv"))
    assert missing.returncode == 1 and "No such file" in missing.stderr


# ---- keys ------------------------------------------------------------------------------------------------
def test_a_key_is_printed_once_and_only_its_hash_is_stored(config):
    cli(config, "user", "add", "ann@example.com")
    output = cli(config, "key", "create", "ann@example.com", "--name", "laptop", "--expires", "30")
    key = output.strip().splitlines()[-1]
    row = table(output.split("the key, shown only this once:")[0])[0]
    assert key.startswith("tok_") and len(key) == 47
    assert (row["id"], row["user_id"], row["name"], row["prefix"]) == ("1", "1", "laptop", key[:8] + "…")
    listed = cli(config, "key", "list")
    assert key not in listed and key[:8] + "…" in listed
    with database(config) as db:
        stored_hash, expires_at = db.execute("SELECT key_hash, expires_at FROM api_keys").fetchone()
    assert stored_hash == tk.key_hash(key)
    assert 29.9 < (expires_at - time.time()) / 86400 <= 30


def test_keys_are_listed_per_user_expire_at_an_iso_date_and_are_revoked(config):
    cli(config, "user", "add", "ann@example.com")
    cli(config, "user", "add", "bob@example.com")
    cli(config, "key", "create", "1")
    cli(config, "key", "create", "bob@example.com", "--expires", "2999-01-01T00:00:00Z")
    assert [r["user_id"] for r in table(cli(config, "key", "list"))] == ["1", "2"]
    bobs = table(cli(config, "key", "list", "--user", "bob@example.com"))
    assert [(r["id"], r["revoked_at"]) for r in bobs] == [("2", "-")]
    with database(config) as db:
        assert db.execute("SELECT expires_at FROM api_keys WHERE id = 2").fetchone()[0] == 32472144000.0
    cli(config, "key", "revoke", "2")
    assert table(cli(config, "key", "list", "--user", "2"))[0]["revoked_at"] != "-"
    assert fails(config, "key", "revoke", "9") == "tokligence: unknown key 9"
    assert fails(config, "key", "create", "ann@example.com", "--expires", "2001-01-01") == \
        "tokligence: the expiry '2001-01-01' is not in the future"
    assert fails(config, "key", "create", "zed@example.com") == "tokligence: no user zed@example.com"


# ---- usage -----------------------------------------------------------------------------------------------
def seed_ledger(config) -> None:
    """Three requests: two by user 1 on 2025-01-01, one by user 2 on 2025-01-02."""
    day = 1735689600.0    # 2025-01-01T00:00:00Z
    db = tk.open_database(str(config.parent / "ledger.db"))
    writer = tk.LedgerWriter(db)
    for i, (ts, user, model, cost) in enumerate([(day + 60, 1, "m-a", 0.25), (day + 120, 1, "m-b", None),
                                                 (day + 86400 + 60, 2, "m-a", 0.5)]):
        writer.submit({"id": f"req_{i}", "ts": ts, "user_id": user, "key_id": user, "endpoint": "/v1/messages",
                       "provider": "p", "model_served": model, "status": 200, "input_tokens": 100 * (i + 1),
                       "output_tokens": 10, "cost_usd": cost})
    writer.close()
    db.close()


def test_usage_prints_totals_and_each_breakdown_as_tables(config):
    seed_ledger(config)
    output = cli(config, "usage")
    sections = {section.split("\n", 1)[0]: section.split("\n", 1)[1] for section in output.strip().split("\n\n")}
    assert list(sections) == ["totals", "by day", "by model", "by provider", "by key", "by user"]
    [totals] = table(sections["totals"])
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == ("3", "600", "30")
    assert (totals["cost_usd"], totals["unpriced_requests"]) == ("0.750000", "1")
    assert [(r["day"], r["requests"]) for r in table(sections["by day"])] == [("2025-01-01", "2"), ("2025-01-02", "1")]
    assert [(r["model"], r["input_tokens"]) for r in table(sections["by model"])] == [("m-a", "400"), ("m-b", "200")]
    assert [(r["user_id"], r["requests"]) for r in table(sections["by user"])] == [("1", "2"), ("2", "1")]


def test_usage_json_is_the_usage_apis_summary_and_takes_filters(config):
    seed_ledger(config)
    cli(config, "user", "add", "ann@example.com")
    with tk.open_database(str(config.parent / "ledger.db")) as db:
        expected = tk.usage_summary(db)
        for_ann = tk.usage_summary(db, user_id=1)
    assert json.loads(cli(config, "usage", "--json")) == json.loads(json.dumps(expected))
    assert json.loads(cli(config, "usage", "--json", "--user", "ann@example.com")) == json.loads(json.dumps(for_ann))
    second_day = json.loads(cli(config, "usage", "--json", "--since", "2025-01-02"))
    assert second_day["totals"]["requests"] == 1 and second_day["by_user"][0]["user_id"] == 2
    first_day = json.loads(cli(config, "usage", "--json", "--since", "1735689600", "--until", "2025-01-02"))
    assert first_day["totals"]["requests"] == 2
    assert fails(config, "usage", "--since", "last week").startswith("tokligence: since: expected unix seconds")


# ---- hooks, the CLI's log file, the database setting ----------------------------------------------------
def test_commands_run_the_hook_with_cli_as_the_actor_before_they_exit(config, tmp_path):
    events = tmp_path / "events.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\nsleep 0.1\ncat >> {events}\necho >> {events}\n")
    hook.chmod(0o755)
    config.write_text(config.read_text() + f"hook_script = {hook}\n")
    cli(config, "user", "add", "ann@example.com")
    key = cli(config, "key", "create", "1").strip().splitlines()[-1]
    cli(config, "key", "revoke", "1")
    cli(config, "user", "update", "1", "--name", "Ann")
    cli(config, "user", "disable", "1")
    cli(config, "user", "delete", "1")
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["type"], e["actor"], e["user_id"]) for e in seen] == [
        ("user.created", "cli", 1), ("key.created", "cli", 1), ("key.revoked", "cli", 1),
        ("user.updated", "cli", 1), ("user.disabled", "cli", 1), ("user.deleted", "cli", 1)]
    assert seen[0]["metadata"]["user"]["email"] == "ann@example.com"
    assert key not in events.read_text()


def test_the_cli_log_file_records_changes_and_rotates(config, tmp_path):
    log_file = tmp_path / "logs" / "cli.log"
    config.write_text(config.read_text() + f"cli_log_file = {log_file}\nlog_max_bytes = 100\nlog_backups = 2\n")
    for i in range(4):
        output = cli(config, "user", "add", f"user{i}@example.com")
        assert "user.created" not in output, "log lines must stay out of the command's output"
    rotated = sorted(path.name for path in log_file.parent.iterdir())
    assert rotated == ["cli.log", "cli.log.1", "cli.log.2"]
    everything = "".join((log_file.parent / name).read_text() for name in rotated)
    assert "INFO user.created user=4 actor=cli" in everything and "user=1 " not in everything
    assert all(path.stat().st_size <= 100 for path in log_file.parent.iterdir())


def test_the_cli_log_can_be_json_lines(config, tmp_path):
    log_file = tmp_path / "cli.log"
    config.write_text(config.read_text() + f"cli_log_file = {log_file}\nlog_format = json\n")
    cli(config, "user", "add", "ann@example.com")
    [entry] = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (entry["level"], entry["logger"], entry["message"], entry["user"], entry["actor"]) == (
        "info", "tokligence", "user.created", 1, "cli")
    assert entry["time"].endswith("Z")


def test_commands_need_the_database(tmp_path):
    config = tmp_path / "settings.ini"
    config.write_text("[gateway]\nledger_path = off\n")
    done = run_cli(config, "user", "list")
    assert done.returncode == 2 and "need the database, but ledger_path = off" in done.stderr


def test_commands_default_to_the_settings_database(tmp_path):
    env = clean_env(tmp_path)
    config = tmp_path / ".tokligence" / "settings.ini"
    config.parent.mkdir()
    config.write_text("")
    done = run_cli(config, "user", "add", "ann@example.com", env=env)
    assert done.returncode == 0 and "ann@example.com" in done.stdout
    assert (tmp_path / ".tokligence" / "ledger.db").exists()


# ---- the gateway's own logging -------------------------------------------------------------------------
@pytest.fixture
def root_logging():
    """Puts the root logger back as it was after setup_logging() has changed it."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved[0], saved[1]


def logged_lines(path: Path, needle: str) -> list[str]:
    """The log file's lines holding needle, once some have arrived: request lines are flushed
    within a fraction of a second, not one write each."""
    deadline = time.monotonic() + 2 * tk.LOG_FLUSH_SECONDS + 1
    while True:
        lines = [line for line in path.read_text().splitlines() if needle in line] if path.exists() else []
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_request_lines_go_to_stdout_and_the_log_file(gateway_factory, tmp_path, capsys, root_logging,
                                                     log_format):
    log_file = tmp_path / "gateway.log"
    settings = tk.load_settings(None, {"TOKLIGENCE_LOG_FILE": str(log_file), "TOKLIGENCE_LOG_FORMAT": log_format})
    tk.setup_logging(settings)
    gw = gateway_factory()
    call(gw, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    ledger_rows(gw, 1)
    lines = logged_lines(log_file, "/v1/chat/completions")
    assert len(lines) == 1 and lines[0] in capsys.readouterr().out
    if log_format == "text":
        assert " INFO request id=req_" in lines[0]
        assert "path=/v1/chat/completions model=m provider=loopback status=200 stream=false ms=" in lines[0]
    else:
        entry = json.loads(lines[0])
        assert (entry["message"], entry["path"], entry["model"], entry["status"], entry["stream"]) == (
            "request", "/v1/chat/completions", "m", 200, False)
        assert entry["in"] > 0 and entry["out"] > 0 and entry["id"].startswith("req_")
        assert isinstance(entry["ms"], float)


def test_json_log_lines_keep_ordinary_messages_and_exceptions():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("tokligence", logging.ERROR, __file__, 1, "connection from %s failed",
                                   ("1.2.3.4",), sys.exc_info())
    entry = json.loads(tk.JSONLogFormatter().format(record))
    assert (entry["message"], entry["level"]) == ("connection from 1.2.3.4 failed", "error")
    assert "RuntimeError: boom" in entry["exception"]


def test_text_log_times_read_as_the_standard_formatter_writes_them():
    standard, formatter = logging.Formatter(tk.TEXT_LOG_FORMAT), tk.LogFormatter(tk.TEXT_LOG_FORMAT)
    for created in (1795800000.9996, 1795800001.0004, 1795800001.5, 1795800000.25):
        record = logging.LogRecord("tokligence", logging.INFO, __file__, 1, "hi", (), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert formatter.format(record) == standard.format(record)


def test_a_log_event_is_key_value_text():
    event = tk.LogEvent("request", {"id": "req_1", "model": None, "stream": True, "ms": 1.5})
    assert str(event) == "request id=req_1 model=- stream=true ms=1.5"
