"""The admin API (/api/v1/admin/, admins only) and the usage API (/api/v1/usage/, scoped by key)."""
import json
import time

import pytest

import tokligence as tk
from team_edition import ADMIN_KEY, TEAM_ENV, call, ledger_rows, on_loop

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def team(gateway_factory):
    return gateway_factory("", TEAM_ENV)


def add_user(gw, email: str, role: str = "user") -> tuple[dict, str]:
    """A user made through the admin API, and a key for them."""
    user = call(gw, "POST", "/api/v1/admin/users", {"email": email, "role": role}, key=ADMIN_KEY).json()
    key = call(gw, "POST", "/api/v1/admin/keys", {"user_id": user["id"]}, key=ADMIN_KEY).json()["key"]
    return user, key


def wait_for_lines(path, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"expected {count} hook events in {path}")


def test_users_are_created_listed_read_updated_disabled_and_deleted(team):
    created = call(team, "POST", "/api/v1/admin/users", {"email": " Ann@Example.com ", "name": "Ann"}, key=ADMIN_KEY)
    assert created.status == 201
    ann = created.json()
    assert (ann["email"], ann["name"], ann["role"], ann["status"]) == ("ann@example.com", "Ann", "user", "active")
    listed = call(team, "GET", "/api/v1/admin/users", key=ADMIN_KEY).json()
    assert listed["object"] == "list"
    assert [user["email"] for user in listed["data"]] == ["admin@localhost", "ann@example.com"]
    assert call(team, "GET", f"/api/v1/admin/users/{ann['id']}", key=ADMIN_KEY).json() == ann

    updated = call(team, "PATCH", f"/api/v1/admin/users/{ann['id']}", {"name": "Ann B", "role": "admin"},
                   key=ADMIN_KEY).json()
    assert (updated["name"], updated["role"]) == ("Ann B", "admin")
    disabled = call(team, "POST", f"/api/v1/admin/users/{ann['id']}/disable", key=ADMIN_KEY).json()
    assert disabled["status"] == "disabled"

    deleted = call(team, "DELETE", f"/api/v1/admin/users/{ann['id']}", key=ADMIN_KEY)
    assert deleted.json() == {"id": ann["id"], "object": "user", "deleted": True}
    assert call(team, "GET", f"/api/v1/admin/users/{ann['id']}", key=ADMIN_KEY).status == 404


def test_a_key_is_shown_once_and_only_its_prefix_is_listed(team):
    user, _ = add_user(team, "kim@example.com")
    created = call(team, "POST", "/api/v1/admin/keys", {"user_id": "kim@example.com", "name": "laptop",
                                                        "expires": 30}, key=ADMIN_KEY)
    assert created.status == 201
    key = created.json()
    assert key["key"].startswith("tok_") and key["prefix"] == key["key"][:8] + "…"
    assert key["user_id"] == user["id"] and key["name"] == "laptop"
    assert 29.9 < (key["expires_at"] - time.time()) / 86400 <= 30
    listed = call(team, "GET", f"/api/v1/admin/keys?user_id={user['id']}", key=ADMIN_KEY).json()["data"]
    assert [k["id"] for k in listed] == [key["id"] - 1, key["id"]]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    everyone = call(team, "GET", "/api/v1/admin/keys", key=ADMIN_KEY).json()["data"]
    assert {k["user_id"] for k in everyone} == {1, user["id"]}
    assert key["key"] not in call(team, "GET", "/api/v1/admin/keys", key=ADMIN_KEY).body.decode()


def test_a_key_can_expire_at_an_iso_time(team):
    user, _ = add_user(team, "iso@example.com")
    key = call(team, "POST", "/api/v1/admin/keys", {"user_id": user["id"], "expires": "2999-01-01"},
               key=ADMIN_KEY).json()
    assert key["expires_at"] == 32472144000.0


def test_the_admin_api_is_for_admins_only(team):
    _, user_key = add_user(team, "user@example.com")
    _, admin_key = add_user(team, "boss@example.com", role="admin")
    for method, path in (("GET", "/api/v1/admin/users"), ("POST", "/api/v1/admin/users"),
                         ("GET", "/api/v1/admin/keys"), ("POST", "/api/v1/admin/keys/1/revoke"),
                         ("DELETE", "/api/v1/admin/users/1"), ("POST", "/api/v1/admin/users/1/disable")):
        refused = call(team, method, path, {"email": "x@example.com"}, key=user_key)
        assert refused.status == 403, (method, path)
        assert refused.json()["error"]["message"] == "only an admin's key may use the admin API"
        assert call(team, method, path, {}).status == 401
    assert call(team, "GET", "/api/v1/admin/users", key=admin_key).status == 200
    assert call(team, "GET", "/api/v1/admin/users", key=user_key.replace("tok_", "tok_x")).status == 401
    # The admin's own key still works everywhere: nothing above changed anything.
    assert len(call(team, "GET", "/api/v1/admin/users", key=ADMIN_KEY).json()["data"]) == 3


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/api/v1/admin/users/99", None, 404, "no user 99"),
    ("GET", "/api/v1/admin/users/abc", None, 404, "no such endpoint: GET /api/v1/admin/users/abc"),
    ("POST", "/api/v1/admin/users/1", None, 404, "no such endpoint: POST /api/v1/admin/users/1"),
    ("POST", "/api/v1/admin/users", {"name": "x"}, 400, "'email' is required"),
    ("POST", "/api/v1/admin/users", {"email": "not-an-email"}, 400, "invalid email 'not-an-email'"),
    ("POST", "/api/v1/admin/users", {"email": "admin@localhost"}, 400,
     "a user with email admin@localhost already exists"),
    ("POST", "/api/v1/admin/users", {"email": "a@b.c", "role": "root"}, 400,
     "role must be admin or user, not 'root'"),
    ("POST", "/api/v1/admin/users", {"email": "a@b.c", "name": 7}, 400, "'name' must be a string"),
    ("POST", "/api/v1/admin/users", ["a@b.c"], 400, "the request body must be a JSON object"),
    ("PATCH", "/api/v1/admin/users/1", {}, 400, "nothing to update: send any of email, name, role, status"),
    ("PATCH", "/api/v1/admin/users/1", {"password": "x"}, 400,
     "unknown field 'password'; known: email, name, role, status"),
    ("POST", "/api/v1/admin/keys", {"user_id": 99}, 404, "no user 99"),
    ("POST", "/api/v1/admin/keys", {"user_id": 1, "expires": "2001-01-01"}, 400,
     "the expiry '2001-01-01' is not in the future"),
    ("POST", "/api/v1/admin/keys", {"user_id": True}, 400, "'user_id' must be an integer or a string"),
    ("POST", "/api/v1/admin/keys/99/revoke", None, 404, "unknown key 99"),
    ("GET", "/api/v1/admin/keys?user_id=me", None, 400,
     "user_id: invalid literal for int() with base 10: 'me'"),
    ("GET", "/api/v1/usage/logs?limit=0", None, 400, "limit must be 1 to 1000 and offset at least 0"),
    ("GET", "/api/v1/usage/summary?since=yesterday", None, 400,
     "since: expected unix seconds or an ISO date or time (2025-01-31, 2025-01-31T12:00Z), got 'yesterday'"),
    ("GET", "/api/v1/usage/summary?day=1", None, 400, "unknown parameter 'day'; known: since, until, user_id"),
])
def test_errors_are_json_in_openai_shape(team, method, path, body, status, message):
    reply = call(team, method, path, body, key=ADMIN_KEY)
    assert (reply.status, reply.headers["content-type"]) == (status, "application/json")
    error = reply.json()["error"]
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


def test_the_last_active_admin_cannot_be_demoted_disabled_or_deleted(team):
    first = call(team, "GET", "/api/v1/admin/users", key=ADMIN_KEY).json()["data"][0]
    for method, path, body in (("PATCH", f"/api/v1/admin/users/{first['id']}", {"role": "user"}),
                               ("POST", f"/api/v1/admin/users/{first['id']}/disable", None),
                               ("DELETE", f"/api/v1/admin/users/{first['id']}", None)):
        refused = call(team, method, path, body, key=ADMIN_KEY)
        assert refused.status == 400 and "last active admin" in refused.json()["error"]["message"]
    second, second_key = add_user(team, "second@example.com", role="admin")
    assert call(team, "POST", f"/api/v1/admin/users/{first['id']}/disable", key=second_key).status == 200
    assert call(team, "DELETE", f"/api/v1/admin/users/{second['id']}", key=second_key).status == 400


def test_a_method_the_endpoint_lacks_is_a_405_naming_the_allowed_ones(team):
    reply = call(team, "PUT", "/api/v1/admin/users/1", {}, key=ADMIN_KEY)
    assert reply.status == 405 and reply.headers["allow"] == "GET, PATCH, DELETE, POST, HEAD"
    assert "PUT is not allowed" in reply.json()["error"]["message"]


def hooked_gateway(gateway_factory, tmp_path):
    """A team gateway whose hook script appends each event to events.jsonl; (gateway, that file)."""
    events = tmp_path / "events.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {events}\necho >> {events}\n")
    hook.chmod(0o755)
    return gateway_factory("", {**TEAM_ENV, "TOKLIGENCE_HOOK_SCRIPT": str(hook)}), events


def test_hooks_get_every_change_with_the_admin_as_actor(gateway_factory, tmp_path):
    gw, events = hooked_gateway(gateway_factory, tmp_path)
    _, boss_key = add_user(gw, "boss@example.com", role="admin")            # by the first admin, id 1
    user = call(gw, "POST", "/api/v1/admin/users", {"email": "eve@example.com"}, key=boss_key).json()
    call(gw, "PATCH", f"/api/v1/admin/users/{user['id']}", {"name": "Eve"}, key=boss_key)
    key = call(gw, "POST", "/api/v1/admin/keys", {"user_id": user["id"]}, key=boss_key).json()
    call(gw, "POST", f"/api/v1/admin/keys/{key['id']}/revoke", key=boss_key)
    call(gw, "POST", f"/api/v1/admin/users/{user['id']}/disable", key=boss_key)
    call(gw, "DELETE", f"/api/v1/admin/users/{user['id']}", key=boss_key)

    seen = wait_for_lines(events, 8)
    assert [(e["type"], e["actor"]) for e in seen] == [
        ("user.created", "1"), ("key.created", "1"), ("user.created", "2"), ("user.updated", "2"),
        ("key.created", "2"), ("key.revoked", "2"), ("user.disabled", "2"), ("user.deleted", "2")]
    assert all(e["user_id"] == user["id"] for e in seen[2:])
    assert seen[2]["metadata"]["user"]["email"] == "eve@example.com"
    assert seen[3]["metadata"]["changed"] == ["name"] and seen[3]["metadata"]["user"]["name"] == "Eve"
    assert seen[4]["metadata"]["key"]["id"] == key["id"]
    assert seen[5]["metadata"]["key"]["revoked_at"] is not None
    assert len({e["id"] for e in seen}) == 8 and all(e["time"].endswith("Z") for e in seen)
    assert key["key"] not in events.read_text(), "a key must never reach a hook"


def test_an_update_to_status_disabled_is_reported_as_user_disabled(gateway_factory, tmp_path):
    gw, events = hooked_gateway(gateway_factory, tmp_path)
    user = call(gw, "POST", "/api/v1/admin/users", {"email": "d@example.com"}, key=ADMIN_KEY).json()
    call(gw, "PATCH", f"/api/v1/admin/users/{user['id']}", {"status": "disabled"}, key=ADMIN_KEY)
    call(gw, "PATCH", f"/api/v1/admin/users/{user['id']}", {"status": "active"}, key=ADMIN_KEY)
    assert [e["type"] for e in wait_for_lines(events, 3)] == ["user.created", "user.disabled", "user.updated"]


def test_usage_an_admin_sees_everything_a_user_only_their_own(team):
    ann, ann_key = add_user(team, "ann@example.com")
    bob, bob_key = add_user(team, "bob@example.com")
    for key, model in ((ann_key, "m-one"), (ann_key, "m-two"), (bob_key, "m-one")):
        assert call(team, "POST", "/v1/chat/completions", {**CHAT, "model": model}, key=key).status == 200
    ledger_rows(team, 3)

    everything = call(team, "GET", "/api/v1/usage/summary", key=ADMIN_KEY).json()
    assert everything["totals"]["requests"] == 3
    assert {row["user_id"]: row["requests"] for row in everything["by_user"]} == {ann["id"]: 2, bob["id"]: 1}
    assert {row["model"]: row["requests"] for row in everything["by_model"]} == {"m-one": 2, "m-two": 1}
    assert call(team, "GET", f"/api/v1/usage/summary?user_id={bob['id']}", key=ADMIN_KEY
                ).json()["totals"]["requests"] == 1

    own = call(team, "GET", "/api/v1/usage/summary", key=ann_key).json()
    assert own["totals"]["requests"] == 2 and [row["user_id"] for row in own["by_user"]] == [ann["id"]]
    assert call(team, "GET", f"/api/v1/usage/summary?user_id={ann['id']}", key=ann_key).status == 200
    assert call(team, "GET", f"/api/v1/usage/summary?user_id={bob['id']}", key=ann_key).status == 403
    logs = call(team, "GET", "/api/v1/usage/logs", key=bob_key).json()
    assert logs["total"] == 1 and logs["data"][0]["user_id"] == bob["id"]
    assert call(team, "GET", f"/api/v1/usage/logs?user_id={ann['id']}", key=bob_key).status == 403


def test_usage_logs_filter_and_page(team):
    for model in ("a", "b", "a", "a"):
        call(team, "POST", "/v1/chat/completions", {**CHAT, "model": model}, key=ADMIN_KEY)
    call(team, "POST", "/v1/chat/completions", {"model": "a"}, key=ADMIN_KEY)       # a 400
    rows = ledger_rows(team, 5)
    page = call(team, "GET", "/api/v1/usage/logs?model=a&status=200&limit=2&offset=1", key=ADMIN_KEY).json()
    assert (page["total"], page["limit"], page["offset"], len(page["data"])) == (3, 2, 1, 2)
    assert all(row["model_served"] == "a" and row["status"] == 200 for row in page["data"])
    failed = call(team, "GET", "/api/v1/usage/logs?status=400", key=ADMIN_KEY).json()["data"]
    assert [row["error_type"] for row in failed] == ["invalid_request"]
    assert call(team, "GET", "/api/v1/usage/logs?provider=loopback&key_id=1", key=ADMIN_KEY).json()["total"] == 5
    middle = rows[2]["ts"]
    since = call(team, "GET", f"/api/v1/usage/logs?since={middle}", key=ADMIN_KEY).json()
    assert since["total"] == 3
    assert call(team, "GET", "/api/v1/usage/summary?until=2000-01-01", key=ADMIN_KEY).json()["totals"]["requests"] == 0
    today = time.strftime("%Y-%m-%d", time.gmtime())
    summary = call(team, "GET", f"/api/v1/usage/summary?since={today}", key=ADMIN_KEY).json()
    assert summary["totals"]["requests"] == 5 and summary["by_day"][0]["day"] == today


def test_with_auth_off_the_apis_answer_loopback_without_a_key(gateway_factory):
    gw = gateway_factory()
    created = call(gw, "POST", "/api/v1/admin/users", {"email": "solo@example.com"})
    assert created.status == 201
    call(gw, "POST", "/v1/chat/completions", CHAT)
    ledger_rows(gw, 1)
    assert call(gw, "GET", "/api/v1/usage/summary").json()["totals"]["requests"] == 1
    # The Host check still applies.
    assert call(gw, "GET", "/api/v1/admin/users", headers={"host": "evil.example"}).status == 403


class CapturingResponder:
    def __init__(self):
        self.started, self.sent = False, None

    async def respond(self, status, headers, body):
        self.sent = (status, dict(headers), json.loads(body))


@pytest.mark.parametrize("peer, status", [("192.0.2.7", 403), ("::ffff:192.0.2.7", 403), ("", 403),
                                          ("127.0.0.1", 200), ("::1", 200), ("::ffff:127.0.0.1", 200)])
def test_with_auth_off_the_apis_refuse_peers_off_this_machine(gateway_factory, peer, status):
    gw = gateway_factory()
    for path in ("/api/v1/admin/users", "/api/v1/usage/summary", "/api/v1/usage/logs"):
        request = tk.Request("GET", path, path, {"host": "localhost:8081"}, [], b"", peer, time.perf_counter())
        responder = CapturingResponder()
        on_loop(gw, gw.gateway.handle(request, responder))
        assert responder.sent[0] == status, (peer, path)
        if status == 403:
            assert "only loopback clients" in responder.sent[2]["error"]["message"]


def test_with_the_ledger_off_the_apis_say_so(gateway_factory):
    gw = gateway_factory("", {"TOKLIGENCE_LEDGER_PATH": "off"})
    for path in ("/api/v1/admin/users", "/api/v1/usage/summary"):
        reply = call(gw, "GET", path)
        assert reply.status == 404 and "ledger_path = off" in reply.json()["error"]["message"]
