#!/usr/bin/env python3
"""Tokligence: a personal LLM gateway in one file.

It speaks OpenAI Chat Completions, OpenAI Responses and Anthropic Messages to clients, forwards to
providers that speak any of the three, routes by model name, translates where client and provider
differ (streaming included) and records every token in a SQLite ledger.

    python tokligence.py init      # write ~/.tokligence/settings.ini
    python tokligence.py           # serve on http://127.0.0.1:8081

Sections, each using only what stands above it: foundations, settings, storage, server-sent events,
wire formats (the neutral model and one part per wire), HTTP (server and upstream client), providers
and routing, handlers, CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import configparser
import contextlib
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, TypeVar, Union
from urllib.parse import parse_qsl, urlsplit

import h11

# Imported where they are used, to keep start-up short: certifi (about 20 ms, with
# importlib.resources) when the first TLS connection is made, and http.client, tomllib, csv, mimetypes
# and uuid in the commands and the rare requests that need them.

__version__ = "0.1.0"
log = logging.getLogger("tokligence")
request_log = logging.getLogger("tokligence.requests")    # a line per request, flushed in batches

# ================================================================================================
# Foundations
# The one error type every layer raises, and the clock that tests can fix.
# ================================================================================================


class GatewayError(Exception):
    """An error with an HTTP status, a neutral kind and a message.

    kind is one of: invalid_request, authentication, permission, not_found, rate_limit, overloaded,
    api_error (upstream or server fault), timeout, too_large.
    Each client wire renders it in its own shape (the <wire>_error_body functions).
    """

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def now() -> float:
    """Wall-clock time for records; tests may patch it."""
    return time.time()


# JSON with non-ASCII text kept as is, and its compact form: made once, since json.dumps with options
# builds a new encoder at every call (a few µs, once per streamed delta).
unicode_json: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False).encode
compact_json: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().raw_decode


def json_loads(data: str | bytes) -> Any:
    """json.loads in about half the time for the compact UTF-8 JSON that clients and providers send:
    it spares json.loads's encoding sniff and whitespace scans. Anything else (whitespace around the
    value, another encoding, an error) goes to json.loads, for its exact result or message."""
    try:
        text = data if isinstance(data, str) else data.decode()
        value, end = _decode_json(text)
        if end == len(text):
            return value
    except ValueError:          # also UnicodeDecodeError
        pass
    return json.loads(data)


# ================================================================================================
# Settings
# settings.ini (configparser), then environment, then CLI flags; every value remembers its origin so
# `config` can say where it came from. Validation errors name the file, line and key.
# ================================================================================================

SETTINGS_TEMPLATE = """\
# Tokligence settings.
# Precedence: this file < environment variables < command-line flags (later wins).
# Values may use ~ and ${ENV_VAR}. Lines starting with # or ; are comments.
# `python tokligence.py config` prints the effective settings and where each value came from.

[gateway]
# Address to listen on. Keep 127.0.0.1 unless auth is on (env TOKLIGENCE_HOST, flag --host).
host = 127.0.0.1
# Port (env TOKLIGENCE_PORT or TOKLIGENCE_FACADE_PORT, flag --port).
port = 8081
# Auth is off in the personal edition, where the admin and usage APIs (/api/v1/…) answer only
# loopback clients; set to false for the team edition, where every /v1 and /api endpoint needs a
# user's API key (env TOKLIGENCE_AUTH_DISABLED).
auth_disabled = true
# Extra Host header names accepted when auth is off, comma-separated; loopback names are always
# accepted (env TOKLIGENCE_ALLOWED_HOSTS).
allowed_hosts =
# SQLite file for the ledger, users, keys and stored responses; ":memory:" for tests, "off" to record
# nothing (env TOKLIGENCE_LEDGER_PATH).
ledger_path = ~/.tokligence/ledger.db
# Stored responses (Responses API store=true) are kept this many seconds (env TOKLIGENCE_RESPONSE_TTL).
response_ttl = 2592000
# debug, info, warning or error (env TOKLIGENCE_LOG_LEVEL).
log_level = info
# The gateway's log file, written besides stdout and rotated daily and by size; "-" logs to stdout
# only (env TOKLIGENCE_LOG_FILE).
log_file = -
# Log line format: text (key=value) or json (an object per line: time, level, message and the
# request's fields) (env TOKLIGENCE_LOG_FORMAT).
log_format = text
# Largest request body accepted, in bytes; larger ones get 413 (env TOKLIGENCE_MAX_BODY_BYTES).
max_body_bytes = 33554432
# Seconds a client may take to send its request headers (env TOKLIGENCE_HEADER_TIMEOUT).
header_timeout = 30
# Seconds an idle keep-alive connection is kept open (env TOKLIGENCE_IDLE_TIMEOUT).
idle_timeout = 120
# On SIGTERM or SIGINT, seconds in-flight requests get to finish (env TOKLIGENCE_SHUTDOWN_GRACE).
shutdown_grace = 10
# Seconds to open a connection to a provider (env TOKLIGENCE_CONNECT_TIMEOUT).
connect_timeout = 10
# Seconds a provider may stay silent before the request fails (env TOKLIGENCE_READ_TIMEOUT).
read_timeout = 600
# Seconds of upstream silence after which an Anthropic stream gets a ping event (env TOKLIGENCE_PING_INTERVAL).
ping_interval = 10
# Extra CA certificates (PEM) trusted besides certifi's bundle, e.g. a corporate proxy's CA
# (env TOKLIGENCE_CA_BUNDLE; SSL_CERT_FILE is honoured too).
ca_bundle =
# A file of extra model aliases, one "pattern = model" per line, re-read when it changes
# (env TOKLIGENCE_ALIASES_FILE).
aliases_file = ~/.tokligence/aliases.ini
# Team edition: the first admin's key, used when no admin exists yet; otherwise one is made and
# printed once at start (env TOKLIGENCE_ADMIN_KEY).
admin_key =
# Log file of the user, key and usage commands, apart from the gateway's; "-" for none
# (env TOKLIGENCE_CLI_LOG_FILE).
cli_log_file = -
# A log file rotates daily and once larger than this many bytes (env TOKLIGENCE_LOG_MAX_BYTES).
log_max_bytes = 10485760
# Rotated log files kept (env TOKLIGENCE_LOG_BACKUPS).
log_backups = 7
# Executable run on user and key events with the event as JSON on stdin; empty for none
# (env TOKLIGENCE_HOOK_SCRIPT).
hook_script =
# Seconds a hook may run before it is killed (env TOKLIGENCE_HOOK_TIMEOUT).
hook_timeout = 10
# Agents loop: when the history ends in the same tool call with the same arguments this many times,
# the provider is told to stop repeating (env TOKLIGENCE_LOOP_WARN_AFTER; 0 turns the warning off).
loop_warn_after = 3
# ...and at this many the gateway ends the turn itself instead of calling the provider
# (env TOKLIGENCE_LOOP_STOP_AFTER; 0 turns the stop off).
loop_stop_after = 5

# Providers. Each [provider.NAME] section adds one; NAME is used in [routes] and in "NAME/model".
#   wire               chat (OpenAI-compatible, the default), responses (OpenAI Responses) or
#                      messages (Anthropic)
#   base_url           URL before /chat/completions, /responses or /messages; a bare host gets /v1
#   api_key            sent as Authorization: Bearer (chat, responses) or x-api-key (messages)
#   headers            extra headers, one "Name: value" per line
#   models             comma-separated model names it serves (listed in /v1/models, and routed to it)
#   max_output_tokens  cap on output tokens; client values above it are clamped
#   default_max_tokens output tokens asked for when a client omits them and the wire requires them
#   token_field        max_tokens or max_completion_tokens (chat providers)
#   drop_schema_keys   JSON-schema keys removed from tool schemas (for providers that reject them)
#   reasoning          true if the provider accepts reasoning effort or thinking
#   forward_client_auth  true to send the client's own credentials upstream instead of api_key
#   drop_tools         tool names or types removed from requests because the provider rejects them;
#                      default: OpenAI's built-in tools (web_search, tool_search, …) for every
#                      provider but "openai"
# Environment: TOKLIGENCE_PROVIDER_<NAME>_<KEY> (e.g. TOKLIGENCE_PROVIDER_OLLAMA_BASE_URL) adds or
# changes a provider. "openai" and "anthropic" exist once their keys are set
# (TOKLIGENCE_OPENAI_API_KEY or OPENAI_API_KEY; TOKLIGENCE_ANTHROPIC_API_KEY or ANTHROPIC_API_KEY;
# base URLs from TOKLIGENCE_OPENAI_BASE_URL and TOKLIGENCE_ANTHROPIC_BASE_URL).
# With no provider configured, every model goes to the built-in "loopback" provider, which echoes.

# [provider.openai]
# wire = chat
# base_url = https://api.openai.com/v1
# api_key = ${OPENAI_API_KEY}
# token_field = max_completion_tokens

# [provider.anthropic]
# wire = messages
# base_url = https://api.anthropic.com/v1
# api_key = ${ANTHROPIC_API_KEY}
# default_max_tokens = 8192

# [provider.ollama]
# wire = chat
# base_url = http://127.0.0.1:11434/v1
# models = llama3.2, qwen2.5-coder:7b
# reasoning = false

# [provider.deepseek]
# wire = chat
# base_url = https://api.deepseek.com/v1
# api_key = ${DEEPSEEK_API_KEY}
# max_output_tokens = 8192

# [provider.openrouter]
# wire = chat
# base_url = https://openrouter.ai/api/v1
# api_key = ${OPENROUTER_API_KEY}

# [provider.vllm]
# wire = chat
# base_url = http://127.0.0.1:8000/v1

[routes]
# "pattern = provider", tried in order after aliases; globs allowed; first match wins
# (env TOKLIGENCE_ROUTES="claude*=>anthropic,gpt*=>openai"). Built-in routes follow yours:
# claude* to anthropic; gpt*, o1*, o3*, o4*, chatgpt*, text-embedding* to openai.
# Without a match, a provider's own models list decides; otherwise the request gets a 404.
# deepseek-* = deepseek
# llama* = ollama

[prices]
# "model-or-glob = input, output[, cache_read, cache_write]" in USD per million tokens, for the
# ledger's cost column; a model without a price costs null, not 0. The longest matching glob wins.
# gpt-5.5 = 1.25, 10, 0.125
# claude-sonnet-4* = 3, 15, 0.3, 3.75

[aliases]
# "name-or-glob = model": rewrite the requested model before routing
# (env TOKLIGENCE_MODEL_ALIASES="claude-*=>gpt-5.5").
# claude-* = deepseek-chat
# fast = ollama/llama3.2
"""


class SettingsError(Exception):
    """A bad setting, its message naming where the value came from (file:line, variable or flag)."""


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _to_int(text: str) -> int:
    return int(text.strip())


def _to_float(text: str) -> float:
    return float(text.strip())


def _to_str(text: str) -> str:
    return text.strip()


def _to_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in re.split(r"[,\n]", text) if item.strip())


def _to_choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value
    return convert


def _to_optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _to_headers(text: str) -> dict[str, str]:
    headers = {}
    for line in text.splitlines():
        if line.strip():
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"expected 'Name: value', got {line.strip()!r}")
            headers[name.strip()] = value.strip()
    return headers


# The [gateway] keys and their types; their defaults are the values in SETTINGS_TEMPLATE.
GATEWAY_TYPES: dict[str, Callable[[str], Any]] = {
    "host": _to_str, "port": _to_int, "auth_disabled": _to_bool, "allowed_hosts": _to_list,
    "ledger_path": _to_str, "response_ttl": _to_int, "log_level": _to_choice("debug", "info", "warning", "error"),
    "log_file": _to_str, "log_format": _to_choice("text", "json"), "max_body_bytes": _to_int,
    "header_timeout": _to_float, "idle_timeout": _to_float, "shutdown_grace": _to_float,
    "connect_timeout": _to_float, "read_timeout": _to_float, "ping_interval": _to_float,
    "ca_bundle": _to_str, "aliases_file": _to_str, "admin_key": _to_str, "cli_log_file": _to_str,
    "log_max_bytes": _to_int, "log_backups": _to_int, "hook_script": _to_str, "hook_timeout": _to_float,
    "loop_warn_after": _to_int, "loop_stop_after": _to_int,
}
PROVIDER_TYPES: dict[str, Callable[[str], Any]] = {
    "wire": _to_choice("chat", "responses", "messages"), "base_url": _to_str, "api_key": _to_str,
    "headers": _to_headers, "models": _to_list, "max_output_tokens": _to_optional_int,
    "default_max_tokens": _to_int, "token_field": _to_choice("max_tokens", "max_completion_tokens"),
    "drop_schema_keys": _to_list, "reasoning": _to_bool, "forward_client_auth": _to_bool,
    "drop_tools": _to_list,
}
# OpenAI's built-in tools (Codex sends some) that other providers reject; dropped for them by default.
OPENAI_BUILTIN_TOOLS = ("web_search, web_search_preview, tool_search, file_search, image_generation, "
                        "code_interpreter, computer_use_preview, local_shell, mcp")
PROVIDER_DEFAULTS = {"wire": "chat", "api_key": "", "headers": "", "models": "", "max_output_tokens": "",
                     "default_max_tokens": "8192", "token_field": "max_tokens", "drop_schema_keys": "",
                     "reasoning": "true", "forward_client_auth": "false", "drop_tools": OPENAI_BUILTIN_TOOLS}
# Providers that exist as soon as their key is set; everything else comes from settings.
BUILTIN_PROVIDERS = {
    "openai": {"wire": "chat", "base_url": "https://api.openai.com/v1", "drop_tools": ""},
    "anthropic": {"wire": "messages", "base_url": "https://api.anthropic.com/v1"},
}
BUILTIN_ROUTES = (("claude*", "anthropic"), ("gpt*", "openai"), ("o1*", "openai"), ("o3*", "openai"),
                  ("o4*", "openai"), ("chatgpt*", "openai"), ("text-embedding*", "openai"))
LIST_SECTIONS = ("routes", "aliases", "prices")
# Environment names kept from the original gateway, besides TOKLIGENCE_<GATEWAY KEY>.
ENV_NAMES = {
    "TOKLIGENCE_FACADE_PORT": ("gateway", "port"),
    "TOKLIGENCE_OPENAI_API_KEY": ("provider.openai", "api_key"),
    "TOKLIGENCE_OPENAI_BASE_URL": ("provider.openai", "base_url"),
    "TOKLIGENCE_ANTHROPIC_API_KEY": ("provider.anthropic", "api_key"),
    "TOKLIGENCE_ANTHROPIC_BASE_URL": ("provider.anthropic", "base_url"),
}
FALLBACK_ENV = {"OPENAI_API_KEY": ("provider.openai", "api_key"),
                "ANTHROPIC_API_KEY": ("provider.anthropic", "api_key")}
SECRET_KEYS = ("api_key", "admin_key")


@dataclass(slots=True)
class Provider:
    name: str
    wire: str
    base_url: str
    api_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    max_output_tokens: int | None = None
    default_max_tokens: int = 8192
    token_field: str = "max_tokens"
    drop_schema_keys: tuple[str, ...] = ()
    reasoning: bool = True
    forward_client_auth: bool = False
    drop_tools: tuple[str, ...] = ()


Price = tuple[float, float, float, float]   # USD per million tokens: input, output, cache read, cache write


@dataclass(slots=True)
class Settings:
    host: str
    port: int
    auth_disabled: bool
    allowed_hosts: tuple[str, ...]
    ledger_path: str
    response_ttl: int
    log_level: str
    log_file: str
    log_format: str
    max_body_bytes: int
    header_timeout: float
    idle_timeout: float
    shutdown_grace: float
    connect_timeout: float
    read_timeout: float
    ping_interval: float
    ca_bundle: str
    aliases_file: str
    admin_key: str
    cli_log_file: str
    log_max_bytes: int
    log_backups: int
    hook_script: str
    hook_timeout: float
    loop_warn_after: int
    loop_stop_after: int
    providers: dict[str, Provider]
    routes: list[tuple[str, str]]
    aliases: list[tuple[str, str]]
    prices: dict[str, Price]
    origins: dict[str, str]            # "section.key" -> where its value came from
    path: Path | None = None


def default_settings_path(env: dict[str, str]) -> Path:
    return Path(env.get("TOKLIGENCE_CONFIG") or "~/.tokligence/settings.ini").expanduser()


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str, env: dict[str, str]) -> str:
    """${VAR} from the environment (unset is empty, as in a shell) and a leading ~."""
    value = _ENV_REFERENCE.sub(lambda m: env.get(m.group(1), ""), value)
    return os.path.expanduser(value) if value.startswith("~") else value


def _parse_ini(text: str, source: str) -> tuple[configparser.RawConfigParser, dict[tuple[str, str], int]]:
    """Parse settings text; also map (section, key) to its line so errors can point at it."""
    # '=' is the only delimiter because model names contain ':' (llama3:8b); case is kept for models.
    parser = configparser.RawConfigParser(delimiters=("=",), comment_prefixes=("#", ";"),
                                          inline_comment_prefixes=None, strict=True,
                                          empty_lines_in_values=False, default_section="\0none")
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        where = f"{source}:{line}" if line else source
        raise SettingsError(f"{where}: {exc.message.splitlines()[0]}") from None
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip()
        elif stripped and stripped[0] not in "#;" and "=" in stripped and not line[0].isspace():
            lines.setdefault((section, stripped.split("=", 1)[0].strip()), number)
    return parser, lines


def _parse_rules(text: str, source: str) -> list[tuple[str, str, str]]:
    """The environment's one-line rule syntax: 'claude*=>anthropic,gpt*=>openai' ('=' works for '=>')."""
    rules = []
    for item in re.split(r"[,\n]", text):
        if item.strip():
            left, sep, right = item.partition("=>") if "=>" in item else item.partition("=")
            if not sep or not left.strip() or not right.strip():
                raise SettingsError(f"{source}: expected 'pattern=>target', got {item.strip()!r}")
            rules.append((left.strip(), right.strip(), source))
    return rules


def load_settings(path: Path | None, env: dict[str, str], flags: dict[str, Any] | None = None,
                  require_file: bool = False) -> Settings:
    """Defaults < settings file < environment < flags. Raises SettingsError naming the culprit."""
    values: dict[tuple[str, str], tuple[str, str]] = {}      # (section, key) -> (raw value, origin)
    template, _ = _parse_ini(SETTINGS_TEMPLATE, "defaults")
    for key in GATEWAY_TYPES:
        values[("gateway", key)] = (template.get("gateway", key), "default")
    rules: dict[str, list[tuple[str, str, str]]] = {name: [] for name in LIST_SECTIONS}

    if path is not None and (path.exists() or require_file):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read settings: {exc.strerror}") from None
        parser, lines = _parse_ini(text, str(path))
        for section in parser.sections():
            if section in LIST_SECTIONS:
                rules[section] = [(k, _expand(v, env).strip(), f"{path}:{lines.get((section, k), '?')}")
                                  for k, v in parser.items(section)]
                continue
            known = (GATEWAY_TYPES if section == "gateway"
                     else PROVIDER_TYPES if section.startswith("provider.") else None)
            if known is None:
                raise SettingsError(f"{path}:{lines.get((section, ''), '?')}: unknown section [{section}]")
            for key, value in parser.items(section):
                where = f"{path}:{lines.get((section, key), '?')}"
                if key not in known:
                    raise SettingsError(f"{where}: [{section}] unknown key {key!r}")
                values[(section, key)] = (_expand(value, env), where)

    for name, (section, key) in FALLBACK_ENV.items():
        if env.get(name) and (section, key) not in values:
            values[(section, key)] = (env[name], f"env {name}")
    for name, value in env.items():
        if not name.startswith("TOKLIGENCE_"):
            continue
        target = ENV_NAMES.get(name)
        suffix = name[len("TOKLIGENCE_"):].lower()
        if target is None and suffix in GATEWAY_TYPES:
            target = ("gateway", suffix)
        if target is None and suffix.startswith("provider_"):
            rest = suffix[len("provider_"):]
            key = next((k for k in PROVIDER_TYPES if rest.endswith("_" + k)), None)
            if key and rest[: -len(key) - 1]:
                target = (f"provider.{rest[: -len(key) - 1]}", key)
        if target is not None:
            values[target] = (_expand(value, env), f"env {name}")
        elif suffix == "routes":
            rules["routes"] = _parse_rules(value, f"env {name}")
        elif suffix == "model_aliases":
            rules["aliases"] = _parse_rules(value, f"env {name}")
    for key, value in (flags or {}).items():
        if value is not None:
            values[("gateway", key)] = (str(value), f"flag --{key.replace('_', '-')}")
    return _build_settings(values, rules, path)


def _convert(values: dict[tuple[str, str], tuple[str, str]], section: str, key: str,
             convert: Callable[[str], Any]) -> Any:
    raw, origin = values[(section, key)]
    try:
        return convert(raw)
    except ValueError as exc:
        detail = str(exc) if not str(exc).startswith("invalid literal") else "expected a number"
        raise SettingsError(f"{origin}: [{section}] {key} = {raw!r}: {detail}") from None


def _build_settings(values: dict[tuple[str, str], tuple[str, str]],
                    rules: dict[str, list[tuple[str, str, str]]], path: Path | None) -> Settings:
    gateway = {key: _convert(values, "gateway", key, convert) for key, convert in GATEWAY_TYPES.items()}
    if not 0 <= gateway["port"] <= 65535:
        raise SettingsError(f"{values[('gateway', 'port')][1]}: [gateway] port must be 0-65535")
    if gateway["ca_bundle"] and not Path(gateway["ca_bundle"]).expanduser().is_file():
        raise SettingsError(f"{values[('gateway', 'ca_bundle')][1]}: [gateway] ca_bundle = "
                            f"{gateway['ca_bundle']!r}: no such file")
    providers: dict[str, Provider] = {}
    names = sorted({section[len("provider."):] for section, _ in values if section.startswith("provider.")})
    for name in names:
        section = f"provider.{name}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name) or name == "loopback":
            origin = next(o for (s, _), (_, o) in values.items() if s == section)
            raise SettingsError(f"{origin}: provider name {name!r} must be lowercase letters, digits, '-', "
                                "'_' or '.', and not 'loopback'")
        for key, default in {**PROVIDER_DEFAULTS, **BUILTIN_PROVIDERS.get(name, {})}.items():
            values.setdefault((section, key), (default, "default"))
        if (section, "base_url") not in values:
            origin = next(o for (s, _), (_, o) in values.items() if s == section)
            raise SettingsError(f"{origin}: [{section}] needs a base_url")
        fields = {key: _convert(values, section, key, convert) for key, convert in PROVIDER_TYPES.items()}
        url = urlsplit(fields["base_url"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SettingsError(f"{values[(section, 'base_url')][1]}: [{section}] base_url must be an "
                                f"http(s) URL, got {fields['base_url']!r}")
        # A bare host means the API's usual /v1 root (https://api.anthropic.com, http://localhost:11434).
        fields["base_url"] = fields["base_url"].rstrip("/") + ("" if url.path.strip("/") else "/v1")
        if name in BUILTIN_PROVIDERS and not fields["api_key"] and not fields["forward_client_auth"]:
            continue      # openai and anthropic exist only once a key is set
        providers[name] = Provider(name=name, **fields)
    routes = [(pattern, target) for pattern, target, _ in rules["routes"]]
    for pattern, target, origin in rules["routes"]:
        if target not in providers and target != "loopback":
            raise SettingsError(f"{origin}: route {pattern!r} names provider {target!r}, which is not "
                                f"configured (configured: {', '.join(providers) or 'none'})")
    routes += [(pattern, target) for pattern, target in BUILTIN_ROUTES if target in providers]
    origins = {f"{section}.{key}": origin for (section, key), (_, origin) in values.items()}
    return Settings(**gateway, providers=providers, routes=routes,
                    aliases=[(pattern, model) for pattern, model, _ in rules["aliases"]],
                    prices={model: _parse_price(text, origin, model) for model, text, origin in rules["prices"]},
                    origins=origins, path=path)


def _parse_price(text: str, origin: str, model: str) -> Price:
    """'input, output[, cache_read, cache_write]' per million tokens; cache prices default to input's."""
    try:
        numbers = [float(item) for item in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3, 4) or any(n < 0 for n in numbers):
        raise SettingsError(f"{origin}: [prices] {model} = {text!r}: expected 'input, output[, cache_read, "
                            "cache_write]' in USD per million tokens")
    input_price, output_price = numbers[0], numbers[1]
    cache_read = numbers[2] if len(numbers) > 2 else input_price
    cache_write = numbers[3] if len(numbers) > 3 else input_price
    return input_price, output_price, cache_read, cache_write


def mask_secret(value: str) -> str:
    return value[:3] + "…" + value[-2:] if len(value) > 8 else ("***" if value else "")


def describe_settings(settings: Settings) -> str:
    """The effective settings as ini text, secrets masked, each value with its origin."""
    def line(key: str, value: Any, origin: str) -> str:
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (tuple, list)):
            text = ", ".join(value)
        elif isinstance(value, dict):
            text = "; ".join(f"{k}: {mask_secret(v)}" for k, v in value.items())
        else:
            text = "" if value is None else str(value)
        return f"{key} = {text}".ljust(48) + f"  # {origin}"

    def masked(key: str, value: Any) -> Any:
        return mask_secret(value) if key in SECRET_KEYS else value

    out = ["[gateway]"]
    out += [line(key, masked(key, getattr(settings, key)), settings.origins.get(f"gateway.{key}", "default"))
            for key in GATEWAY_TYPES]
    for provider in settings.providers.values():
        out += ["", f"[provider.{provider.name}]"]
        for key in PROVIDER_TYPES:
            out.append(line(key, masked(key, getattr(provider, key)),
                            settings.origins.get(f"provider.{provider.name}.{key}", "default")))
    out += ["", "[routes]"] + [f"{pattern} = {target}" for pattern, target in settings.routes]
    out += ["", "[aliases]"] + [f"{pattern} = {model}" for pattern, model in settings.aliases]
    out += ["", "[prices]"] + [f"{model} = {', '.join(f'{p:g}' for p in price)}"
                               for model, price in settings.prices.items()]
    return "\n".join(out) + "\n"

# ================================================================================================
# Storage
# The SQLite database (request ledger, users, API keys, stored responses) and its one writer thread,
# plus what the gateway keeps off the request path: prices, lifecycle hooks and rotating logs.
# ================================================================================================

T = TypeVar("T")
storage_log = logging.getLogger("tokligence.storage")

BUSY_TIMEOUT_SECONDS = 5.0   # how long a connection waits for another one's write lock

# ---- schema --------------------------------------------------------------------------------------
# Each entry upgrades the schema by one version (PRAGMA user_version); append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # v1: the request ledger, users and their API keys
        """CREATE TABLE requests (
            id                 TEXT    NOT NULL,            -- the gateway's request id
            ts                 REAL    NOT NULL,            -- unix time the request arrived
            user_id            INTEGER,                     -- no foreign keys: history outlives users
            key_id             INTEGER,
            endpoint           TEXT    NOT NULL,            -- e.g. /v1/messages
            client_wire        TEXT,
            provider           TEXT,
            provider_wire      TEXT,
            model_requested    TEXT,
            model_served       TEXT,
            stream             INTEGER NOT NULL DEFAULT 0,
            status             INTEGER NOT NULL,            -- HTTP status, 499 when the client left
            error_type         TEXT,
            input_tokens       INTEGER NOT NULL DEFAULT 0,  -- uncached input only
            output_tokens      INTEGER NOT NULL DEFAULT 0,  -- reasoning included
            cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens   INTEGER NOT NULL DEFAULT 0,
            latency_ms         REAL,
            ttfb_ms            REAL,
            overhead_ms        REAL,                        -- time spent in the gateway itself
            cost_usd           REAL                         -- NULL when the model has no price
        )""",
        "CREATE INDEX requests_ts ON requests (ts)",
        "CREATE INDEX requests_model ON requests (model_served)",
        "CREATE INDEX requests_provider ON requests (provider)",
        "CREATE INDEX requests_key ON requests (key_id)",
        "CREATE INDEX requests_user ON requests (user_id)",
        """CREATE TABLE users (
            id         INTEGER PRIMARY KEY,
            email      TEXT    NOT NULL UNIQUE,             -- stored lowercase
            name       TEXT    NOT NULL DEFAULT '',
            role       TEXT    NOT NULL CHECK (role IN ('admin', 'user')),
            status     TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
            created_at REAL    NOT NULL,
            updated_at REAL    NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id           INTEGER PRIMARY KEY,
            user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            name         TEXT,
            key_hash     TEXT    NOT NULL UNIQUE,           -- sha256 hex; the key itself is never stored
            prefix       TEXT    NOT NULL,                  -- for display, e.g. tok_AbC1…
            created_at   REAL    NOT NULL,
            expires_at   REAL,
            revoked_at   REAL,
            last_used_at REAL
        )""",
        "CREATE INDEX api_keys_user ON api_keys (user_id)",
    ),
    (  # v2: Responses-API objects kept for previous_response_id
        """CREATE TABLE stored_responses (
            id         TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            body       TEXT NOT NULL                        -- JSON: the response and its conversation
        )""",
        "CREATE INDEX stored_responses_expiry ON stored_responses (expires_at)",
    ),
)


class Database(sqlite3.Connection):
    """A connection to the gateway database that can open more connections to the same database:
    each thread that touches SQLite (the ledger writer, the event loop's readers) owns its own."""

    def __init__(self, uri: str) -> None:
        # Autocommit: transactions are explicit (transaction() below), never opened behind our back.
        # Connections are opened on one thread and handed to the one that uses them.
        super().__init__(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                         check_same_thread=False)
        self.uri = uri
        self.row_factory = sqlite3.Row
        self.execute("PRAGMA synchronous = NORMAL")   # with WAL: only power loss can undo the last commits
        self.execute("PRAGMA foreign_keys = ON")

    def connect(self) -> Database:
        return Database(self.uri)


def open_database(path: str) -> Database:
    """Opens (creating if needed) and migrates the database at path; ":memory:" gives a fresh
    in-memory database that the connections from .connect() share while this one stays open."""
    if path == ":memory:":
        # The memdb VFS shares a "/name" among a process's connections with ordinary locking, so a
        # reader waits out a commit; shared-cache memory databases fail at once with "table is locked".
        database = Database(f"file:/tokligence-{os.urandom(16).hex()}?vfs=memdb")
    else:
        file = Path(path).expanduser().resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        database = Database(file.as_uri())
        database.execute("PRAGMA journal_mode = WAL")   # readers never wait for the writer
    _storage_migrate(database)
    return database


def _storage_migrate(database: Database) -> None:
    # Under BEGIN IMMEDIATE, two gateways starting together migrate one after the other.
    with transaction(database):
        version = database.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"the database has schema v{version}, newer than this gateway's "
                               f"v{len(MIGRATIONS)}: upgrade tokligence")
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                database.execute(statement)
        database.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction: committed when the block ends, rolled back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# ---- the ledger writer ---------------------------------------------------------------------------
LEDGER_COLUMNS = (
    "id", "ts", "user_id", "key_id", "endpoint", "client_wire", "provider", "provider_wire",
    "model_requested", "model_served", "stream", "status", "error_type", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "latency_ms", "ttfb_ms", "overhead_ms",
    "cost_usd",
)
TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                 "reasoning_tokens")
# What a ledger row may leave out.
LEDGER_DEFAULTS: dict[str, Any] = (dict.fromkeys(LEDGER_COLUMNS) | dict.fromkeys(TOKEN_COLUMNS, 0)
                                   | {"stream": 0})
# Rows go in with multi-row INSERTs of 64, 32, … 1 rows: few statements per batch (SQLite releases the
# GIL at every step, so a step per row would bounce the GIL off the event loop once per request), and
# only seven statement shapes, so SQLite's statement cache stays small.
LEDGER_INSERTS = {rows: f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) VALUES "
                        + ", ".join(["(" + ", ".join("?" * len(LEDGER_COLUMNS)) + ")"] * rows)
                  for rows in (64, 32, 16, 8, 4, 2, 1)}
TOUCH_KEY = "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?"

LEDGER_BATCH_ROWS = 500
# After the first row of a batch the writer waits this long for more: one transaction then serves a
# burst, and rows queue without waking the thread (no waiter to notify) instead of one wake-up each.
LEDGER_BATCH_WINDOW_SECONDS = 0.1
BACKPRESSURE_POLL_SECONDS = 0.005

# A queued item: a ledger row, a write_now job, or None, which stops the writer.
LedgerItem = dict[str, Any] | Callable[[Database], None] | None


class LedgerWriter:
    """The one thread that writes to the database, so the event loop never waits on SQLite.

    Ledger rows (dicts keyed by LEDGER_COLUMNS) queue up and are written in batched transactions;
    write_now() runs any other write on the same thread, in queue order, and reports back. Nothing is
    dropped: a full queue makes callers wait, and a batch that fails is retried row by row so only the
    bad row is lost (and logged). With db None (the database is off) the writer records nothing.
    """

    def __init__(self, db: Database | None, max_queued: int = 10_000) -> None:
        # A deque and two events rather than queue.Queue: appending takes no lock, and the writer
        # thread is woken once per batch, not once per row.
        self._items: collections.deque[LedgerItem] = collections.deque()
        self._max_queued = max_queued
        self._queued = threading.Event()     # items are waiting (set by the first after a drain)
        self._urgent = threading.Event()     # a write_now job or close() cuts the batch window short
        self._closed = False
        self._thread: threading.Thread | None = None
        if db is not None:
            self._thread = threading.Thread(target=self._run, args=(db.connect(),), name="tokligence-ledger",
                                            daemon=True)
            self._thread.start()

    def submit(self, row: dict[str, Any]) -> None:
        """Queues a ledger row; waits only while the queue is full (async code may prefer put())."""
        if self._thread is not None:
            self._refuse_if_closed()
            while len(self._items) >= self._max_queued:
                time.sleep(BACKPRESSURE_POLL_SECONDS)
            self._push(row)

    async def put(self, row: dict[str, Any]) -> None:
        """Queues a ledger row, letting the event loop run while the queue is full."""
        if self._thread is not None:
            await self._enqueue(row)

    async def write_now(self, write: Callable[[Database], T]) -> T:
        """Runs write(connection) on the writer thread after everything queued before it and returns
        its result (or raises its exception) once it has landed."""
        if self._thread is None:
            raise RuntimeError("the database is off")
        loop = asyncio.get_running_loop()
        landed: asyncio.Future[T] = loop.create_future()

        def job(conn: Database) -> None:
            try:
                outcome: tuple[Any, Exception | None] = (write(conn), None)
            except Exception as error:
                outcome = (None, error)
            with contextlib.suppress(RuntimeError):   # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_storage_settle, landed, *outcome)

        await self._enqueue(job)
        self._urgent.set()
        return await landed

    def close(self) -> None:
        """Writes everything queued, then stops the thread (at shutdown; blocks until done)."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._push(None)
        self._urgent.set()
        self._thread.join()

    def _refuse_if_closed(self) -> None:
        if self._closed:   # nothing would write it: refuse rather than lose it
            raise RuntimeError("the ledger writer is closed")

    def _push(self, item: LedgerItem) -> None:
        self._items.append(item)
        if not self._queued.is_set():
            self._queued.set()

    async def _enqueue(self, item: LedgerItem) -> None:
        self._refuse_if_closed()
        while len(self._items) >= self._max_queued:
            # Polling keeps the wait off the executor threads, which DNS lookups also need.
            await asyncio.sleep(BACKPRESSURE_POLL_SECONDS)
        self._push(item)

    def _run(self, conn: Database) -> None:
        items = self._items
        with contextlib.closing(conn):
            while True:
                self._queued.wait()
                if items and isinstance(items[0], dict):
                    self._urgent.wait(LEDGER_BATCH_WINDOW_SECONDS)
                self._queued.clear()      # before taking: an item pushed from here on sets it again
                self._urgent.clear()
                batch = [items.popleft() for _ in range(min(len(items), LEDGER_BATCH_ROWS))]
                if items:
                    self._queued.set()
                if batch and not self._write(conn, batch):
                    return

    def _write(self, conn: Database, items: list[LedgerItem]) -> bool:
        """Writes items in queue order (a run of rows shares a transaction); False once told to stop."""
        rows: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, dict):
                rows.append(item)
                continue
            self._write_rows(conn, rows)
            rows = []
            if item is None:
                return False
            item(conn)
        self._write_rows(conn, rows)
        return True

    @staticmethod
    def _write_rows(conn: Database, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            _storage_insert_ledger_rows(conn, rows)
        except Exception:
            storage_log.exception("writing %d ledger rows failed; retrying them one by one", len(rows))
            for row in rows:
                try:
                    _storage_insert_ledger_rows(conn, [row])
                except Exception:
                    storage_log.exception("ledger row %r could not be written", row)


def _storage_insert_ledger_rows(conn: Database, rows: list[dict[str, Any]]) -> None:
    last_used: dict[int, float] = {}
    for row in rows:
        if (key_id := row.get("key_id")) is not None:
            last_used[key_id] = max(last_used.get(key_id, 0.0), row["ts"])
    with transaction(conn):
        start = 0
        for size, statement in LEDGER_INSERTS.items():
            while len(rows) - start >= size:
                group = rows[start:start + size]
                conn.execute(statement, [row.get(column, default) for row in group
                                         for column, default in LEDGER_DEFAULTS.items()])
                start += size
        if last_used:
            conn.executemany(TOUCH_KEY, [(ts, key_id) for key_id, ts in last_used.items()])


def _storage_settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


# ---- costs ---------------------------------------------------------------------------------------
class PriceTable:
    """Prices by model name or glob pattern ("claude-sonnet-4*"): an exact name wins, then the longest
    matching pattern. Each model's answer is remembered, so pricing a request is one dict lookup."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self._exact = {name: price for name, price in prices.items() if not _storage_is_glob(name)}
        self._patterns = sorted(((name, price) for name, price in prices.items() if _storage_is_glob(name)),
                                key=lambda entry: len(entry[0]), reverse=True)
        self._resolved: dict[str, Price | None] = {}

    def price_for(self, model: str) -> Price | None:
        try:
            return self._resolved[model]
        except KeyError:
            price = self._exact.get(model) or next(
                (price for pattern, price in self._patterns if fnmatch.fnmatchcase(model, pattern)), None)
            self._resolved[model] = price
            return price


def _storage_is_glob(name: str) -> bool:
    return any(character in name for character in "*?[")


def cost_usd(input_tokens: int, output_tokens: int, cache_read_tokens: int, cache_write_tokens: int,
             price: Price | None) -> float | None:
    """What a request cost; None when its model has no price (unknown is not free)."""
    if price is None:
        return None
    tokens = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
    return sum(count * per_million for count, per_million in zip(tokens, price)) / 1_000_000


# ---- users and API keys --------------------------------------------------------------------------
# Synchronous, taking a connection: the CLI calls them directly, the admin API through write_now().
USER_ROLES = ("admin", "user")
USER_STATUSES = ("active", "disabled")
USER_FIELDS = ("email", "name", "role", "status")
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+")
KEY_PREFIX = "tok_"
MIN_ADMIN_KEY_LENGTH = 24
ADMIN_EMAIL = "admin@localhost"

INSERT_USER = ("INSERT INTO users (email, name, role, status, created_at, updated_at) "
               "VALUES (?, ?, ?, 'active', ?, ?)")
SELECT_USERS = "SELECT * FROM users ORDER BY id"
SELECT_USER_BY_ID = "SELECT * FROM users WHERE id = ?"
SELECT_USER_BY_EMAIL = "SELECT * FROM users WHERE email = ?"
SELECT_ANY_ADMIN = "SELECT 1 FROM users WHERE role = 'admin' LIMIT 1"
UPDATE_USER = "UPDATE users SET {assignments} WHERE id = :id"
DELETE_USER = "DELETE FROM users WHERE id = ?"   # its keys go with it (ON DELETE CASCADE)

KEY_COLUMNS = "id, user_id, name, prefix, created_at, expires_at, revoked_at, last_used_at"
INSERT_KEY = ("INSERT INTO api_keys (user_id, name, key_hash, prefix, created_at, expires_at) "
              "VALUES (?, ?, ?, ?, ?, ?)")
SELECT_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"
SELECT_USER_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = ? ORDER BY id"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?"
SELECT_USABLE_KEYS = """
    SELECT k.key_hash, k.id, k.user_id, u.role, k.expires_at
    FROM api_keys k JOIN users u ON u.id = k.user_id
    WHERE k.revoked_at IS NULL AND u.status = 'active'"""


def create_user(conn: sqlite3.Connection, email: str, name: str = "", role: str = "user") -> dict[str, Any]:
    email = _storage_normalized_email(email)
    now = time.time()
    try:
        cursor = conn.execute(INSERT_USER, (email, name.strip(), _storage_one_of(role, USER_ROLES, "role"), now, now))
    except sqlite3.IntegrityError:   # the email's UNIQUE constraint
        raise ValueError(f"a user with email {email} already exists") from None
    return _storage_user(conn, cursor.lastrowid)


def list_users(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(SELECT_USERS)]


def get_user(conn: sqlite3.Connection, user: int | str) -> dict[str, Any] | None:
    """The user with this id (an int or digits) or email, or None."""
    if isinstance(user, int) or user.isdigit():
        row = conn.execute(SELECT_USER_BY_ID, (int(user),)).fetchone()
    else:
        row = conn.execute(SELECT_USER_BY_EMAIL, (user.strip().lower(),)).fetchone()
    return None if row is None else dict(row)


def update_user(conn: sqlite3.Connection, user_id: int, **fields: str) -> dict[str, Any]:
    """Changes any of email, name, role and status; returns the updated user."""
    if unknown := fields.keys() - set(USER_FIELDS):
        raise ValueError(f"cannot update {', '.join(sorted(unknown))}: users have {', '.join(USER_FIELDS)}")
    if "email" in fields:
        fields["email"] = _storage_normalized_email(fields["email"])
    if "role" in fields:
        _storage_one_of(fields["role"], USER_ROLES, "role")
    if "status" in fields:
        _storage_one_of(fields["status"], USER_STATUSES, "status")
    assignments = ", ".join(f"{name} = :{name}" for name in [*fields, "updated_at"])   # names checked above
    try:
        cursor = conn.execute(UPDATE_USER.format(assignments=assignments),
                              fields | {"updated_at": time.time(), "id": user_id})
    except sqlite3.IntegrityError:
        raise ValueError(f"a user with email {fields['email']} already exists") from None
    if cursor.rowcount == 0:
        raise ValueError(f"unknown user {user_id}")
    return _storage_user(conn, user_id)


def disable_user(conn: sqlite3.Connection, user_id: int) -> dict[str, Any]:
    return update_user(conn, user_id, status="disabled")


def delete_user(conn: sqlite3.Connection, user_id: int) -> None:
    """Deletes the user and their keys; their ledger rows stay."""
    if conn.execute(DELETE_USER, (user_id,)).rowcount == 0:
        raise ValueError(f"unknown user {user_id}")


def create_key(conn: sqlite3.Connection, user_id: int, name: str | None = None,
               expires_at: float | None = None) -> tuple[str, dict[str, Any]]:
    """A new key for the user: (the key itself, shown once and never stored; the stored key row)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    return plaintext, _storage_insert_key(conn, user_id, plaintext, name, expires_at)


def list_keys(conn: sqlite3.Connection, user_id: int | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(SELECT_KEYS) if user_id is None else conn.execute(SELECT_USER_KEYS, (user_id,))
    return [dict(row) for row in rows]


def revoke_key(conn: sqlite3.Connection, key_id: int) -> dict[str, Any]:
    """Revokes the key (revoking twice keeps the first time); returns the key row."""
    if conn.execute(REVOKE_KEY, (time.time(), key_id)).rowcount == 0:
        raise ValueError(f"unknown key {key_id}")
    return dict(conn.execute(SELECT_KEY, (key_id,)).fetchone())


def import_users_csv(conn: sqlite3.Connection, file: Iterable[str]) -> dict[str, list[Any]]:
    """Creates the users of a CSV file with a header row: email, and optionally name and role (default
    user). Existing emails are skipped; a bad line raises ValueError and imports nothing.
    Returns {"created": [user rows], "skipped": [emails]}: the caller counts them and emits hooks."""
    import csv
    reader = csv.DictReader(file)
    # Spreadsheets write " Email" or a byte-order mark before the first name.
    reader.fieldnames = [column.replace("\ufeff", "").strip().lower() for column in reader.fieldnames or ()]
    if "email" not in reader.fieldnames:
        raise ValueError("the CSV needs a header row with an email column (and optionally name, role)")
    created: list[dict[str, Any]] = []
    skipped: list[str] = []
    with transaction(conn):
        for row in reader:
            try:
                email = _storage_normalized_email(row["email"] or "")
                if get_user(conn, email) is None:
                    role = (row.get("role") or "").strip().lower() or "user"
                    created.append(create_user(conn, email, row.get("name") or "", role))
                else:
                    skipped.append(email)
            except ValueError as error:
                raise ValueError(f"line {reader.line_num}: {error}") from None
    return {"created": created, "skipped": skipped}


def ensure_admin(conn: sqlite3.Connection, admin_key: str | None) -> str | None:
    """Team edition's first start: with no admin yet, creates admin@localhost and a key for it (admin_key,
    from TOKLIGENCE_ADMIN_KEY, when given) and returns that key to print once; otherwise None."""
    if admin_key is not None and not (admin_key.startswith(KEY_PREFIX)
                                      and len(admin_key) >= MIN_ADMIN_KEY_LENGTH):
        raise ValueError(f"TOKLIGENCE_ADMIN_KEY must start with {KEY_PREFIX} and be at least "
                         f"{MIN_ADMIN_KEY_LENGTH} characters long")
    with transaction(conn):   # two gateways starting together make one admin
        if conn.execute(SELECT_ANY_ADMIN).fetchone() is not None:
            return None
        admin = create_user(conn, ADMIN_EMAIL, "Administrator", "admin")
        plaintext = admin_key or KEY_PREFIX + secrets.token_urlsafe(32)
        _storage_insert_key(conn, admin["id"], plaintext, "bootstrap", None)
        return plaintext


def key_hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _storage_insert_key(conn: sqlite3.Connection, user_id: int, plaintext: str, name: str | None,
                expires_at: float | None) -> dict[str, Any]:
    display_prefix = plaintext[:len(KEY_PREFIX) + 4] + "…"
    try:
        cursor = conn.execute(INSERT_KEY, (user_id, name, key_hash(plaintext), display_prefix, time.time(),
                                           expires_at))
    except sqlite3.IntegrityError:   # the user_id foreign key
        raise ValueError(f"unknown user {user_id}") from None
    return dict(conn.execute(SELECT_KEY, (cursor.lastrowid,)).fetchone())


def _storage_user(conn: sqlite3.Connection, user_id: int) -> dict[str, Any]:
    return dict(conn.execute(SELECT_USER_BY_ID, (user_id,)).fetchone())


def _storage_normalized_email(email: str) -> str:
    email = email.strip().lower()
    if not EMAIL_PATTERN.fullmatch(email):
        raise ValueError(f"invalid email {email!r}")
    return email


def _storage_one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be {' or '.join(allowed)}, not {value!r}")
    return value


# ---- key lookup ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    user_id: int
    user_role: str
    expires_at: float | None
    key_hash: str


KEY_CHECK_INTERVAL_SECONDS = 1.0
# The index is keyed by the first 128 bits of a key's hash (collisions are out of reach), so the
# comparison of the full hash, the one that decides, can be constant-time.
HASH_BUCKET_CHARS = 32


class KeyIndex:
    """The usable keys (not revoked, user active) in memory, so authenticating a request never touches
    SQLite. Reloads when the database changed: refresh_if_changed() looks at most once a second (a
    PRAGMA on its own connection). The reload is one small query on the event loop's thread; WAL readers
    do not wait for the writer. The ledger's commits move data_version too, so under traffic it runs
    about once a second."""

    def __init__(self, db: Database) -> None:
        self._conn = db.connect()
        self._keys: dict[str, KeyInfo] = {}
        self._data_version = -1
        self._next_check = 0.0
        self.invalidate()

    def lookup(self, presented_key: str) -> KeyInfo | None:
        """The key's owner and role, or None for an unknown, revoked or expired key."""
        digest = key_hash(presented_key)
        info = self._keys.get(digest[:HASH_BUCKET_CHARS])
        if info is None or not hmac.compare_digest(info.key_hash, digest):
            return None
        if info.expires_at is not None and info.expires_at <= time.time():
            return None
        return info

    def refresh_if_changed(self) -> None:
        """Reloads if another connection changed the database; cheap enough to call per request."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + KEY_CHECK_INTERVAL_SECONDS
        if self._conn.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self.invalidate()

    def invalidate(self) -> None:
        """Reloads now: after the admin API changes keys or users, the next request sees it."""
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        self._keys = {digest[:HASH_BUCKET_CHARS]: KeyInfo(key_id, user_id, role, expires_at, digest)
                      for digest, key_id, user_id, role, expires_at in self._conn.execute(SELECT_USABLE_KEYS)}


# ---- usage queries -------------------------------------------------------------------------------
USAGE_AGGREGATES = """
    count(*) AS requests,
    coalesce(sum(input_tokens), 0) AS input_tokens,
    coalesce(sum(output_tokens), 0) AS output_tokens,
    coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens,
    coalesce(sum(cache_write_tokens), 0) AS cache_write_tokens,
    coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
    sum(cost_usd) AS cost_usd,                          -- of the priced requests; NULL when none was
    count(*) - count(cost_usd) AS unpriced_requests,
    coalesce(sum(status >= 400), 0) AS errors           -- 499, the client leaving, included
"""
USAGE_TOTALS = f"SELECT {USAGE_AGGREGATES} FROM requests {{where}}"
USAGE_BREAKDOWN = (f"SELECT {{group}} AS {{name}}, {USAGE_AGGREGATES} "
                   "FROM requests {where} GROUP BY 1 ORDER BY 1")
# Summary entry → (the group's name in its rows, its SQL expression).
USAGE_BREAKDOWNS = {
    "by_day": ("day", "date(ts, 'unixepoch')"),   # UTC
    "by_model": ("model", "model_served"),
    "by_provider": ("provider", "provider"),
    "by_key": ("key_id", "key_id"),
    "by_user": ("user_id", "user_id"),
}
LEDGER_PAGE = "SELECT * FROM requests {where} ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?"
LEDGER_COUNT = "SELECT count(*) FROM requests {where}"
LEDGER_FILTERS = {
    "model": "model_served = ?",
    "provider": "provider = ?",
    "key_id": "key_id = ?",
    "user_id": "user_id = ?",
    "status": "status = ?",
    "since": "ts >= ?",
    "until": "ts < ?",
}
MAX_LOG_PAGE = 1_000


def usage_summary(conn: sqlite3.Connection, since: float | None = None, until: float | None = None,
                  user_id: int | None = None) -> dict[str, Any]:
    """Totals over [since, until) and the same figures by day, model served, provider, key and user."""
    where, parameters = _storage_ledger_where(since=since, until=until, user_id=user_id)
    totals = conn.execute(USAGE_TOTALS.format(where=where), parameters).fetchone()
    summary: dict[str, Any] = {"totals": dict(totals)}
    for entry, (name, group) in USAGE_BREAKDOWNS.items():
        query = USAGE_BREAKDOWN.format(group=group, name=name, where=where)
        summary[entry] = [dict(row) for row in conn.execute(query, parameters)]
    return summary


def usage_logs(conn: sqlite3.Connection, *, limit: int = 50, offset: int = 0, model: str | None = None,
               provider: str | None = None, key_id: int | None = None, user_id: int | None = None,
               status: int | None = None, since: float | None = None,
               until: float | None = None) -> dict[str, Any]:
    """One page of ledger rows, newest first, and how many rows match in all."""
    if not 1 <= limit <= MAX_LOG_PAGE or offset < 0:
        raise ValueError(f"limit must be 1 to {MAX_LOG_PAGE} and offset at least 0")
    where, parameters = _storage_ledger_where(model=model, provider=provider, key_id=key_id, user_id=user_id,
                                      status=status, since=since, until=until)
    total = conn.execute(LEDGER_COUNT.format(where=where), parameters).fetchone()[0]
    rows = conn.execute(LEDGER_PAGE.format(where=where), [*parameters, limit, offset])
    return {"data": [dict(row) for row in rows], "total": total, "limit": limit, "offset": offset}


def _storage_ledger_where(**filters: Any) -> tuple[str, list[Any]]:
    """A WHERE clause for the filters given (None means any) and its parameters."""
    used = {name: value for name, value in filters.items() if value is not None}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(LEDGER_FILTERS[name] for name in used), list(used.values())


# ---- stored responses ----------------------------------------------------------------------------
STORE_RESPONSE = ("INSERT OR REPLACE INTO stored_responses (id, created_at, expires_at, body) "
                  "VALUES (?, ?, ?, ?)")
LOAD_RESPONSE = "SELECT body FROM stored_responses WHERE id = ? AND expires_at > ?"
DELETE_RESPONSE = "DELETE FROM stored_responses WHERE id = ? AND expires_at > ?"
PURGE_RESPONSES = "DELETE FROM stored_responses WHERE expires_at <= ?"


def store_response(conn: sqlite3.Connection, response_id: str, body: dict[str, Any],
                   ttl_seconds: float) -> None:
    """Keeps body for ttl_seconds, and clears out what has expired: with the expiry index that
    touches only the expired rows."""
    now = time.time()
    with transaction(conn):
        conn.execute(PURGE_RESPONSES, (now,))
        conn.execute(STORE_RESPONSE, (response_id, now, now + ttl_seconds,
                                      compact_json(body)))


def load_response(conn: sqlite3.Connection, response_id: str) -> dict[str, Any] | None:
    row = conn.execute(LOAD_RESPONSE, (response_id, time.time())).fetchone()
    return None if row is None else json.loads(row["body"])


def delete_response(conn: sqlite3.Connection, response_id: str) -> bool:
    """False when there was no such response (or it had expired)."""
    return conn.execute(DELETE_RESPONSE, (response_id, time.time())).rowcount > 0


# ---- lifecycle hooks -----------------------------------------------------------------------------
HOOK_EVENTS = frozenset({"user.created", "user.updated", "user.disabled", "user.deleted",
                         "key.created", "key.revoked"})


class HookRunner:
    """Runs the hook script (an executable) once per user or key event, the event as JSON on stdin.

    emit() only queues: one background thread runs the hooks in event order (a key.created never
    overtakes its user.created). A hook that outlives the timeout is killed with everything it
    started (its process group); failures and timeouts are logged, never raised.
    """

    def __init__(self, script: str | None, timeout: float) -> None:
        self._script = script
        self._timeout = timeout
        self._runner = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokligence-hook")
                        if script else None)

    def emit(self, event_type: str, *, user_id: int | None, actor: str,
             metadata: dict[str, Any] | None = None) -> None:
        if event_type not in HOOK_EVENTS:
            raise ValueError(f"unknown hook event {event_type!r}")
        if self._runner is None:
            return
        import uuid
        event = {
            "id": str(uuid.uuid4()),
            "type": event_type,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "user_id": user_id,
            "actor": actor,
            "metadata": metadata or {},
        }
        self._runner.submit(self._run, event_type, json.dumps(event))

    def close(self) -> None:
        """Waits for the hooks already emitted (at shutdown)."""
        if self._runner is not None:
            self._runner.shutdown(wait=True)

    def _run(self, event_type: str, payload: str) -> None:
        try:
            with subprocess.Popen([self._script], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True) as hook:
                try:
                    _, errors = hook.communicate(payload, timeout=self._timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(hook.pid, signal.SIGKILL)
                    hook.communicate()
                    storage_log.warning("hook %s for %s timed out after %gs and was killed",
                                        self._script, event_type, self._timeout)
                    return
        except OSError as error:
            storage_log.warning("hook %s for %s could not run: %s", self._script, event_type, error)
            return
        if hook.returncode != 0:
            storage_log.warning("hook %s for %s exited with status %d: %s", self._script, event_type,
                                hook.returncode, errors.strip()[-500:])


# ---- log files -----------------------------------------------------------------------------------
SECONDS_PER_DAY = 86_400


LOG_FLUSH_SECONDS = 0.2


class LogFlusher:
    """Flushes log handlers from one background thread, at most LOG_FLUSH_SECONDS after a request
    line was written: a flush per line would cost a write syscall per request. Started on first use."""

    def __init__(self) -> None:
        self._dirty: set[logging.Handler] = set()
        self._pending = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def mark(self, handler: logging.Handler) -> None:
        self._dirty.add(handler)
        if not self._pending.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tokligence-log-flush", daemon=True)
                    self._thread.start()
            self._pending.set()

    def _run(self) -> None:
        while True:
            self._pending.wait()
            time.sleep(LOG_FLUSH_SECONDS)
            self._pending.clear()
            dirty, self._dirty = self._dirty, set()
            for handler in dirty:
                with handler.lock, contextlib.suppress(OSError, ValueError):   # ValueError: closed since
                    handler.flush()       # emit holds the lock, so `deferring` is False here


LOG_FLUSHER = LogFlusher()


class DeferredFlush(logging.StreamHandler):
    """A stream handler whose request lines (request_log) reach the file within LOG_FLUSH_SECONDS
    instead of at once; any other record, close() and logging.shutdown() at exit flush at once."""

    deferring = False

    def emit(self, record: logging.LogRecord) -> None:
        self.deferring = record.name == request_log.name
        try:
            super().emit(record)
        finally:
            self.deferring = False

    def flush(self) -> None:
        if self.deferring:
            LOG_FLUSHER.mark(self)
        else:
            super().flush()


class ConsoleLogHandler(DeferredFlush):
    """Standard output or error. On a terminal every line shows at once; a pipe or file (a service
    manager, Docker) gets its own buffered stream on the same descriptor, since PYTHONUNBUFFERED,
    which containers often set, would otherwise cost a write syscall per line."""

    def __init__(self, stream: Any) -> None:
        try:
            if not stream.isatty():
                stream.flush()
                stream = open(stream.fileno(), "w", encoding=stream.encoding, errors="backslashreplace",
                              closefd=False)
        except (AttributeError, OSError, ValueError):
            pass          # no descriptor (e.g. a test's captured output): write to it as it is
        super().__init__(stream)


class RotatingLogHandler(DeferredFlush, logging.handlers.RotatingFileHandler):
    """A log file that rolls over at UTC midnight and whenever it would grow past max_bytes (0: never
    by size), keeping backup_count old files (path.1 the newest). Logging to stdout ("-") is the
    caller's choice and does not come here."""

    def __init__(self, path: str, max_bytes: int, backup_count: int) -> None:
        file = Path(path).expanduser()
        file.parent.mkdir(parents=True, exist_ok=True)
        # A file last written on an earlier day rolls over with today's first record.
        last_written = file.stat().st_mtime if file.exists() else time.time()
        # Never roll over what is not a regular file, such as /dev/null.
        self._regular = not file.exists() or file.is_file()
        super().__init__(file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self._next_midnight = _storage_next_utc_midnight(last_written)
        self._size = file.stat().st_size if self._regular else 0    # counted here, not asked of the file

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        line = len(self.format(record)) + len(self.terminator)
        roll = self._regular and (record.created >= self._next_midnight
                                  or 0 < self._size and 0 < self.maxBytes <= self._size + line)
        self._size = (0 if roll else self._size) + line
        return roll

    def doRollover(self) -> None:
        super().doRollover()
        self._next_midnight = _storage_next_utc_midnight(time.time())


def _storage_next_utc_midnight(unix_time: float) -> float:
    return (unix_time // SECONDS_PER_DAY + 1) * SECONDS_PER_DAY   # unix days are exactly 86,400 s

# ================================================================================================
# Server-sent events
# An incremental SSE parser (bytes in, events out, chunks split anywhere) and the event writer.
# Pure: the HTTP layer feeds it, the wire decoders and the passthrough usage sniffer consume it.
# ================================================================================================


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None
    raw: bytes = b""           # the event's exact bytes (with any comments before it), for relays


def _sse_lines(buffer: bytes, position: int) -> Iterator[tuple[bytes, int]]:
    """The complete lines of buffer from position on (LF, CRLF or CR ends), each with the offset just
    past its end."""
    if b"\r" not in buffer:
        # Line feeds only, as providers send: the lines come from one split, made in C.
        for line in buffer[position:].split(b"\n")[:-1]:
            position += len(line) + 1
            yield line, position
        return
    size = len(buffer)
    while position < size:
        newline = buffer.find(b"\n", position)
        carriage = buffer.find(b"\r", position, newline if newline >= 0 else size)
        if carriage >= 0:
            if carriage + 1 == size:
                return             # a CR at the end may be half of a CRLF: wait for the next byte
            end, following = carriage, carriage + (2 if buffer[carriage + 1] == 10 else 1)
        elif newline >= 0:
            end, following = newline, newline + 1
        else:
            return
        yield buffer[position:end], following
        position = following


class SSEParser:
    """Splits a byte stream into SSE events per the HTML spec (LF, CRLF or CR line ends)."""

    def __init__(self) -> None:
        self._buffer = b""         # the current event's bytes so far, kept for its raw copy
        self._parsed = 0           # how much of _buffer has already been read as lines
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self._has_field = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SSEEvent] = []
        start, position = 0, self._parsed
        for line, position in _sse_lines(buffer, position):
            if line:
                self._field(line)
            elif self._has_field:
                events.append(SSEEvent(self._event, "\n".join(self._data), self._id, self._retry,
                                       buffer[start:position]))
                self._event, self._data, self._retry, self._has_field = None, [], None, False
                start = position
        self._buffer = buffer[start:]
        self._parsed = position - start
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 58:          # ':' starts a comment
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            self._data.append(text)
        elif name == b"event":
            self._event = text
        elif name == b"id":
            if "\0" not in text:
                self._id = text
        elif name == b"retry":
            if text.isdigit():
                self._retry = int(text)
        else:
            return
        self._has_field = True

    def close(self) -> list[SSEEvent]:
        """At end of stream: a final event without its blank line is discarded, as the spec says."""
        self._buffer, self._parsed = b"", 0
        return []


def sse_event(event: str | None, data: Any) -> bytes:
    """One SSE event as bytes; data is JSON-encoded unless already a str."""
    text = data if isinstance(data, str) else compact_json(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()

# ================================================================================================
# Wire formats
# The neutral model that every wire translates to and from, then one part per wire: request and
# response parse/render, and the stream decoder and encoder state machines. Pure: no I/O.
# ================================================================================================

# ---- content parts -------------------------------------------------------------------------
@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    url: str = ""            # http(s) URL, or empty when data is set
    data: str = ""           # base64 payload
    media_type: str = ""     # e.g. image/png, with data


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""      # JSON text for function tools; raw input text for custom tools
    custom: bool = False     # Responses freeform (custom) tool call


@dataclass(slots=True)
class ToolResult:
    call_id: str
    content: list[Union[Text, Image]] = field(default_factory=list)
    is_error: bool = False
    custom: bool = False     # answer to a custom tool call


@dataclass(slots=True)
class Thinking:
    text: str = ""
    signature: str = ""      # Anthropic signature, kept verbatim across turns
    redacted: str = ""       # Anthropic redacted_thinking data
    encrypted: str = ""      # OpenAI reasoning encrypted_content (meaningful to OpenAI only)


@dataclass(slots=True)
class Refusal:
    text: str


Part = Union[Text, Image, ToolCall, ToolResult, Thinking, Refusal]


@dataclass(slots=True)
class Message:
    role: str                # "user" | "assistant"  (tool results are ToolResult parts of user turns)
    parts: list[Part] = field(default_factory=list)


@dataclass(slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    custom: bool = False     # freeform tool taking one string input
    format: dict[str, Any] | None = None   # custom tool grammar/format, kept for responses


@dataclass(slots=True)
class Conversation:
    model: str
    messages: list[Message] = field(default_factory=list)
    system: list[str] = field(default_factory=list)     # system/developer prompt parts, in order
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None        # None | "auto" | "none" | "required" | "tool"
    tool_choice_name: str = ""            # with tool_choice == "tool"
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False           # chat clients: stream_options.include_usage
    response_format: dict[str, Any] | None = None   # {"type": "json_object"} or
                                                    # {"type": "json_schema", "name", "schema", "strict"}
    reasoning_effort: str | None = None   # "minimal" | "low" | "medium" | "high" | ...
    thinking_budget: int | None = None    # Anthropic thinking budget_tokens, when given
    user: str | None = None
    # Flattened tool name -> (namespace, name) as the client declared it, so answers use its names.
    tool_namespaces: dict[str, tuple[str, str]] = field(default_factory=dict)
    unportable_tools: list[str] = field(default_factory=list)   # provider built-ins dropped, for the log


# ---- replies and usage ---------------------------------------------------------------------
@dataclass(slots=True)
class Usage:
    input_tokens: int = 0        # uncached input only (Anthropic convention)
    output_tokens: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0           # part of output_tokens


# Neutral finish reasons: "stop", "length", "tool_calls", "content_filter", "stop_sequence",
# "refusal", "pause".
@dataclass(slots=True)
class Reply:
    id: str
    model: str
    parts: list[Part] = field(default_factory=list)   # Text, ToolCall, Thinking, Refusal
    finish: str = "stop"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)


# ---- stream events -------------------------------------------------------------------------
# Decoders guarantee: blocks are numbered 0, 1, 2 … one open at a time; BlockStart precedes its
# Deltas, BlockEnd closes it before the next BlockStart; Finish comes last, exactly once, unless a
# StreamFailure ends the stream instead.
@dataclass(slots=True)
class Start:
    id: str
    model: str
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class BlockStart:
    index: int
    part: Part                   # Text(""), Thinking(), ToolCall(id, name, "") or Refusal("")


@dataclass(slots=True)
class Delta:
    index: int
    text: str
    field: str = "text"          # "text" | "thinking" | "signature" | "arguments" | "refusal"


@dataclass(slots=True)
class BlockEnd:
    index: int


@dataclass(slots=True)
class Finish:
    reason: str
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None


@dataclass(slots=True)
class StreamFailure:
    error: GatewayError


Event = Union[Start, BlockStart, Delta, BlockEnd, Finish, StreamFailure]


@dataclass(slots=True)
class UpstreamProfile:
    """What a render_request needs to know about the provider it targets (built once at start)."""
    max_output_tokens: int | None = None       # provider's cap; client values are clamped to it
    default_max_tokens: int = 8192             # used when the wire requires it and the client omits it
    token_field: str = "max_tokens"            # chat: "max_tokens" or "max_completion_tokens"
    drop_schema_keys: frozenset[str] = frozenset()   # JSON-schema keys the provider rejects
    reasoning: bool = True                     # provider accepts reasoning_effort / thinking


ERROR_KINDS_BY_STATUS = {400: "invalid_request", 401: "authentication", 402: "permission", 403: "permission",
                         404: "not_found", 405: "invalid_request", 408: "timeout", 413: "too_large",
                         422: "invalid_request", 429: "rate_limit", 503: "overloaded", 504: "timeout",
                         529: "overloaded"}


def error_kind_for_status(status: int) -> str:
    """The neutral kind of an upstream's HTTP error status."""
    return ERROR_KINDS_BY_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request")


class _RandomHex:
    """Hex from os.urandom, read 6 KiB at a time: a syscall per id costs more than the rest of it."""

    __slots__ = ("_pool", "_used")

    def __init__(self) -> None:
        self._pool, self._used = b"", 0

    def take(self, size: int) -> str:
        if self._used + size > len(self._pool):
            self._pool, self._used = os.urandom(6144), 0
        self._used += size
        return self._pool[self._used - size:self._used].hex()


_random_hex = _RandomHex()


def new_id(prefix: str) -> str:
    """Random id with a wire's prefix (chatcmpl-, msg_, resp_, call_, toolu_ …); tests may patch it."""
    return prefix + _random_hex.take(12)


def reply_events(reply: Reply) -> list[Event]:
    """A whole Reply as the neutral stream it would have been (loopback, loop stops, tests)."""
    events: list[Event] = [Start(reply.id, reply.model, Usage(reply.usage.input_tokens, 0,
                                                                reply.usage.cache_read, reply.usage.cache_write))]
    for index, part in enumerate(reply.parts):
        if isinstance(part, Text):
            events += [BlockStart(index, Text("")), Delta(index, part.text)]
        elif isinstance(part, Refusal):
            events += [BlockStart(index, Refusal("")), Delta(index, part.text, "refusal")]
        elif isinstance(part, Thinking):
            events.append(BlockStart(index, Thinking(redacted=part.redacted, encrypted=part.encrypted)))
            if part.text:
                events.append(Delta(index, part.text, "thinking"))
            if part.signature:
                events.append(Delta(index, part.signature, "signature"))
        elif isinstance(part, ToolCall):
            events += [BlockStart(index, ToolCall(part.id, part.name, "", part.custom)),
                       Delta(index, part.arguments, "arguments")]
        events.append(BlockEnd(index))
    events.append(Finish(reply.finish, reply.usage, reply.stop_sequence))
    return events


class ReplyCollector:
    """Folds a neutral stream back into a Reply (stored responses, non-stream clients of a stream)."""

    def __init__(self) -> None:
        self.reply = Reply("", "")
        self.failure: GatewayError | None = None
        self.done = False

    def feed(self, event: Event) -> None:
        reply = self.reply
        if isinstance(event, Delta):
            part = reply.parts[-1]
            if event.field == "arguments":
                part.arguments += event.text
            elif event.field == "thinking":
                part.text += event.text
            elif event.field == "signature":
                part.signature += event.text
            else:
                part.text += event.text
        elif isinstance(event, BlockStart):
            reply.parts.append(replace(event.part))     # a copy: deltas must not change the event
        elif isinstance(event, Start):
            reply.id, reply.model, reply.usage = event.id, event.model, event.usage
        elif isinstance(event, Finish):
            reply.finish, reply.stop_sequence, self.done = event.reason, event.stop_sequence, True
            reply.usage = event.usage
        elif isinstance(event, StreamFailure):
            self.failure = event.error


_SCHEMA_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_SCHEMA_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})


def strip_schema(node: Any, drop: frozenset[str]) -> Any:
    """A JSON schema without the keywords in drop (those a provider rejects). Property names and
    literal values (enum, default …) are data, not keywords, so they are never stripped."""
    if not drop:
        return node
    if isinstance(node, list):
        return [strip_schema(item, drop) for item in node]
    if not isinstance(node, dict):
        return node
    stripped: dict[str, Any] = {}
    for key, value in node.items():
        if key in drop:
            continue
        if key in _SCHEMA_DATA_KEYS:
            stripped[key] = value
        elif key in _SCHEMA_NAME_MAPS and isinstance(value, dict):
            stripped[key] = {name: strip_schema(sub, drop) for name, sub in value.items()}
        else:
            stripped[key] = strip_schema(value, drop)
    return stripped


# ---- custom (freeform) tools on wires that only have functions ---------------------------------
# Chat and Messages providers get a Responses custom tool as a function taking one string, and its
# calls come back as {"input": "<raw text>"}; CustomToolUnbridge turns them back into custom calls.
CUSTOM_TOOL_INPUT = "input"
CUSTOM_TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {CUSTOM_TOOL_INPUT: {"type": "string"}},
    "required": [CUSTOM_TOOL_INPUT],
}


def bridge_custom_input(text: str) -> str:
    """A custom tool's raw input as the JSON arguments of its bridging function."""
    return compact_json({CUSTOM_TOOL_INPUT: text})


def unbridge_custom_input(arguments: str) -> str:
    """The raw input inside a bridging function's arguments (the arguments themselves if not bridged)."""
    try:
        value = json_loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_TOOL_INPUT), str):
        return value[CUSTOM_TOOL_INPUT]
    return arguments


class CustomToolUnbridge:
    """A stream filter: calls of the named custom tools become custom calls with their raw input.
    The arguments are held until the call ends, since a JSON string cannot be unescaped piecewise."""

    def __init__(self, names: set[str]):
        self.names = names
        self.held: dict[int, list[str]] = {}

    def feed(self, event: Event) -> list[Event]:
        if isinstance(event, BlockStart) and isinstance(event.part, ToolCall) and event.part.name in self.names:
            self.held[event.index] = []
            return [BlockStart(event.index, ToolCall(event.part.id, event.part.name, "", custom=True))]
        if isinstance(event, Delta) and event.index in self.held:
            self.held[event.index].append(event.text)
            return []
        if isinstance(event, BlockEnd) and event.index in self.held:
            raw = unbridge_custom_input("".join(self.held.pop(event.index)))
            return [Delta(event.index, raw, "arguments"), event]
        return [event]

    def reply(self, reply: Reply) -> Reply:
        for part in reply.parts:
            if isinstance(part, ToolCall) and part.name in self.names and not part.custom:
                part.custom, part.arguments = True, unbridge_custom_input(part.arguments)
        return reply


# ---- reading client bodies ---------------------------------------------------------------------
# A malformed body is the client's error, answered with a 400 that names the field; never a traceback.
JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
                   list: "an array", dict: "an object"}


def invalid_request(param: str | None, message: str) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def json_type_matches(value: Any, kind: type) -> bool:
    """JSON's types, not Python's: true is not an integer, and an integer is a number."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def request_field(obj: dict, key: str, kind: type, param: str, required: bool = False) -> Any:
    """obj[key] of JSON type kind (None when absent or null), or a 400 in OpenAI's words naming param."""
    value = obj.get(key)
    if value is None:
        if required:
            raise invalid_request(param, f"Missing required parameter: '{param}'.")
        return None
    if not json_type_matches(value, kind):
        raise invalid_request(param, f"Invalid type for '{param}': expected {JSON_TYPE_NAMES[kind]}.")
    return float(value) if kind is float else value


# ---- the local token estimate (count_tokens, input_tokens) -----------------------------------
_ESTIMATE_IMAGE_TOKENS = 1600       # Anthropic's cost of a ~1.15 megapixel image, the size most are scaled to
_ESTIMATE_MESSAGE_TOKENS = 4        # role and block framing per message
_ESTIMATE_TOOL_TOKENS = 8           # framing per tool definition
_ESTIMATE_TOOL_PROMPT_TOKENS = 346  # the tool-use system prompt Anthropic adds when tools are given (Claude 4)


def estimate_tokens(conv: Conversation) -> int:
    """A local estimate of a Conversation's input tokens (count_tokens, Responses input_tokens).

    Method: all text (system, message parts, tool call names and arguments, tool results, thinking,
    tool names, descriptions and compact JSON schemas) is joined and measured once. Characters of
    3 UTF-8 bytes (CJK, kana, hangul, Indic scripts) count ~1 token each, 2-byte ones (Cyrillic, Greek,
    accented Latin) ~0.6, ASCII ~3.5 characters per token (Claude's tokenizer on English and code). The
    wide count comes from the UTF-8 length, so the measure is two C-speed passes, no per-character loop.
    Each image adds a flat 1,600, each message 4, each tool 8, and any tools at all Anthropic's
    346-token tool prompt.
    Expected error: within ~±25% for English prose and code; dense JSON and 2-byte scripts can be off
    by more; an image's real cost depends on its size (a small one costs far less).
    """
    texts = list(conv.system)
    fixed = 0
    for message in conv.messages:
        fixed += _ESTIMATE_MESSAGE_TOKENS
        for part in message.parts:
            if isinstance(part, (Text, Refusal, Thinking)):
                texts.append(part.text)
            elif isinstance(part, ToolCall):
                texts += (part.name, part.arguments)
            elif isinstance(part, Image):
                fixed += _ESTIMATE_IMAGE_TOKENS
            else:
                for item in part.content:
                    if isinstance(item, Text):
                        texts.append(item.text)
                    else:
                        fixed += _ESTIMATE_IMAGE_TOKENS
    if conv.tools:
        fixed += _ESTIMATE_TOOL_PROMPT_TOKENS + _ESTIMATE_TOOL_TOKENS * len(conv.tools)
        for tool in conv.tools:
            schema = compact_json(tool.parameters)
            texts += (tool.name, tool.description, schema)
    text = "\n".join(texts)
    chars = len(text)
    wide = (len(text.encode("utf-8", "surrogatepass")) - chars) // 2    # a 3-byte char adds 2 bytes
    return fixed + wide + (chars - wide) * 2 // 7


# ---- OpenAI Chat Completions wire (`chat`) -----------------------------------------------------
# Chat content is one string on many providers, so neutral parts of one kind are joined with this.
_CHAT_PART_SEPARATOR = "\n\n"


def _chat_string(obj: dict, key: str) -> str:
    """obj[key] when it is a string, else "" (for upstream bodies, which are read leniently)."""
    value = obj.get(key)
    return value if isinstance(value, str) else ""


# ---- request validation ----------------------------------------------------------------------
def _chat_positive_int(obj: dict, key: str) -> int | None:
    value = request_field(obj, key, int, key)
    if value is not None and value < 1:
        raise invalid_request(key, f"{key} must be at least 1")
    return value


# ---- request parsing -------------------------------------------------------------------------
_CHAT_TEXT_PARTS = frozenset({"text"})
_CHAT_USER_PARTS = frozenset({"text", "image_url"})
_CHAT_ASSISTANT_PARTS = frozenset({"text", "refusal"})


def _chat_parse_image(item: dict, where: str) -> Image:
    image = request_field(item, "image_url", dict, f"{where}.image_url", required=True)
    url = request_field(image, "url", str, f"{where}.image_url.url", required=True)
    if not url.startswith("data:"):
        return Image(url=url)
    header, comma, data = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid_request(f"{where}.image_url.url",
                              f"{where}.image_url.url must be an http(s) URL or a base64 data URL")
    return Image(data=data, media_type=header.removesuffix(";base64"))


def _chat_parse_content(content: Any, param: str, allowed: frozenset[str]) -> list[Part]:
    """A message's content (a string or an array of parts) as neutral parts; empty text is dropped."""
    if isinstance(content, str):
        return [Text(content)] if content else []
    if not isinstance(content, list):
        raise invalid_request(param, f"{param} must be a string or an array of content parts")
    parts: list[Part] = []
    for i, item in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(where, f"Invalid type for '{where}': expected an object.")
        kind = item.get("type")
        if kind not in allowed:
            raise invalid_request(f"{where}.type", f"{where}.type {kind!r} is not supported here "
                                  f"(expected one of: {', '.join(sorted(allowed))})")
        if kind == "text":
            text = request_field(item, "text", str, f"{where}.text", required=True)
            if text:
                parts.append(Text(text))
        elif kind == "refusal":
            parts.append(Refusal(request_field(item, "refusal", str, f"{where}.refusal", required=True)))
        else:
            parts.append(_chat_parse_image(item, where))
    return parts


def _chat_parse_tool_call(entry: Any, param: str) -> ToolCall:
    if not isinstance(entry, dict):
        raise invalid_request(param, f"Invalid type for '{param}': expected an object.")
    call_id = request_field(entry, "id", str, f"{param}.id", required=True)
    if entry.get("type") == "custom":
        custom = request_field(entry, "custom", dict, f"{param}.custom", required=True)
        return ToolCall(call_id, request_field(custom, "name", str, f"{param}.custom.name", required=True),
                        request_field(custom, "input", str, f"{param}.custom.input") or "", custom=True)
    function = request_field(entry, "function", dict, f"{param}.function", required=True)
    return ToolCall(call_id, request_field(function, "name", str, f"{param}.function.name", required=True),
                    request_field(function, "arguments", str, f"{param}.function.arguments") or "")


def _chat_assistant_parts(message: dict, param: str) -> list[Part]:
    """An assistant message (request history or upstream reply): thinking, content, refusal, calls."""
    parts: list[Part] = []
    # DeepSeek and vLLM name it reasoning_content; OpenRouter and Ollama name it reasoning.
    reasoning = (request_field(message, "reasoning_content", str, f"{param}.reasoning_content")
                 or request_field(message, "reasoning", str, f"{param}.reasoning"))
    if reasoning:
        parts.append(Thinking(reasoning))
    content = message.get("content")
    if content is not None:
        parts += _chat_parse_content(content, f"{param}.content", _CHAT_ASSISTANT_PARTS)
    refusal = request_field(message, "refusal", str, f"{param}.refusal")
    if refusal:
        parts.append(Refusal(refusal))
    calls = request_field(message, "tool_calls", list, f"{param}.tool_calls") or []
    parts += [_chat_parse_tool_call(entry, f"{param}.tool_calls[{i}]") for i, entry in enumerate(calls)]
    return parts


def _chat_add_user_parts(messages: list[Message], parts: list[Part]) -> None:
    """Appends user-side parts, joining the user turn opened by the tool results just before them."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "user" and last.parts and isinstance(last.parts[-1], ToolResult):
        last.parts += parts
    else:
        messages.append(Message("user", parts))


def _chat_parse_messages(raw: list) -> tuple[list[str], list[Message]]:
    system: list[str] = []
    messages: list[Message] = []
    custom_call_ids: set[str] = set()   # so answers to custom calls keep their kind
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid_request(param, f"Invalid type for '{param}': expected an object.")
        role = request_field(message, "role", str, f"{param}.role", required=True)
        content = message.get("content")
        if role == "assistant":
            parts = _chat_assistant_parts(message, param)
            custom_call_ids.update(p.id for p in parts if isinstance(p, ToolCall) and p.custom)
            messages.append(Message("assistant", parts))
            continue
        if role == "function":   # legacy function-calling turn: not carried
            continue
        if role not in ("system", "developer", "user", "tool"):
            raise invalid_request(f"{param}.role",
                                  f"{param}.role {role!r} is not one of system, developer, user, assistant, tool")
        if content is None:
            raise invalid_request(f"{param}.content", f"Missing required parameter: '{param}.content'.")
        if role == "user":
            _chat_add_user_parts(messages, _chat_parse_content(content, f"{param}.content", _CHAT_USER_PARTS))
            continue
        parts = _chat_parse_content(content, f"{param}.content", _CHAT_TEXT_PARTS)
        if role == "tool":
            call_id = request_field(message, "tool_call_id", str, f"{param}.tool_call_id", required=True)
            _chat_add_user_parts(messages, [ToolResult(call_id, parts, custom=call_id in custom_call_ids)])
        else:
            system += [part.text for part in parts]
    return system, messages


def _chat_parse_tool(raw: Any, param: str) -> Tool:
    if not isinstance(raw, dict):
        raise invalid_request(param, f"Invalid type for '{param}': expected an object.")
    kind = raw.get("type")
    if kind not in ("function", "custom"):
        raise invalid_request(f"{param}.type", f"{param}.type must be 'function' or 'custom'")
    spec = request_field(raw, kind, dict, f"{param}.{kind}", required=True)
    tool = Tool(request_field(spec, "name", str, f"{param}.{kind}.name", required=True),
                request_field(spec, "description", str, f"{param}.{kind}.description") or "")
    if kind == "custom":
        tool.custom = True
        tool.format = request_field(spec, "format", dict, f"{param}.custom.format")
    else:
        parameters = request_field(spec, "parameters", dict, f"{param}.function.parameters")
        if parameters is not None:
            tool.parameters = parameters
    return tool


def _chat_parse_tool_choice(value: Any) -> tuple[str | None, str]:
    """tool_choice as the neutral (tool_choice, tool_choice_name) pair."""
    if value is None:
        return None, ""
    if value in ("auto", "none", "required"):
        return value, ""
    if isinstance(value, dict) and value.get("type") in ("function", "custom"):
        target = value.get(value["type"])
        if isinstance(target, dict) and isinstance(target.get("name"), str):
            return "tool", target["name"]
    raise invalid_request("tool_choice", 'tool_choice must be "auto", "none", "required" or '
                   '{"type": "function", "function": {"name": ...}}')


def _chat_parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise invalid_request("stop", "stop must be a string or an array of strings")


def _chat_parse_response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = request_field(value, "json_schema", dict, "response_format.json_schema", required=True)
        return {"type": "json_schema",
                "name": request_field(spec, "name", str, "response_format.json_schema.name", required=True),
                "schema": request_field(spec, "schema", dict, "response_format.json_schema.schema") or {},
                "strict": bool(request_field(spec, "strict", bool, "response_format.json_schema.strict"))}
    raise invalid_request("response_format.type",
                          "response_format.type must be 'text', 'json_object' or 'json_schema'")


def chat_parse_request(body: dict) -> Conversation:
    """A client's /v1/chat/completions body as a neutral Conversation (400 GatewayError if malformed)."""
    if not isinstance(body, dict):
        raise invalid_request(None, "request body must be a JSON object")
    model = request_field(body, "model", str, "model", required=True)
    raw_messages = request_field(body, "messages", list, "messages", required=True)
    if not raw_messages:
        raise invalid_request("messages", "messages must be a non-empty array")
    system, messages = _chat_parse_messages(raw_messages)
    tools = request_field(body, "tools", list, "tools") or []
    tool_choice, tool_choice_name = _chat_parse_tool_choice(body.get("tool_choice"))
    max_completion_tokens = _chat_positive_int(body, "max_completion_tokens")
    stream_options = request_field(body, "stream_options", dict, "stream_options") or {}
    return Conversation(
        model=model,
        messages=messages,
        system=system,
        tools=[_chat_parse_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)],
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=request_field(body, "parallel_tool_calls", bool, "parallel_tool_calls"),
        max_tokens=max_completion_tokens if max_completion_tokens is not None
        else _chat_positive_int(body, "max_tokens"),
        temperature=request_field(body, "temperature", float, "temperature"),
        top_p=request_field(body, "top_p", float, "top_p"),
        stop=_chat_parse_stop(body.get("stop")),
        stream=bool(request_field(body, "stream", bool, "stream")),
        include_usage=bool(request_field(stream_options, "include_usage", bool, "stream_options.include_usage")),
        response_format=_chat_parse_response_format(body.get("response_format")),
        reasoning_effort=request_field(body, "reasoning_effort", str, "reasoning_effort"),
        user=request_field(body, "user", str, "user"),
    )


# ---- request rendering -----------------------------------------------------------------------
def _chat_render_tool(tool: Tool, drop: frozenset[str]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = strip_schema(CUSTOM_TOOL_PARAMETERS if tool.custom else tool.parameters, drop)
    return {"type": "function", "function": function}


def _chat_render_tool_choice(conv: Conversation) -> str | dict[str, Any]:
    if conv.tool_choice == "tool":
        return {"type": "function", "function": {"name": conv.tool_choice_name}}
    return conv.tool_choice


def _chat_join_text(parts: list) -> str:
    return _CHAT_PART_SEPARATOR.join(part.text for part in parts if isinstance(part, Text))


def _chat_image_url(image: Image) -> str:
    return image.url or f"data:{image.media_type};base64,{image.data}"


def _chat_render_user_content(parts: list[Part]) -> str | list[dict[str, Any]]:
    """One string when the turn is text only (what every provider accepts), else content parts."""
    if not any(isinstance(part, Image) for part in parts):
        return _chat_join_text(parts)
    return [{"type": "image_url", "image_url": {"url": _chat_image_url(part)}} if isinstance(part, Image)
            else {"type": "text", "text": part.text}
            for part in parts if isinstance(part, (Text, Image))]


def _chat_render_user_turn(parts: list[Part]) -> list[dict[str, Any]]:
    """A neutral user turn: its tool results first as role:"tool" messages (chat requires them right
    after the calling assistant turn), then one user message with the images the tools returned
    (a tool message holds only text) followed by the user's own content."""
    messages: list[dict[str, Any]] = []
    content: list[Part] = []
    own: list[Part] = []
    for part in parts:
        if isinstance(part, ToolResult):
            messages.append({"role": "tool", "tool_call_id": part.call_id,
                             "content": _chat_join_text(part.content)})
            content += [item for item in part.content if isinstance(item, Image)]
        else:
            own.append(part)
    content += own
    if content or not messages:
        messages.append({"role": "user", "content": _chat_render_user_content(content)})
    return messages


def _chat_split_assistant(parts: list[Part]) -> tuple[str, str, str, list[ToolCall]]:
    """An assistant turn's (text, refusal, thinking text, tool calls); chat keeps each kind apart."""
    texts, refusals, thoughts, calls = [], [], [], []
    for part in parts:
        if isinstance(part, Text):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            refusals.append(part.text)
        elif isinstance(part, Thinking):
            if part.text:
                thoughts.append(part.text)
        elif isinstance(part, ToolCall):
            calls.append(part)
    join = _CHAT_PART_SEPARATOR.join
    return join(texts), join(refusals), join(thoughts), calls


def _chat_render_tool_call(call: ToolCall, bridge_custom: bool) -> dict[str, Any]:
    """A tool call on the chat wire: custom calls either bridged to a function (upstreams) or in
    chat's own custom shape (clients that declared custom tools)."""
    if call.custom and not bridge_custom:
        return {"id": call.id, "type": "custom", "custom": {"name": call.name, "input": call.arguments}}
    arguments = bridge_custom_input(call.arguments) if call.custom else call.arguments or "{}"
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _chat_render_assistant(parts: list[Part]) -> dict[str, Any]:
    """An assistant turn sent upstream; thinking is dropped since chat providers do not take it back."""
    text, refusal, _, calls = _chat_split_assistant(parts)
    # content may be null only beside tool calls
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if refusal:
        message["refusal"] = refusal
    if calls:
        message["tool_calls"] = [_chat_render_tool_call(call, bridge_custom=True) for call in calls]
    return message


def _chat_render_response_format(response_format: dict[str, Any], drop: frozenset[str]) -> dict[str, Any]:
    if response_format["type"] != "json_schema":
        return {"type": response_format["type"]}
    return {"type": "json_schema",
            "json_schema": {"name": response_format["name"],
                            "schema": strip_schema(response_format["schema"], drop),
                            "strict": response_format["strict"]}}


def chat_render_request(conv: Conversation, profile: UpstreamProfile) -> dict[str, Any]:
    """A neutral Conversation as a /v1/chat/completions body for a chat provider."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": _CHAT_PART_SEPARATOR.join(conv.system)})
    for message in conv.messages:
        if message.role == "assistant":
            messages.append(_chat_render_assistant(message.parts))
        else:
            messages += _chat_render_user_turn(message.parts)
    body: dict[str, Any] = {"model": conv.model, "messages": messages}
    if conv.tools:   # OpenAI rejects tool_choice and parallel_tool_calls without tools
        body["tools"] = [_chat_render_tool(tool, profile.drop_schema_keys) for tool in conv.tools]
        if conv.tool_choice:
            body["tool_choice"] = _chat_render_tool_choice(conv)
        if conv.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = conv.parallel_tool_calls
    if conv.max_tokens is not None:
        cap = profile.max_output_tokens
        body[profile.token_field] = min(conv.max_tokens, cap) if cap else conv.max_tokens
    if conv.temperature is not None:
        body["temperature"] = conv.temperature
    if conv.top_p is not None:
        body["top_p"] = conv.top_p
    if conv.stop:
        body["stop"] = conv.stop
    if conv.response_format:
        body["response_format"] = _chat_render_response_format(conv.response_format, profile.drop_schema_keys)
    if conv.reasoning_effort and profile.reasoning:
        body["reasoning_effort"] = conv.reasoning_effort
    if conv.user is not None:
        body["user"] = conv.user
    if conv.stream:
        # Always ask for usage: the gateway meters it; the client encoder drops it if unwanted.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# ---- usage and finish reasons ----------------------------------------------------------------
def _chat_count(obj: Any, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def chat_parse_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI usage (prompt_tokens include cached ones) as neutral Usage (input excludes them)."""
    # DeepSeek reports its cache hits as prompt_cache_hit_tokens
    cached = (_chat_count(usage.get("prompt_tokens_details"), "cached_tokens")
              or _chat_count(usage, "prompt_cache_hit_tokens"))
    return Usage(input_tokens=max(_chat_count(usage, "prompt_tokens") - cached, 0),
                 output_tokens=_chat_count(usage, "completion_tokens"),
                 cache_read=cached,
                 reasoning=_chat_count(usage.get("completion_tokens_details"), "reasoning_tokens"))


def _chat_render_usage(usage: Usage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cache_read + usage.cache_write
    return {"prompt_tokens": prompt,
            "completion_tokens": usage.output_tokens,
            "total_tokens": prompt + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning}}


_CHAT_NEUTRAL_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                   "function_call": "tool_calls", "content_filter": "content_filter"}
_CHAT_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                "content_filter": "content_filter", "refusal": "content_filter",
                "stop_sequence": "stop", "pause": "stop"}


def _chat_neutral_finish(reason: Any, has_tool_calls: bool) -> str:
    finish = _CHAT_NEUTRAL_FINISH.get(reason, "stop")
    # Some servers (Ollama, older vLLM) say "stop" after tool calls; clients only run tools on tool_calls.
    return "tool_calls" if finish == "stop" and has_tool_calls else finish


# ---- errors ----------------------------------------------------------------------------------
# OpenAI's own bodies: 401/403/404 come as invalid_request_error (401 with code invalid_api_key),
# 5xx and overload (503) as server_error.
_CHAT_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "permission": ("invalid_request_error", None),
    "not_found": ("invalid_request_error", None),
    "too_large": ("invalid_request_error", None),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "overloaded": ("server_error", None),
    "api_error": ("server_error", None),
    "timeout": ("server_error", None),
}
def chat_error_body(err: GatewayError) -> dict[str, Any]:
    error_type, default_code = _CHAT_ERROR_TYPES.get(err.kind, ("server_error", None))
    return {"error": {"message": err.message, "type": error_type, "param": err.param,
                      "code": err.code or default_code}}


def _chat_error_from_payload(payload: Any, raw: str, status: int | None = None) -> GatewayError:
    """An OpenAI-style error payload ({"error": {...}}, {"error": "text"} as Ollama sends, or a
    top-level message as vLLM sends) as a GatewayError; raw text stands in for a missing message.
    Without an HTTP status (an error inside a 200 body or stream) a numeric error code in the HTTP
    range gives it, else 502."""
    error = payload.get("error") if isinstance(payload, dict) else None
    details = error if isinstance(error, dict) else payload if isinstance(payload, dict) else {}
    code = details.get("code")
    if status is None:
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    message = details.get("message")
    if not isinstance(message, str) or not message:
        fallback = raw.strip()[:500] or f"upstream returned HTTP {status}"
        message = error if isinstance(error, str) and error else fallback
    param = details.get("param")
    return GatewayError(status, error_kind_for_status(status), message,
                        param=param if isinstance(param, str) else None,
                        code=code if isinstance(code, str) else None)


def chat_parse_error(status: int, body: bytes) -> GatewayError:
    """An upstream's non-2xx answer, JSON or not, as a GatewayError keeping its status and message."""
    raw = body.decode("utf-8", "replace")
    try:
        payload = json_loads(raw)
    except ValueError:
        payload = None
    return _chat_error_from_payload(payload, raw, status)


# ---- whole responses -------------------------------------------------------------------------
def chat_parse_response(body: dict) -> Reply:
    """An upstream chat.completion as a neutral Reply (502 GatewayError if it is malformed)."""
    if isinstance(body, dict) and body.get("error"):
        raise _chat_error_from_payload(body, "")
    try:
        if not isinstance(body, dict):
            raise invalid_request(None, "body must be a JSON object")
        choices = request_field(body, "choices", list, "choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = request_field(choice, "message", dict, "choices[0].message") or {}
        parts = _chat_assistant_parts(message, "choices[0].message")
    except GatewayError as err:
        raise GatewayError(502, "api_error", f"upstream sent an invalid chat completion: {err.message}") from None
    usage = body.get("usage")
    has_tool_calls = any(isinstance(part, ToolCall) for part in parts)
    return Reply(id=_chat_string(body, "id") or new_id("chatcmpl-"),
                 model=_chat_string(body, "model"),
                 parts=parts,
                 finish=_chat_neutral_finish(choice.get("finish_reason"), has_tool_calls),
                 usage=chat_parse_usage(usage) if isinstance(usage, dict) else Usage())


def chat_render_response(reply: Reply) -> dict[str, Any]:
    """A neutral Reply as the chat.completion object a client expects."""
    text, refusal, thinking, calls = _chat_split_assistant(reply.parts)
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": refusal or None}
    if calls:
        message["tool_calls"] = [_chat_render_tool_call(call, bridge_custom=False) for call in calls]
    if thinking:
        message["reasoning_content"] = thinking
    return {
        # an id from another wire (msg_, resp_) would look foreign to chat clients
        "id": reply.id if reply.id.startswith("chatcmpl-") else new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _CHAT_FINISH.get(reply.finish, "stop")}],
        "usage": _chat_render_usage(reply.usage),
    }


# ---- stream decoding (upstream chat chunks -> neutral events) -------------------------------
@dataclass(slots=True)
class _chat_ChatStreamedCall:
    """One upstream tool call (keyed by its OpenAI index) on its way into a neutral ToolCall block."""
    id: str
    name: str
    custom: bool
    chunks: list[str] = field(default_factory=list)   # argument text received so far
    closed: bool = False


def _chat_is_complete_json(text: str) -> bool:
    try:
        json_loads(text)
    except ValueError:
        return False
    return True


_CHAT_EMPTY_PARTS = {"text": lambda: Text(""), "thinking": Thinking, "refusal": lambda: Refusal("")}
_CHAT_EARLY_END = "upstream stream ended early"


class ChatStreamDecoder:
    """Chat completion chunks (upstream SSE) to neutral events.

    Tool calls stream live, one block at a time. Upstreams normally send calls one after another;
    a call that starts while the live call's arguments are not yet complete JSON means the upstream
    interleaves them, so that call is held back and emitted whole once the live block closes — no
    closed block is ever reopened. The sequential case costs one json.loads per call. Argument text
    for a call whose block has already closed (only a broken upstream sends it) is dropped.
    """

    def __init__(self) -> None:
        self._started = False
        self._ended = False                 # Finish or StreamFailure emitted
        self._blocks = 0                    # block indexes handed out; the open block is the last
        self._open: str | None = None       # Delta field of the open block
        self._calls: dict[int, _chat_ChatStreamedCall] = {}
        self._live: _chat_ChatStreamedCall | None = None    # the call whose block is open
        self._held: list[_chat_ChatStreamedCall] = []        # calls waiting for the live one to finish
        self._finish: str | None = None
        self._usage: Usage | None = None

    def feed(self, event: str | None, data: str) -> list[Event]:
        if self._ended:
            return []
        if data == "[DONE]":
            if not self._started:
                return self._fail(GatewayError(502, "api_error", _CHAT_EARLY_END))
            out: list[Event] = []
            self._end(out, self._finish or _chat_neutral_finish(None, bool(self._calls)))
            return out
        try:
            chunk = json_loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            return self._fail(GatewayError(502, "api_error", "upstream sent a stream chunk that is not JSON"))
        if event == "error" or chunk.get("error"):
            return self._fail(_chat_error_from_payload(chunk, data))
        out = []
        if not self._started:
            self._started = True
            out.append(Start(_chat_string(chunk, "id") or new_id("chatcmpl-"), _chat_string(chunk, "model")))
        choices = chunk.get("choices")
        if choices and isinstance(choices, list) and isinstance(choices[0], dict):
            self._choice(out, choices[0])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = chat_parse_usage(usage)
            if self._finish is not None:
                self._end(out, self._finish)
        return out

    def close(self) -> list[Event]:
        if self._ended:
            return []
        if self._finish is None:
            return self._fail(GatewayError(502, "api_error", _CHAT_EARLY_END))
        out: list[Event] = []
        self._end(out, self._finish)
        return out

    def _fail(self, error: GatewayError) -> list[Event]:
        self._ended = True
        return [StreamFailure(error)]

    def _choice(self, out: list[Event], choice: dict) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = _chat_string(delta, "reasoning_content") or _chat_string(delta, "reasoning")
            if reasoning:
                self._content(out, "thinking", reasoning)
            content = _chat_string(delta, "content")
            if content:
                self._content(out, "text", content)
            refusal = _chat_string(delta, "refusal")
            if refusal:
                self._content(out, "refusal", refusal)
            tool_calls = delta.get("tool_calls")
            if tool_calls and isinstance(tool_calls, list):
                for entry in tool_calls:
                    if isinstance(entry, dict):
                        self._tool_delta(out, entry)
        reason = choice.get("finish_reason")
        if reason:
            # remembered until usage is known; no more content follows, so close blocks now
            self._finish = _chat_neutral_finish(reason, bool(self._calls))
            self._close_all(out)

    def _open_block(self, out: list[Event], delta_field: str, part: Part) -> None:
        self._close_block(out)
        out.append(BlockStart(self._blocks, part))
        self._blocks += 1
        self._open = delta_field

    def _close_block(self, out: list[Event]) -> None:
        if self._open is None:
            return
        out.append(BlockEnd(self._blocks - 1))
        self._open = None
        if self._live is not None:
            self._live.closed = True
            self._live = None

    def _close_all(self, out: list[Event]) -> None:
        """Closes the open block, then emits the held-back calls whole, in arrival order."""
        self._close_block(out)
        for call in self._held:
            self._go_live(out, call)
            self._close_block(out)
        self._held.clear()

    def _content(self, out: list[Event], delta_field: str, text: str) -> None:
        if self._open != delta_field:
            self._close_all(out)
            self._open_block(out, delta_field, _CHAT_EMPTY_PARTS[delta_field]())
        out.append(Delta(self._blocks - 1, text, delta_field))

    def _go_live(self, out: list[Event], call: _chat_ChatStreamedCall) -> None:
        self._open_block(out, "arguments", ToolCall(call.id, call.name, "", call.custom))
        self._live = call
        if call.chunks:
            out.append(Delta(self._blocks - 1, "".join(call.chunks), "arguments"))

    def _tool_delta(self, out: list[Event], entry: dict) -> None:
        # custom calls come in chat's own custom shape ({"custom": {name, input}}), as the encoder writes them
        custom = not isinstance(entry.get("function"), dict) and isinstance(entry.get("custom"), dict)
        spec = entry["custom"] if custom else entry.get("function") or {}
        text = _chat_string(spec, "input" if custom else "arguments")
        index = entry.get("index")
        index = index if isinstance(index, int) else 0
        call_id = _chat_string(entry, "id")
        call = self._calls.get(index)
        # some servers omit or reuse index and send each call whole: a new id is a new call
        if call is None or call_id and call_id != call.id:
            call = _chat_ChatStreamedCall(call_id or new_id("call_"), _chat_string(spec, "name"), custom)
            self._calls[index] = call
        elif call is self._live:
            if text:
                call.chunks.append(text)
                out.append(Delta(self._blocks - 1, text, "arguments"))
            return
        elif call.closed:
            return
        if text:
            call.chunks.append(text)
        live = self._live
        if live is not None and not _chat_is_complete_json("".join(live.chunks)):
            if call not in self._held:
                self._held.append(call)
            return
        if call in self._held:
            self._held.remove(call)
        self._go_live(out, call)   # calls are held only beside a live call, so closing it loses none

    def _end(self, out: list[Event], reason: str) -> None:
        self._close_all(out)
        out.append(Finish(reason, self._usage or Usage()))
        self._ended = True


# ---- stream encoding (neutral events -> client chat chunks) ---------------------------------
_CHAT_DELTA_KEYS = {"text": '{"content":', "thinking": '{"reasoning_content":', "refusal": '{"refusal":'}


class ChatStreamEncoder:
    """Neutral events to the chat.completion.chunk SSE stream a client reads.

    Each chunk's constant JSON around the delta is built once, so a delta costs one string build.
    """

    def __init__(self, model: str, include_usage: bool, id: str | None = None, created: int | None = None):
        head = compact_json({"id": id or new_id("chatcmpl-"), "object": "chat.completion.chunk",
                              "created": int(time.time()) if created is None else created, "model": model})
        self._head = head[:-1]                                   # the object still open for "choices"
        self._prefix = self._head + ',"choices":[{"index":0,"delta":'
        # with include_usage the real API gives every chunk "usage": null until the usage chunk
        self._usage_tail = ',"usage":null}' if include_usage else "}"
        self._suffix = ',"logprobs":null,"finish_reason":null}]' + self._usage_tail
        self._include_usage = include_usage
        self._tool_calls = 0
        self._arguments_key = ""            # delta JSON opening for the open tool call's arguments
        self._done = False

    def _chunk(self, delta: str) -> bytes:
        return sse_event(None, self._prefix + delta + self._suffix)

    def feed(self, event: Event) -> bytes:
        if self._done:
            return b""
        if isinstance(event, Delta):
            if not event.text or event.field == "signature":
                return b""
            text = unicode_json(event.text)
            if event.field == "arguments":
                return self._chunk(self._arguments_key + text + "}}]}")
            return self._chunk(_CHAT_DELTA_KEYS[event.field] + text + "}")
        if isinstance(event, BlockStart):
            return self._tool_start(event.part) if isinstance(event.part, ToolCall) else b""
        if isinstance(event, Start):
            return self._chunk('{"role":"assistant","content":""}')
        if isinstance(event, Finish):
            self._done = True
            reason = _CHAT_FINISH.get(event.reason, "stop")
            out = sse_event(None, f'{self._prefix}{{}},"logprobs":null,"finish_reason":"{reason}"}}]'
                                  f'{self._usage_tail}')
            if self._include_usage:
                usage = compact_json(_chat_render_usage(event.usage))
                out += sse_event(None, f'{self._head},"choices":[],"usage":{usage}}}')
            return out + sse_event(None, "[DONE]")
        if isinstance(event, StreamFailure):
            self._done = True
            return sse_event(None, chat_error_body(event.error))
        return b""   # BlockEnd: chat has no block boundaries

    def _tool_start(self, call: ToolCall) -> bytes:
        index = self._tool_calls
        self._tool_calls += 1
        kind, key = ("custom", "input") if call.custom else ("function", "arguments")
        self._arguments_key = f'{{"tool_calls":[{{"index":{index},"{kind}":{{"{key}":'
        first = {"index": index, "id": call.id, "type": kind, kind: {"name": call.name, key: ""}}
        return self._chunk(f'{{"tool_calls":[{compact_json(first)}]}}')
# ---- errors ----------------------------------------------------------------------------------
# ---- Anthropic Messages wire (`messages`) ------------------------------------------------------

# (neutral kind, Anthropic error type, HTTP status). billing_error comes before permission_error so
# that rendering a "permission" error picks permission_error (the later row wins in the dict below).
_MSG_ERRORS = (
    ("invalid_request", "invalid_request_error", 400),
    ("authentication", "authentication_error", 401),
    ("permission", "billing_error", 402),
    ("permission", "permission_error", 403),
    ("not_found", "not_found_error", 404),
    ("too_large", "request_too_large", 413),
    ("rate_limit", "rate_limit_error", 429),
    ("api_error", "api_error", 500),
    ("timeout", "timeout_error", 504),
    ("overloaded", "overloaded_error", 529),
)
_MSG_ERROR_TYPE_BY_KIND = {kind: error_type for kind, error_type, _ in _MSG_ERRORS}
_MSG_ERROR_BY_TYPE = {error_type: (kind, status) for kind, error_type, status in _MSG_ERRORS}


def messages_error_body(err: GatewayError) -> dict:
    """The error object Anthropic clients expect (the HTTP status is err.status)."""
    return {"type": "error", "error": {"type": _MSG_ERROR_TYPE_BY_KIND.get(err.kind, "api_error"),
                                       "message": err.message}}


def messages_parse_error(status: int, body: bytes) -> GatewayError:
    """An Anthropic error response (or whatever a compatible server sent) as a GatewayError."""
    try:
        payload = json_loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    kind, message = error_kind_for_status(status), None
    if isinstance(error, dict):
        kind = _MSG_ERROR_BY_TYPE.get(error.get("type"), (kind, status))[0]
        message = error.get("message")
    elif isinstance(error, str):
        message = error
    if not isinstance(message, str) or not message:
        message = body.decode(errors="replace")[:500] or f"upstream returned HTTP {status}"
    return GatewayError(status, kind, message)


# ---- request parsing -------------------------------------------------------------------------
def _msg_invalid(param: str, problem: str) -> GatewayError:
    return invalid_request(param, f"{param}: {problem}")     # Anthropic's way of naming the field


def _msg_get(obj: dict, key: str, kind: type, where: str = "") -> Any:
    """obj[key] if it has the expected JSON type, None if absent or null; raises a 400 otherwise."""
    value = obj.get(key)
    if value is None or json_type_matches(value, kind):
        return value
    param = f"{where}.{key}" if where else key
    raise _msg_invalid(param, f"expected {JSON_TYPE_NAMES[kind]}")


def _msg_need(obj: dict, key: str, kind: Any, where: str = "") -> Any:
    value = _msg_get(obj, key, kind, where)
    if value is None:
        raise _msg_invalid(f"{where}.{key}" if where else key, "field required")
    return value


def _msg_omitted(what: str) -> Text:
    return Text(f"[{what} omitted: it cannot be forwarded to this model]")


# Claude Code prefixes its system prompt with a billing-attribution line whose hash changes between
# requests; it means nothing to other providers and, first in the prompt, would defeat their prefix caching.
_MSG_BILLING_HEADER = "x-anthropic-billing-header:"


def _msg_system_texts(value: Any, where: str) -> list[str]:
    """A system prompt given as a string or as text blocks, one entry per non-empty block."""
    if value is None:
        return []
    if isinstance(value, str):
        blocks: list = [{"type": "text", "text": value}]
    elif isinstance(value, list):
        blocks = value
    else:
        raise _msg_invalid(where, "expected a string or an array of text blocks")
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _msg_invalid(f"{where}.{i}", "expected a text block")
        text = _msg_need(block, "text", str, f"{where}.{i}")
        if text and not text.startswith(_MSG_BILLING_HEADER):
            texts.append(text)
    return texts


def _msg_image_part(block: dict, where: str) -> Part:
    source = _msg_need(block, "source", dict, where)
    where += ".source"
    kind = _msg_get(source, "type", str, where)
    if kind == "base64":
        return Image(data=_msg_need(source, "data", str, where),
                     media_type=_msg_get(source, "media_type", str, where) or "")
    if kind == "url":
        return Image(url=_msg_need(source, "url", str, where))
    return _msg_omitted(f"an image given as a {kind} source")


def _msg_document_part(block: dict, where: str) -> Text:
    source = _msg_need(block, "source", dict, where)
    if source.get("type") == "text":
        return Text(_msg_need(source, "data", str, where + ".source"))
    title = block.get("title")
    label = source.get("media_type") or source.get("type") or "unknown"
    titled = f" titled {title!r}" if isinstance(title, str) and title else ""
    return _msg_omitted(f"a {label} document{titled}")


def _msg_tool_result_content(value: Any, where: str) -> list[Text | Image]:
    if value is None:
        return []
    if isinstance(value, str):
        return [Text(value)] if value else []
    if not isinstance(value, list):
        raise _msg_invalid(where, "expected a string or an array of content blocks")
    parts = []
    for i, block in enumerate(value):
        part = _msg_parse_block(block, f"{where}.{i}")
        if not isinstance(part, (Text, Image)):
            raise _msg_invalid(f"{where}.{i}", "tool_result content takes only text, image and document blocks")
        parts.append(part)
    return parts


# Blocks of tools the provider ran itself (server tools are skipped, so are their traces in history).
_MSG_SERVER_BLOCKS = frozenset({"server_tool_use", "mcp_tool_use"})


def _msg_parse_block(block: Any, where: str) -> Part | None:
    """One content block as a neutral part; None for a server-tool block, which is not portable."""
    if not isinstance(block, dict):
        raise _msg_invalid(where, "expected a content block object")
    kind = _msg_need(block, "type", str, where)
    if kind == "text":
        return Text(_msg_need(block, "text", str, where))
    if kind == "tool_use":
        arguments = _msg_get(block, "input", dict, where) or {}
        return ToolCall(_msg_need(block, "id", str, where), _msg_need(block, "name", str, where),
                        compact_json(arguments))
    if kind == "tool_result":
        return ToolResult(_msg_need(block, "tool_use_id", str, where),
                          _msg_tool_result_content(block.get("content"), where + ".content"),
                          bool(_msg_get(block, "is_error", bool, where)))
    if kind == "image":
        return _msg_image_part(block, where)
    if kind == "thinking":
        return Thinking(_msg_get(block, "thinking", str, where) or "",
                        _msg_get(block, "signature", str, where) or "")
    if kind == "redacted_thinking":
        return Thinking(redacted=_msg_need(block, "data", str, where))
    if kind == "document":
        return _msg_document_part(block, where)
    if kind in _MSG_SERVER_BLOCKS or kind.endswith("_tool_result"):
        return None
    raise _msg_invalid(where + ".type", f"unsupported content block type {kind!r}")


def _msg_parse_content(value: Any, where: str) -> list[Part]:
    if isinstance(value, str):
        return [Text(value)] if value else []
    if not isinstance(value, list):
        raise _msg_invalid(where, "expected a string or an array of content blocks")
    parts = []
    for i, block in enumerate(value):
        part = _msg_parse_block(block, f"{where}.{i}")
        if part is not None:
            parts.append(part)
    return parts


def _msg_is_server_tool(tool: dict) -> bool:
    """Anthropic-defined tools (web_search_20250305, bash_20250124 …) carry a versioned type and no schema."""
    return tool.get("type") not in (None, "custom")


_MSG_TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}
_MSG_EFFORT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}


def _msg_effort_for_budget(budget: int) -> str:
    """The effort whose budget (as rendered) is the largest not above this one."""
    if budget >= _MSG_EFFORT_BUDGETS["high"]:
        return "high"
    return "medium" if budget >= _MSG_EFFORT_BUDGETS["medium"] else "low"


def _msg_parse_tools(body: dict, conv: Conversation) -> None:
    for i, tool in enumerate(_msg_get(body, "tools", list) or []):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _msg_invalid(where, "expected an object")
        if _msg_is_server_tool(tool):
            conv.unportable_tools.append(str(tool.get("name") or tool.get("type")))
            continue
        schema = _msg_get(tool, "input_schema", dict, where) or {"type": "object", "properties": {}}
        conv.tools.append(Tool(_msg_need(tool, "name", str, where),
                               _msg_get(tool, "description", str, where) or "", schema))
    choice = _msg_get(body, "tool_choice", dict)
    if choice is not None:
        choice_type = _msg_need(choice, "type", str, "tool_choice")
        if choice_type not in _MSG_TOOL_CHOICES:
            raise _msg_invalid("tool_choice.type", f"expected one of auto, any, tool, none, got {choice_type!r}")
        conv.tool_choice = _MSG_TOOL_CHOICES[choice_type]
        if choice_type == "tool":
            conv.tool_choice_name = _msg_need(choice, "name", str, "tool_choice")
        if _msg_get(choice, "disable_parallel_tool_use", bool, "tool_choice"):
            conv.parallel_tool_calls = False


def _msg_parse_reasoning(body: dict, conv: Conversation) -> None:
    output_config = _msg_get(body, "output_config", dict) or {}
    effort = _msg_get(output_config, "effort", str, "output_config")
    output_format = _msg_get(output_config, "format", dict, "output_config")
    if output_format is not None and output_format.get("type") == "json_schema":
        conv.response_format = {"type": "json_schema", "name": "response",
                                "schema": _msg_need(output_format, "schema", dict, "output_config.format"),
                                "strict": True}
    thinking = _msg_get(body, "thinking", dict) or {}
    mode = _msg_get(thinking, "type", str, "thinking")
    if mode == "enabled":
        conv.thinking_budget = _msg_need(thinking, "budget_tokens", int, "thinking")
        conv.reasoning_effort = effort or _msg_effort_for_budget(conv.thinking_budget)
    elif mode == "adaptive":
        conv.reasoning_effort = effort or "medium"
    elif mode is None:
        conv.reasoning_effort = effort
    elif mode != "disabled":    # disabled leaves reasoning_effort unset: "none" is not accepted everywhere
        raise _msg_invalid("thinking.type", f"expected enabled, adaptive or disabled, got {mode!r}")


def messages_parse_request(body: dict) -> Conversation:
    """A /v1/messages (or /v1/messages/count_tokens) body as a Conversation.

    cache_control, context_management, container, mcp_servers, service_tier and beta fields are dropped:
    the neutral model has no place for them. Server tools are skipped (named in conv.unportable_tools).
    max_tokens is optional because count_tokens bodies have none.
    """
    if not isinstance(body, dict):
        raise _msg_invalid("body", "expected a JSON object")
    model = _msg_need(body, "model", str)
    if not model:
        raise _msg_invalid("model", "must be a non-empty string")
    conv = Conversation(model, system=_msg_system_texts(body.get("system"), "system"))
    for i, item in enumerate(_msg_need(body, "messages", list)):
        where = f"messages.{i}"
        if not isinstance(item, dict):
            raise _msg_invalid(where, "expected an object")
        role = _msg_need(item, "role", str, where)
        if role == "system":    # Claude Code sends reminders as system messages inside the list
            conv.system += _msg_system_texts(item.get("content"), where + ".content")
        elif role in ("user", "assistant"):
            conv.messages.append(Message(role, _msg_parse_content(item.get("content"), where + ".content")))
        else:
            raise _msg_invalid(where + ".role", f"expected user or assistant, got {role!r}")
    _msg_parse_tools(body, conv)
    _msg_parse_reasoning(body, conv)
    conv.max_tokens = _msg_get(body, "max_tokens", int)
    if conv.max_tokens is not None and conv.max_tokens < 1:
        raise _msg_invalid("max_tokens", "must be at least 1")
    conv.temperature = _msg_get(body, "temperature", float)
    conv.top_p = _msg_get(body, "top_p", float)
    stops = _msg_get(body, "stop_sequences", list) or []
    if not all(isinstance(stop, str) for stop in stops):
        raise _msg_invalid("stop_sequences", "expected an array of strings")
    conv.stop = stops
    conv.stream = bool(_msg_get(body, "stream", bool))
    conv.user = _msg_get(_msg_get(body, "metadata", dict) or {}, "user_id", str, "metadata")
    return conv


# ---- request rendering -----------------------------------------------------------------------
_MSG_MAX_INVALID_ARGUMENTS_SHOWN = 500


def _msg_tool_input(call: ToolCall) -> dict | None:
    """A tool call's arguments as the tool_use input object; None when they are not a JSON object."""
    if call.custom:     # freeform tools are bridged as a tool taking {"input": "<raw text>"}
        return {CUSTOM_TOOL_INPUT: call.arguments}
    if not call.arguments.strip():
        return {}
    try:
        arguments = json_loads(call.arguments)
    except ValueError:
        return None
    return arguments if isinstance(arguments, dict) else None


def _msg_tool_use_blocks(call: ToolCall) -> list[dict]:
    arguments = _msg_tool_input(call)
    block = {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments or {}}
    if arguments is not None:
        return [block]
    raw = call.arguments
    if len(raw) > _MSG_MAX_INVALID_ARGUMENTS_SHOWN:
        raw = raw[:_MSG_MAX_INVALID_ARGUMENTS_SHOWN] + "…"
    note = (f"[The model produced invalid arguments for tool {call.name!r}; the call was sent with {{}}. "
            f"Raw arguments: {raw}]")
    return [{"type": "text", "text": note}, block]


def _msg_image_block(image: Image) -> dict:
    if image.data:
        source = {"type": "base64", "media_type": image.media_type, "data": image.data}
    elif image.url.startswith("data:"):
        media_type, _, data = image.url[5:].partition(";base64,")
        source = {"type": "base64", "media_type": media_type, "data": data}
    else:
        source = {"type": "url", "url": image.url}
    return {"type": "image", "source": source}


def _msg_part_blocks(part: Part) -> list[dict]:
    """One part as Anthropic content blocks: none for empty text, two for a call with bad arguments."""
    if isinstance(part, (Text, Refusal)):
        return [{"type": "text", "text": part.text}] if part.text else []   # Anthropic rejects empty text
    if isinstance(part, ToolCall):
        return _msg_tool_use_blocks(part)
    if isinstance(part, Thinking):
        if part.redacted:
            return [{"type": "redacted_thinking", "data": part.redacted}]
        if part.text or part.signature:
            return [{"type": "thinking", "thinking": part.text, "signature": part.signature}]
        return []   # only OpenAI's encrypted reasoning: meaningless here
    if isinstance(part, Image):
        return [_msg_image_block(part)]
    block: dict = {"type": "tool_result", "tool_use_id": part.call_id}
    content = [item for piece in part.content for item in _msg_part_blocks(piece)]
    if content:
        block["content"] = content
    if part.is_error:
        block["is_error"] = True
    return [block]


def _msg_render_messages(messages: list[Message]) -> list[dict]:
    """Messages with alternating roles (Anthropic requires it) and tool results leading each user turn."""
    rendered: list[dict] = []
    for message in messages:
        blocks = []
        for part in message.parts:
            # Anthropic rejects thinking blocks it did not sign
            if isinstance(part, Thinking) and not (part.signature or part.redacted):
                continue
            blocks += _msg_part_blocks(part)
        if not blocks:
            continue
        if rendered and rendered[-1]["role"] == message.role:
            rendered[-1]["content"] += blocks
        else:
            rendered.append({"role": message.role, "content": blocks})
    for turn in rendered:
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")    # stable: keeps order
    return rendered


def _msg_thinking_allowed(conv: Conversation, messages: list[dict]) -> bool:
    """Whether Anthropic accepts thinking for this request.

    It refuses thinking with a forced tool choice, and requires the last assistant turn of a tool loop to
    start with its signed thinking block. A history produced elsewhere (another provider, or a client that
    dropped the blocks) lacks it, so thinking is turned off for that request rather than failing it; the
    gateway-level memory of signed thinking by tool-call id restores the blocks where it can.
    """
    if conv.tool_choice in ("required", "tool"):
        return False
    for turn in reversed(messages):
        if turn["role"] == "assistant":
            blocks = turn["content"]
            return (blocks[0]["type"] in ("thinking", "redacted_thinking")
                    or all(block["type"] != "tool_use" for block in blocks))
    return True


_MSG_MIN_THINKING_BUDGET = 1024     # Anthropic's minimum budget_tokens


def _msg_thinking_budget(conv: Conversation) -> int | None:
    if conv.thinking_budget:
        return conv.thinking_budget
    if conv.reasoning_effort in (None, "none", "minimal"):
        return None
    # efforts above high (xhigh, max) get the largest budget
    return _MSG_EFFORT_BUDGETS.get(conv.reasoning_effort, _MSG_EFFORT_BUDGETS["high"])


def _msg_clamp(tokens: int, cap: int | None) -> int:
    return tokens if cap is None else min(tokens, cap)


def _msg_render_tool(tool: Tool, drop_keys: frozenset[str]) -> dict:
    rendered: dict = {"name": tool.name}
    if tool.description:
        rendered["description"] = tool.description
    rendered["input_schema"] = strip_schema(CUSTOM_TOOL_PARAMETERS if tool.custom else tool.parameters, drop_keys)
    return rendered


_MSG_CHOICE_TYPES = {neutral: choice_type for choice_type, neutral in _MSG_TOOL_CHOICES.items()}


def _msg_render_tool_choice(conv: Conversation) -> dict | None:
    choice_type = _MSG_CHOICE_TYPES.get(conv.tool_choice)
    disable_parallel = conv.parallel_tool_calls is False and choice_type != "none"
    if disable_parallel:
        choice_type = choice_type or "auto"
    if choice_type is None:
        return None
    choice = {"type": choice_type}
    if choice_type == "tool":
        choice["name"] = conv.tool_choice_name
    if disable_parallel:
        choice["disable_parallel_tool_use"] = True
    return choice


def _msg_json_instruction(response_format: dict | None) -> list[str]:
    # Limitation: this Messages rendering has no response_format, so the request asks for JSON in the
    # system prompt. Nothing validates the answer: it is usually, not always, JSON matching the schema.
    if not response_format:
        return []
    if response_format.get("type") == "json_schema" and response_format.get("schema") is not None:
        return ["Answer with only a JSON value (no prose, no code fence) that matches this JSON schema:\n"
                + compact_json(response_format["schema"])]
    if response_format.get("type") == "json_object":
        return ["Answer with only a valid JSON object (no prose, no code fence)."]
    return []


def messages_render_request(conv: Conversation, profile: UpstreamProfile) -> dict:
    """A Conversation as a /v1/messages body for an Anthropic provider."""
    cap = profile.max_output_tokens
    max_tokens = _msg_clamp(conv.max_tokens or profile.default_max_tokens, cap)
    messages = _msg_render_messages(conv.messages)
    budget = _msg_thinking_budget(conv) if profile.reasoning and _msg_thinking_allowed(conv, messages) else None
    if budget is not None and budget >= max_tokens:
        # budget_tokens must stay below max_tokens: make room for it and an answer, shrinking it at the cap
        raised = _msg_clamp(budget + _MSG_MIN_THINKING_BUDGET, cap)
        budget = min(budget, raised - _MSG_MIN_THINKING_BUDGET)
        if budget >= _MSG_MIN_THINKING_BUDGET:
            max_tokens = raised
    thinking = budget is not None and budget >= _MSG_MIN_THINKING_BUDGET

    body: dict[str, Any] = {"model": conv.model, "max_tokens": max_tokens}
    system = conv.system + _msg_json_instruction(conv.response_format)
    if system:
        body["system"] = "\n\n".join(system)
    body["messages"] = messages
    if conv.tools:
        body["tools"] = [_msg_render_tool(tool, profile.drop_schema_keys) for tool in conv.tools]
        choice = _msg_render_tool_choice(conv)
        if choice:
            body["tool_choice"] = choice
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    # Thinking rejects temperature and allows only top_p >= 0.95; recent models reject temperature and
    # top_p together, so temperature wins when both are given.
    if conv.temperature is not None and not thinking:
        body["temperature"] = conv.temperature
    elif conv.top_p is not None and (not thinking or conv.top_p >= 0.95):
        body["top_p"] = conv.top_p
    stops = [stop for stop in conv.stop if stop.strip()]    # whitespace-only stop sequences are rejected
    if stops:
        body["stop_sequences"] = stops
    if conv.user:
        body["metadata"] = {"user_id": conv.user}
    if conv.stream:
        body["stream"] = True
    return body


# ---- responses -------------------------------------------------------------------------------
_MSG_STOP_REASONS = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                     "stop_sequence": "stop_sequence", "refusal": "refusal", "pause_turn": "pause",
                     "model_context_window_exceeded": "length"}
_MSG_FINISH_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                       "stop_sequence": "stop_sequence", "refusal": "refusal", "content_filter": "refusal",
                       "pause": "pause_turn"}
_MSG_USAGE_FIELDS = (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                     ("cache_read_input_tokens", "cache_read"), ("cache_creation_input_tokens", "cache_write"))


def messages_parse_usage(raw: Any, base: Usage | None = None) -> Usage:
    """base (or zeros) updated with the counts present in an Anthropic usage object; nulls are skipped."""
    usage = Usage() if base is None else replace(base)
    if isinstance(raw, dict):
        for key, attribute in _MSG_USAGE_FIELDS:
            value = raw.get(key)
            if isinstance(value, int):
                setattr(usage, attribute, value)
    return usage


def _msg_usage_json(usage: Usage, output_tokens: int | None = None) -> dict:
    return {"input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens if output_tokens is None else output_tokens,
            "cache_creation_input_tokens": usage.cache_write, "cache_read_input_tokens": usage.cache_read}


def messages_parse_response(body: dict) -> Reply:
    """A non-streaming Anthropic message as a Reply (server-tool blocks are left out)."""
    if not isinstance(body, dict):
        raise GatewayError(502, "api_error", "upstream sent a message that is not a JSON object")
    try:
        parts = _msg_parse_content(body.get("content") or [], "content")
    except GatewayError as err:
        raise GatewayError(502, "api_error", f"upstream sent an invalid message: {err.message}") from None
    return Reply(str(body.get("id") or ""), str(body.get("model") or ""), parts,
                 _MSG_STOP_REASONS.get(body.get("stop_reason"), "stop"), body.get("stop_sequence"),
                 messages_parse_usage(body.get("usage")))


def _msg_message_id(reply_id: str) -> str:
    return reply_id if reply_id.startswith("msg_") else new_id("msg_")


def messages_render_response(reply: Reply) -> dict:
    """A Reply as the message object of a non-streaming /v1/messages answer."""
    return {"id": _msg_message_id(reply.id), "type": "message", "role": "assistant", "model": reply.model,
            "content": [block for part in reply.parts for block in _msg_part_blocks(part)],
            "stop_reason": _MSG_FINISH_REASONS.get(reply.finish, "end_turn"),
            "stop_sequence": reply.stop_sequence, "usage": _msg_usage_json(reply.usage)}


# ---- streams ---------------------------------------------------------------------------------
# Anthropic delta type → (its payload key, neutral Delta.field)
_MSG_DELTA_FIELDS = {"text_delta": ("text", "text"), "input_json_delta": ("partial_json", "arguments"),
                     "thinking_delta": ("thinking", "thinking"), "signature_delta": ("signature", "signature")}


def _msg_object(value: Any) -> dict:
    """value if it is a JSON object, else an empty one (upstream events are read leniently)."""
    return value if isinstance(value, dict) else {}


class MessagesStreamDecoder:
    """Anthropic SSE events from a provider → neutral events.

    Server-tool blocks (server_tool_use, web_search_tool_result …) are skipped and the remaining blocks
    renumbered 0, 1, 2 …; citations_delta, ping and unknown events are ignored.
    """

    def __init__(self) -> None:
        self._indexes: dict[Any, int] = {}     # upstream block index → neutral index, portable blocks only
        self._open: int | None = None
        self._whole_input = ""                 # tool_use input given in content_block_start, not streamed
        self._usage = Usage()
        self._reason = "stop"
        self._stop_sequence: str | None = None
        self._ended = False                    # message_delta seen
        self._done = False                     # Finish or StreamFailure emitted

    def feed(self, event: str | None, data: str) -> list[Event]:
        if self._done:
            return []
        try:
            payload = json_loads(data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return self._fail(GatewayError(502, "api_error", "upstream sent an invalid stream event"))
        kind = payload.get("type") or event
        if kind == "content_block_delta":
            return self._delta(payload)
        if kind == "content_block_start":
            return self._block_start(payload.get("index"), payload.get("content_block"))
        if kind == "content_block_stop":
            return self._block_stop(self._indexes.get(payload.get("index")))
        if kind == "message_start":
            message = _msg_object(payload.get("message"))
            start_usage = messages_parse_usage(message.get("usage"))
            start_usage.output_tokens = 0    # message_start carries a placeholder output count
            self._usage = start_usage
            return [Start(str(message.get("id") or ""), str(message.get("model") or ""), start_usage)]
        if kind == "message_delta":
            delta = _msg_object(payload.get("delta"))
            self._reason = _MSG_STOP_REASONS.get(delta.get("stop_reason"), "stop")
            self._stop_sequence = delta.get("stop_sequence")
            # output tokens, and in newer API versions the input and cache counts again
            self._usage = messages_parse_usage(payload.get("usage"), self._usage)
            self._ended = True
            return []
        if kind == "message_stop":
            return self._finish()
        if kind == "error":
            error = _msg_object(payload.get("error"))
            error_kind, status = _MSG_ERROR_BY_TYPE.get(error.get("type"), ("api_error", 500))
            return self._fail(GatewayError(status, error_kind, error.get("message") or "upstream stream error"))
        return []

    def close(self) -> list[Event]:
        """End of the upstream body: a stream cut before its end is a failure."""
        if self._done:
            return []
        if self._ended:
            return self._finish()
        return self._fail(GatewayError(502, "api_error", "upstream stream ended before message_stop"))

    def _delta(self, payload: dict) -> list[Event]:
        index = self._indexes.get(payload.get("index"))
        delta = _msg_object(payload.get("delta"))
        spec = _MSG_DELTA_FIELDS.get(delta.get("type"))
        if index is None or spec is None:
            return []
        key, field_name = spec
        if field_name == "arguments":
            self._whole_input = ""
        text = delta.get(key)
        return [Delta(index, text, field_name)] if text else []

    def _block_start(self, upstream_index: Any, block: Any) -> list[Event]:
        try:
            part = _msg_parse_block(block, "content_block")
        except GatewayError:
            part = None     # a block type this gateway does not know: skipped like server blocks
        if not isinstance(part, (Text, ToolCall, Thinking)):
            return []
        index = len(self._indexes)
        self._indexes[upstream_index] = index
        self._open = index
        # Content already present in the start block (some compatible servers) becomes deltas.
        if isinstance(part, ToolCall):
            self._whole_input = "" if part.arguments == "{}" else part.arguments
            return [BlockStart(index, ToolCall(part.id, part.name))]
        if isinstance(part, Thinking):
            events: list[Event] = [BlockStart(index, Thinking(redacted=part.redacted))]
            if part.text:
                events.append(Delta(index, part.text, "thinking"))
            if part.signature:
                events.append(Delta(index, part.signature, "signature"))
            return events
        if part.text:
            return [BlockStart(index, Text("")), Delta(index, part.text)]
        return [BlockStart(index, Text(""))]

    def _block_stop(self, index: int | None) -> list[Event]:
        if index is None or index != self._open:
            return []
        self._open = None
        if self._whole_input:    # the input was never streamed: send it whole
            events: list[Event] = [Delta(index, self._whole_input, "arguments"), BlockEnd(index)]
            self._whole_input = ""
            return events
        return [BlockEnd(index)]

    def _finish(self) -> list[Event]:
        events = self._block_stop(self._open)
        self._done = True
        events.append(Finish(self._reason, self._usage, self._stop_sequence))
        return events

    def _fail(self, error: GatewayError) -> list[Event]:
        self._done = True
        return [StreamFailure(error)]


# Neutral Delta.field → the tail of a content_block_delta's `"delta":{"type":"` up to its text value.
_MSG_DELTA_TAILS = {"text": 'text_delta","text":', "refusal": 'text_delta","text":',
                    "thinking": 'thinking_delta","thinking":', "signature": 'signature_delta","signature":',
                    "arguments": 'input_json_delta","partial_json":'}
_MSG_MESSAGE_STOP = sse_event("message_stop", {"type": "message_stop"})
_MSG_PING = sse_event("ping", {"type": "ping"})


def _msg_start_block(part: Part) -> dict:
    if isinstance(part, ToolCall):    # input only ever arrives through input_json_delta
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": {}}
    if isinstance(part, Thinking):
        if part.redacted:
            return {"type": "redacted_thinking", "data": part.redacted}
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}    # Text, and Refusal which Anthropic clients read as text


class MessagesStreamEncoder:
    """Neutral events → Anthropic SSE bytes for a /v1/messages client (with `event:` lines)."""

    def __init__(self, model: str, id: str | None = None) -> None:
        self.model = model
        self.id = id or new_id("msg_")
        self._index = -1
        self._delta_head = ""    # SSE text of a content_block_delta up to its delta type, per block
        self._done = False       # message_stop or error sent: nothing may follow

    def feed(self, event: Event) -> bytes:
        if isinstance(event, Delta):
            return (self._delta_head + _MSG_DELTA_TAILS[event.field]
                    + unicode_json(event.text) + "}}\n\n").encode()
        if isinstance(event, BlockStart):
            self._index += 1
            self._delta_head = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                                f'{self._index},"delta":{{"type":"')
            return sse_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                     "content_block": _msg_start_block(event.part)})
        if isinstance(event, BlockEnd):
            return sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index})
        if isinstance(event, Start):
            return sse_event("message_start", {"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": _msg_usage_json(event.usage, 1)}})
        if isinstance(event, Finish):
            self._done = True
            return sse_event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": _MSG_FINISH_REASONS.get(event.reason, "end_turn"),
                          "stop_sequence": event.stop_sequence},
                "usage": _msg_usage_json(event.usage)}) + _MSG_MESSAGE_STOP
        self._done = True
        return sse_event("error", messages_error_body(event.error))

    def ping(self) -> bytes:
        """Keep-alive sent while the upstream is silent (none once the stream has ended)."""
        return b"" if self._done else _MSG_PING


# ---- OpenAI Responses wire (`responses`) -----------------------------------------------------
# Client side: Codex CLI and other /v1/responses clients reaching any provider. Provider side:
# Chat and Messages clients reaching a responses-only model. Passthrough never comes here.
def _responses_object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise invalid_request(param, f"Invalid type for '{param}': expected an object.")
    return value


# ---- tools -----------------------------------------------------------------------------------
def _responses_safe_tool_name(raw: str, taken: set[str]) -> str:
    """A name matching providers' ^[a-zA-Z0-9_-]{1,64}$ rule, not in taken."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in raw)[:64] or "_"
    candidate, n = safe, 1
    while candidate in taken:
        n += 1
        suffix = f"_{n}"
        candidate = safe[:64 - len(suffix)] + suffix
    return candidate


def _responses_tool_from_spec(spec: dict, where: str) -> Tool:
    name = request_field(spec, "name", str, f"{where}.name", required=True)
    description = request_field(spec, "description", str, f"{where}.description") or ""
    # A schema or grammar that is not an object is treated as absent rather than rejected: the
    # tool stays usable and the provider still validates what it is given.
    if spec["type"] == "custom":
        grammar = spec.get("format")
        return Tool(name, description, custom=True, format=grammar if isinstance(grammar, dict) else None)
    parameters = spec.get("parameters")
    return Tool(name, description, parameters) if isinstance(parameters, dict) else Tool(name, description)


@dataclass(slots=True)
class _responses_ToolTable:
    """The portable tools of a request and how their names map between client and provider."""
    tools: list[Tool] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)                      # built-in tool types
    name_map: dict[str, tuple[str, str]] = field(default_factory=dict)    # flat → (namespace, name)
    lookup: dict[tuple[str, str], str] = field(default_factory=dict)      # (namespace, name) → sent name
    taken: set[str] = field(default_factory=set)

    def read(self, specs: list, param: str, namespace: str = "") -> None:
        for i, raw in enumerate(specs):
            where = f"{param}[{i}]"
            spec = _responses_object(raw, where)
            kind = request_field(spec, "type", str, f"{where}.type", required=True)
            if kind in ("function", "custom"):
                self.add(_responses_tool_from_spec(spec, where), namespace)
            elif kind == "namespace" and not namespace:
                self.read(request_field(spec, "tools", list, f"{where}.tools", required=True), f"{where}.tools",
                          request_field(spec, "name", str, f"{where}.name", required=True))
            else:
                self.skipped.append(kind)

    def add(self, tool: Tool, namespace: str) -> None:
        short = tool.name
        if namespace:
            tool.name = _responses_safe_tool_name(f"{namespace}__{short}", self.taken)
            self.name_map[tool.name] = (namespace, short)
            # history items may name a namespaced tool without its namespace
            self.lookup.setdefault(("", short), tool.name)
        self.lookup[(namespace, short)] = tool.name
        self.taken.add(tool.name)
        self.tools.append(tool)

    def provider_name(self, namespace: str, name: str) -> str:
        """The name the provider knows for a tool a client names. OpenAI reports top-level tools
        under the default namespace "functions", hence the fallback to the bare name."""
        sent = self.lookup.get((namespace, name)) or self.lookup.get(("", name))
        if sent:
            return sent
        return _responses_safe_tool_name(f"{namespace}__{name}", set()) if namespace else name


# ---- input content ---------------------------------------------------------------------------
def _responses_split_data_url(url: str, param: str) -> tuple[str, str]:
    """(media type, base64 payload) of a data: URL."""
    header, comma, data = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid_request(param, f"Invalid data URL in '{param}': expected data:<media type>;base64,<data>.")
    return header[:-7], data


def _responses_is_text_media(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type.endswith(("json", "xml", "yaml", "javascript"))


def _responses_input_image(part: dict, where: str) -> Text | Image:
    url = request_field(part, "image_url", str, f"{where}.image_url")
    if url is None:
        file_id = request_field(part, "file_id", str, f"{where}.image_url", required=True)
        return Text(f"[image {file_id} omitted: OpenAI file ids cannot be forwarded]")
    if url.startswith("data:"):
        media_type, data = _responses_split_data_url(url, f"{where}.image_url")
        return Image(data=data, media_type=media_type)
    return Image(url=url)


def _responses_input_file(part: dict, where: str) -> Text:
    data = request_field(part, "file_data", str, f"{where}.file_data")
    name = (request_field(part, "filename", str, f"{where}.filename")
            or part.get("file_id") or part.get("file_url") or "file")
    if data is not None:
        if data.startswith("data:"):
            media_type, data = _responses_split_data_url(data, f"{where}.file_data")
        else:
            import mimetypes
            media_type = mimetypes.guess_type(name)[0] or ""
        if _responses_is_text_media(media_type):
            try:
                return Text(f'<file name="{name}">\n{base64.b64decode(data, validate=True).decode()}\n</file>')
            except (binascii.Error, UnicodeDecodeError):
                pass
    return Text(f"[file {name} omitted: only text files can be forwarded]")


def _responses_content_part(raw: Any, where: str) -> Part | None:
    part = _responses_object(raw, where)
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return Text(request_field(part, "text", str, f"{where}.text", required=True))
    if kind == "refusal":
        return Refusal(request_field(part, "refusal", str, f"{where}.refusal", required=True))
    if kind == "input_image":
        return _responses_input_image(part, where)
    if kind == "input_file":
        return _responses_input_file(part, where)
    return None   # audio and other kinds no provider here takes


def _responses_content_parts(content: Any, where: str) -> list[Part]:
    if isinstance(content, str):
        return [Text(content)]
    if not isinstance(content, list):
        raise invalid_request(where, f"Invalid type for '{where}': expected a string or an array.")
    parts = (_responses_content_part(raw, f"{where}[{j}]") for j, raw in enumerate(content))
    return [part for part in parts if part is not None]


def _responses_reasoning_text(item: dict) -> str:
    """Summary texts of a reasoning item, else its raw reasoning_text content (open-weight models)."""
    for key in ("summary", "content"):
        entries = item.get(key)
        if isinstance(entries, list):
            texts = [e["text"] for e in entries if isinstance(e, dict) and isinstance(e.get("text"), str)]
            if texts:
                return "\n\n".join(texts)
    return ""


# ---- input items -----------------------------------------------------------------------------
def _responses_append(messages: list[Message], role: str, parts: list[Part]) -> None:
    """Consecutive items of one side share a Message, so turns alternate."""
    if not parts:
        return
    if messages and messages[-1].role == role:
        messages[-1].parts.extend(parts)
    else:
        messages.append(Message(role, parts))


def _responses_read_item(item: dict, where: str, tools: _responses_ToolTable, conv: Conversation) -> None:
    kind = item.get("type", "message")   # easy input messages carry only role and content
    if kind == "message":
        role = request_field(item, "role", str, f"{where}.role", required=True)
        parts = _responses_content_parts(item.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            conv.system.extend(part.text for part in parts if isinstance(part, Text))
        elif role in ("user", "assistant"):
            _responses_append(conv.messages, role, parts)
        else:
            raise invalid_request(f"{where}.role", f"Invalid value for '{where}.role': expected one of "
                                            "'user', 'assistant', 'system' or 'developer'.")
    elif kind in ("function_call", "custom_tool_call"):
        custom = kind == "custom_tool_call"
        call_id = request_field(item, "call_id", str, f"{where}.call_id", required=True)
        name = request_field(item, "name", str, f"{where}.name", required=True)
        namespace = request_field(item, "namespace", str, f"{where}.namespace") or ""
        key = "input" if custom else "arguments"
        payload = request_field(item, key, str, f"{where}.{key}")
        arguments = payload if payload is not None else ("" if custom else "{}")
        _responses_append(conv.messages, "assistant",
                [ToolCall(call_id, tools.provider_name(namespace, name), arguments, custom)])
    elif kind in ("function_call_output", "custom_tool_call_output"):
        call_id = request_field(item, "call_id", str, f"{where}.call_id", required=True)
        output = item.get("output")
        if isinstance(output, list):
            content = [p for p in _responses_content_parts(output, f"{where}.output") if isinstance(p, (Text, Image))]
        elif isinstance(output, str):
            content = [Text(output)]
        else:
            raise invalid_request(f"{where}.output", f"Invalid type for '{where}.output': expected a string or an array.")
        _responses_append(conv.messages, "user", [ToolResult(call_id, content, custom=kind == "custom_tool_call_output")])
    elif kind == "reasoning":
        text = _responses_reasoning_text(item)
        encrypted = request_field(item, "encrypted_content", str, f"{where}.encrypted_content") or ""
        if text or encrypted:
            _responses_append(conv.messages, "assistant", [Thinking(text, encrypted=encrypted)])
    # additional_tools were read with the tools; configuration_update, item_reference and other
    # kinds carry nothing a provider can take.


# ---- request: client → neutral ---------------------------------------------------------------
def _responses_read_tool_choice(raw: Any, tools: _responses_ToolTable, conv: Conversation) -> None:
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise invalid_request("tool_choice", "Invalid value for 'tool_choice': expected 'auto', 'none' or 'required'.")
        conv.tool_choice = raw
    elif isinstance(raw, dict):
        kind = raw.get("type")
        if kind in ("function", "custom"):
            name = request_field(raw, "name", str, "tool_choice.name", required=True)
            conv.tool_choice = "tool"
            conv.tool_choice_name = tools.provider_name(raw.get("namespace") or "", name)
        else:   # allowed_tools and built-in tools have no portable equivalent beyond their mode
            conv.tool_choice = "required" if kind == "allowed_tools" and raw.get("mode") == "required" else "auto"
    elif raw is not None:
        raise invalid_request("tool_choice", "Invalid type for 'tool_choice': expected a string or an object.")


def _responses_read_text_format(text: dict) -> dict[str, Any] | None:
    fmt = request_field(text, "format", dict, "text.format")
    kind = fmt.get("type") if fmt else None
    if kind == "json_schema":
        return {"type": "json_schema",
                "name": request_field(fmt, "name", str, "text.format.name", required=True),
                "schema": request_field(fmt, "schema", dict, "text.format.schema", required=True),
                "strict": bool(request_field(fmt, "strict", bool, "text.format.strict"))}
    if kind == "json_object":
        return {"type": "json_object"}
    return None


def responses_parse_request(body: dict) -> Conversation:
    body = _responses_object(body, "body")
    conv = Conversation(request_field(body, "model", str, "model", required=True))
    instructions = request_field(body, "instructions", str, "instructions")
    if instructions:
        conv.system.append(instructions)
    tools = _responses_ToolTable()
    tools.read(request_field(body, "tools", list, "tools") or [], "tools")
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        conv.messages.append(Message("user", [Text(raw_input)]))
    elif raw_input is not None:
        items = [_responses_object(item, f"input[{i}]") for i, item in enumerate(request_field(body, "input", list, "input"))]
        # Codex sends its tools in an additional_tools item; they must be known before any call names them.
        for i, item in enumerate(items):
            if item.get("type") == "additional_tools":
                tools.read(request_field(item, "tools", list, f"input[{i}].tools") or [], f"input[{i}].tools")
        for i, item in enumerate(items):
            _responses_read_item(item, f"input[{i}]", tools, conv)
    conv.tools = tools.tools
    _responses_read_tool_choice(body.get("tool_choice"), tools, conv)
    conv.parallel_tool_calls = request_field(body, "parallel_tool_calls", bool, "parallel_tool_calls")
    conv.max_tokens = request_field(body, "max_output_tokens", int, "max_output_tokens")
    if conv.max_tokens is not None and conv.max_tokens < 1:
        raise invalid_request("max_output_tokens", "Invalid 'max_output_tokens': expected a positive integer.")
    conv.temperature = request_field(body, "temperature", float, "temperature")
    conv.top_p = request_field(body, "top_p", float, "top_p")
    conv.stream = bool(request_field(body, "stream", bool, "stream"))
    text = request_field(body, "text", dict, "text")
    conv.response_format = _responses_read_text_format(text) if text else None
    reasoning = request_field(body, "reasoning", dict, "reasoning") or {}
    conv.reasoning_effort = request_field(reasoning, "effort", str, "reasoning.effort")
    conv.user = (request_field(body, "safety_identifier", str, "safety_identifier")
                 or request_field(body, "user", str, "user"))
    conv.tool_namespaces, conv.unportable_tools = tools.name_map, tools.skipped
    return conv


# ---- request: neutral → Responses provider ---------------------------------------------------
def _responses_tool_spec(tool: Tool, drop: frozenset[str]) -> dict[str, Any]:
    if tool.custom:
        spec: dict[str, Any] = {"type": "custom", "name": tool.name, "description": tool.description}
        if tool.format:
            spec["format"] = tool.format
        return spec
    # Responses tools default to strict, which rejects most schemas written for other wires.
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": strip_schema(tool.parameters, drop), "strict": False}


def _responses_image_input(image: Image) -> dict[str, Any]:
    url = image.url or f"data:{image.media_type};base64,{image.data}"
    return {"type": "input_image", "image_url": url, "detail": "auto"}


def _responses_tool_output(result: ToolResult) -> str | list[dict[str, Any]]:
    """A plain string when the result is one text, which every Responses server accepts."""
    if not result.content:
        return ""
    if len(result.content) == 1 and isinstance(result.content[0], Text):
        return result.content[0].text
    return [{"type": "input_text", "text": part.text} if isinstance(part, Text) else _responses_image_input(part)
            for part in result.content]


def _responses_history_item(part: Part, keep_reasoning: bool) -> dict[str, Any] | None:
    if isinstance(part, ToolCall):
        if part.custom:
            return {"type": "custom_tool_call", "call_id": part.id, "name": part.name, "input": part.arguments}
        return {"type": "function_call", "call_id": part.id, "name": part.name, "arguments": part.arguments}
    if isinstance(part, ToolResult):
        return {"type": "custom_tool_call_output" if part.custom else "function_call_output",
                "call_id": part.call_id, "output": _responses_tool_output(part)}
    # Only OpenAI can verify reasoning it produced, and only through its encrypted_content.
    if isinstance(part, Thinking) and part.encrypted and keep_reasoning:
        summary = [{"type": "summary_text", "text": part.text}] if part.text else []
        return {"type": "reasoning", "summary": summary, "encrypted_content": part.encrypted}
    return None


def _responses_input_items(messages: list[Message], keep_reasoning: bool) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for message in messages:
        content: list[dict[str, Any]] = []   # user content gathered between tool results
        for part in message.parts:
            if isinstance(part, (Text, Refusal)) and message.role == "assistant":
                # string content: the one assistant message form the spec takes without an item id
                items.append({"type": "message", "role": "assistant", "content": part.text})
            elif isinstance(part, Text):
                content.append({"type": "input_text", "text": part.text})
            elif isinstance(part, Image):
                content.append(_responses_image_input(part))
            else:
                if content:
                    items.append({"type": "message", "role": message.role, "content": content})
                    content = []
                item = _responses_history_item(part, keep_reasoning)
                if item:
                    items.append(item)
        if content:
            items.append({"type": "message", "role": message.role, "content": content})
    return items


def _responses_tool_choice_spec(conv: Conversation) -> str | dict[str, str]:
    if conv.tool_choice != "tool":
        return conv.tool_choice
    custom = any(t.custom and t.name == conv.tool_choice_name for t in conv.tools)
    return {"type": "custom" if custom else "function", "name": conv.tool_choice_name}


def responses_render_request(conv: Conversation, profile: UpstreamProfile) -> dict:
    body: dict[str, Any] = {"model": conv.model}
    if conv.system:
        body["instructions"] = "\n\n".join(conv.system)
    body["input"] = _responses_input_items(conv.messages, profile.reasoning)
    if conv.tools:
        body["tools"] = [_responses_tool_spec(tool, profile.drop_schema_keys) for tool in conv.tools]
    if conv.tool_choice:
        body["tool_choice"] = _responses_tool_choice_spec(conv)
    if conv.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = conv.parallel_tool_calls
    if conv.max_tokens is not None:
        cap = profile.max_output_tokens
        body["max_output_tokens"] = min(conv.max_tokens, cap) if cap else conv.max_tokens
    if conv.temperature is not None:
        body["temperature"] = conv.temperature
    if conv.top_p is not None:
        body["top_p"] = conv.top_p
    if conv.reasoning_effort and profile.reasoning:
        body["reasoning"] = {"effort": conv.reasoning_effort}
    if conv.response_format:
        fmt = conv.response_format
        if profile.drop_schema_keys and "schema" in fmt:
            fmt = {**fmt, "schema": strip_schema(fmt["schema"], profile.drop_schema_keys)}
        body["text"] = {"format": fmt}
    if conv.user:
        body["safety_identifier"] = conv.user
    body["store"] = False   # the gateway, not the provider, keeps conversation state
    body["stream"] = conv.stream
    return body


# ---- response objects (shared by render_response and the stream encoder) ---------------------
def _responses_usage_object(usage: Usage) -> dict[str, Any]:
    input_tokens = usage.input_tokens + usage.cache_read + usage.cache_write
    details = {"cached_tokens": usage.cache_read, "cache_write_tokens": usage.cache_write}
    return {"input_tokens": input_tokens, "input_tokens_details": details,
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning},
            "total_tokens": input_tokens + usage.output_tokens}


def _responses_final_status(finish: str) -> tuple[str, dict[str, str] | None]:
    """Response status and incomplete_details for a neutral finish reason."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _responses_echo_fields(request: dict | None) -> dict[str, Any]:
    """The request settings a response object repeats, with the API's defaults."""
    req = request or {}
    text = req.get("text") if isinstance(req.get("text"), dict) else {}
    return {"instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": req.get("reasoning") or {"effort": None, "summary": None},
            "store": req.get("store", True), "temperature": req.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, **text}, "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools") or [], "top_p": req.get("top_p", 1.0),
            "truncation": req.get("truncation", "disabled"), "user": req.get("user"),
            "metadata": req.get("metadata") or {}}


def _responses_response_object(response_id: str, created_at: int, model: str, status: str, output: list[dict],
                     usage: dict | None, echo: dict[str, Any], *, error: dict | None = None,
                     incomplete: dict | None = None) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "error": error, "incomplete_details": incomplete, "model": model, "output": output,
            "usage": usage, **echo}


def _responses_content_object(refusal: bool, text: str) -> dict[str, Any]:
    if refusal:
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _responses_message_item(item_id: str, status: str, content: list[dict]) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _responses_call_item(call: ToolCall, status: str, payload: str,
               name_map: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A function_call / custom_tool_call item under the name (and namespace) the client declared."""
    namespace, name = name_map.get(call.name, ("", call.name))
    if call.custom:
        item = {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": call.id, "name": name}
    else:
        item = {"type": "function_call", "id": new_id("fc_"), "call_id": call.id, "name": name}
    if namespace:
        item["namespace"] = namespace
    item["input" if call.custom else "arguments"] = payload
    item["status"] = status
    return item


def _responses_reasoning_item(item_id: str, text: str, encrypted: str) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "reasoning", "id": item_id,
                            "summary": [{"type": "summary_text", "text": text}] if text else []}
    if encrypted:
        item["encrypted_content"] = encrypted
    return item


def _responses_output_item(part: Part, name_map: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The output item of one reply part (Text, Refusal, ToolCall or Thinking)."""
    if isinstance(part, (Text, Refusal)):
        content = [_responses_content_object(isinstance(part, Refusal), part.text)]
        return _responses_message_item(new_id("msg_"), "completed", content)
    if isinstance(part, ToolCall):
        return _responses_call_item(part, "completed", part.arguments, name_map)
    return _responses_reasoning_item(new_id("rs_"), part.text, part.encrypted)


def responses_render_response(reply: Reply, *, created_at: int | None = None, request: dict | None = None,
                              name_map: dict[str, tuple[str, str]] | None = None) -> dict:
    output = [_responses_output_item(part, name_map or {}) for part in reply.parts]
    status, incomplete = _responses_final_status(reply.finish)
    response_id = reply.id if reply.id.startswith("resp_") else new_id("resp_")
    return _responses_response_object(response_id, int(time.time()) if created_at is None else created_at, reply.model,
                            status, output, _responses_usage_object(reply.usage), _responses_echo_fields(request),
                            incomplete=incomplete)


# ---- response: Responses provider → neutral --------------------------------------------------
_RESPONSES_FAILURES: dict[str, tuple[int, str]] = {   # Responses error code → (HTTP status, neutral kind)
    "rate_limit_exceeded": (429, "rate_limit"), "insufficient_quota": (429, "rate_limit"),
    "server_is_overloaded": (503, "overloaded"), "slow_down": (503, "overloaded"),
    "context_length_exceeded": (400, "invalid_request"), "invalid_prompt": (400, "invalid_request"),
}


def _responses_upstream_failure(error: Any) -> GatewayError:
    """The error of a failed response (or an `error` stream event)."""
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    status, kind = _RESPONSES_FAILURES.get(code or "", (502, "api_error"))
    return GatewayError(status, kind, str(error.get("message") or "upstream response failed"), code=code)


def responses_parse_usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    details = raw.get("input_tokens_details") or {}
    cached, written = details.get("cached_tokens") or 0, details.get("cache_write_tokens") or 0
    reasoning = (raw.get("output_tokens_details") or {}).get("reasoning_tokens") or 0
    return Usage(max((raw.get("input_tokens") or 0) - cached - written, 0), raw.get("output_tokens") or 0,
                 cached, written, reasoning)


def _responses_item_parts(item: Any) -> list[Part]:
    """Neutral parts of one complete output item; kinds no client can take (web_search_call …) give none."""
    if not isinstance(item, dict):
        return []
    kind = item.get("type")
    if kind == "message":
        parts: list[Part] = []
        for content in item.get("content") or []:
            content_kind = content.get("type") if isinstance(content, dict) else None
            if content_kind == "output_text":
                parts.append(Text(content.get("text") or ""))
            elif content_kind == "refusal":
                parts.append(Refusal(content.get("refusal") or ""))
        return parts
    if kind == "function_call":
        return [ToolCall(item.get("call_id") or "", item.get("name") or "", item.get("arguments") or "")]
    if kind == "custom_tool_call":
        return [ToolCall(item.get("call_id") or "", item.get("name") or "", item.get("input") or "", True)]
    if kind == "reasoning":
        return [Thinking(_responses_reasoning_text(item), encrypted=item.get("encrypted_content") or "")]
    return []


def _responses_finish_reason(incomplete: bool, details: Any, tool_called: bool) -> str:
    if incomplete:
        reason = details.get("reason") if isinstance(details, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if tool_called else "stop"


def responses_parse_response(body: dict) -> Reply:
    if not isinstance(body, dict):
        raise GatewayError(502, "api_error", "upstream returned a malformed response")
    if body.get("status") == "failed":
        raise _responses_upstream_failure(body.get("error"))
    parts = [part for item in body.get("output") or [] for part in _responses_item_parts(item)]
    tool_called = any(isinstance(part, ToolCall) for part in parts)
    finish = _responses_finish_reason(body.get("status") == "incomplete", body.get("incomplete_details"), tool_called)
    return Reply(body.get("id") or "", body.get("model") or "", parts, finish,
                 usage=responses_parse_usage(body.get("usage")))


def _responses_part_start(part: Part) -> tuple[Part, str, str]:
    """(empty part for BlockStart, Delta field, full text) of a complete part."""
    if isinstance(part, ToolCall):
        return ToolCall(part.id, part.name, "", part.custom), "arguments", part.arguments
    if isinstance(part, Thinking):
        return Thinking(encrypted=part.encrypted), "thinking", part.text
    if isinstance(part, Refusal):
        return Refusal(""), "refusal", part.text
    return Text(""), "text", part.text


_RESPONSES_DELTA_FIELDS = {
    "response.output_text.delta": "text",
    "response.function_call_arguments.delta": "arguments",
    "response.custom_tool_call_input.delta": "arguments",
    "response.reasoning_summary_text.delta": "thinking",
    "response.reasoning_text.delta": "thinking",
    "response.refusal.delta": "refusal",
}
_RESPONSES_LAZY_PARTS = {"text": Text, "refusal": Refusal, "thinking": Thinking}   # blocks a bare delta may open


class ResponsesStreamDecoder:
    """Responses SSE from a provider → neutral events.

    One neutral block per message content part, reasoning item or tool call. Items that arrive
    whole (only output_item.done, or only inside response.completed) are replayed as
    start/delta/end; a reasoning item's encrypted_content is kept only when it comes with the item's
    start, as the neutral stream has no later place for it. A failure before any output comes
    without a Start, so the caller can still answer with an HTTP error.
    """

    def __init__(self) -> None:
        self._started = False
        self._done = False
        self._blocks = 0           # neutral blocks opened so far
        self._open = -1            # index of the open block, -1 when none
        self._open_field = ""
        self._streamed = False     # the open block has received a delta
        self._item = -1            # output_index of the item announced by output_item.added
        self._item_opened = False  # that item has opened a block
        self._tool_called = False

    def feed(self, event: str | None, data: str) -> list[Event]:
        if self._done:
            return []
        try:
            payload = json_loads(data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return self._fail(GatewayError(502, "api_error", "upstream sent a malformed stream event"))
        kind = payload.get("type") or event
        field_name = _RESPONSES_DELTA_FIELDS.get(kind)
        if field_name and self._started:
            return self._delta(field_name, payload.get("delta") or "")
        if kind == "response.failed":
            return self._fail(_responses_upstream_failure((payload.get("response") or {}).get("error")))
        if kind == "error":
            return self._fail(_responses_upstream_failure(payload))
        out: list[Event] = []
        if not self._started:
            response = payload.get("response") or {}
            out.append(Start(response.get("id") or "", response.get("model") or ""))
            self._started = True
        if field_name:
            out += self._delta(field_name, payload.get("delta") or "")
        elif kind == "response.output_item.added":
            self._item_added(payload, out)
        elif kind == "response.content_part.added":
            part = payload.get("part") or {}
            if part.get("type") in ("output_text", "refusal"):
                refusal = part["type"] == "refusal"
                self._open_block(out, Refusal("") if refusal else Text(""), "refusal" if refusal else "text")
        elif kind == "response.content_part.done":
            if self._open_field in ("text", "refusal"):
                self._close(out)
        elif kind == "response.reasoning_summary_part.added":
            # Several summary parts make one Thinking block: keep them apart as paragraphs.
            if self._open_field == "thinking" and self._streamed:
                out.append(Delta(self._open, "\n\n", "thinking"))
        elif kind == "response.output_item.done":
            self._item_done(payload, out)
        elif kind in ("response.completed", "response.incomplete"):
            self._finish(kind, payload.get("response") or {}, out)
        return out

    def close(self) -> list[Event]:
        """End of the upstream body: a failure unless a terminal event came."""
        if self._done:
            return []
        return self._fail(GatewayError(502, "api_error", "upstream stream ended before response.completed"))

    def _delta(self, field_name: str, text: str) -> list[Event]:
        out: list[Event] = []
        if self._open_field != field_name:
            if field_name not in _RESPONSES_LAZY_PARTS:
                return out   # arguments without an announced call have no name to go with
            self._open_block(out, _RESPONSES_LAZY_PARTS[field_name](""), field_name)
        self._streamed = True
        out.append(Delta(self._open, text, field_name))
        return out

    def _open_block(self, out: list[Event], part: Part, field_name: str) -> None:
        self._close(out)
        self._open, self._open_field, self._streamed = self._blocks, field_name, False
        self._blocks += 1
        self._item_opened = True
        out.append(BlockStart(self._open, part))

    def _close(self, out: list[Event]) -> None:
        if self._open >= 0:
            out.append(BlockEnd(self._open))
            self._open, self._open_field = -1, ""

    def _replay(self, parts: list[Part], out: list[Event]) -> None:
        for part in parts:
            start, field_name, text = _responses_part_start(part)
            self._open_block(out, start, field_name)
            if text:
                out.append(Delta(self._open, text, field_name))
            self._tool_called |= isinstance(part, ToolCall)
        self._close(out)

    def _item_added(self, payload: dict, out: list[Event]) -> None:
        self._close(out)
        self._item, self._item_opened = payload.get("output_index", -1), False
        item = payload.get("item") or {}
        kind = item.get("type")
        if kind in ("function_call", "custom_tool_call"):
            self._tool_called = True
            self._open_block(out, ToolCall(item.get("call_id") or "", item.get("name") or "", "",
                                           kind == "custom_tool_call"), "arguments")
        elif kind == "reasoning":
            self._open_block(out, Thinking(encrypted=item.get("encrypted_content") or ""), "thinking")

    def _item_done(self, payload: dict, out: list[Event]) -> None:
        parts = _responses_item_parts(payload.get("item"))
        if payload.get("output_index", -1) != self._item or not self._item_opened:
            self._close(out)
            self._replay(parts, out)
            return
        if self._open >= 0 and not self._streamed and parts:
            text = _responses_part_start(parts[-1])[2]   # the item's content came only with its done event
            if text:
                out.append(Delta(self._open, text, self._open_field))
        self._close(out)

    def _finish(self, kind: str, response: dict, out: list[Event]) -> None:
        self._close(out)
        if not self._blocks:   # a provider that streams nothing but the final response
            self._replay([p for item in response.get("output") or [] for p in _responses_item_parts(item)], out)
        incomplete = kind == "response.incomplete" or response.get("status") == "incomplete"
        reason = _responses_finish_reason(incomplete, response.get("incomplete_details"), self._tool_called)
        out.append(Finish(reason, responses_parse_usage(response.get("usage"))))
        self._done = True

    def _fail(self, error: GatewayError) -> list[Event]:
        self._done = True
        return [StreamFailure(error)]


# ---- stream: neutral → Responses client ------------------------------------------------------
_RESPONSES_FAILURE_CODES = {"rate_limit": "rate_limit_exceeded", "overloaded": "server_is_overloaded",
                  "invalid_request": "invalid_prompt", "too_large": "context_length_exceeded"}


class ResponsesStreamEncoder:
    """Neutral events → the Responses SSE sequence a client such as Codex expects.

    Every event carries `event:` and a sequence_number counting from 0. `response` holds the final
    response object (completed, incomplete or failed) once the stream has ended, for storage.
    """

    def __init__(self, model: str, *, id: str | None = None, request: dict | None = None,
                 name_map: dict[str, tuple[str, str]] | None = None) -> None:
        self.id = id or new_id("resp_")
        self.model = model
        self.response: dict[str, Any] | None = None
        self._created_at = int(time.time())
        self._echo = _responses_echo_fields(request)
        self._name_map = name_map or {}
        self._seq = 0
        self._output: list[dict[str, Any]] = []   # finished items
        self._item: dict[str, Any] = {}           # item being streamed
        self._kind = ""                           # its block: text, refusal, thinking, function, custom
        self._ids: dict[str, Any] = {}            # item_id, output_index (and content/summary index)
        self._delta_type = ""
        self._delta_extra: dict[str, Any] = {}
        self._delta_parts = ("", "", "")          # a delta event's text around its sequence number and text
        self._chunks: list[str] = []
        self._encrypted = ""
        self._summary_open = False
        self._open = False                        # an item is added and not yet done

    def feed(self, event: Event) -> bytes:
        if self.response is not None:
            return b""
        if isinstance(event, Delta):
            return self._delta(event)
        head = b"" if self._seq else self._header()
        if isinstance(event, BlockStart):
            return head + self._block_start(event.part)
        if isinstance(event, BlockEnd):
            return head + self._block_end()
        if isinstance(event, Finish):
            status, incomplete = _responses_final_status(event.reason)
            self.response = self._snapshot(status, _responses_usage_object(event.usage), incomplete=incomplete)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            return head + self._event(kind, response=self.response)
        if isinstance(event, StreamFailure):
            err = event.error
            error = {"code": err.code or _RESPONSES_FAILURE_CODES.get(err.kind, "server_error"), "message": err.message}
            closing = self._block_end("incomplete") if self._open else b""   # no item left open
            self.response = self._snapshot("failed", None, error=error)
            return head + closing + self._event("response.failed", response=self.response)
        return head

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse_event(kind, payload)

    def _snapshot(self, status: str, usage: dict | None, **extra: Any) -> dict[str, Any]:
        return _responses_response_object(self.id, self._created_at, self.model, status, self._output, usage,
                                self._echo, **extra)

    def _header(self) -> bytes:
        # Both events carry the same object (with the request's echoed tools): encoded once.
        response = compact_json(self._snapshot("in_progress", None))
        out = b""
        for kind in ("response.created", "response.in_progress"):
            out += sse_event(kind, f'{{"type":"{kind}","sequence_number":{self._seq},"response":{response}}}')
            self._seq += 1
        return out

    def _block_start(self, part: Part) -> bytes:
        self._open = True
        index = len(self._output)
        self._chunks = []
        self._delta_extra = {}
        self._delta_parts = ("", "", "")
        if isinstance(part, ToolCall):
            self._kind = "custom" if part.custom else "function"
            self._item = _responses_call_item(part, "in_progress", "", self._name_map)
            self._ids = {"item_id": self._item["id"], "output_index": index}
            self._delta_type = ("response.custom_tool_call_input.delta" if part.custom
                                else "response.function_call_arguments.delta")
            return self._event("response.output_item.added", output_index=index, item=self._item)
        if isinstance(part, Thinking):
            self._kind, self._encrypted, self._summary_open = "thinking", part.encrypted, False
            self._item = _responses_reasoning_item(new_id("rs_"), "", "")
            self._ids = {"item_id": self._item["id"], "output_index": index, "summary_index": 0}
            self._delta_type = "response.reasoning_summary_text.delta"
            return self._event("response.output_item.added", output_index=index, item=self._item)
        refusal = isinstance(part, Refusal)
        self._kind = "refusal" if refusal else "text"
        self._item = _responses_message_item(new_id("msg_"), "in_progress", [])
        self._ids = {"item_id": self._item["id"], "output_index": index, "content_index": 0}
        if refusal:
            self._delta_type = "response.refusal.delta"
        else:
            self._delta_type, self._delta_extra = "response.output_text.delta", {"logprobs": []}
        return (self._event("response.output_item.added", output_index=index, item=self._item)
                + self._event("response.content_part.added", **self._ids, part=_responses_content_object(refusal, "")))

    def _delta(self, delta: Delta) -> bytes:
        if not delta.text or (self._kind == "thinking" and delta.field != "thinking"):
            return b""   # Anthropic signatures mean nothing to a Responses client
        self._chunks.append(delta.text)
        head = b""
        if self._kind == "thinking" and not self._summary_open:
            self._summary_open = True
            head = self._event("response.reasoning_summary_part.added", **self._ids,
                               part={"type": "summary_text", "text": ""})
        if not self._delta_parts[0]:
            # The hot path: the event's constant text is built once per item, what _event would write.
            fixed = compact_json({"type": self._delta_type, "sequence_number": 0, **self._ids, "delta": "",
                                  **self._delta_extra})
            before, after = fixed.split('"sequence_number":0', 1)
            middle, tail = after.split('"delta":""', 1)
            self._delta_parts = (f"event: {self._delta_type}\ndata: {before}\"sequence_number\":",
                                 middle + '"delta":', tail + "\n\n")
        sequence, self._seq = self._seq, self._seq + 1
        start, middle, tail = self._delta_parts
        return head + (start + str(sequence) + middle + unicode_json(delta.text) + tail).encode()

    def _block_end(self, status: str = "completed") -> bytes:
        self._open = False
        item, kind, text = self._item, self._kind, "".join(self._chunks)
        if kind in ("text", "refusal"):
            content = _responses_content_object(kind == "refusal", text)
            if kind == "text":
                out = self._event("response.output_text.done", **self._ids, text=text, logprobs=[])
            else:
                out = self._event("response.refusal.done", **self._ids, refusal=text)
            out += self._event("response.content_part.done", **self._ids, part=content)
            item["content"] = [content]
            item["status"] = status
        elif kind == "thinking":
            out = b""
            if self._summary_open:
                summary = {"type": "summary_text", "text": text}
                out = (self._event("response.reasoning_summary_text.done", **self._ids, text=text)
                       + self._event("response.reasoning_summary_part.done", **self._ids, part=summary))
            item = _responses_reasoning_item(item["id"], text, self._encrypted)
        else:
            key = "input" if kind == "custom" else "arguments"
            done_type = ("response.custom_tool_call_input.done" if kind == "custom"
                         else "response.function_call_arguments.done")
            out = self._event(done_type, **self._ids, **{key: text})
            item[key] = text
            item["status"] = status
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=self._ids["output_index"], item=item)


# ================================================================================================
# HTTP
# The server (keep-alive, pipelining, 100-continue, limits, timeouts, graceful shutdown) and the
# upstream client (keep-alive pool per origin, TLS with certifi, CONNECT proxies, gzip). h11 parses
# every head either side reads; the heads they write and the framing of bodies are plain code here.
# ================================================================================================

MAX_HEADER_BYTES = 64 * 1024
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
READ_SIZE = 65536
# Never forwarded in either direction: they describe one hop, not the message.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"host",
                        b"accept-encoding", b"expect", b"content-encoding"})


# The grammar of a header line: a token name, and a latin-1 value without NUL, CR or LF or
# whitespace at either end. A whole head is checked at once, its lines ended by NUL, which no valid
# name or value holds; that costs a fraction of checking each header. (The value's class is
# spelled as the ranges it allows: a class that excludes the rest of Unicode takes 5 ms to compile.)
VALID_HEADER_LINES = re.compile(r"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:(?:[\x01-\x08\x0e-\x1f!-\xff]+"
                                r"(?:[ \t]+[\x01-\x08\x0e-\x1f!-\xff]+)*)?\x00)*")


def checked_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The headers as bytes to send. ValueError names the first that is not valid HTTP: no value may
    end its header line and start another."""
    lines = [f"{name}:{value}\x00" for name, value in headers]
    if not VALID_HEADER_LINES.fullmatch("".join(lines)):
        bad = next(line for line in lines if not VALID_HEADER_LINES.fullmatch(line))
        raise ValueError(f"not a valid HTTP header line: {bad[:-1]!r}")
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def http_head(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A request or response head from headers that are valid HTTP already (parsed by h11, or
    checked_headers). h11 parses what the gateway reads; writing a head needs no parser, and writing
    it here costs a fraction of h11's events for it."""
    return b"".join([start_line, b"\r\n", *[name + b": " + value + b"\r\n" for name, value in headers], b"\r\n"])


def after_interim_heads(data: bytes) -> tuple[bytes, bool]:
    """A provider's first response bytes without the interim (1xx) heads that may come before the
    final one, such as 103 Early Hints, which a fresh h11 client does not read: what is left, and
    whether it starts the final head (else more bytes are needed)."""
    while len(data) > 9 and data[9:10] == b"1":        # "HTTP/1.1 1xx"
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data, False
        data = data[end + 4:]
    return data, len(data) > 9


def keeps_alive(http_version: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a message lets its connection carry another exchange: HTTP/1.1 unless a Connection
    header says "close". HTTP/1.0 never does here (its keep-alive extension is not offered, as h11
    does not offer it either)."""
    tokens = b",".join([value for name, value in headers if name == b"connection"]).lower().split(b",")
    return http_version == b"1.1" and b"close" not in map(bytes.strip, tokens)


def body_chunk(data: bytes) -> bytes:
    """Data framed as one chunk of a chunked body; LAST_CHUNK ends the body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

WEEKDAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


class HTTPDate:
    """The Date header every response the gateway makes carries (RFC 9110 section 6.6.1), in its
    IMF-fixdate form. Made at most once a second; the names are spelled out, as strftime's follow
    the locale."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second, self._value = -1, b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            t = time.gmtime(second)
            self._second, self._value = second, b"%s, %02d %s %d %02d:%02d:%02d GMT" % (
                WEEKDAYS[t.tm_wday], t.tm_mday, MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
        return self._value


RESPONSE_DATE = HTTPDate()


class ReadDeadline:
    """Socket reads with a timeout, for one connection: `await read(reader, seconds)` is
    reader.read() that raises TimeoutError after `seconds` without data. asyncio.timeout() makes and
    cancels a timer per read, which costs more than the read; here a read only stores its deadline,
    and the one pending timer, when it fires before the latest deadline, waits on for it."""

    __slots__ = ("_loop", "_task", "_until", "_timer", "_expired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._until: float | None = None          # the deadline of the read under way, if any
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def read(self, reader: asyncio.StreamReader, seconds: float) -> bytes:
        until = self._loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > until:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(until, self._fire)
        self._task, self._until = asyncio.current_task(self._loop), until
        try:
            return await reader.read(READ_SIZE)
        except asyncio.CancelledError:
            assert self._task is not None
            if self._expired:
                self._expired = False
                if self._task.uncancel() == 0:     # cancelled by the deadline alone, as asyncio.timeout
                    raise TimeoutError from None
            raise
        finally:
            self._until = self._task = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._until is None:
            return                                 # no read under way: the next one sets a timer
        if self._loop.time() < self._until:
            self._timer = self._loop.call_at(self._until, self._fire)
            return
        assert self._task is not None
        self._expired = True
        self._task.cancel()


@dataclass(slots=True)
class Request:
    method: str
    target: str                         # path and query as sent
    path: str
    headers: dict[str, str]             # lower-case names; repeated headers joined with ", "
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    peer: str
    started: float                      # perf_counter when the request line arrived
    query: str = ""
    key: KeyInfo | None = None          # the caller's API key once authenticated (team edition)
    http_version: str = "1.1"           # as the client sent it: "1.1" or "1.0"


def _header_dict(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = headers[key] + ", " + text if key in headers else text
    return headers


class Responder:
    """Writes one response on a server connection; a handler gets one per request. It frames the
    body by Content-Length when the handler has it whole, else chunked, or for an HTTP/1.0 client by
    closing the connection after it; a HEAD request gets the head alone."""

    __slots__ = ("_reader", "_writer", "_server", "_head", "_http11", "_head_only", "_chunked", "keep_alive",
                 "complete", "started", "status", "sent_bytes")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request | None,
                 server: HTTPServer | None = None):
        self._reader = reader
        self._writer = writer
        self._server = server    # whose shutdown ends the connection after this response
        self._head = b""         # the response head, held to go out with the first body bytes
        self._http11 = request is None or request.http_version == "1.1"
        self._head_only = request is not None and request.method == "HEAD"
        self._chunked = False
        self.keep_alive = request is not None and keeps_alive(request.http_version.encode(), request.raw_headers)
        self.complete = False    # the whole response is written: the connection may serve another
        self.started = False
        self.status = 0
        self.sent_bytes = 0

    @property
    def client_gone(self) -> bool:
        """True once the client closed its side (checked between stream chunks)."""
        return self._writer.is_closing() or self._reader.at_eof()

    def start(self, status: int, headers: list[tuple[str, str]],
              relayed: list[tuple[bytes, bytes]] | None = None, length: int | None = None) -> None:
        """Holds the response head: relayed (a provider's headers as h11 parsed them) go first, as
        they are, then headers, then the framing: length, or a body that send() streams. A Date
        comes first unless the provider's is relayed."""
        if length is not None:
            framing = [(b"content-length", b"%d" % length)]
        elif self._http11:
            framing, self._chunked = [(b"transfer-encoding", b"chunked")], True
        else:
            framing, self.keep_alive = [], False
        if self._server is not None and self._server.closing:
            self.keep_alive = False          # draining: the client should not send another request here
        if not self.keep_alive:
            framing.append((b"connection", b"close"))
        relayed = relayed or []
        if not any(name == b"date" for name, _ in relayed):
            relayed = [(b"date", RESPONSE_DATE.now()), *relayed]
        self._head = http_head(b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"")),
                               [*relayed, *checked_headers(headers), *framing])
        self.started, self.status = True, status      # not before: a header refused leaves it unstarted

    async def send(self, data: bytes) -> None:
        """Write a body chunk and wait while the client is slow; raises ConnectionError if it left."""
        if data and not self._head_only:
            self.sent_bytes += len(data)
            self._write(body_chunk(data) if self._chunked else data)
            await self._writer.drain()

    async def end(self) -> None:
        self._write(LAST_CHUNK if self._chunked and not self._head_only else b"")
        self.complete = True
        await self._writer.drain()

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      relayed: list[tuple[bytes, bytes]] | None = None) -> None:
        self.start(status, headers, relayed, len(body))
        if not self._head_only:
            self.sent_bytes += len(body)
            self._write(body)
        await self.end()

    def _write(self, data: bytes) -> None:
        """One socket write per call: a held head goes out with the bytes that follow it."""
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            self._writer.write(data)


Handler = Callable[[Request, Responder], Any]


class BrokenRequest(Exception):
    """A request that could not be read (malformed, too large, too slow); its path, once its head has
    arrived, decides the wire its error is worded in."""

    def __init__(self, path: str, error: GatewayError):
        super().__init__(error.message)
        self.path = path
        self.error = error

    @classmethod
    def timed_out(cls, path: str) -> BrokenRequest:
        return cls(path, GatewayError(408, "timeout", "timed out reading the request"))


class HTTPServer:
    """asyncio + h11 server. `handler(request, responder)` must send a complete response."""

    def __init__(self, handler: Handler, settings: Settings,
                 on_error: Callable[[str, GatewayError], tuple[int, list[tuple[str, str]], bytes]]):
        self.handler = handler
        self.settings = settings
        self.render_error = on_error     # renders a broken request's error (400, 408, 413) for its path
        self.server: asyncio.AbstractServer | None = None
        self.busy: set[asyncio.Task] = set()
        self.idle: set[asyncio.Task] = set()
        self.closing = False

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        self.server = await asyncio.start_server(self._connection, host, port, limit=READ_SIZE, backlog=1024)
        return [sock.getsockname()[:2] for sock in self.server.sockets]

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle keep-alive connections, let busy ones finish up to `grace` s."""
        self.closing = True
        if self.server:
            self.server.close()
        for task in list(self.idle):
            task.cancel()
        if self.busy:
            _, pending = await asyncio.wait(list(self.busy), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _mark(self, task: asyncio.Task, busy: bool) -> None:
        (self.busy if busy else self.idle).add(task)
        (self.idle if busy else self.busy).discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        deadline = ReadDeadline()
        peername = writer.get_extra_info("peername")
        peer = peername[0] if peername else ""
        try:
            while not self.closing:
                self._mark(task, busy=False)
                read = await self._read_request(conn, reader, writer, peer, task, deadline)
                if read is None:
                    break
                request, pipelined = read
                responder = Responder(reader, writer, request, self)
                try:
                    await self.handler(request, responder)
                except (ConnectionError, asyncio.CancelledError):
                    raise
                except Exception:        # a fault of the gateway's: answered as one, if nothing went out yet
                    log.exception("%s %s from %s failed", request.method, request.path, peer)
                    if not responder.started:
                        await self._answer_and_close(reader, writer, request.path, GatewayError(
                            500, "api_error", "the gateway failed on this request; its log says why"))
                    break
                if not (responder.complete and responder.keep_alive):
                    break
                # A fresh h11 for the next request: this one's body was likely read past h11 (_read_request).
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
                if pipelined:
                    conn.receive_data(pipelined)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except BrokenRequest as broken:       # raised between responses, so it can still be answered
            await self._answer_and_close(reader, writer, broken.path, broken.error)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            deadline.close()
            self.busy.discard(task)
            self.idle.discard(task)
            writer.close()

    async def _answer_and_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                                error: GatewayError) -> None:
        """The error in the wire of the route at path, as the connection's last response."""
        status, headers, body = self.render_error(path, error)
        with contextlib.suppress(ConnectionError):
            await Responder(reader, writer, None).respond(status, headers, body)

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            peer: str, task: asyncio.Task, deadline: ReadDeadline
                            ) -> tuple[Request, bytes] | None:
        """The next request with its whole body and any bytes the client sent after it, or None when
        the client is done; BrokenRequest when it cannot be read. h11 reads the head; a body framed
        by Content-Length is then counted out here, which spares h11's two events per request."""
        settings = self.settings
        path = ""
        timeout = settings.idle_timeout
        head: h11.Request | None = None
        headers: list[tuple[bytes, bytes]] = []   # the head's, listed once (h11's Headers iterate slowly)
        body: list[bytes] = []
        size = 0
        started = 0.0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BrokenRequest(path, GatewayError(exc.error_status_hint, "invalid_request",
                                                       f"malformed HTTP request: {exc}")) from None
            if event is h11.NEED_DATA:
                try:
                    data = await deadline.read(reader, timeout)
                except TimeoutError:
                    if head is None and not conn.trailing_data[0]:
                        return None                   # idle keep-alive connection: close quietly
                    raise BrokenRequest.timed_out(path) from None
                conn.receive_data(data)
                if head is None and data:
                    timeout = settings.header_timeout
                continue
            if isinstance(event, h11.Request):
                head, headers, started = event, list(event.headers), time.perf_counter()
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                self._mark(task, busy=True)
                length = _content_length(headers)
                if length is not None and length > settings.max_body_bytes:
                    raise BrokenRequest(path, GatewayError(413, "too_large", f"request body of {length} bytes "
                                                           f"exceeds the limit of {settings.max_body_bytes} bytes"))
                if conn.they_are_waiting_for_100_continue:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                timeout = settings.read_timeout
                if not any(name == b"transfer-encoding" for name, _ in headers):   # else h11 reads it
                    length = length or 0
                    data = await self._read_body(conn, reader, deadline, timeout, path, length)
                    if data is None:
                        return None
                    content, pipelined = data[:length], data[length:]
                    break
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > settings.max_body_bytes:
                    raise BrokenRequest(path, GatewayError(413, "too_large", f"request body exceeds the limit "
                                                           f"of {settings.max_body_bytes} bytes"))
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                content, pipelined = b"".join(body), conn.trailing_data[0]
                break
            else:                                      # ConnectionClosed or PAUSED
                return None
        assert head is not None
        return (Request(head.method.decode(), target, path, _header_dict(headers), headers, content, peer, started,
                        query, http_version=head.http_version.decode()), pipelined)

    @staticmethod
    async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader, deadline: ReadDeadline,
                         timeout: float, path: str, length: int) -> bytes | None:
        """At least length bytes: the body h11 holds past the head, then what it still takes to read;
        None if the client left before sending it all."""
        data = conn.trailing_data[0]
        if len(data) >= length:
            return data
        pieces, size = [data], len(data)
        while size < length:
            try:
                data = await deadline.read(reader, timeout)
            except TimeoutError:
                raise BrokenRequest.timed_out(path) from None
            if not data:
                return None
            pieces.append(data)
            size += len(data)
        return b"".join(pieces)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


# ---- upstream client ---------------------------------------------------------------------------


class UpstreamError(Exception):
    """The provider could not be reached or broke the exchange (not an HTTP error status)."""


class ConnectionDropped(UpstreamError):
    """The connection ended before any answer: on a kept-alive connection, safe to retry on a new one."""


@dataclass(slots=True, frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    proxy: tuple[str, int, str] | None = None    # (host, port, Proxy-Authorization value) or None

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def proxy_for(scheme: str, host: str, env: dict[str, str]) -> tuple[str, int, str] | None:
    """HTTPS_PROXY / HTTP_PROXY unless NO_PROXY names the host (suffix match, '*' for all)."""
    def get(name: str) -> str:
        return env.get(name) or env.get(name.lower()) or ""

    proxy_url = get("HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY")
    if not proxy_url:
        return None
    for entry in get("NO_PROXY").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    parts = urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
    auth = ""
    if parts.username:
        credentials = f"{parts.username}:{parts.password or ''}".encode()
        auth = "Basic " + base64.b64encode(credentials).decode()
    return parts.hostname or "", parts.port or 8080, auth


def make_ssl_context(ca_bundle: str, env: dict[str, str]) -> ssl.SSLContext:
    import certifi
    context = ssl.create_default_context(cafile=certifi.where())
    for extra in (ca_bundle, env.get("SSL_CERT_FILE", "")):
        if extra:
            context.load_verify_locations(cafile=os.path.expanduser(extra))
    return context


class UpstreamConnection:
    __slots__ = ("origin", "reader", "writer", "h11", "deadline")

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.deadline = ReadDeadline()

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def read(self, seconds: float) -> Awaitable[bytes]:
        return self.deadline.read(self.reader, seconds)

    def close(self) -> None:
        self.deadline.close()
        self.writer.transport.abort()


CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_CHUNK_LINE_BYTES = 4096


def _chunk_size(line: bytes) -> int:
    """The size from a chunk's size line; chunk extensions (after ";") are ignored."""
    if not CHUNK_SIZE.fullmatch(line):
        size = line.partition(b";")[0].strip(b" \t")
        if not CHUNK_SIZE.fullmatch(size):
            raise UpstreamError(f"provider broke the HTTP exchange: bad chunk size line {line[:40]!r}")
        line = size
    return int(line, 16)


class ChunkedBody:
    """Sans-IO reader of a chunked body (RFC 9112 §7.1): feed(data) returns the payload that data
    completes; `done` once the last chunk and its trailer section are in, `extra` holds anything the
    peer sent after them. h11 reads the provider's response head, and a chunked body is read here:
    h11 spends several µs on each chunk, and providers stream one chunk per server-sent event."""

    __slots__ = ("_pending", "_left", "_crlf_due", "_trailer", "done", "extra")

    def __init__(self) -> None:
        self._pending = b""      # an incomplete size line, trailer line or chunk-ending CRLF
        self._left = 0           # payload bytes of the current chunk still to come
        self._crlf_due = False   # the CRLF that ends a chunk's payload comes next
        self._trailer = False    # the last (zero-size) chunk is in: trailer lines until an empty one
        self.done = False
        self.extra = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Payload pieces in order; raises UpstreamError when the framing is broken or data is
        b"" (the peer closed) before the body is complete."""
        if not data and not self.done:
            raise UpstreamError("provider closed the connection mid-response")
        buffer = self._pending + data if self._pending else data
        end, at, payload = len(buffer), 0, []
        while at < end and not self.done:
            if self._left:
                take = min(self._left, end - at)
                payload.append(buffer[at:at + take])
                at += take
                self._left -= take
                self._crlf_due = not self._left
            elif self._crlf_due:
                if end - at < 2:
                    break
                if buffer[at:at + 2] != b"\r\n":
                    raise UpstreamError("provider broke the HTTP exchange: a chunk does not end with CRLF")
                at += 2
                self._crlf_due = False
            else:
                line_end = buffer.find(b"\r\n", at)
                if line_end < 0:
                    if end - at > MAX_CHUNK_LINE_BYTES:
                        raise UpstreamError("provider broke the HTTP exchange: chunk line too long")
                    break
                line, at = buffer[at:line_end], line_end + 2
                if self._trailer:
                    self.done = not line
                    continue
                size = _chunk_size(line)
                stop = at + size
                if size and end >= stop + 2:          # the whole chunk is here: take it in one step
                    if buffer[stop:stop + 2] != b"\r\n":
                        raise UpstreamError("provider broke the HTTP exchange: a chunk does not end with CRLF")
                    payload.append(buffer[at:stop])
                    at = stop + 2
                    continue
                self._left = size
                self._trailer = not size
        rest = buffer[at:]
        self._pending, self.extra = (b"", rest) if self.done else (rest, b"")
        return payload


class LengthBody:
    """Sans-IO reader of a body framed by its length: Content-Length, 0 for a bodyless response, or
    None for a body that ends when the provider closes the connection. Same interface as ChunkedBody:
    counting bytes here spares h11's two events per read."""

    __slots__ = ("_left", "done", "extra")

    def __init__(self, length: int | None) -> None:
        self._left = length
        self.done = length == 0
        self.extra = b""

    def feed(self, data: bytes) -> list[bytes]:
        left = self._left
        if left is None:                    # the provider's close ends the body
            self.done = not data
            return [data] if data else []
        if not data:
            raise UpstreamError("provider closed the connection mid-response")
        if len(data) < left:
            self._left = left - len(data)
            return [data]
        self._left, self.done, self.extra = 0, True, data[left:]
        return [data[:left]]


class UpstreamResponse:
    """Status and headers at once; the body read incrementally with `chunks()` or whole with `read()`."""

    def __init__(self, pool: "UpstreamPool", connection: UpstreamConnection, status: int,
                 headers: list[tuple[bytes, bytes]], waited: float, body: ChunkedBody | LengthBody,
                 keep_alive: bool):
        self._pool = pool
        self._connection: UpstreamConnection | None = connection
        self.status = status
        self.headers = headers
        self.waited = waited     # seconds spent waiting on the provider (connect, send, head, body)
        encoding = next((v.lower() for n, v in headers if n == b"content-encoding"), b"identity")
        # Asked for identity, but some servers compress anyway; wbits 47 accepts gzip and zlib.
        self._inflate = zlib.decompressobj(47) if encoding in (b"gzip", b"deflate", b"x-gzip") else None
        self._body = body
        self._keep_alive = keep_alive

    def header(self, name: bytes) -> str | None:
        return next((v.decode("latin-1") for n, v in self.headers if n == name), None)

    @property
    def end_to_end_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers a client may be given as they came: all but the hop-by-hop ones."""
        return [(name, value) for name, value in self.headers if name not in HOP_BY_HOP]

    def _payload(self, connection: UpstreamConnection, data: bytes | None) -> tuple[list[bytes], bool]:
        """The body bytes that data completes (None: the bytes h11 holds past the head), and
        whether the body is complete."""
        body = self._body
        if data is None:
            data = connection.h11.trailing_data[0]
            if not data:
                return [], body.done
        return body.feed(data), body.done

    def _next_cycle(self, connection: UpstreamConnection) -> bool:
        """Readies a connection whose response is complete for another exchange; False if it
        cannot have one. h11 saw only this exchange's heads, so the next one gets a fresh h11."""
        if self._body.extra or not self._keep_alive:
            return False
        connection.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        return True

    async def chunks(self, heartbeat: float | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, each read's bytes as one chunk (one write later); with
        `heartbeat`, an empty chunk after each such silence so the caller can keep its own client's
        connection alive."""
        connection = self._connection
        if connection is None:
            return
        read_timeout = self._pool.read_timeout
        wait = min(heartbeat, read_timeout) if heartbeat else read_timeout
        silent = 0.0
        try:
            payload, complete = self._payload(connection, None)
            while True:
                if payload:
                    body = payload[0] if len(payload) == 1 else b"".join(payload)
                    yield self._inflate.decompress(body) if self._inflate else body
                if complete:
                    if self._inflate:
                        yield self._inflate.flush()
                    self._connection = None
                    self._pool.release(connection, self._next_cycle(connection))
                    return
                payload = []
                began = time.perf_counter()
                try:
                    data = await connection.read(wait)     # a read that times out loses no data
                except TimeoutError:
                    self.waited += wait
                    silent += wait
                    if silent >= read_timeout:
                        raise
                    yield b""
                    continue
                self.waited += time.perf_counter() - began
                silent = 0.0
                payload, complete = self._payload(connection, data)
        except TimeoutError:
            raise UpstreamError(f"provider sent nothing for {read_timeout:g} s") from None
        except zlib.error as exc:
            raise UpstreamError(f"provider sent a corrupt compressed body: {exc}") from None
        finally:
            self.close()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Abandon the response: the connection is closed so the provider stops generating."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class UpstreamPool:
    """Keep-alive connections per origin; broken or half-read ones are discarded, never reused.
    Up to max_idle_per_origin wait for reuse, enough for every request of a busy burst: each one
    closed for want of room costs a later request a new TCP (and TLS) handshake."""

    def __init__(self, make_tls: Callable[[], ssl.SSLContext], connect_timeout: float, read_timeout: float,
                 max_idle_per_origin: int = 256):
        self._make_tls = make_tls
        self._tls: ssl.SSLContext | None = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle_per_origin
        self.idle: dict[Origin, list[UpstreamConnection]] = {}
        self.opened = 0

    @property
    def tls(self) -> ssl.SSLContext:
        """Made on first use: loading the CA bundles takes tens of milliseconds that a gateway with
        only local providers never needs to spend."""
        if self._tls is None:
            self._tls = self._make_tls()
        return self._tls

    def release(self, connection: UpstreamConnection, reusable: bool) -> None:
        if reusable and connection.usable():
            idle = self.idle.setdefault(connection.origin, [])
            if len(idle) < self.max_idle:
                idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        for connections in self.idle.values():
            for connection in connections:
                connection.close()
        self.idle.clear()

    async def _open(self, origin: Origin) -> UpstreamConnection:
        tls = self.tls if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if origin.proxy is None:
                    reader, writer = await asyncio.open_connection(origin.host, origin.port, ssl=tls,
                                                                   limit=READ_SIZE)
                else:
                    reader, writer = await self._open_via_proxy(origin, tls)
        except TimeoutError:
            raise UpstreamError(f"connecting to {origin.host}:{origin.port} timed out after "
                                f"{self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        self.opened += 1
        return UpstreamConnection(origin, reader, writer)

    async def _open_via_proxy(self, origin: Origin, tls: ssl.SSLContext | None
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        proxy_host, proxy_port, auth = origin.proxy  # type: ignore[misc]
        reader, writer = await asyncio.open_connection(proxy_host, proxy_port, limit=READ_SIZE)
        if tls is None:
            return reader, writer          # plain HTTP goes through the proxy in absolute form
        target = f"{origin.host}:{origin.port}".encode()
        writer.write(http_head(b"CONNECT %s HTTP/1.1" % target, [(b"host", target), *(
            [(b"proxy-authorization", auth.encode())] if auth else [])]))
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status != b"200":
            writer.close()
            raise OSError(f"proxy {proxy_host}:{proxy_port} refused CONNECT: {head.splitlines()[0].decode()}")
        await writer.start_tls(tls, server_hostname=origin.host)
        return reader, writer

    async def request(self, origin: Origin, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> UpstreamResponse:
        """Send a request and return once the response head arrives (the body is read later).
        The head goes out unchecked: each header is a constant, a value h11 parsed from a client, or
        a provider's own, checked at start-up (build_upstream), as is the origin's host; the target
        is a path of the gateway's and a query h11 parsed."""
        if origin.proxy is not None and origin.scheme == "http":
            target = f"http://{origin.host_header}{target}"
        head = http_head(b"%s %s HTTP/1.1" % (method.encode(), target.encode("latin-1")),
                         [(b"host", origin.host_header.encode()), *headers,
                          (b"content-length", b"%d" % len(body)), (b"accept-encoding", b"identity")])
        idle = self.idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.usable():
                try:
                    return await self._exchange(connection, method, head, body, 0.0)
                except ConnectionDropped:
                    pass    # the provider closed a kept-alive connection as we reused it: retry fresh
            else:
                connection.close()
        began = time.perf_counter()
        connection = await self._open(origin)
        return await self._exchange(connection, method, head, body, time.perf_counter() - began)

    async def _exchange(self, connection: UpstreamConnection, method: str, head: bytes, body: bytes,
                        waited: float) -> UpstreamResponse:
        conn = connection.h11
        try:
            connection.writer.write(head + body)    # framed by the head's content-length
            began = time.perf_counter()
            await connection.writer.drain()
            early, final = b"", False                # the bytes before the final head has begun
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await connection.read(self.read_timeout)
                    waited, began = waited + time.perf_counter() - began, time.perf_counter()
                    if data and not final:
                        data, final = after_interim_heads(early + data)
                        if not final:
                            early = data
                            continue
                    conn.receive_data(data)
                elif type(event) is h11.Response:
                    headers = list(event.headers)
                    keep_alive = keeps_alive(event.http_version, headers)
                    framing: ChunkedBody | LengthBody
                    if method == "HEAD" or event.status_code in (204, 304):
                        framing = LengthBody(0)
                    elif any(n == b"transfer-encoding" for n, _ in headers):   # h11 accepts only chunked
                        framing = ChunkedBody()
                    else:
                        length = _content_length(headers)
                        framing = LengthBody(length)
                        keep_alive = keep_alive and length is not None    # else the body ends the connection
                    return UpstreamResponse(self, connection, event.status_code, headers, waited, framing,
                                            keep_alive)
                else:
                    raise ConnectionDropped("provider closed the connection before answering")
        except TimeoutError:
            connection.close()
            raise UpstreamError(f"provider did not answer within {self.read_timeout:g} s") from None
        except (OSError, h11.ProtocolError) as exc:
            connection.close()
            raise ConnectionDropped(f"provider connection failed: {exc or type(exc).__name__}") from None
        except BaseException:
            connection.close()
            raise

# ================================================================================================
# Providers and routing
# What each provider needs at run time (origin, auth headers, upstream profile), the aliases file
# that reloads itself, and the routing rule: aliases, then provider/model, then patterns.
# ================================================================================================

WIRE_PATHS = {"chat": "/chat/completions", "responses": "/responses", "messages": "/messages"}
LOOPBACK = Provider(name="loopback", wire="loopback", base_url="")


@dataclass(slots=True)
class Upstream:
    """A provider as the handlers use it, everything derivable computed once at start-up."""
    provider: Provider
    origin: Origin | None
    path_prefix: str
    auth_headers: list[tuple[bytes, bytes]]   # the key and the configured headers, checked at start-up
    profile: UpstreamProfile
    drop_tools: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def wire(self) -> str:
        return self.provider.wire

    def target(self, suffix: str) -> str:
        return self.path_prefix + suffix


def build_upstream(provider: Provider, env: dict[str, str]) -> Upstream:
    if provider is LOOPBACK:
        return Upstream(provider, None, "", [], UpstreamProfile())
    url = urlsplit(provider.base_url)
    scheme, host = url.scheme, url.hostname or ""
    origin = Origin(scheme, host, url.port or (443 if scheme == "https" else 80), proxy_for(scheme, host, env))
    if provider.wire == "messages":
        auth = [("x-api-key", provider.api_key)] if provider.api_key else []
    else:
        auth = [("authorization", f"Bearer {provider.api_key}")] if provider.api_key else []
    profile = UpstreamProfile(max_output_tokens=provider.max_output_tokens,
                              default_max_tokens=provider.default_max_tokens,
                              token_field=provider.token_field,
                              drop_schema_keys=frozenset(provider.drop_schema_keys),
                              reasoning=provider.reasoning)
    try:
        checked = checked_headers([("host", origin.host_header), *auth,
                                   *((name.lower(), value) for name, value in provider.headers.items())])
    except ValueError:
        raise SettingsError(f"provider {provider.name}: its base_url host, api_key or headers hold characters "
                            "an HTTP header cannot (a line break, or spaces in a header name?)") from None
    return Upstream(provider, origin, url.path.rstrip("/"), checked[1:], profile, frozenset(provider.drop_tools))


def read_alias_lines(text: str, source: str) -> list[tuple[str, str]]:
    """'pattern = model' lines; '#' comments; an optional [aliases] header is allowed."""
    aliases = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;" or line == "[aliases]":
            continue
        pattern, sep, model = line.partition("=")
        if not sep or not pattern.strip() or not model.strip():
            raise SettingsError(f"{source}:{number}: expected 'pattern = model', got {line!r}")
        aliases.append((pattern.strip(), model.strip()))
    return aliases


class AliasFile:
    """An aliases file re-read when its mtime or size changes; a broken file keeps the last good map."""

    def __init__(self, path: str):
        self.path = Path(path).expanduser() if path else None
        self.stamp: tuple[float, int] | None = None
        self.aliases: list[tuple[str, str]] = []

    def reload(self) -> bool:
        """Re-read if the file changed; True when the aliases were replaced."""
        if self.path is None:
            return False
        try:
            info = self.path.stat()
        except OSError:
            stamp = None
        else:
            stamp = (info.st_mtime, info.st_size)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        if stamp is None:
            self.aliases = []
            return True
        try:
            self.aliases = read_alias_lines(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, SettingsError) as exc:
            log.warning("aliases file not reloaded, keeping the last good aliases: %s", exc)
            return False
        log.info("aliases file loaded: %s (%d aliases)", self.path, len(self.aliases))
        return True


def _compile_rules(rules: list[tuple[str, str]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Exact names in a dict (one lookup), globs kept in order."""
    exact: dict[str, str] = {}
    globs: list[tuple[str, str]] = []
    for pattern, target in rules:
        if any(c in pattern for c in "*?["):
            globs.append((pattern, target))
        else:
            exact.setdefault(pattern, target)
    return exact, globs


def _match(name: str, exact: dict[str, str], globs: list[tuple[str, str]]) -> str | None:
    found = exact.get(name)
    if found is None:
        found = next((target for pattern, target in globs if fnmatch.fnmatchcase(name, pattern)), None)
    return found


class Router:
    """Model name -> (upstream, model to send). Aliases, then 'provider/model', then route patterns."""

    def __init__(self, settings: Settings, env: dict[str, str]):
        self.upstreams = {name: build_upstream(p, env) for name, p in settings.providers.items()}
        self.upstreams["loopback"] = build_upstream(LOOPBACK, env)
        self.settings_aliases = settings.aliases
        self.alias_file = AliasFile(settings.aliases_file)
        self.routes = settings.routes
        self.configured = bool(settings.providers)
        self.route_exact, self.route_globs = _compile_rules(self.routes)
        models = [(model, name) for name, p in settings.providers.items() for model in p.models]
        self.model_exact, self.model_globs = _compile_rules(models)
        self.alias_file.reload()
        self._compile_aliases()
        self._cache: dict[str, tuple[Upstream, str]] = {}

    def _compile_aliases(self) -> None:
        self.alias_exact, self.alias_globs = _compile_rules(self.settings_aliases + self.alias_file.aliases)
        self._cache = {}

    def reload_aliases(self) -> None:
        if self.alias_file.reload():
            self._compile_aliases()

    @property
    def aliases(self) -> list[tuple[str, str]]:
        return self.settings_aliases + self.alias_file.aliases

    def resolve(self, model: str) -> tuple[Upstream, str]:
        """Raises GatewayError 404 model_not_found when providers exist but none takes the model."""
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        name = _match(model, self.alias_exact, self.alias_globs) or model
        prefix, slash, rest = name.partition("/")
        if slash and prefix in self.upstreams and rest:
            resolved = self.upstreams[prefix], rest
        else:
            target = _match(name, self.route_exact, self.route_globs) or _match(name, self.model_exact,
                                                                                 self.model_globs)
            if target is None and not self.configured:
                target = "loopback"
            if target is None:
                routes = ", ".join(f"{p}={t}" for p, t in self.routes) or "none"
                raise GatewayError(404, "not_found", f"no provider serves model {name!r}"
                                   + (f" (requested as {model!r})" if name != model else "")
                                   + f"; routes: {routes}. Add a route in [routes] or use 'provider/model'.",
                                   param="model", code="model_not_found")
            resolved = self.upstreams[target], name
        if len(self._cache) < 4096:
            self._cache[model] = resolved
        return resolved

    def model_list(self) -> list[tuple[str, str]]:
        """(model id, owner) for /v1/models: providers' models, alias names, then loopback."""
        listed = [(model, name) for name, p in self.upstreams.items() for model in p.provider.models]
        listed += [(pattern, "alias") for pattern, _ in self.aliases if not any(c in pattern for c in "*?[")]
        if not self.configured:
            listed.append(("loopback", "tokligence"))
        return listed

# ---- request policies ----------------------------------------------------------------------------
# They work on the client's raw body, before passthrough or translation, so both paths share them.

LOOP_WARNING = ("Note from the gateway: the conversation ends with {count} identical calls to the tool "
                "'{name}' with the same arguments. Do not call it again with those arguments: use the results "
                "you already have, try a different approach, or tell the user what is blocking you.")
LOOP_STOP = ("I stopped because I was repeating myself: the last {count} tool calls were the same call to "
             "'{name}' with identical arguments, and the results did not change. Tell me how you would like "
             "to continue.")


def _canonical_arguments(value: Any) -> str:
    """Arguments compared by meaning, so key order and spacing do not hide a repeat."""
    if isinstance(value, str):
        try:
            value = json_loads(value)
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _dicts(value: Any) -> Iterator[dict]:
    """The dict items of a list, newest (last) first; anything malformed is skipped, not fatal:
    the wire's parser reports bad bodies properly later."""
    if isinstance(value, list):
        yield from (item for item in reversed(value) if isinstance(item, dict))


def _chat_calls(body: dict) -> Iterator[tuple[str, str]]:
    for message in _dicts(body.get("messages")):
        if message.get("role") == "user":
            return                       # the user spoke since: older calls are no loop any more
        if message.get("role") == "assistant":
            for call in _dicts(message.get("tool_calls")):
                function = call.get("function") or call.get("custom") or {}
                if isinstance(function, dict):
                    yield str(function.get("name")), _canonical_arguments(
                        function.get("arguments", function.get("input")))


def _messages_calls(body: dict) -> Iterator[tuple[str, str]]:
    for message in _dicts(body.get("messages")):
        content = message.get("content")
        if message.get("role") == "user" and not any(isinstance(block, dict) and block.get("type") == "tool_result"
                                                     for block in (content if isinstance(content, list) else [])):
            return                       # the user spoke since (not only tool results)
        if message.get("role") == "assistant":
            for block in _dicts(message.get("content")):
                if block.get("type") == "tool_use":
                    yield str(block.get("name")), _canonical_arguments(block.get("input"))


def _responses_calls(body: dict) -> Iterator[tuple[str, str]]:
    for item in _dicts(body.get("input")):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return                       # the user spoke since: older calls are no loop any more
        if item.get("type") in ("function_call", "custom_tool_call"):
            yield str(item.get("name")), _canonical_arguments(item.get("arguments", item.get("input")))


TOOL_CALL_HISTORY: dict[str, Callable[[dict], Iterator[tuple[str, str]]]] = {
    "chat": _chat_calls, "messages": _messages_calls, "responses": _responses_calls}


def repeated_tool_call(wire: str, body: dict) -> tuple[str, int]:
    """The tool the history ends with and how many times in a row it was called with the same arguments."""
    calls = TOOL_CALL_HISTORY[wire](body)
    last = next(calls, None)
    if last is None:
        return "", 0
    count = 1
    for call in calls:
        if call != last:
            break
        count += 1
    return last[0], count


def add_system_note(wire: str, body: dict, note: str) -> None:
    """Appends a note to the system prompt in the wire's own place for it."""
    if wire == "messages":
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = system + [{"type": "text", "text": note}]
        else:
            body["system"] = f"{system}\n\n{note}" if isinstance(system, str) and system else note
    elif wire == "responses":
        instructions = body.get("instructions")
        body["instructions"] = f"{instructions}\n\n{note}" if isinstance(instructions, str) and instructions else note
    else:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        leading = next((i for i, m in enumerate(messages)
                        if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))), len(messages))
        body["messages"] = messages[:leading] + [{"role": "system", "content": note}] + messages[leading:]


def _tool_identity(tool: Any) -> set[str]:
    """The names a tool or tool choice goes by in any wire: its type and its (function) name."""
    if isinstance(tool, str):
        return {tool}
    if not isinstance(tool, dict):
        return set()
    names = {tool.get("type"), tool.get("name")}
    for nested in ("function", "custom"):
        if isinstance(tool.get(nested), dict):
            names.add(tool[nested].get("name"))
    return {name for name in names if isinstance(name, str)}


def _drop_tools_from(tools: list, unsupported: frozenset[str]) -> tuple[list, set[str]]:
    """(the tools kept, the names dropped); a namespace tool loses the tools inside it that match."""
    kept, dropped = [], set()
    for tool in tools:
        if hit := _tool_identity(tool) & unsupported:
            dropped |= hit
            continue
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            inner, gone = _drop_tools_from(tool["tools"], unsupported)
            if gone:
                tool, dropped = {**tool, "tools": inner}, dropped | gone
        kept.append(tool)
    return kept, dropped


def drop_unsupported_tools(wire: str, body: dict, unsupported: frozenset[str]) -> list[str]:
    """Removes the tools a provider rejects, also from Codex's additional_tools items and inside
    namespace tools; a tool_choice naming one falls back to auto. Returns the names dropped."""
    if not unsupported:
        return []
    dropped: set[str] = set()
    items = body.get("input") if wire == "responses" else None
    for index, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("type") == "additional_tools" and isinstance(item.get("tools"), list):
            inner, gone = _drop_tools_from(item["tools"], unsupported)
            if gone:
                items[index], dropped = {**item, "tools": inner}, dropped | gone
    tools = body.get("tools")
    if not isinstance(tools, list):
        return sorted(dropped)
    kept, gone = _drop_tools_from(tools, unsupported)
    if not gone:
        return sorted(dropped)
    dropped = sorted(dropped | gone)
    if kept:
        body["tools"] = kept
    else:
        del body["tools"]
    if not kept:
        body.pop("tool_choice", None)        # providers reject a tool choice without tools
        body.pop("parallel_tool_calls", None)
    elif _tool_identity(body.get("tool_choice")) & unsupported:
        body["tool_choice"] = {"type": "auto"} if wire == "messages" else "auto"
    return dropped


# ================================================================================================
# Handlers
# One coroutine per endpoint: parse, route, then relay (passthrough), translate or answer locally
# (loopback); every inference request ends in one log line and one ledger row. Then the admin and
# usage APIs (JSON under /api/v1/), whose account changes the CLI shares.
# ================================================================================================

JSON_HEADERS = [("content-type", "application/json")]
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
# A client's headers a passthrough does not relay: hop-by-hop ones, credentials and content-type (ours).
NOT_RELAYED = HOP_BY_HOP | CREDENTIAL_HEADERS | {b"content-type"}
ANTHROPIC_VERSION = b"2023-06-01"
TOKEN_LIMIT_FIELDS = {"chat": ("max_tokens", "max_completion_tokens"), "messages": ("max_tokens",),
                      "responses": ("max_output_tokens",)}


@dataclass(frozen=True, slots=True)
class Wire:
    """Everything the handlers need to speak one wire, as client or as provider."""
    name: str
    parse_request: Callable[[dict], Conversation]
    render_request: Callable[[Conversation, UpstreamProfile], dict]
    parse_response: Callable[[dict], Reply]
    render_response: Callable[[Reply, Conversation, dict], dict]
    decoder: Callable[[], Any]
    encoder: Callable[[Conversation, dict, str], Any]
    error_body: Callable[[GatewayError], dict]
    parse_error: Callable[[int, bytes], GatewayError]
    usage_of_body: Callable[[dict], Usage]
    usage_of_event: Callable[[SSEEvent], Usage | None]
    stream_error: Callable[[GatewayError, str | None, str | None], bytes]   # (error, first and last event data)


def _chat_usage_of_event(event: SSEEvent) -> Usage | None:
    if '"usage":{' not in event.data and '"usage": {' not in event.data:
        return None
    chunk = json_loads(event.data)
    return chat_parse_usage(chunk["usage"]) if isinstance(chunk.get("usage"), dict) else None


def _messages_usage_of_event(event: SSEEvent) -> Usage | None:
    if event.event == "message_start":
        return messages_parse_usage(json_loads(event.data).get("message", {}).get("usage") or {})
    if event.event == "message_delta":
        return messages_parse_usage(json_loads(event.data).get("usage") or {})
    return None


def _responses_usage_of_event(event: SSEEvent) -> Usage | None:
    if event.event in ("response.completed", "response.incomplete", "response.failed"):
        return responses_parse_usage(json_loads(event.data).get("response", {}).get("usage") or {})
    return None


def _responses_stream_error(err: GatewayError, first: str | None, last: str | None) -> bytes:
    """response.failed for a relayed stream the provider broke off: Responses clients wait for a
    terminal event. It continues the stream's sequence numbers and names its response."""
    def field(data: str | None, name: str, default: Any) -> Any:
        try:
            return json_loads(data).get(name, default) if data else default
        except ValueError:
            return default

    error = chat_error_body(err)["error"]
    response = {**field(first, "response", {}), "status": "failed",
                "error": {"code": error["code"] or error["type"], "message": error["message"]}}
    return sse_event("response.failed", {"type": "response.failed", "response": response,
                                         "sequence_number": field(last, "sequence_number", -1) + 1})


WIRES: dict[str, Wire] = {
    "chat": Wire(
        "chat", chat_parse_request, chat_render_request, chat_parse_response,
        lambda reply, conv, body: chat_render_response(reply), lambda: ChatStreamDecoder(),
        lambda conv, body, model: ChatStreamEncoder(model, conv.include_usage),
        chat_error_body, chat_parse_error, lambda body: chat_parse_usage(body.get("usage") or {}),
        _chat_usage_of_event, lambda err, first, last: sse_event(None, chat_error_body(err))),
    "messages": Wire(
        "messages", messages_parse_request, messages_render_request, messages_parse_response,
        lambda reply, conv, body: messages_render_response(reply), lambda: MessagesStreamDecoder(),
        lambda conv, body, model: MessagesStreamEncoder(model),
        messages_error_body, messages_parse_error, lambda body: messages_parse_usage(body.get("usage") or {}),
        _messages_usage_of_event, lambda err, first, last: sse_event("error", messages_error_body(err))),
    "responses": Wire(
        "responses", responses_parse_request, responses_render_request, responses_parse_response,
        lambda reply, conv, body: responses_render_response(reply, request=body, name_map=conv.tool_namespaces),
        lambda: ResponsesStreamDecoder(),
        lambda conv, body, model: ResponsesStreamEncoder(model, request=body, name_map=conv.tool_namespaces),
        chat_error_body, chat_parse_error,      # the Responses API errs in the Chat API's shape
        lambda body: responses_parse_usage(body.get("usage") or {}), _responses_usage_of_event,
        _responses_stream_error),
}


@dataclass(slots=True)
class Exchange:
    """One inference request's facts, filled in as it goes; becomes the log line and ledger row."""
    id: str
    endpoint: str
    client_wire: str
    started: float
    model_requested: str = ""
    model_served: str = ""
    provider: str = ""
    provider_wire: str = ""
    stream: bool = False
    status: int = 0
    error_type: str | None = None
    usage: Usage = field(default_factory=Usage)
    upstream: UpstreamResponse | None = None    # its `waited` is the time spent on the provider
    ttfb: float | None = None          # seconds to the first body byte sent to the client
    key: KeyInfo | None = None
    store: bool = False                # keep the Responses object for previous_response_id
    loop: tuple[str, int] | None = None    # the repeated tool call that ended the turn
    time: float = field(default_factory=now)

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.upstream_wait) * 1000)

    @property
    def upstream_wait(self) -> float:
        return self.upstream.waited if self.upstream else 0.0


def parse_json_object(body: bytes) -> dict:
    if not body:
        raise GatewayError(400, "invalid_request", "the request body is empty; expected a JSON object")
    try:
        parsed = json_loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, "invalid_request", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise GatewayError(400, "invalid_request", "the request body must be a JSON object")
    return parsed


def loopback_reply(conv: Conversation, model: str) -> Reply:
    """The built-in provider: echoes the last user text, with token counts from the local estimate."""
    last = next((m for m in reversed(conv.messages) if m.role == "user"), None)
    texts = [p.text for p in (last.parts if last else []) if isinstance(p, Text)]
    text = "echo: " + (" ".join(texts) if texts else "(no text)")
    output = max(1, (len(text) + 3) // 4)
    return Reply(new_id("msg_"), model, [Text(text)], "stop",
                 usage=Usage(input_tokens=estimate_tokens(conv), output_tokens=output))


def input_items(value: Any) -> list:
    """A Responses input as a list of items (a plain string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return list(value) if isinstance(value, list) else []


def loop_stop_reply(name: str, count: int, model: str) -> Callable[[Conversation, str], Reply]:
    """The final answer that ends a looping turn instead of calling the provider again."""
    text = LOOP_STOP.format(name=name, count=count)
    return lambda conv, served: Reply(new_id("msg_"), model, [Text(text)], "stop",
                                      usage=Usage(output_tokens=max(1, len(text) // 4)))


def loopback_embedding(text: str, dimensions: int = 16) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(dimensions)]


def is_gateway_key(credential: str) -> bool:
    return credential.removeprefix("Bearer ").startswith("tok_")


class ThinkingMemory:
    """Signed thinking blocks by the id of the tool call they led to. Chat and Responses clients
    cannot carry Anthropic's signatures back, yet Anthropic rejects a tool-use turn without its
    thinking; so the gateway puts the block back on the next turn (bounded, oldest forgotten first)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.blocks: dict[str, list[Thinking]] = {}

    def remember(self, parts: list[Part]) -> None:
        thinking = [p for p in parts if isinstance(p, Thinking) and (p.signature or p.redacted)]
        if not thinking:
            return
        for part in parts:
            if isinstance(part, ToolCall):
                self.blocks[part.id] = thinking
        while len(self.blocks) > self.size:
            del self.blocks[next(iter(self.blocks))]

    def restore(self, conv: Conversation) -> None:
        for message in conv.messages:
            if message.role != "assistant" or any(isinstance(p, Thinking) and (p.signature or p.redacted)
                                                  for p in message.parts):
                continue
            call = next((p for p in message.parts if isinstance(p, ToolCall)), None)
            if call is not None and call.id in self.blocks:
                message.parts[:0] = self.blocks[call.id]


# ---- log events, accounts and API parameters (the admin and usage APIs and the CLI share them)
@dataclass(slots=True)
class LogEvent:
    """A structured log line, logged as log.info("%s", LogEvent(name, fields)): "name key=value …" in
    text logs, separate members in JSON logs (JSONLogFormatter). Formatted only if a handler emits it."""
    name: str
    fields: dict[str, Any]

    def __str__(self) -> str:
        # None is "-" and booleans are lower case; one f-string per field, since this runs per request.
        return self.name + "".join([
            f" {key}={'-' if value is None else value if type(value) is not bool else str(value).lower()}"
            for key, value in self.fields.items()])


def find_user(conn: sqlite3.Connection, ref: int | str) -> dict[str, Any]:
    """The user with this id or email; a 404 when there is none."""
    user = get_user(conn, ref)
    if user is None:
        raise GatewayError(404, "not_found", f"no user {ref}", code="user_not_found")
    return user


class Accounts:
    """Changes to users and keys, each followed by its lifecycle hook and an audit log line. The admin
    API runs them on the ledger writer's thread, the CLI on a connection of its own. actor is who made
    the change, for the hook: an admin's user id, "local" (the API with auth off) or "cli"."""

    def __init__(self, conn: sqlite3.Connection, hooks: HookRunner, actor: str) -> None:
        self.conn = conn
        self.hooks = hooks
        self.actor = actor

    def add_user(self, email: str, name: str = "", role: str = "user") -> dict[str, Any]:
        user = create_user(self.conn, email, name, role)
        self._emit("user.created", user["id"], user=user)
        return user

    def edit_user(self, ref: int | str, **fields: str) -> dict[str, Any]:
        """Changes any of email, name, role and status; a change to status disabled is a user.disabled."""
        user = find_user(self.conn, ref)
        if fields.get("role", "admin") != "admin" or fields.get("status", "active") != "active":
            self._keep_an_admin(user)
        user = update_user(self.conn, user["id"], **fields)
        event = "user.disabled" if fields.get("status") == "disabled" else "user.updated"
        self._emit(event, user["id"], user=user, changed=sorted(fields))
        return user

    def disable_user(self, ref: int | str) -> dict[str, Any]:
        """The user's keys stop working at once; their data stays, and re-enabling brings it all back."""
        return self.edit_user(ref, status="disabled")

    def remove_user(self, ref: int | str) -> dict[str, Any]:
        """Deletes the user and their keys (their ledger rows stay); returns the user as it was."""
        user = find_user(self.conn, ref)
        self._keep_an_admin(user)
        delete_user(self.conn, user["id"])
        self._emit("user.deleted", user["id"], user=user)
        return user

    def import_users(self, lines: Iterable[str]) -> dict[str, list[Any]]:
        result = import_users_csv(self.conn, lines)
        for user in result["created"]:
            self._emit("user.created", user["id"], user=user)
        return result

    def issue_key(self, ref: int | str, name: str | None = None,
                  expires_at: float | None = None) -> tuple[str, dict[str, Any]]:
        """A new key for the user: (the key itself, to be shown once; its stored row)."""
        plaintext, key = create_key(self.conn, find_user(self.conn, ref)["id"], name, expires_at)
        self._emit("key.created", key["user_id"], key=key)
        return plaintext, key

    def revoke(self, key_id: int) -> dict[str, Any]:
        try:
            key = revoke_key(self.conn, key_id)
        except ValueError as error:   # its one failure: no such key
            raise GatewayError(404, "not_found", str(error), code="key_not_found") from None
        self._emit("key.revoked", key["user_id"], key=key)
        return key

    def _keep_an_admin(self, user: dict[str, Any]) -> None:
        """Refuses to demote, disable or delete the last active admin: nobody could manage users then."""
        if user["role"] == "admin" and user["status"] == "active" and not self.conn.execute(
                "SELECT 1 FROM users WHERE role = 'admin' AND status = 'active' AND id != ?", (user["id"],)
        ).fetchone():
            raise ValueError(f"{user['email']} is the last active admin: make another admin first")

    def _emit(self, event_type: str, user_id: int, **metadata: Any) -> None:
        log.info("%s", LogEvent(event_type, {"user": user_id, "actor": self.actor}))
        self.hooks.emit(event_type, user_id=user_id, actor=self.actor, metadata=metadata)


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it names a zone)."""
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected unix seconds or an ISO date or time (2025-01-31, 2025-01-31T12:00Z), "
                         f"got {text!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def parse_expiry(value: str | float) -> float:
    """A key's expiry: a number of days from now, or an ISO date or time; it must lie ahead."""
    try:
        expires_at = time.time() + float(value) * SECONDS_PER_DAY
    except ValueError:
        expires_at = parse_time(str(value))
    if expires_at <= time.time():
        raise ValueError(f"the expiry {value!r} is not in the future")
    return expires_at


def convert_parameters(pairs: Iterable[tuple[str, str]],
                       converters: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Query parameters (or CLI options) by name, each converted; ValueError names a bad or unknown one."""
    converted = {}
    for name, text in pairs:
        if name not in converters:
            raise ValueError(f"unknown parameter {name!r}; known: {', '.join(converters)}")
        try:
            converted[name] = converters[name](text)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return converted


USAGE_SUMMARY_PARAMETERS: dict[str, Callable[[str], Any]] = {"since": parse_time, "until": parse_time,
                                                             "user_id": int}
USAGE_LOG_PARAMETERS: dict[str, Callable[[str], Any]] = {
    **USAGE_SUMMARY_PARAMETERS, "limit": int, "offset": int, "model": str, "provider": str, "key_id": int,
    "status": int}


def json_fields(request: Request, types: dict[str, tuple[type, ...]], required: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """The request's JSON object, checked: only these members, each of one of its types."""
    body = parse_json_object(request.body)
    for name, value in body.items():
        if name not in types:
            raise GatewayError(400, "invalid_request", f"unknown field {name!r}; known: {', '.join(types)}",
                               param=name)
        if isinstance(value, bool) or not isinstance(value, types[name]):
            expected = " or ".join(JSON_TYPE_NAMES[kind] for kind in types[name])
            raise GatewayError(400, "invalid_request", f"{name!r} must be {expected}", param=name)
    for name in required:
        if name not in body:
            raise GatewayError(400, "invalid_request", f"{name!r} is required", param=name)
    return body


ADMIN_USERS = "/api/v1/admin/users"
ADMIN_KEYS = "/api/v1/admin/keys"


def resource_id(request: Request, collection: str, action: str = "") -> int:
    """The id in collection/ID or collection/ID/action; any other path is a 404."""
    ident, _, rest = request.path.rstrip("/").removeprefix(collection + "/").partition("/")
    if ident.isdigit() and rest == action:
        return int(ident)
    raise GatewayError(404, "not_found", f"no such endpoint: {request.method} {request.path}")


def query_parameters(request: Request, converters: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    return convert_parameters(parse_qsl(request.query, keep_blank_values=True), converters)


def usage_filters(request: Request, converters: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """The usage query's filters; a user's key sees its own user's rows only, an admin's everything."""
    filters = query_parameters(request, converters)
    key = request.key
    if key is None or key.user_role == "admin":
        return filters
    if filters.setdefault("user_id", key.user_id) != key.user_id:
        raise GatewayError(403, "permission", "a user's key sees only its own user's usage", param="user_id")
    return filters


class Gateway:
    """The application: routes requests to handlers; owns the router, the pool and the ledger."""

    def __init__(self, settings: Settings, env: dict[str, str]):
        self.settings = settings
        self.router = Router(settings, env)
        self.pool = UpstreamPool(lambda: make_ssl_context(settings.ca_bundle, env), settings.connect_timeout,
                                 settings.read_timeout)
        self.started = time.time()
        self.thinking = ThinkingMemory()
        self.database = None if settings.ledger_path == "off" else open_database(settings.ledger_path)
        if self.database is None and not settings.auth_disabled:
            raise SettingsError("auth needs the database: ledger_path cannot be 'off' when auth_disabled = false")
        self.ledger = LedgerWriter(self.database)
        self.keys = None if settings.auth_disabled else KeyIndex(self.database)  # type: ignore[arg-type]
        self.prices = PriceTable(settings.prices)
        self.hooks = HookRunner(settings.hook_script or None, settings.hook_timeout)
        self.allowed_hosts = frozenset(host.lower() for host in settings.allowed_hosts)
        self.loops = {"warned": 0, "stopped": 0}
        self.endpoints: dict[str, dict[str, Callable]] = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_message_tokens},
            "/v1/responses/input_tokens": {"POST": self.count_response_tokens},
            "/v1/responses": {"POST": self.responses},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/models": {"GET": self.models},
            "/health": {"GET": self.health},
            "/": {"GET": self.health},
            ADMIN_USERS: {"GET": self.api(self.api_list_users), "POST": self.api(self.api_create_user)},
            ADMIN_KEYS: {"GET": self.api(self.api_list_keys), "POST": self.api(self.api_create_key)},
            "/api/v1/usage/summary": {"GET": self.api(self.api_usage_summary, admin=False)},
            "/api/v1/usage/logs": {"GET": self.api(self.api_usage_logs, admin=False)},
        }
        # Paths ending in an id: prefix -> methods.
        self.resources: dict[str, dict[str, Callable]] = {
            "/v1/responses/": {"GET": self.get_stored_response, "DELETE": self.delete_stored_response},
            ADMIN_USERS + "/": {"GET": self.api(self.api_get_user), "PATCH": self.api(self.api_update_user),
                                "DELETE": self.api(self.api_delete_user),
                                "POST": self.api(self.api_disable_user)},    # …/ID/disable
            ADMIN_KEYS + "/": {"POST": self.api(self.api_revoke_key)},          # …/ID/revoke
        }
        # Usage and admin reads run here, off the event loop and off the writer thread.
        self.readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokligence-reader")

    def team_edition_start(self) -> str | None:
        """With auth on and no admin yet: creates one and returns its key, to be shown once."""
        if self.keys is None:
            return None
        assert self.database is not None
        try:
            created = ensure_admin(self.database, self.settings.admin_key or None)
        except ValueError as error:   # a malformed admin_key
            raise SettingsError(f"{self.settings.origins['gateway.admin_key']}: {error}") from None
        self.keys.invalidate()
        return created

    def close(self) -> None:
        """At shutdown: every ledger row written, hooks finished, connections closed."""
        self.pool.close()
        self.readers.shutdown()
        self.ledger.close()
        self.hooks.close()
        if self.database is not None:
            self.database.close()

    # ---- dispatch ----------------------------------------------------------------------------
    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.path
        if path.startswith("/anthropic/"):
            path = path[len("/anthropic"):]
        path = path.rstrip("/") or "/"
        wire = client_wire_of(path)
        try:
            methods = self.endpoints.get(path) or next(
                (methods for prefix, methods in self.resources.items() if path.startswith(prefix)), None)
            if methods is None:
                raise GatewayError(404, "not_found", f"no such endpoint: {request.method} {request.path}")
            # HEAD is answered as GET would be, without the body (the Responder leaves it out).
            method = "GET" if request.method == "HEAD" and "HEAD" not in methods else request.method
            if method not in methods:
                raise GatewayError(405, "invalid_request", f"{request.method} is not allowed on {request.path}",
                                   headers={"allow": ", ".join([*methods, *(["HEAD"] if "GET" in methods else [])])})
            if self.keys is None:
                self.check_host(request)
                if path.startswith("/api/"):
                    self.check_loopback_peer(request)
            elif path.startswith(("/v1/", "/api/")):
                request.key = self.authenticate(request)
        except GatewayError as err:
            await self.send_error(responder, wire, err)
            return
        await methods[method](request, responder)

    def check_host(self, request: Request) -> None:
        """Without auth, only loopback Host names (and allowed ones) are served, so a web page cannot
        drive the gateway through DNS rebinding."""
        host = host_name(request.headers.get("host", ""))
        if not (is_loopback_name(host) or host in self.allowed_hosts):
            raise GatewayError(403, "permission", f"requests for host {host!r} are refused: auth is off, so only "
                               "loopback names are served; add the name to allowed_hosts or turn auth on")

    @staticmethod
    def check_loopback_peer(request: Request) -> None:
        """Without auth, the admin and usage APIs answer only this machine: nobody else may manage
        users or read the ledger (allowed_hosts opens the inference endpoints, not these)."""
        if not is_loopback_peer(request.peer):
            raise GatewayError(403, "permission", "the admin and usage APIs answer only loopback clients "
                               "while auth is off; turn auth on to use them from elsewhere")

    def authenticate(self, request: Request) -> KeyInfo:
        """A valid key from Authorization: Bearer or x-api-key (Claude Code may send both)."""
        assert self.keys is not None
        self.keys.refresh_if_changed()
        presented = [request.headers.get("x-api-key", ""),
                     request.headers.get("authorization", "").removeprefix("Bearer ").strip()]
        for credential in presented:
            if credential and (key := self.keys.lookup(credential)) is not None:
                return key
        message = ("invalid, expired or revoked API key" if any(presented)
                   else "missing API key: send it as 'Authorization: Bearer tok_…' or 'x-api-key'")
        raise GatewayError(401, "authentication", message)

    async def send_error(self, responder: Responder, wire: str, err: GatewayError,
                         request_id: str | None = None) -> None:
        status, headers, body = self.error_response(wire, err, request_id)
        await responder.respond(status, headers, body)

    def error_response(self, wire: str, err: GatewayError, request_id: str | None = None
                       ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = JSON_HEADERS + list(err.headers.items())
        if request_id:
            headers.append(("x-request-id", request_id))
        return err.status, headers, json.dumps(WIRES[wire].error_body(err)).encode()

    def protocol_error(self, path: str, err: GatewayError) -> tuple[int, list[tuple[str, str]], bytes]:
        return self.error_response(client_wire_of(path), err)

    # ---- inference endpoints -------------------------------------------------------------------
    async def chat_completions(self, request: Request, responder: Responder) -> None:
        await self.infer(request, responder, "chat")

    async def messages(self, request: Request, responder: Responder) -> None:
        await self.infer(request, responder, "messages")

    async def responses(self, request: Request, responder: Responder) -> None:
        await self.infer(request, responder, "responses")

    async def infer(self, request: Request, responder: Responder, client_wire: str) -> None:
        ex = Exchange(request.headers.get("x-request-id") or new_id("req_"), request.path, client_wire,
                      request.started, key=request.key)
        try:
            body = parse_json_object(request.body)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise GatewayError(400, "invalid_request", "'model' is required and must be a non-empty string",
                                   param="model")
            stream = body.get("stream", False)
            if not isinstance(stream, bool) and stream is not None:
                raise GatewayError(400, "invalid_request", "'stream' must be a boolean", param="stream")
            ex.model_requested, ex.stream = model, bool(stream)
            upstream, served = self.router.resolve(model)
            ex.provider, ex.provider_wire, ex.model_served = upstream.name, upstream.wire, served
            rewritten = self.apply_policies(ex, body, upstream)
            if ex.loop is not None:
                await self.answer_locally(ex, responder, body, loop_stop_reply(*ex.loop, model))
            elif client_wire == "responses" and upstream.wire != "responses":
                # The provider keeps no Responses state: the gateway stores and expands it.
                body = await self.expand_previous_response(body, ex.key)
                ex.store = body.get("store") is not False and self.database is not None
                await self.answer(ex, request, responder, body, upstream)
            elif upstream.wire == client_wire:
                await self.passthrough(ex, request, responder, body, upstream, rewritten)
            else:
                await self.answer(ex, request, responder, body, upstream)
        except GatewayError as err:
            ex.status, ex.error_type = err.status, err.kind
            if not responder.started:
                await self.send_error(responder, client_wire, err, ex.id)
        except (ConnectionError, asyncio.CancelledError):
            ex.status = 499                      # the client went away
            raise
        except Exception:                        # a fault of the gateway's, which the server answers
            ex.status, ex.error_type = 500, "api_error"
            raise
        finally:
            await self.finish(ex)

    async def answer(self, ex: Exchange, request: Request, responder: Responder, body: dict,
                     upstream: Upstream) -> None:
        if upstream.wire == "loopback":
            await self.answer_locally(ex, responder, body, loopback_reply)
        else:
            await self.translate(ex, request, responder, body, upstream)

    def apply_policies(self, ex: Exchange, body: dict, upstream: Upstream) -> bool:
        """Tool filtering and loop detection on the client's body; True if the body was changed.
        Sets ex.loop when the turn must end without calling the provider."""
        changed = False
        if upstream.drop_tools and (dropped := drop_unsupported_tools(ex.client_wire, body, upstream.drop_tools)):
            log.info("request id=%s dropped tools %s: provider %s does not take them", ex.id,
                     ", ".join(dropped), upstream.name)
            changed = True
        settings = self.settings
        if settings.loop_warn_after or settings.loop_stop_after:
            name, count = repeated_tool_call(ex.client_wire, body)
            if settings.loop_stop_after and count >= settings.loop_stop_after:
                self.loops["stopped"] += 1
                ex.error_type = "loop_stopped"
                log.warning("request id=%s loop stopped: %d identical calls to %s", ex.id, count, name)
                ex.loop = (name, count)
                return changed
            if settings.loop_warn_after and count >= settings.loop_warn_after:
                self.loops["warned"] += 1
                log.warning("request id=%s loop warning: %d identical calls to %s", ex.id, count, name)
                add_system_note(ex.client_wire, body, LOOP_WARNING.format(name=name, count=count))
                changed = True
        return changed

    async def finish(self, ex: Exchange) -> None:
        """The request's log line and ledger row (awaiting only when the ledger queue is full)."""
        latency = (time.perf_counter() - ex.started) * 1000
        u = ex.usage
        key = ex.key
        if request_log.isEnabledFor(logging.INFO):
            fields = {"id": ex.id, "path": ex.endpoint, "model": ex.model_requested or None,
                      "provider": ex.provider or None, "status": ex.status, "stream": ex.stream,
                      "ms": round(latency, 1), "in": u.input_tokens, "out": u.output_tokens,
                      "cache_read": u.cache_read, "cache_write": u.cache_write}
            if key:
                fields |= {"user": key.user_id, "key": key.key_id}
            request_log.info("%s", LogEvent("request", fields))
        price = self.prices.price_for(ex.model_served) if ex.model_served else None
        await self.ledger.put({
            "id": ex.id, "ts": ex.time, "user_id": key.user_id if key else None,
            "key_id": key.key_id if key else None, "endpoint": ex.endpoint, "client_wire": ex.client_wire,
            "provider": ex.provider or None, "provider_wire": ex.provider_wire or None,
            "model_requested": ex.model_requested or None, "model_served": ex.model_served or None,
            "stream": int(ex.stream), "status": ex.status, "error_type": ex.error_type,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "cache_read_tokens": u.cache_read,
            "cache_write_tokens": u.cache_write, "reasoning_tokens": u.reasoning, "latency_ms": latency,
            "ttfb_ms": ex.ttfb * 1000 if ex.ttfb is not None else latency,
            "overhead_ms": ex.overhead_ms(),
            "cost_usd": cost_usd(u.input_tokens, u.output_tokens, u.cache_read, u.cache_write, price)})

    def response_headers(self, ex: Exchange, base: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return base + [("x-request-id", ex.id), ("x-tokligence-overhead-ms", f"{ex.overhead_ms():.3f}")]

    async def answer_locally(self, ex: Exchange, responder: Responder, body: dict,
                             answer: Callable[[Conversation, str], Reply]) -> None:
        conv = WIRES[ex.client_wire].parse_request(body)
        await self.send_reply(ex, responder, conv, body, answer(conv, ex.model_requested))

    async def send_reply(self, ex: Exchange, responder: Responder, conv: Conversation, body: dict,
                         reply: Reply) -> None:
        """A whole Reply in the client's wire, as a stream or not (local answers, provider JSON)."""
        wire = WIRES[ex.client_wire]
        ex.usage, ex.status = reply.usage, 200
        if ex.stream:
            encoder = wire.encoder(conv, body, ex.model_requested)
            payload = b"".join(encoder.feed(event) for event in reply_events(reply))
            await self.keep_response(ex, body, encoder)
            await responder.respond(200, self.response_headers(ex, SSE_HEADERS), payload)
        else:
            rendered = wire.render_response(reply, conv, body)
            if ex.store:
                await self.store_response(ex, body, rendered)
            await responder.respond(200, self.response_headers(ex, JSON_HEADERS),
                                    unicode_json(rendered).encode())

    # ---- stored responses (Responses API state for providers that keep none) ------------------------
    async def keep_response(self, ex: Exchange, body: dict, encoder: Any) -> None:
        """Stores a streamed Responses object once complete, before its last event is sent, so a
        follow-up that arrives at once finds it."""
        if ex.store and encoder.response is not None:
            await self.store_response(ex, body, encoder.response)

    async def store_response(self, ex: Exchange, body: dict, response: dict) -> None:
        ex.store = False
        stored = {"response": response, "items": input_items(body.get("input")) + response.get("output", []),
                  "user_id": ex.key.user_id if ex.key else None}
        ttl = self.settings.response_ttl
        await self.ledger.write_now(lambda db: store_response(db, response["id"], stored, ttl))

    async def load_stored(self, response_id: str, key: KeyInfo | None) -> dict:
        """Read through the writer thread, so a response stored a moment ago is always seen. With auth
        on, only the user who made a response can see it: to anyone else it does not exist."""
        if self.database is None:
            raise GatewayError(404, "not_found", f"response {response_id!r} not found: the gateway stores no "
                               "responses while ledger_path = off", param="response_id")
        stored = await self.ledger.write_now(lambda db: load_response(db, response_id))
        if stored is None or stored.get("user_id") != (key.user_id if key else None):
            raise GatewayError(404, "not_found", f"response with id {response_id!r} not found",
                               param="response_id")
        return stored

    async def expand_previous_response(self, body: dict, key: KeyInfo | None) -> dict:
        """previous_response_id: the stored conversation, then this request's input."""
        previous = body.get("previous_response_id")
        if previous is None:
            return body
        if not isinstance(previous, str):
            raise GatewayError(400, "invalid_request", "'previous_response_id' must be a string",
                               param="previous_response_id")
        stored = await self.load_stored(previous, key)
        expanded = dict(body)   # previous_response_id stays: the response echoes it
        expanded["input"] = stored["items"] + input_items(body.get("input"))
        return expanded

    async def get_stored_response(self, request: Request, responder: Responder) -> None:
        try:
            stored = await self.load_stored(request.path.rstrip("/").rsplit("/", 1)[-1], request.key)
            await responder.respond(200, JSON_HEADERS, json.dumps(stored["response"]).encode())
        except GatewayError as err:
            await self.send_error(responder, "responses", err)

    async def delete_stored_response(self, request: Request, responder: Responder) -> None:
        response_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            await self.load_stored(response_id, request.key)
            await self.ledger.write_now(lambda db: delete_response(db, response_id))
            payload = {"id": response_id, "object": "response", "deleted": True}
            await responder.respond(200, JSON_HEADERS, json.dumps(payload).encode())
        except GatewayError as err:
            await self.send_error(responder, "responses", err)

    @staticmethod
    def upstream_headers(request: Request, upstream: Upstream, passthrough: bool) -> list[tuple[bytes, bytes]]:
        """What the provider's wire needs, with the client's own headers as h11 parsed them: all but
        those NOT_RELAYED in a passthrough, only its user-agent in a translation."""
        if passthrough:
            headers = [(name, value) for name, value in request.raw_headers if name not in NOT_RELAYED]
        else:
            headers = [(name, value) for name, value in request.raw_headers if name == b"user-agent"]
        headers.append((b"content-type", b"application/json"))
        if upstream.provider.forward_client_auth:
            # The gateway's own key (tok_…) authenticates to the gateway; the other credential is the user's.
            headers += [(name, value) for name, value in request.raw_headers
                        if name in CREDENTIAL_HEADERS and not is_gateway_key(value.decode("latin-1"))]
        else:
            headers += upstream.auth_headers
        if upstream.wire == "messages" and not (passthrough and "anthropic-version" in request.headers):
            headers.append((b"anthropic-version", ANTHROPIC_VERSION))
        return headers

    async def call_upstream(self, ex: Exchange, upstream: Upstream, suffix: str, request: Request, body: bytes,
                            passthrough: bool) -> UpstreamResponse:
        assert upstream.origin is not None
        headers = self.upstream_headers(request, upstream, passthrough)
        try:
            ex.upstream = await self.pool.request(upstream.origin, "POST", upstream.target(suffix), headers, body)
        except UpstreamError as exc:
            raise GatewayError(502, "api_error", f"provider {upstream.name}: {exc}") from None
        return ex.upstream

    async def passthrough(self, ex: Exchange, request: Request, responder: Responder, body: dict,
                          upstream: Upstream, rewritten: bool) -> None:
        """Same wire on both sides: bytes relayed untouched but for the few rewrites named here: the
        model name (alias or prefix), the provider's output cap, the policies' changes (rewritten)
        and, for chat streams, a request for the usage chunk that the client did not ask for."""
        wire = WIRES[ex.client_wire]
        rewrite = rewritten or ex.model_served != ex.model_requested
        if rewrite:
            body["model"] = ex.model_served
        cap = upstream.provider.max_output_tokens
        for name in TOKEN_LIMIT_FIELDS[ex.client_wire] if cap else ():
            if isinstance(body.get(name), int) and body[name] > cap:
                body[name], rewrite = cap, True
        drop_usage_chunk = False
        if ex.client_wire == "chat" and ex.stream:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                rewrite = drop_usage_chunk = True
        payload = unicode_json(body).encode() if rewrite else request.body
        query = "?" + request.query if request.query else ""     # e.g. Claude Code's ?beta=true
        response = await self.call_upstream(ex, upstream, WIRE_PATHS[upstream.wire] + query, request, payload,
                                            passthrough=True)
        content_type = response.header(b"content-type") or ""
        if not content_type.startswith("text/event-stream"):
            data = await self.read_upstream(response, upstream)
            ex.status = response.status
            if response.status < 400:
                ex.usage = self.usage_of_json(wire, data, upstream)
            else:
                ex.error_type = wire.parse_error(response.status, data).kind
            await responder.respond(response.status, self.response_headers(ex, []), data,
                                    response.end_to_end_headers)
            return
        ex.status = response.status
        responder.start(response.status, self.response_headers(ex, []), response.end_to_end_headers)
        parser = SSEParser()
        usage = Usage()
        first = last = None        # event data a failure notice may need to continue the stream
        try:
            async with contextlib.aclosing(response.chunks()) as chunks:
                async for chunk in chunks:
                    out = []
                    for event in parser.feed(chunk):
                        first, last = first or event.data, event.data
                        seen = wire.usage_of_event(event)
                        if seen is not None:
                            usage = merge_usage(usage, seen)
                            if drop_usage_chunk:
                                continue
                        out.append(event.raw)
                    if drop_usage_chunk:
                        chunk = b"".join(out)
                    await self.send_chunk(ex, responder, chunk)
        except UpstreamError as exc:
            err = GatewayError(502, "api_error", f"provider {upstream.name} failed mid-stream: {exc}")
            ex.error_type = err.kind
            await responder.send(wire.stream_error(err, first, last))
        finally:
            ex.usage = usage
        await responder.end()

    def usage_of_json(self, wire: Wire, data: bytes, upstream: Upstream) -> Usage:
        """Usage of a successful JSON reply; a reply that is not JSON is the provider's fault (502)."""
        try:
            parsed = json_loads(data)
        except ValueError:
            raise GatewayError(502, "api_error", f"provider {upstream.name} sent a reply that is not JSON: "
                               f"{data[:200]!r}") from None
        return wire.usage_of_body(parsed) if isinstance(parsed, dict) else Usage()

    async def read_upstream(self, response: UpstreamResponse, upstream: Upstream) -> bytes:
        try:
            return await response.read()
        except UpstreamError as exc:
            raise GatewayError(502, "api_error", f"provider {upstream.name}: {exc}") from None

    async def send_chunk(self, ex: Exchange, responder: Responder, data: bytes) -> None:
        if not data:
            return
        if ex.ttfb is None:
            ex.ttfb = time.perf_counter() - ex.started
        if responder.client_gone:
            raise ConnectionResetError("client disconnected")
        await responder.send(data)

    async def translate(self, ex: Exchange, request: Request, responder: Responder, body: dict,
                        upstream: Upstream) -> None:
        client, provider = WIRES[ex.client_wire], WIRES[upstream.wire]
        conv = client.parse_request(body)
        conv.model = ex.model_served
        if conv.unportable_tools:
            log.info("request id=%s dropped built-in tools %s: provider %s cannot run them",
                     ex.id, ", ".join(conv.unportable_tools), upstream.name)
        remember_thinking = upstream.wire == "messages"
        if remember_thinking:
            self.thinking.restore(conv)
        custom_tools = {tool.name for tool in conv.tools if tool.custom}
        unbridge = CustomToolUnbridge(custom_tools) if custom_tools and upstream.wire != "responses" else None
        payload = unicode_json(provider.render_request(conv, upstream.profile)).encode()
        response = await self.call_upstream(ex, upstream, WIRE_PATHS[upstream.wire], request, payload,
                                            passthrough=False)
        if response.status >= 400:
            err = provider.parse_error(response.status, await self.read_upstream(response, upstream))
            if retry_after := response.header(b"retry-after"):
                err.headers.setdefault("retry-after", retry_after)
            raise err
        content_type = response.header(b"content-type") or ""
        if not content_type.startswith("text/event-stream"):
            data = await self.read_upstream(response, upstream)
            try:
                reply = provider.parse_response(parse_json_object(data))
            except GatewayError as exc:
                raise GatewayError(502, "api_error", f"provider {upstream.name} sent an unreadable "
                                   f"response: {exc.message}") from None
            reply.model = ex.model_requested
            if remember_thinking:
                self.thinking.remember(reply.parts)
            if unbridge:
                unbridge.reply(reply)
            await self.send_reply(ex, responder, conv, body, reply)   # a stream if the client asked
            return
        ex.status = 200
        decoder = provider.decoder()
        encoder = client.encoder(conv, body, ex.model_requested)
        collector = ReplyCollector() if remember_thinking else None
        # Anthropic clients expect pings while a provider thinks in silence; others get nothing.
        heartbeat = self.settings.ping_interval if ex.client_wire == "messages" else None
        parser = SSEParser()
        responder.start(200, self.response_headers(ex, SSE_HEADERS))
        try:
            async with contextlib.aclosing(response.chunks(heartbeat)) as chunks:
                async for chunk in chunks:
                    if not chunk:
                        await self.send_chunk(ex, responder, encoder.ping())
                        continue
                    events = [event for sse in parser.feed(chunk) for event in decoder.feed(sse.event, sse.data)]
                    # Kept on ex as it comes: a client that leaves mid-stream is charged what was used.
                    ex.usage, out = self.relay_events(ex, events, encoder, collector, unbridge, ex.usage)
                    await self.keep_response(ex, body, encoder)
                    await self.send_chunk(ex, responder, out)
            tail = decoder.close()
        except UpstreamError as exc:
            tail = [StreamFailure(GatewayError(502, "api_error", f"provider {upstream.name} failed "
                                                                 f"mid-stream: {exc}"))]
        ex.usage, out = self.relay_events(ex, tail, encoder, collector, unbridge, ex.usage)
        if collector:
            self.thinking.remember(collector.reply.parts)
        await self.keep_response(ex, body, encoder)
        await self.send_chunk(ex, responder, out)
        await responder.end()

    def relay_events(self, ex: Exchange, events: list[Event], encoder: Any, collector: ReplyCollector | None,
                     unbridge: CustomToolUnbridge | None, usage: Usage) -> tuple[Usage, bytes]:
        """Decoded events encoded for the client, noting usage and failures on the way."""
        out = []
        for decoded in events:
            for event in unbridge.feed(decoded) if unbridge else (decoded,):
                if isinstance(event, (Start, Finish)):
                    usage = merge_usage(usage, event.usage)
                elif isinstance(event, StreamFailure):
                    ex.error_type = event.error.kind
                if collector:
                    collector.feed(event)
                out.append(encoder.feed(event))
        return usage, b"".join(out)

    # ---- other endpoints -----------------------------------------------------------------------
    async def embeddings(self, request: Request, responder: Responder) -> None:
        ex = Exchange(request.headers.get("x-request-id") or new_id("req_"), request.path, "chat",
                      request.started, key=request.key)
        try:
            body = parse_json_object(request.body)
            model, text = body.get("model"), body.get("input")
            if not isinstance(model, str) or not model:
                raise GatewayError(400, "invalid_request", "'model' is required", param="model")
            inputs = [text] if isinstance(text, str) else text
            if not isinstance(inputs, list) or not inputs:
                raise GatewayError(400, "invalid_request", "'input' must be a string or a non-empty list",
                                   param="input")
            upstream, served = self.router.resolve(model)
            ex.model_requested, ex.model_served, ex.provider, ex.provider_wire = model, served, upstream.name, upstream.wire
            if upstream.wire == "loopback":
                data = [{"object": "embedding", "index": i, "embedding": loopback_embedding(json.dumps(item))}
                        for i, item in enumerate(inputs)]
                tokens = sum(max(1, len(json.dumps(item)) // 4) for item in inputs)
                ex.usage, ex.status = Usage(input_tokens=tokens), 200
                payload = {"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
                await responder.respond(200, self.response_headers(ex, JSON_HEADERS), json.dumps(payload).encode())
                return
            if upstream.wire == "messages":
                raise GatewayError(400, "invalid_request", f"provider {upstream.name} (Anthropic Messages) "
                                   "offers no embeddings", param="model")
            if served != model:
                body["model"] = served
            payload_bytes = json.dumps(body).encode() if served != model else request.body
            response = await self.call_upstream(ex, upstream, "/embeddings", request, payload_bytes,
                                                passthrough=True)
            data = await self.read_upstream(response, upstream)
            ex.status = response.status
            if response.status < 400:
                ex.usage = self.usage_of_json(WIRES["chat"], data, upstream)
            await responder.respond(response.status, self.response_headers(ex, []), data,
                                    response.end_to_end_headers)
        except GatewayError as err:
            ex.status, ex.error_type = err.status, err.kind
            await self.send_error(responder, "chat", err, ex.id)
        finally:
            await self.finish(ex)

    async def count_message_tokens(self, request: Request, responder: Responder) -> None:
        await self.count_tokens(request, responder, "messages", "/messages/count_tokens",
                                lambda count: {"input_tokens": count})

    async def count_response_tokens(self, request: Request, responder: Responder) -> None:
        await self.count_tokens(request, responder, "responses", "/responses/input_tokens",
                                lambda count: {"object": "response.input_tokens", "input_tokens": count})

    async def count_tokens(self, request: Request, responder: Responder, wire_name: str, suffix: str,
                           answer: Callable[[int], dict]) -> None:
        """Forwarded to a provider of the same wire; otherwise the local estimate, which is cheap
        enough for the bursts editors send at start-up."""
        try:
            body = parse_json_object(request.body)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise GatewayError(400, "invalid_request", "'model' is required", param="model")
            upstream, served = self.router.resolve(model)
            if upstream.wire == wire_name:
                if served != model:
                    body["model"] = served
                ex = Exchange("", request.path, wire_name, request.started)
                response = await self.call_upstream(ex, upstream, suffix, request, json.dumps(body).encode()
                                                    if served != model else request.body, passthrough=True)
                data = await self.read_upstream(response, upstream)
                await responder.respond(response.status, [], data, response.end_to_end_headers)
                return
            count = estimate_tokens(WIRES[wire_name].parse_request(body))
            await responder.respond(200, JSON_HEADERS, json.dumps(answer(count)).encode())
        except GatewayError as err:
            await self.send_error(responder, wire_name, err)

    async def models(self, request: Request, responder: Responder) -> None:
        listed = self.router.model_list()
        created = int(self.started)
        if "anthropic-version" in request.headers:
            data = [{"type": "model", "id": model, "display_name": model,
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}
                    for model, _ in listed]
            payload: dict[str, Any] = {"data": data, "has_more": False,
                                       "first_id": data[0]["id"] if data else None,
                                       "last_id": data[-1]["id"] if data else None}
        else:
            payload = {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                                   "owned_by": owner} for model, owner in listed]}
        await responder.respond(200, JSON_HEADERS, json.dumps(payload).encode())

    async def health(self, request: Request, responder: Responder) -> None:
        payload = {"status": "ok", "version": __version__, "uptime_s": round(time.time() - self.started, 3),
                   "providers": [{"name": u.name, "wire": u.wire, "base_url": u.provider.base_url}
                                 for u in self.router.upstreams.values()],
                   "loops": self.loops}
        await responder.respond(200, JSON_HEADERS, json.dumps(payload).encode())

    # ---- admin and usage APIs ------------------------------------------------------------------
    # JSON in and out, errors in OpenAI's shape. With auth on, handle() has authenticated the caller;
    # with auth off, only loopback peers get here, and they count as an admin.
    def api(self, answer: Callable[[Request], Awaitable[tuple[int, Any]]], admin: bool = True) -> Handler:
        """The endpoint for answer(request) -> (status, payload): admins only unless admin is False."""
        async def endpoint(request: Request, responder: Responder) -> None:
            try:
                if self.database is None:
                    raise GatewayError(404, "not_found", "there are no users, keys or usage to see: "
                                       "the gateway records nothing while ledger_path = off")
                if admin and request.key is not None and request.key.user_role != "admin":
                    raise GatewayError(403, "permission", "only an admin's key may use the admin API")
                status, payload = await answer(request)
            except ValueError as error:   # the storage functions' and parameters' own checks
                await self.send_error(responder, "chat", GatewayError(400, "invalid_request", str(error)))
            except GatewayError as error:
                await self.send_error(responder, "chat", error)
            else:
                await responder.respond(status, JSON_HEADERS, json.dumps(payload).encode())
        return endpoint

    async def read(self, query: Callable[[Database], T]) -> T:
        """query(connection) in a reader thread, once the rows queued before it have landed: it sees
        every request answered before it, and neither waits for the writer nor holds it up (WAL)."""
        await self.ledger.write_now(lambda conn: None)
        database = self.database
        assert database is not None

        def run() -> T:
            with contextlib.closing(database.connect()) as conn:
                return query(conn)
        return await asyncio.get_running_loop().run_in_executor(self.readers, run)

    async def change(self, request: Request, action: Callable[[Accounts], T]) -> T:
        """A user or key change on the writer thread; then the key index reloads, so that the very
        next request already meets a revoked key or a disabled user."""
        actor = str(request.key.user_id) if request.key else "local"
        result = await self.ledger.write_now(lambda conn: action(Accounts(conn, self.hooks, actor)))
        if self.keys is not None:
            self.keys.invalidate()
        return result

    async def api_list_users(self, request: Request) -> tuple[int, Any]:
        return 200, {"object": "list", "data": await self.read(list_users)}

    async def api_create_user(self, request: Request) -> tuple[int, Any]:
        fields = json_fields(request, dict.fromkeys(("email", "name", "role"), (str,)), required=("email",))
        return 201, await self.change(request, lambda accounts: accounts.add_user(**fields))

    async def api_get_user(self, request: Request) -> tuple[int, Any]:
        user_id = resource_id(request, ADMIN_USERS)
        return 200, await self.read(lambda conn: find_user(conn, user_id))

    async def api_update_user(self, request: Request) -> tuple[int, Any]:
        user_id = resource_id(request, ADMIN_USERS)
        fields = json_fields(request, dict.fromkeys(USER_FIELDS, (str,)))
        if not fields:
            raise ValueError(f"nothing to update: send any of {', '.join(USER_FIELDS)}")
        return 200, await self.change(request, lambda accounts: accounts.edit_user(user_id, **fields))

    async def api_disable_user(self, request: Request) -> tuple[int, Any]:
        user_id = resource_id(request, ADMIN_USERS, "disable")
        return 200, await self.change(request, lambda accounts: accounts.disable_user(user_id))

    async def api_delete_user(self, request: Request) -> tuple[int, Any]:
        user_id = resource_id(request, ADMIN_USERS)
        await self.change(request, lambda accounts: accounts.remove_user(user_id))
        return 200, {"id": user_id, "object": "user", "deleted": True}

    async def api_list_keys(self, request: Request) -> tuple[int, Any]:
        user_id = query_parameters(request, {"user_id": int}).get("user_id")
        return 200, {"object": "list", "data": await self.read(lambda conn: list_keys(conn, user_id))}

    async def api_create_key(self, request: Request) -> tuple[int, Any]:
        """{"user_id": id or email, "name"?, "expires"?: days or ISO time}; the key is in this answer only."""
        fields = json_fields(request, {"user_id": (int, str), "name": (str,), "expires": (int, float, str)},
                             required=("user_id",))
        expires_at = parse_expiry(fields["expires"]) if "expires" in fields else None
        plaintext, key = await self.change(request, lambda accounts: accounts.issue_key(
            fields["user_id"], fields.get("name"), expires_at))
        return 201, {**key, "key": plaintext}

    async def api_revoke_key(self, request: Request) -> tuple[int, Any]:
        key_id = resource_id(request, ADMIN_KEYS, "revoke")
        return 200, await self.change(request, lambda accounts: accounts.revoke(key_id))

    async def api_usage_summary(self, request: Request) -> tuple[int, Any]:
        filters = usage_filters(request, USAGE_SUMMARY_PARAMETERS)
        return 200, await self.read(lambda conn: usage_summary(conn, **filters))

    async def api_usage_logs(self, request: Request) -> tuple[int, Any]:
        filters = usage_filters(request, USAGE_LOG_PARAMETERS)
        return 200, await self.read(lambda conn: usage_logs(conn, **filters))


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback_name(host: str) -> bool:
    return (host in ("localhost", "::1") or host.endswith(".localhost")
            or (host.startswith("127.") and host.replace(".", "").isdigit()))


def is_loopback_peer(peer: str) -> bool:
    """Whether a connection's address is this machine's (::ffff:127.0.0.1 on a dual-stack socket too)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def client_wire_of(path: str) -> str:
    """The wire an endpoint's clients speak, which decides the shape of its errors."""
    return "messages" if "/v1/messages" in path else "chat"


def merge_usage(total: Usage, seen: Usage) -> Usage:
    """Usage reported in pieces (Anthropic's message_start, then message_delta): later non-zero wins."""
    return Usage(seen.input_tokens or total.input_tokens, seen.output_tokens or total.output_tokens,
                 seen.cache_read or total.cache_read, seen.cache_write or total.cache_write,
                 seen.reasoning or total.reasoning)

# ================================================================================================
# CLI
# `serve` (the default), `init`, `config`, the team edition's `user`, `key` and `usage`, and the
# `claude`, `codex` and `env` launchers; logging set-up and the signal-driven lifecycle.
# ================================================================================================
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class LogFormatter(logging.Formatter):
    """"time LEVEL message" lines. A record is formatted once, however many handlers write it (the
    console and the log file, and the file's size check)."""

    _second: tuple[int, str] = (-1, "")     # the last second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        cached = record.__dict__.get("_formatted")
        if cached is None or cached[0] is not self:
            cached = record._formatted = (self, self.render(record))  # type: ignore[attr-defined]
        return cached[1]

    def render(self, record: logging.LogRecord) -> str:
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default "2026-01-31 12:00:00,123", its date and time made once per second."""
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(second)))
        return f"{cached[1]},{int(record.msecs):03d}"


class JSONLogFormatter(LogFormatter):
    """One JSON object per line: time, level, logger and message, and a LogEvent's fields as members."""

    def render(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name}
        event = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else None
        if record.msg == "%s" and isinstance(event, LogEvent):
            entry |= {"message": event.name, **event.fields}
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(settings: Settings, command: bool = False) -> None:
    """The gateway logs to stdout and log_file. A command logs to cli_log_file, and only its warnings
    to stderr, since stdout carries its output. A file of "-" means none."""
    # Records carry no thread or process names and no source line here (the logging HOWTO's
    # optimizations): skipping them makes every log call cheaper.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    formatter = JSONLogFormatter() if settings.log_format == "json" else LogFormatter(TEXT_LOG_FORMAT)
    console = ConsoleLogHandler(sys.stderr if command else sys.stdout)
    console.setLevel(logging.WARNING if command else logging.NOTSET)
    handlers: list[logging.Handler] = [console]
    path = settings.cli_log_file if command else settings.log_file
    if path != "-":
        handlers.append(RotatingLogHandler(path, settings.log_max_bytes, settings.log_backups))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(getattr(logging, settings.log_level.upper()))


async def serve(settings: Settings, env: dict[str, str], stop: asyncio.Event | None = None,
                ready: Callable[[Gateway, list[tuple[str, int]]], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT or `stop` is set, then let in-flight requests finish and stop."""
    gateway = Gateway(settings, env)
    admin_key = gateway.team_edition_start()
    if admin_key and settings.admin_key:   # the operator has it already: keep it out of the logs
        log.info("created the first admin (admin@localhost) with the key in admin_key")
    elif admin_key:
        print(f"tokligence: created the first admin (admin@localhost); its API key, shown only once:\n"
              f"  {admin_key}", flush=True)
    server = HTTPServer(gateway.handle, settings, gateway.protocol_error)
    try:
        addresses = await server.start(settings.host, settings.port)
    except OSError:
        gateway.close()
        raise
    for host, port in addresses:
        log.info("tokligence %s listening on http://%s:%d (providers: %s; auth %s)", __version__, host, port,
                 ", ".join(gateway.router.upstreams), "off" if settings.auth_disabled else "on")
    if settings.auth_disabled and not is_loopback_name(host_name(settings.host)):
        log.warning("auth is off but the gateway listens on %s: anyone who can reach it can spend your "
                    "provider keys (requests are still refused unless their Host is loopback or in "
                    "allowed_hosts); turn auth on or bind 127.0.0.1", settings.host)
    if ready:
        ready(gateway, addresses)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass                          # not the main thread (tests) or no signals on this platform
    reload_task = asyncio.create_task(_reload_aliases(gateway.router))
    try:
        await stop.wait()
        log.info("shutting down: waiting up to %gs for in-flight requests", settings.shutdown_grace)
    finally:
        reload_task.cancel()
        await server.shutdown(settings.shutdown_grace)
        gateway.close()


async def _reload_aliases(router: Router, every: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every)
        router.reload_aliases()


def init_settings(path: Path, force: bool) -> str:
    if path.exists() and not force:
        raise SettingsError(f"{path} exists; use --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SETTINGS_TEMPLATE, encoding="utf-8")
    return f"wrote {path}\nedit it to add providers, then run: python tokligence.py --config {path}"


# ---- user, key and usage commands ----------------------------------------------------------------
USER_COLUMNS = ("id", "email", "name", "role", "status", "created_at")
KEY_COLUMNS_SHOWN = ("id", "user_id", "name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
USAGE_COLUMNS = ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                 "reasoning_tokens", "cost_usd", "unpriced_requests", "errors")


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Rows as aligned text columns; times (the *_at columns) in UTC, a missing value as "-"."""
    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        if column.endswith("_at"):
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
        return f"{value:.6f}" if isinstance(value, float) else str(value)

    lines = [list(columns)] + [[cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in lines)


def format_usage(summary: dict[str, Any]) -> str:
    """usage_summary() as a totals table, then one table per breakdown."""
    sections = [f"totals\n{format_table([summary['totals']], USAGE_COLUMNS)}"]
    for entry, (name, _) in USAGE_BREAKDOWNS.items():
        sections.append(f"{entry.replace('_', ' ')}\n{format_table(summary[entry], (name, *USAGE_COLUMNS))}")
    return "\n\n".join(sections)


def cli_user_add(args: argparse.Namespace, accounts: Accounts) -> None:
    print(format_table([accounts.add_user(args.email, args.name, args.role)], USER_COLUMNS))


def cli_user_list(args: argparse.Namespace, accounts: Accounts) -> None:
    print(format_table(list_users(accounts.conn), USER_COLUMNS))


def cli_user_update(args: argparse.Namespace, accounts: Accounts) -> None:
    fields = {name: value for name in USER_FIELDS if (value := getattr(args, name)) is not None}
    if not fields:
        raise ValueError("nothing to update: give --email, --name, --role or --status")
    print(format_table([accounts.edit_user(args.user, **fields)], USER_COLUMNS))


def cli_user_disable(args: argparse.Namespace, accounts: Accounts) -> None:
    print(format_table([accounts.disable_user(args.user)], USER_COLUMNS))


def cli_user_delete(args: argparse.Namespace, accounts: Accounts) -> None:
    user = accounts.remove_user(args.user)
    print(f"deleted user {user['id']} ({user['email']}) and their keys; their usage stays in the ledger")


def cli_user_import(args: argparse.Namespace, accounts: Accounts) -> None:
    with open(args.file, newline="", encoding="utf-8") as file:
        result = accounts.import_users(file)
    print(format_table(result["created"], USER_COLUMNS))
    print(f"created {len(result['created'])} users; skipped {len(result['skipped'])} that exist already"
          + "".join(f"\n  {email}" for email in result["skipped"]))


def cli_key_create(args: argparse.Namespace, accounts: Accounts) -> None:
    expires_at = parse_expiry(args.expires) if args.expires else None
    plaintext, key = accounts.issue_key(args.user, args.name, expires_at)
    print(format_table([key], KEY_COLUMNS_SHOWN))
    print(f"the key, shown only this once:\n{plaintext}")


def cli_key_list(args: argparse.Namespace, accounts: Accounts) -> None:
    user_id = find_user(accounts.conn, args.user)["id"] if args.user else None
    print(format_table(list_keys(accounts.conn, user_id), KEY_COLUMNS_SHOWN))


def cli_key_revoke(args: argparse.Namespace, accounts: Accounts) -> None:
    print(format_table([accounts.revoke(args.key_id)], KEY_COLUMNS_SHOWN))


def cli_usage(args: argparse.Namespace, accounts: Accounts) -> None:
    """The usage API's summary, from the same query."""
    given = [(name, value) for name, value in (("since", args.since), ("until", args.until)) if value]
    filters = convert_parameters(given, USAGE_SUMMARY_PARAMETERS)
    if args.user:
        filters["user_id"] = find_user(accounts.conn, args.user)["id"]
    summary = usage_summary(accounts.conn, **filters)
    print(json.dumps(summary, indent=2) if args.json else format_usage(summary))


def add_account_commands(commands: argparse._SubParsersAction) -> None:
    """`user`, `key` and `usage`: each sets args.run, a function of (args, Accounts)."""
    def action(parent: argparse._SubParsersAction, name: str, run: Callable[..., None], summary: str,
               user: str | None = None) -> argparse.ArgumentParser:
        """A command running run; user names its user argument ("user" or the option "--user")."""
        command = parent.add_parser(name, help=summary)
        command.set_defaults(run=run)
        if user:
            command.add_argument(user, help="user id or email")
        return command

    users = commands.add_parser("user", help="manage users (team edition)").add_subparsers(
        dest="action", required=True)
    add = action(users, "add", cli_user_add, "create a user")
    add.add_argument("email")
    add.add_argument("--name", default="")
    add.add_argument("--role", choices=USER_ROLES, default="user")
    action(users, "list", cli_user_list, "list users")
    update = action(users, "update", cli_user_update, "change a user's email, name, role or status", user="user")
    update.add_argument("--email")
    update.add_argument("--name")
    update.add_argument("--role", choices=USER_ROLES)
    update.add_argument("--status", choices=USER_STATUSES)
    action(users, "disable", cli_user_disable, "disable a user: their keys stop working", user="user")
    action(users, "delete", cli_user_delete, "delete a user and their keys (their usage stays)", user="user")
    action(users, "import", cli_user_import, "create users from a CSV file with a header row: email, and "
           "optionally name and role").add_argument("file")

    keys = commands.add_parser("key", help="manage API keys (team edition)").add_subparsers(
        dest="action", required=True)
    create = action(keys, "create", cli_key_create, "create a key and print it once", user="user")
    create.add_argument("--name")
    create.add_argument("--expires", help="days from now, or an ISO date or time")
    action(keys, "list", cli_key_list, "list keys", user="--user")
    action(keys, "revoke", cli_key_revoke, "revoke a key").add_argument("key_id", type=int)

    usage = action(commands, "usage", cli_usage, "print token usage and cost from the ledger", user="--user")
    usage.add_argument("--since", help="unix seconds or an ISO date or time (UTC unless it says otherwise)")
    usage.add_argument("--until", help="the same; the end is excluded")
    usage.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_account_command(args: argparse.Namespace, settings: Settings) -> int:
    """A user, key or usage command on the settings' database; hooks have run when it returns."""
    if settings.ledger_path == "off":
        raise SettingsError("the user, key and usage commands need the database, but ledger_path = off")
    setup_logging(settings, command=True)
    hooks = HookRunner(settings.hook_script or None, settings.hook_timeout)
    try:
        with contextlib.closing(open_database(settings.ledger_path)) as conn:
            args.run(args, Accounts(conn, hooks, "cli"))
        return 0
    except (GatewayError, ValueError) as error:
        print(f"tokligence: {error}", file=sys.stderr)
        return 1
    finally:
        hooks.close()


# ---- launchers: Claude Code and Codex CLI pointed at the gateway ---------------------------------
LAUNCHED_CLIS = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}   # command: npm package
KEY_ENV = "TOKLIGENCE_API_KEY"      # the gateway key the launchers pass on; Codex reads it (env_key)
PLACEHOLDER_KEY = "tokligence"      # the CLIs refuse to start without a key, even when auth is off
START_TIMEOUT = 15.0                # seconds a gateway started in the background has to answer /health
CODEX_CONFIG_END = "# ---- end of tokligence's block: your own settings go below it and are kept ----"


def data_dir() -> Path:
    """Where the launchers keep Codex's home and the background gateway's log: beside the default
    settings file and ledger."""
    return Path("~/.tokligence").expanduser()


def gateway_url(settings: Settings) -> str:
    """The gateway's URL for a client on this machine: a wildcard address is reached on loopback."""
    if not settings.port:
        raise SettingsError("the launchers need the gateway's port, which is 0 (any free port)")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def gateway_healthy(url: str) -> bool:
    """Whether a Tokligence gateway answers GET /health at url (http.client, as no proxy applies here)."""
    from http.client import HTTPConnection, HTTPException
    parts = urlsplit(url)
    connection = HTTPConnection(parts.hostname or "", parts.port, timeout=2)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status == 200 and json.loads(response.read()).get("status") == "ok"
    except (OSError, HTTPException, ValueError, AttributeError):
        return False
    finally:
        connection.close()


def start_gateway(url: str, serve_args: list[str], log_path: Path) -> int:
    """Runs `tokligence serve_args` in a session of its own (so it outlives this command, and Ctrl-C in
    the CLI's terminal does not reach it), output appended to log_path; returns its pid once healthy."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *serve_args],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not gateway_healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-5:])
            raise ChildProcessError(f"the gateway did not start on {url}; the end of {log_path}:\n{tail}")
        time.sleep(0.1)
    return process.pid


def gateway_key(settings: Settings, given: str | None, env: dict[str, str]) -> str:
    """The key the CLI sends: the user's gateway key when auth is on, else a placeholder."""
    key = given or env.get(KEY_ENV)
    if key:
        return key
    if not settings.auth_disabled:
        raise SettingsError(f"auth is on: give your gateway key with --key or ${KEY_ENV}")
    return PLACEHOLDER_KEY


def write_codex_config(home: Path, url: str) -> Path:
    """home/config.toml with the gateway as Codex's model provider, over the Responses API (the only
    wire Codex speaks). Its top block is rewritten at every launch, since the gateway's address may
    change; what the user added below the block is kept. The block uses dotted keys, not a table,
    because a table would swallow any top-level key added below it."""
    path = home / "config.toml"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    _, marker, below = text.partition(CODEX_CONFIG_END + "\n")
    block = "\n".join((
        "# Codex settings for Tokligence (CODEX_HOME). `tokligence codex` and `tokligence env codex`",
        "# rewrite this block at every launch.",
        'model_provider = "tokligence"',
        'model_providers.tokligence.name = "Tokligence"',
        f"model_providers.tokligence.base_url = {json.dumps(url + '/v1')}",
        'model_providers.tokligence.wire_api = "responses"',
        f"model_providers.tokligence.env_key = {json.dumps(KEY_ENV)}",
        CODEX_CONFIG_END, ""))
    text = block + (below if marker else text)      # a file without the block is all the user's
    import tomllib
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{path}: what is below tokligence's block does not fit with it ({error}); "
                            "remove the conflicting lines") from None
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cli_env(cli: str, url: str, key: str) -> dict[str, str]:
    """The variables that point `cli` at the gateway; for codex, its config is written first.
    Claude Code gets the key as ANTHROPIC_AUTH_TOKEN, its variable for gateways, which needs no login
    and no approval of a custom API key."""
    if cli == "claude":
        return {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_AUTH_TOKEN": key}
    home = data_dir() / "codex"
    write_codex_config(home, url)
    return {"CODEX_HOME": str(home), KEY_ENV: key}


def print_env(cli: str, settings: Settings, key: str | None, env: dict[str, str]) -> int:
    """`env claude|codex`: the exports, for `eval "$(tokligence env claude)"`; starts nothing."""
    url = gateway_url(settings)
    for name, value in cli_env(cli, url, gateway_key(settings, key, env)).items():
        print(f"export {name}={shlex.quote(value)}")
    if not gateway_healthy(url):
        print(f"tokligence: no gateway answers on {url} yet: start it with `python tokligence.py`",
              file=sys.stderr)
    return 0


def launch(cli: str, cli_args: list[str], settings: Settings, key: str | None, serve_args: list[str],
           env: dict[str, str]) -> int:
    """`claude|codex [args…]`: the CLI with args, pointed at the gateway, which is started first if
    nothing answers. What it sets goes to stderr, so the CLI's stdout stays its own."""
    program = shutil.which(cli, path=env.get("PATH"))
    if program is None:
        print(f"tokligence: {cli} is not installed (not found on PATH); install it with:\n"
              f"  npm install -g {LAUNCHED_CLIS[cli]}", file=sys.stderr)
        return 127
    url = gateway_url(settings)
    key = gateway_key(settings, key, env)
    variables = cli_env(cli, url, key)
    if gateway_healthy(url):
        print(f"tokligence: using the gateway running on {url}", file=sys.stderr)
    else:
        log_path = data_dir() / "gateway.log"
        pid = start_gateway(url, serve_args, log_path)
        print(f"tokligence: started the gateway on {url} in the background (pid {pid}, log {log_path})",
              file=sys.stderr)
    for name, value in variables.items():
        secret = value == key and key != PLACEHOLDER_KEY
        print(f"tokligence: {name}={mask_secret(value) if secret else value}", file=sys.stderr)
    print(f"tokligence: running {shlex.join([program, *cli_args])}", file=sys.stderr, flush=True)
    env = {**env, **variables}
    if os.name == "posix":     # exec: the CLI owns the terminal and its signals, and its status is ours
        os.execve(program, [program, *cli_args], env)
    return subprocess.run([program, *cli_args], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokligence", description="A personal LLM gateway.")
    parser.add_argument("--version", action="version", version=f"tokligence {__version__}")
    parser.add_argument("--config", help="settings file (default: $TOKLIGENCE_CONFIG or ~/.tokligence/settings.ini)")
    commands = parser.add_subparsers(dest="command")
    serve_cmd = commands.add_parser("serve", help="run the gateway (the default)")
    for target in (parser, serve_cmd):
        target.add_argument("--host", help="address to listen on")
        target.add_argument("--port", type=int, help="port to listen on")
        target.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    init_cmd = commands.add_parser("init", help="write a commented settings file")
    init_cmd.add_argument("--path", help="where to write it (default: the settings path)")
    init_cmd.add_argument("--force", action="store_true", help="overwrite an existing file")
    commands.add_parser("config", help="print the effective settings and where each came from")
    add_account_commands(commands)
    key_help = f"your gateway key, needed when auth is on (default: ${KEY_ENV})"
    for cli, package in LAUNCHED_CLIS.items():
        # no -h of its own and no abbreviations: every argument but --key is the CLI's
        launcher = commands.add_parser(cli, add_help=False, allow_abbrev=False, help=(
            f"run {cli} (npm {package}) through the gateway, starting the gateway if needed: "
            f"{cli} [--key KEY] [{cli}'s own arguments…]"))
        launcher.add_argument("--key", help=key_help)
    env_cmd = commands.add_parser("env", help="print the shell exports that point claude or codex at the gateway")
    env_cmd.add_argument("cli", choices=LAUNCHED_CLIS)
    env_cmd.add_argument("--key", help=key_help)
    args, cli_args = parser.parse_known_args(argv)
    given = sys.argv[1:] if argv is None else argv
    # A launcher passes on what argparse did not take, which must be all that follows its own options.
    if cli_args and (args.command not in LAUNCHED_CLIS or given[len(given) - len(cli_args):] != cli_args):
        parser.error(f"unrecognized arguments: {' '.join(cli_args)}" + (
            f" (tokligence's options go before {args.command}'s)" if args.command in LAUNCHED_CLIS else ""))
    env = dict(os.environ)
    explicit = args.config or env.get("TOKLIGENCE_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_settings_path(env)
    try:
        if args.command == "init":
            print(init_settings(Path(args.path).expanduser() if args.path else path, args.force))
            return 0
        flags = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                 "log_level": getattr(args, "log_level", None)}
        settings = load_settings(path, env, flags, require_file=bool(explicit))
        if args.command == "config":
            print(f"# settings file: {path}{'' if path.exists() else ' (not found; defaults in use)'}")
            print(describe_settings(settings), end="")
            return 0
        if "run" in args:
            return run_account_command(args, settings)
        if args.command == "env":
            return print_env(args.cli, settings, args.key, env)
        if args.command in LAUNCHED_CLIS:
            # the background gateway gets this command's settings file and flags
            serve_args = [*(["--config", str(path.resolve())] if explicit else []), "serve",
                          *(f"--{name.replace('_', '-')}={value}" for name, value in flags.items()
                            if value is not None)]
            return launch(args.command, cli_args, settings, args.key, serve_args, env)
        setup_logging(settings)
        asyncio.run(serve(settings, env))
        return 0
    except SettingsError as exc:
        print(f"tokligence: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tokligence: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
