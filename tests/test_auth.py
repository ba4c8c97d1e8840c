"""Auth: off in the personal edition (loopback Host names only), on in the team edition for every
inference route, with keys from Authorization: Bearer or x-api-key and refusals in each client's shape."""
import http.client
import json
import time

import anthropic
import openai
import pytest

import tokligence as tk
from team_edition import ADMIN_KEY, TEAM_ENV, call, clean_env, on_loop, run_cli

MESSAGES = [{"role": "user", "content": "hello"}]
# (method, path, body, the error shape its clients expect)
ROUTES = [
    ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES}, "openai"),
    ("POST", "/v1/responses", {"model": "m", "input": "hello"}, "openai"),
    ("POST", "/v1/messages", {"model": "m", "max_tokens": 16, "messages": MESSAGES}, "anthropic"),
    ("POST", "/anthropic/v1/messages", {"model": "m", "max_tokens": 16, "messages": MESSAGES}, "anthropic"),
    ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": MESSAGES}, "anthropic"),
    ("POST", "/v1/responses/input_tokens", {"model": "m", "input": "hello"}, "openai"),
    ("POST", "/v1/embeddings", {"model": "m", "input": "hello"}, "openai"),
    ("GET", "/v1/models", None, "openai"),
]
ROUTE_IDS = [path for _, path, _, _ in ROUTES]
HEADER_STYLES = {
    "bearer": lambda key: {"authorization": f"Bearer {key}"},
    "x-api-key": lambda key: {"x-api-key": key},
    "both": lambda key: {"authorization": f"Bearer {key}", "x-api-key": key},
    # Claude Code with ANTHROPIC_AUTH_TOKEN set beside an Anthropic key of the user's own:
    "bearer-beside-a-foreign-x-api-key": lambda key: {"authorization": f"Bearer {key}",
                                                      "x-api-key": "sk-ant-api03-users-own"},
    "x-api-key-beside-a-foreign-bearer": lambda key: {"x-api-key": key,
                                                      "authorization": "Bearer sk-ant-oat01-users-own"},
}


class Team:
    """A team-edition gateway with one key of each kind."""

    def __init__(self, gw):
        self.gw = gw
        self.key_ids: dict[str, int] = {}
        self.user = self.add_user("user@example.com")
        self.key = self.new_key(self.user)
        self.revoked = self.new_key(self.user)
        admin("POST", gw, f"/api/v1/admin/keys/{self.key_ids[self.revoked]}/revoke")
        self.expired = on_loop(gw, gw.gateway.ledger.write_now(
            lambda db: tk.create_key(db, self.user, "old", time.time() - 1)[0]))
        gw.call(gw.gateway.keys.invalidate)
        self.disabled = self.new_key(self.add_user("gone@example.com", disable=True))

    def add_user(self, email: str, disable: bool = False) -> int:
        user_id = admin("POST", self.gw, "/api/v1/admin/users", {"email": email})["id"]
        return admin("POST", self.gw, f"/api/v1/admin/users/{user_id}/disable")["id"] if disable else user_id

    def new_key(self, user_id: int) -> str:
        created = admin("POST", self.gw, "/api/v1/admin/keys", {"user_id": user_id})
        self.key_ids[created["key"]] = created["id"]
        return created["key"]


def admin(method: str, gw, path: str, body=None) -> dict:
    reply = call(gw, method, path, body, key=ADMIN_KEY)
    assert reply.status < 300, reply.body
    return reply.json()


def send(gw, route, headers: dict[str, str]):
    method, path, body, _ = route
    return call(gw, method, path, body, headers=headers)


def assert_refused(reply, shape: str, status: int = 401) -> None:
    assert reply.status == status, reply.body
    body = reply.json()
    if shape == "anthropic":
        expected = {401: "authentication_error", 403: "permission_error"}[status]
        assert body["type"] == "error" and body["error"]["type"] == expected
    else:
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == ("invalid_api_key" if status == 401 else None)


@pytest.fixture
def team(gateway_factory):
    return Team(gateway_factory("", TEAM_ENV))


# ---- every route, every header style ---------------------------------------------------------------
@pytest.mark.parametrize("style", HEADER_STYLES)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_auth_on_a_valid_key_is_served_in_every_header_style(team, route, style):
    reply = send(team.gw, route, HEADER_STYLES[style](team.key))
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("failure", ["missing", "invalid", "revoked", "expired", "disabled user",
                                     "a foreign key only"])
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_auth_on_refuses_with_401_in_the_clients_shape(team, route, failure):
    keys = {"invalid": "tok_" + "x" * 43, "revoked": team.revoked, "expired": team.expired,
            "disabled user": team.disabled, "a foreign key only": "sk-ant-api03-users-own"}
    for style in ("bearer", "x-api-key", "both"):
        headers = {} if failure == "missing" else HEADER_STYLES[style](keys[failure])
        reply = send(team.gw, route, headers)
        assert_refused(reply, route[3])
        assert ("missing API key" in reply.body.decode()) == (failure == "missing")


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_auth_off_every_route_answers_without_a_key(gateway_factory, route):
    assert send(gateway_factory(), route, {}).status == 200


def test_stored_responses_need_a_key_too(team):
    created = call(team.gw, "POST", "/v1/responses", {"model": "m", "input": "hi"}, key=team.key).json()
    assert call(team.gw, "GET", f"/v1/responses/{created['id']}", key=team.key).status == 200
    assert_refused(call(team.gw, "GET", f"/v1/responses/{created['id']}"), "openai")
    assert_refused(call(team.gw, "DELETE", f"/v1/responses/{created['id']}", key=team.revoked), "openai")


def test_a_stored_response_is_seen_only_by_the_user_who_made_it(team):
    created = call(team.gw, "POST", "/v1/responses", {"model": "m", "input": "secret plan"}, key=team.key).json()
    other = team.new_key(team.add_user("other@example.com"))
    for method in ("GET", "DELETE"):
        reply = call(team.gw, method, f"/v1/responses/{created['id']}", key=other)
        assert reply.status == 404 and reply.json()["error"]["param"] == "response_id"
    follow_up = call(team.gw, "POST", "/v1/responses",
                     {"model": "m", "input": "more", "previous_response_id": created["id"]}, key=other)
    assert follow_up.status == 404
    assert call(team.gw, "GET", f"/v1/responses/{created['id']}", key=team.key).status == 200


def test_health_needs_no_key(team):
    assert call(team.gw, "GET", "/health").status == 200


# ---- the official SDKs -----------------------------------------------------------------------------
def test_openai_sdk_with_a_gateway_key(team):
    client = openai.OpenAI(base_url=team.gw.url + "/v1", api_key=team.key, max_retries=0)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "echo: hello"
    assert client.responses.create(model="m", input="hello").output_text == "echo: hello"
    assert len(client.embeddings.create(model="m", input="hello").data) == 1
    assert [model.id for model in client.models.list()] == ["loopback"]
    refused = openai.OpenAI(base_url=team.gw.url + "/v1", api_key=team.revoked, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        refused.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        refused.responses.create(model="m", input="hello")


@pytest.mark.parametrize("credential", ["api_key", "auth_token"])
def test_anthropic_sdk_with_a_gateway_key_as_x_api_key_or_bearer(team, credential):
    client = anthropic.Anthropic(base_url=team.gw.url, max_retries=0, **{credential: team.key})
    reply = client.messages.create(model="m", max_tokens=16, messages=MESSAGES)
    assert reply.content[0].text == "echo: hello"
    assert client.messages.count_tokens(model="m", messages=MESSAGES).input_tokens > 0
    refused = anthropic.Anthropic(base_url=team.gw.url, max_retries=0, **{credential: team.expired})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        refused.messages.create(model="m", max_tokens=16, messages=MESSAGES)
    assert caught.value.body["error"]["type"] == "authentication_error"


# ---- revocation --------------------------------------------------------------------------------------
def test_a_key_revoked_through_the_admin_api_is_refused_on_the_very_next_request(team):
    conn = http.client.HTTPConnection("127.0.0.1", team.gw.port, timeout=5)    # one keep-alive connection
    body = json.dumps({"model": "m", "messages": MESSAGES})

    def chat() -> int:
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {team.key}"})
        response = conn.getresponse()
        response.read()
        return response.status

    assert chat() == 200
    admin("POST", team.gw, f"/api/v1/admin/keys/{team.key_ids[team.key]}/revoke")
    assert chat() == 401


def test_disabling_a_user_refuses_their_keys_at_once_and_enabling_brings_them_back(team):
    route = ROUTES[0]
    assert send(team.gw, route, HEADER_STYLES["bearer"](team.key)).status == 200
    admin("POST", team.gw, f"/api/v1/admin/users/{team.user}/disable")
    assert_refused(send(team.gw, route, HEADER_STYLES["bearer"](team.key)), "openai")
    admin("PATCH", team.gw, f"/api/v1/admin/users/{team.user}", {"status": "active"})
    assert send(team.gw, route, HEADER_STYLES["bearer"](team.key)).status == 200
    admin("DELETE", team.gw, f"/api/v1/admin/users/{team.user}")
    assert_refused(send(team.gw, route, HEADER_STYLES["bearer"](team.key)), "openai")


def test_a_key_revoked_or_created_from_the_cli_reaches_a_running_gateway_within_a_second(gateway_factory,
                                                                                          tmp_path):
    ledger = tmp_path / "ledger.db"
    gw = gateway_factory("", {**TEAM_ENV, "TOKLIGENCE_LEDGER_PATH": str(ledger)})
    config = tmp_path / "cli.ini"
    config.write_text(f"[gateway]\nledger_path = {ledger}\n")
    route = ROUTES[2]

    def seconds_until(status: int, key: str) -> float:
        started = time.monotonic()
        while send(gw, route, {"x-api-key": key}).status != status:
            assert time.monotonic() - started < 3, f"still not {status}"
            time.sleep(0.02)
        return time.monotonic() - started

    created = run_cli(config, "user", "add", "cli@example.com")
    assert created.returncode == 0, created.stderr
    issued = run_cli(config, "key", "create", "cli@example.com")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip().splitlines()[-1]
    assert seconds_until(200, key) < 1.5
    revoked = run_cli(config, "key", "revoke", issued.stdout.splitlines()[1].split()[0])
    assert revoked.returncode == 0, revoked.stderr
    assert seconds_until(401, key) < 1.5


# ---- the Host check with auth off ---------------------------------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "localhost:8081", "127.0.0.1:8081", "[::1]:8081",
                                  "dev.localhost", "127.9.9.9"])
def test_auth_off_serves_loopback_host_names(gateway_factory, host):
    assert send(gateway_factory(), ROUTES[0], {"host": host}).status == 200


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_auth_off_refuses_other_host_names_against_dns_rebinding(gateway_factory, route):
    reply = send(gateway_factory(), route, {"host": "attacker.example:8081"})
    assert_refused(reply, route[3], status=403)
    assert "host 'attacker.example' are refused" in reply.body.decode()


def test_auth_off_honours_allowed_hosts(gateway_factory):
    gw = gateway_factory("[gateway]\nallowed_hosts = gateway.lan, Box.Internal\n")
    for host in ("gateway.lan", "box.internal:8081"):
        assert send(gw, ROUTES[0], {"host": host}).status == 200
    assert send(gw, ROUTES[0], {"host": "other.lan"}).status == 403


def test_auth_on_takes_any_host_name(team):
    assert send(team.gw, ROUTES[0], {"host": "gateway.example.com", **HEADER_STYLES["bearer"](team.key)}
                ).status == 200


# ---- team edition start ---------------------------------------------------------------------------------
def test_team_edition_start_prints_a_new_admin_key_once(gateway_factory, tmp_path, capsys):
    env = {"TOKLIGENCE_AUTH_DISABLED": "false", "TOKLIGENCE_LEDGER_PATH": str(tmp_path / "ledger.db")}
    first = gateway_factory("", env)
    printed = capsys.readouterr().out
    assert "created the first admin (admin@localhost)" in printed
    key = printed.split("shown only once:")[1].split()[0]
    assert key.startswith("tok_") and len(key) > 40
    assert call(first, "GET", "/api/v1/admin/users", key=key).status == 200
    first.close()
    second = gateway_factory("", env)
    assert "tok_" not in capsys.readouterr().out
    assert call(second, "GET", "/api/v1/admin/users", key=key).status == 200


def test_team_edition_start_takes_the_admin_key_from_the_environment_and_keeps_it_quiet(gateway_factory,
                                                                                         capsys):
    gw = gateway_factory("", TEAM_ENV)
    assert ADMIN_KEY not in capsys.readouterr().out
    users = call(gw, "GET", "/api/v1/admin/users", key=ADMIN_KEY).json()["data"]
    assert [(u["email"], u["role"]) for u in users] == [("admin@localhost", "admin")]


def test_a_malformed_admin_key_stops_the_start_with_a_message(tmp_path):
    config = tmp_path / "settings.ini"
    config.write_text("")
    env = clean_env(tmp_path, TOKLIGENCE_AUTH_DISABLED="false", TOKLIGENCE_ADMIN_KEY="short",
                    TOKLIGENCE_LEDGER_PATH=":memory:")
    failed = run_cli(config, "serve", "--port", "0", env=env)
    assert failed.returncode == 2
    assert "env TOKLIGENCE_ADMIN_KEY" in failed.stderr and "must start with tok_" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_auth_on_needs_the_database(tmp_path):
    config = tmp_path / "settings.ini"
    config.write_text("[gateway]\nauth_disabled = false\nledger_path = off\n")
    failed = run_cli(config, "serve", "--port", "0", env=clean_env(tmp_path))
    assert failed.returncode == 2 and "auth needs the database" in failed.stderr
