import asyncio
import fnmatch
import hmac
import io
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tokligence import *  # noqa: E402,F403


def ledger_row(n: int, **fields):
    return {"id": f"req_{n}", "ts": 1_700_000_000.0 + n, "endpoint": "/v1/messages", "status": 200, **fields}


def count_requests(db) -> int:
    return db.execute("SELECT count(*) FROM requests").fetchone()[0]


@pytest.fixture
def db():
    database = open_database(":memory:")
    yield database
    database.close()


# ---- database and migrations ---------------------------------------------------------------------
def test_memory_database_is_shared_by_connect_and_new_per_call():
    first, second = open_database(":memory:"), open_database(":memory:")
    sibling = first.connect()
    create_user(first, "a@example.com")
    assert get_user(sibling, "a@example.com") is not None
    assert get_user(second, "a@example.com") is None
    for conn in (sibling, first, second):
        conn.close()


def test_file_database_expands_home_creates_parent_and_uses_wal(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    db = open_database("~/nested/dir/tokligence.db")
    assert (tmp_path / "nested" / "dir" / "tokligence.db").exists()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
    db.close()


def test_v1_database_is_migrated_forward_keeping_its_data(tmp_path):
    path = tmp_path / "v1.db"
    old = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    old.execute("INSERT INTO users (email, name, role, status, created_at, updated_at) "
                "VALUES ('old@example.com', 'Old', 'user', 'active', 1, 1)")
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()

    db = open_database(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert get_user(db, "old@example.com")["name"] == "Old"
    store_response(db, "resp_1", {"ok": True}, ttl_seconds=60)
    assert load_response(db, "resp_1") == {"ok": True}
    db.close()
    reopened = open_database(str(path))   # already current: nothing to do
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == 2
    reopened.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    future = sqlite3.connect(path)
    future.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    future.close()
    with pytest.raises(RuntimeError, match="newer"):
        open_database(str(path))


def test_transaction_rolls_back_on_error(db):
    with pytest.raises(ZeroDivisionError):
        with transaction(db):
            create_user(db, "gone@example.com")
            1 / 0
    assert get_user(db, "gone@example.com") is None


# ---- ledger writer -------------------------------------------------------------------------------
def test_concurrent_submitters_through_a_full_queue_lose_nothing(db):
    writer = LedgerWriter(db, max_queued=50)

    def submit_many(thread: int):
        for n in range(1_000):
            writer.submit(ledger_row(thread * 10_000 + n))

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert count_requests(db) == 8_000


def test_put_waits_for_room_without_blocking_the_loop_and_drops_nothing(db):
    writer = LedgerWriter(db, max_queued=5)

    async def scenario():
        gate = threading.Event()
        held = asyncio.create_task(writer.write_now(lambda conn: gate.wait(5)))
        await asyncio.sleep(0.05)                      # the writer thread is now stuck in the job
        puts = [asyncio.create_task(writer.put(ledger_row(n))) for n in range(30)]
        await asyncio.sleep(0.05)                      # the loop keeps running while puts wait
        assert sum(put.done() for put in puts) == 5   # the queue's room; the rest wait
        gate.set()
        await asyncio.gather(held, *puts)

    asyncio.run(scenario())
    writer.close()
    assert count_requests(db) == 30


def test_close_flushes_everything_queued(db):
    writer = LedgerWriter(db)
    for n in range(5_000):
        writer.submit(ledger_row(n))
    writer.close()
    assert count_requests(db) == 5_000
    writer.close()   # idempotent


def test_submitting_after_close_is_refused(db):
    writer = LedgerWriter(db)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(ledger_row(1))
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(writer.put(ledger_row(2)))


def test_a_bad_row_does_not_lose_its_batch(db, caplog):
    writer = LedgerWriter(db)

    async def scenario():
        gate = threading.Event()
        held = asyncio.create_task(writer.write_now(lambda conn: gate.wait(5)))
        await asyncio.sleep(0.05)   # everything below queues up and lands in one batch
        for n in range(3):
            writer.submit(ledger_row(n))
        writer.submit({"endpoint": "/v1/messages", "status": 200})   # no id, no ts
        writer.submit(ledger_row(3, stream={"not": "bindable"}))
        for n in range(4, 7):
            writer.submit(ledger_row(n))
        gate.set()
        await held

    with caplog.at_level(logging.ERROR, logger="tokligence.storage"):
        asyncio.run(scenario())
        writer.close()
    assert count_requests(db) == 6
    assert "retrying them one by one" in caplog.text
    assert caplog.text.count("could not be written") == 2


def test_write_now_runs_after_what_was_queued_before_it(db):
    writer = LedgerWriter(db)

    async def scenario():
        for n in range(100):
            writer.submit(ledger_row(n))
        seen = await writer.write_now(count_requests)
        user = await writer.write_now(lambda conn: create_user(conn, "w@example.com"))
        with pytest.raises(ValueError, match="already exists"):
            await writer.write_now(lambda conn: create_user(conn, "w@example.com"))
        await writer.put(ledger_row(100))   # the writer survives a failed job
        return seen, user, await writer.write_now(count_requests)

    seen, user, after = asyncio.run(scenario())
    writer.close()
    assert (seen, after) == (100, 101)
    assert user["email"] == "w@example.com"


def test_ledger_rows_get_defaults_and_touch_their_key(db):
    user = create_user(db, "u@example.com")
    _, key = create_key(db, user["id"])
    writer = LedgerWriter(db)
    writer.submit(ledger_row(1, key_id=key["id"], ts=2_000.0))
    writer.submit(ledger_row(2, key_id=key["id"], ts=1_000.0))
    writer.close()
    row = dict(db.execute("SELECT * FROM requests WHERE id = 'req_1'").fetchone())
    assert row["input_tokens"] == 0 and row["stream"] == 0 and row["cost_usd"] is None
    assert list_keys(db)[0]["last_used_at"] == 2_000.0


def test_a_disabled_writer_records_nothing():
    writer = LedgerWriter(None)
    writer.submit(ledger_row(1))
    asyncio.run(writer.put(ledger_row(2)))
    with pytest.raises(RuntimeError, match="off"):
        asyncio.run(writer.write_now(count_requests))
    writer.close()


# ---- costs ---------------------------------------------------------------------------------------
def test_prices_exact_then_longest_glob_and_unknown_is_none(monkeypatch):
    table = PriceTable({
        "gpt-4o": (2.5, 10.0, 1.25, 0.0),
        "gpt-4o*": (1.0, 1.0, 1.0, 1.0),
        "gpt-4o-mini*": (0.15, 0.6, 0.075, 0.0),
        "claude-*": (3.0, 15.0, 0.3, 3.75),
    })
    assert table.price_for("gpt-4o") == (2.5, 10.0, 1.25, 0.0)
    assert table.price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.6, 0.075, 0.0)
    assert table.price_for("gpt-4o-2024-08-06") == (1.0, 1.0, 1.0, 1.0)
    assert table.price_for("claude-sonnet-4") == (3.0, 15.0, 0.3, 3.75)
    assert table.price_for("llama-3") is None

    calls = []
    monkeypatch.setattr(fnmatch, "fnmatchcase", lambda *args: calls.append(args) or False)
    assert table.price_for("claude-sonnet-4") == (3.0, 15.0, 0.3, 3.75)   # remembered: no matching
    assert table.price_for("llama-3") is None
    assert calls == []


def test_cost_is_per_million_tokens_and_none_without_a_price():
    price = (3.0, 15.0, 0.3, 3.75)
    assert cost_usd(1_000_000, 0, 0, 0, price) == pytest.approx(3.0)
    assert cost_usd(1_000, 2_000, 10_000, 4_000, price) == pytest.approx(0.003 + 0.03 + 0.003 + 0.015)
    assert cost_usd(0, 0, 0, 0, price) == 0.0
    assert cost_usd(1_000, 2_000, 0, 0, None) is None


# ---- users and keys ------------------------------------------------------------------------------
def test_user_crud(db):
    alice = create_user(db, "  Alice@Example.com ", "Alice", "admin")
    assert alice["email"] == "alice@example.com" and alice["role"] == "admin" and alice["status"] == "active"
    assert get_user(db, alice["id"]) == alice
    assert get_user(db, str(alice["id"])) == alice
    assert get_user(db, "ALICE@example.com") == alice
    assert get_user(db, "nobody@example.com") is None
    bob = create_user(db, "bob@example.com")
    assert bob["role"] == "user"
    assert [user["email"] for user in list_users(db)] == ["alice@example.com", "bob@example.com"]

    renamed = update_user(db, bob["id"], name="Robert", role="admin")
    assert (renamed["name"], renamed["role"]) == ("Robert", "admin")
    assert renamed["updated_at"] >= bob["updated_at"]
    assert disable_user(db, bob["id"])["status"] == "disabled"
    assert update_user(db, bob["id"])["name"] == "Robert"   # nothing to change: only updated_at moves

    delete_user(db, bob["id"])
    assert get_user(db, bob["id"]) is None


def test_user_validation(db):
    user = create_user(db, "a@example.com")
    with pytest.raises(ValueError, match="already exists"):
        create_user(db, "A@EXAMPLE.COM")
    with pytest.raises(ValueError, match="role must be admin or user"):
        create_user(db, "b@example.com", role="owner")
    with pytest.raises(ValueError, match="invalid email"):
        create_user(db, "not-an-email")
    create_user(db, "c@example.com")
    with pytest.raises(ValueError, match="already exists"):
        update_user(db, user["id"], email="c@example.com")
    with pytest.raises(ValueError, match="cannot update id"):
        update_user(db, user["id"], id=7)
    with pytest.raises(ValueError, match="status must be active or disabled"):
        update_user(db, user["id"], status="gone")
    for change in (lambda: update_user(db, 999, name="x"), lambda: disable_user(db, 999),
                   lambda: delete_user(db, 999), lambda: create_key(db, 999)):
        with pytest.raises(ValueError, match="unknown user 999"):
            change()


def test_keys_store_only_a_hash_and_a_prefix(db):
    user = create_user(db, "k@example.com")
    plaintext, key = create_key(db, user["id"], name="laptop", expires_at=2e9)
    assert plaintext.startswith("tok_") and len(plaintext) == 4 + 43
    assert key["prefix"] == plaintext[:8] + "…"
    assert (key["name"], key["expires_at"], key["revoked_at"]) == ("laptop", 2e9, None)
    assert key["user_id"] == user["id"]
    assert "key_hash" not in key
    stored = db.execute("SELECT key_hash FROM api_keys").fetchone()[0]
    assert stored == key_hash(plaintext)
    assert plaintext not in json.dumps([list(row) for row in db.execute("SELECT * FROM api_keys")])

    other = create_user(db, "o@example.com")
    create_key(db, other["id"])
    assert len(list_keys(db)) == 2
    assert [row["id"] for row in list_keys(db, user["id"])] == [key["id"]]

    revoked = revoke_key(db, key["id"])
    assert revoked["revoked_at"] is not None
    assert revoke_key(db, key["id"])["revoked_at"] == revoked["revoked_at"]   # first revocation stands
    with pytest.raises(ValueError, match="unknown key 999"):
        revoke_key(db, 999)

    delete_user(db, user["id"])
    assert list_keys(db, user["id"]) == []


def test_import_users_csv(db):
    create_user(db, "existing@example.com")
    result = import_users_csv(db, io.StringIO(
        "\ufeff Email ,Name,Role\n"
        "new@example.com,New,admin\n"
        "EXISTING@example.com,Again,\n"
        "plain@example.com,,\n"
        "\n"
        "new@example.com,Twice,user\n"))
    assert [user["email"] for user in result["created"]] == ["new@example.com", "plain@example.com"]
    assert result["skipped"] == ["existing@example.com", "new@example.com"]
    assert get_user(db, "new@example.com")["role"] == "admin"
    assert get_user(db, "plain@example.com")["role"] == "user"


def test_import_users_csv_is_all_or_nothing(db):
    with pytest.raises(ValueError, match="line 3: role must be admin or user"):
        import_users_csv(db, io.StringIO("email,role\nfirst@example.com,user\nsecond@example.com,boss\n"))
    assert list_users(db) == []
    with pytest.raises(ValueError, match="line 2: invalid email"):
        import_users_csv(db, io.StringIO("email\nnope\n"))
    with pytest.raises(ValueError, match="header row with an email column"):
        import_users_csv(db, io.StringIO("name,role\nx,user\n"))


def test_ensure_admin_creates_the_first_admin_once(db):
    plaintext = ensure_admin(db, None)
    assert plaintext.startswith("tok_")
    admin = get_user(db, "admin@localhost")
    assert admin["role"] == "admin"
    assert KeyIndex(db).lookup(plaintext).user_id == admin["id"]
    assert ensure_admin(db, None) is None
    assert len(list_keys(db)) == 1


def test_ensure_admin_uses_the_given_key_and_checks_it():
    db = open_database(":memory:")
    with pytest.raises(ValueError, match="must start with tok_"):
        ensure_admin(db, "sk-not-ours-0000000000000000")
    with pytest.raises(ValueError, match="at least 24"):
        ensure_admin(db, "tok_short")
    assert list_users(db) == []
    given = "tok_" + "x" * 30
    assert ensure_admin(db, given) == given
    assert KeyIndex(db).lookup(given).user_role == "admin"


# ---- key index -----------------------------------------------------------------------------------
def test_key_index_accepts_only_usable_keys(db):
    alice = create_user(db, "alice@example.com", role="admin")
    bob = create_user(db, "bob@example.com")
    alice_key, alice_row = create_key(db, alice["id"])
    bob_key, _ = create_key(db, bob["id"])
    expired_key, _ = create_key(db, alice["id"], expires_at=time.time() - 1)
    later_key, _ = create_key(db, alice["id"], expires_at=time.time() + 3600)
    revoked_key, revoked_row = create_key(db, alice["id"])
    revoke_key(db, revoked_row["id"])
    index = KeyIndex(db)

    info = index.lookup(alice_key)
    assert (info.key_id, info.user_id, info.user_role) == (alice_row["id"], alice["id"], "admin")
    assert index.lookup(bob_key).user_role == "user"
    assert index.lookup(later_key) is not None
    assert index.lookup(expired_key) is None
    assert index.lookup(revoked_key) is None
    assert index.lookup("tok_unknown") is None
    assert index.lookup(alice_key[:-1]) is None

    disable_user(db, bob["id"])
    revoke_key(db, alice_row["id"])
    assert index.lookup(bob_key) is not None   # not reloaded yet
    index.invalidate()
    assert index.lookup(bob_key) is None
    assert index.lookup(alice_key) is None


def test_key_index_compares_the_full_hash_in_constant_time(db, monkeypatch):
    user = create_user(db, "c@example.com")
    plaintext, _ = create_key(db, user["id"])
    index = KeyIndex(db)
    compared = []
    real_compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real_compare(a, b))
    assert index.lookup(plaintext) is not None
    assert compared == [(key_hash(plaintext), key_hash(plaintext))]


def wait_until(condition, refresh, seconds: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        refresh()
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_key_index_sees_another_connections_changes_within_a_second(tmp_path):
    gateway = open_database(str(tmp_path / "shared.db"))
    index = KeyIndex(gateway)
    cli = open_database(str(tmp_path / "shared.db"))   # as another process would
    user = create_user(cli, "late@example.com")
    plaintext, key = create_key(cli, user["id"])
    index.refresh_if_changed()   # spends this second's check; the change may land after it
    assert wait_until(lambda: index.lookup(plaintext) is not None, index.refresh_if_changed) < 1.5
    revoke_key(cli, key["id"])
    assert wait_until(lambda: index.lookup(plaintext) is None, index.refresh_if_changed) < 1.5
    cli.close()
    gateway.close()


def test_key_index_checks_data_version_at_most_once_a_second(db, monkeypatch):
    index = KeyIndex(db)
    index.refresh_if_changed()
    user = create_user(db.connect(), "x@example.com")
    plaintext, _ = create_key(db.connect(), user["id"])
    index.refresh_if_changed()   # within the second: not looked at
    assert index.lookup(plaintext) is None
    clock = time.monotonic() + 1.5
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    index.refresh_if_changed()
    assert index.lookup(plaintext) is not None


# ---- usage queries -------------------------------------------------------------------------------
DAY = 86_400.0
MONDAY = 1_700_006_400.0   # 2023-11-15 00:00 UTC


@pytest.fixture
def ledger(db):
    writer = LedgerWriter(db)
    rows = [
        ledger_row(1, ts=MONDAY + 10, user_id=1, key_id=10, provider="anthropic", model_served="claude",
                   input_tokens=100, output_tokens=50, cache_read_tokens=5, reasoning_tokens=7, cost_usd=0.5),
        ledger_row(2, ts=MONDAY + 20, user_id=1, key_id=11, provider="openai", model_served="gpt",
                   input_tokens=10, output_tokens=5, cost_usd=0.25),
        ledger_row(3, ts=MONDAY + DAY + 5, user_id=2, key_id=20, provider="openai", model_served="gpt",
                   input_tokens=1, output_tokens=1, cache_write_tokens=3, status=429,
                   error_type="rate_limit"),
        ledger_row(4, ts=MONDAY + DAY + 6, user_id=2, key_id=20, provider="local", model_served="llama",
                   status=499),
    ]
    for row in rows:
        writer.submit(row)
    writer.close()
    return db


def test_usage_summary_totals_and_breakdowns(ledger):
    summary = usage_summary(ledger, None, None, None)
    assert summary["totals"] == {
        "requests": 4, "input_tokens": 111, "output_tokens": 56, "cache_read_tokens": 5,
        "cache_write_tokens": 3, "reasoning_tokens": 7, "cost_usd": 0.75, "unpriced_requests": 2, "errors": 2,
    }
    assert [(row["day"], row["requests"]) for row in summary["by_day"]] == [
        ("2023-11-15", 2), ("2023-11-16", 2)]
    assert [(row["model"], row["requests"], row["cost_usd"]) for row in summary["by_model"]] == [
        ("claude", 1, 0.5), ("gpt", 2, 0.25), ("llama", 1, None)]
    assert [(row["provider"], row["errors"]) for row in summary["by_provider"]] == [
        ("anthropic", 0), ("local", 1), ("openai", 1)]
    assert [(row["key_id"], row["requests"]) for row in summary["by_key"]] == [(10, 1), (11, 1), (20, 2)]
    assert [(row["user_id"], row["input_tokens"]) for row in summary["by_user"]] == [(1, 110), (2, 1)]


def test_usage_summary_filters_by_time_and_user(ledger):
    first_day = usage_summary(ledger, MONDAY, MONDAY + DAY, None)
    assert first_day["totals"]["requests"] == 2
    assert usage_summary(ledger, None, None, 2)["totals"]["cost_usd"] is None
    empty = usage_summary(ledger, MONDAY + 10 * DAY, None, None)
    assert empty["totals"]["requests"] == 0 and empty["totals"]["input_tokens"] == 0
    assert empty["by_day"] == []


def test_usage_logs_filters_and_pages(ledger):
    page = usage_logs(ledger)
    assert (page["total"], page["limit"], page["offset"]) == (4, 50, 0)
    assert [row["id"] for row in page["data"]] == ["req_4", "req_3", "req_2", "req_1"]   # newest first
    assert page["data"][0]["endpoint"] == "/v1/messages"
    second = usage_logs(ledger, limit=2, offset=2)
    assert [row["id"] for row in second["data"]] == ["req_2", "req_1"] and second["total"] == 4
    assert [row["id"] for row in usage_logs(ledger, model="gpt")["data"]] == ["req_3", "req_2"]
    assert [row["id"] for row in usage_logs(ledger, provider="openai", status=429)["data"]] == ["req_3"]
    assert usage_logs(ledger, key_id=20)["total"] == 2
    assert usage_logs(ledger, user_id=1, since=MONDAY + 15)["total"] == 1
    assert usage_logs(ledger, until=MONDAY + 15)["total"] == 1
    for bad in ({"limit": 0}, {"limit": 5_000}, {"offset": -1}):
        with pytest.raises(ValueError, match="limit must be"):
            usage_logs(ledger, **bad)


# ---- stored responses ----------------------------------------------------------------------------
def test_stored_responses_expire_and_are_purged(db):
    body = {"response": {"id": "resp_1", "output": []}, "conversation": {"messages": ["ünïcode"]}}
    store_response(db, "resp_1", body, ttl_seconds=60)
    assert load_response(db, "resp_1") == body
    store_response(db, "resp_old", {"x": 1}, ttl_seconds=-1)
    assert load_response(db, "resp_old") is None
    assert delete_response(db, "resp_old") is False
    store_response(db, "resp_2", {"x": 2}, ttl_seconds=60)   # purges what has expired
    stored = [row[0] for row in db.execute("SELECT id FROM stored_responses ORDER BY id")]
    assert stored == ["resp_1", "resp_2"]
    assert delete_response(db, "resp_1") is True
    assert delete_response(db, "resp_1") is False
    assert load_response(db, "resp_1") is None
    assert load_response(db, "resp_missing") is None


def test_a_response_stored_through_write_now_is_readable_at_once(db):
    writer = LedgerWriter(db)
    asyncio.run(writer.write_now(lambda conn: store_response(conn, "resp_s", {"done": True}, 60)))
    assert load_response(db, "resp_s") == {"done": True}
    writer.close()


# ---- hooks ---------------------------------------------------------------------------------------
def hook_script(tmp_path: Path, body: str) -> str:
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_hook_gets_the_event_as_json_on_stdin_in_order(tmp_path):
    out = tmp_path / "events.jsonl"
    runner = HookRunner(hook_script(tmp_path, f"cat >> '{out}'\necho >> '{out}'\n"), timeout=5)
    runner.emit("user.created", user_id=7, actor="admin@localhost", metadata={"email": "n@example.com"})
    runner.emit("key.created", user_id=7, actor="cli")
    runner.close()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [event["type"] for event in events] == ["user.created", "key.created"]
    first = events[0]
    assert set(first) == {"id", "type", "time", "user_id", "actor", "metadata"}
    assert (first["user_id"], first["actor"]) == (7, "admin@localhost")
    assert first["metadata"] == {"email": "n@example.com"}
    assert first["time"].endswith("Z") and len(first["id"]) == 36
    assert events[1]["metadata"] == {}


def test_emit_returns_before_the_hook_finishes(tmp_path):
    runner = HookRunner(hook_script(tmp_path, "sleep 1\n"), timeout=5)
    started = time.monotonic()
    runner.emit("user.deleted", user_id=1, actor="cli")
    assert time.monotonic() - started < 0.5
    runner.close()


def process_is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")   # a zombie nobody has reaped yet is dead too


def test_hook_timeout_kills_the_script_and_what_it_started(tmp_path, caplog):
    pid_file = tmp_path / "child.pid"
    runner = HookRunner(hook_script(tmp_path, f"sleep 30 &\necho $! > '{pid_file}'\nwait\n"), timeout=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tokligence.storage"):
        runner.emit("key.revoked", user_id=1, actor="cli")
        runner.close()
    assert time.monotonic() - started < 5
    assert "timed out after 0.5s and was killed" in caplog.text
    child = int(pid_file.read_text())
    wait_until(lambda: process_is_gone(child), lambda: None)


def test_hook_failures_are_logged_not_raised(tmp_path, caplog):
    failing = HookRunner(hook_script(tmp_path, "echo boom >&2\nexit 3\n"), timeout=5)
    missing = HookRunner(str(tmp_path / "no-such-hook"), timeout=5)
    with caplog.at_level(logging.WARNING, logger="tokligence.storage"):
        failing.emit("user.updated", user_id=1, actor="cli")
        missing.emit("user.disabled", user_id=1, actor="cli")
        failing.close()
        missing.close()
    assert "exited with status 3: boom" in caplog.text
    assert "could not run" in caplog.text


def test_hooks_without_a_script_do_nothing_but_still_check_event_types():
    runner = HookRunner(None, timeout=5)
    runner.emit("user.created", user_id=1, actor="cli")
    with pytest.raises(ValueError, match="unknown hook event"):
        runner.emit("user.renamed", user_id=1, actor="cli")
    runner.close()


# ---- log files -----------------------------------------------------------------------------------
def file_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test-rotation-{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_log_rotates_by_size_keeping_backup_count(tmp_path):
    path = tmp_path / "logs" / "gateway.log"
    handler = RotatingLogHandler(str(path), max_bytes=300, backup_count=2)
    logger = file_logger(handler)
    for n in range(100):
        logger.info("line %03d padded to about thirty b", n)
    handler.close()
    assert path.exists() and Path(f"{path}.1").exists() and Path(f"{path}.2").exists()
    assert not Path(f"{path}.3").exists()
    assert all(os.path.getsize(name) <= 300 for name in (path, f"{path}.1", f"{path}.2"))
    assert "line 099" in path.read_text()


def test_log_rotates_at_utc_midnight(tmp_path, monkeypatch):
    path = tmp_path / "gateway.log"
    clock = [MONDAY + DAY - 1]   # 23:59:59 UTC
    monkeypatch.setattr(time, "time", lambda: clock[0])
    handler = RotatingLogHandler(str(path), max_bytes=1_000_000, backup_count=3)
    logger = file_logger(handler)
    logger.info("before midnight")
    logger.info("still today")
    clock[0] = MONDAY + DAY + 1
    logger.info("after midnight")
    logger.info("same new day")
    handler.close()
    assert Path(f"{path}.1").read_text() == "before midnight\nstill today\n"
    assert path.read_text() == "after midnight\nsame new day\n"


def test_request_lines_reach_the_log_file_soon_and_other_lines_at_once(tmp_path):
    path = tmp_path / "gateway.log"
    handler = RotatingLogHandler(str(path), max_bytes=0, backup_count=1)
    requests, lifecycle = logging.getLogger("tokligence.requests"), logging.getLogger("tokligence.test-lifecycle")
    for logger in (requests, lifecycle):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        requests.info("request one")
        lifecycle.info("listening")
        assert path.read_text() == "request one\nlistening\n"    # flushing one flushes what came before
        requests.info("request two")
        assert wait_until(lambda: "two" in path.read_text(), lambda: None) < 2 * LOG_FLUSH_SECONDS + 1
        assert path.read_text() == "request one\nlistening\nrequest two\n"
    finally:
        for logger in (requests, lifecycle):
            logger.removeHandler(handler)
        handler.close()


def test_a_log_file_from_an_earlier_day_rolls_over_with_the_first_record(tmp_path):
    path = tmp_path / "gateway.log"
    path.write_text("yesterday\n")
    yesterday = time.time() - DAY
    os.utime(path, (yesterday, yesterday))
    handler = RotatingLogHandler(str(path), max_bytes=0, backup_count=1)
    file_logger(handler).info("today")
    handler.close()
    assert Path(f"{path}.1").read_text() == "yesterday\n"
    assert path.read_text() == "today\n"
