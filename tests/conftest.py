"""Shared test harness: the gateway running in a background thread on an ephemeral port."""
import asyncio
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokligence as tk  # noqa: E402
from mock_upstream import MockUpstream  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


class RunningGateway:
    """tokligence serving `settings_text` (plus env) on 127.0.0.1 with a port of its own."""

    def __init__(self, settings_text: str = "", env: dict | None = None, tmp_path: Path | None = None):
        path = (tmp_path or Path("/nonexistent")) / "settings.ini"
        if tmp_path is not None:
            path.write_text(settings_text)
        base_env = {"TOKLIGENCE_LEDGER_PATH": ":memory:", "TOKLIGENCE_ALIASES_FILE": ""}
        self.settings = tk.load_settings(path, {**base_env, **(env or {})}, {"port": 0})
        self.env = env or {}
        self.gateway: tk.Gateway | None = None
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("gateway did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        def ready(gateway, addresses):
            self.gateway, self.port = gateway, addresses[0][1]
            self._ready.set()

        async def main():
            self._stop = asyncio.Event()
            await tk.serve(self.settings, self.env, self._stop, ready)

        self._loop.run_until_complete(main())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn, *args):
        """Run fn(*args) on the gateway's loop thread and return its result."""
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop).result(10)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


async def _call(fn, *args):
    return fn(*args)


@pytest.fixture
def mock():
    upstream = MockUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def gateway_factory(tmp_path):
    started = []

    def start(settings_text: str = "", env: dict | None = None) -> RunningGateway:
        gateway = RunningGateway(settings_text, env, tmp_path)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()


def provider_section(name: str, mock: MockUpstream, wire: str = "chat", extra: str = "") -> str:
    return f"[provider.{name}]\nwire = {wire}\nbase_url = {mock.base_url}/v1\napi_key = sk-test-{name}\n{extra}\n"


def assert_neutral_stream(events: list, cut_off: bool = False) -> None:
    """The neutral stream's guarantees: Start first, blocks 0, 1, 2 … one open at a time and each
    closed (but the last, in a stream cut_off by a failure), nothing but blocks between, one
    terminal event (Finish or StreamFailure) last."""
    assert isinstance(events[0], tk.Start)
    assert isinstance(events[-1], (tk.Finish, tk.StreamFailure))
    assert not any(isinstance(e, (tk.Finish, tk.StreamFailure)) for e in events[:-1])
    expected, open_index = 0, None
    for event in events[1:-1]:
        if isinstance(event, tk.BlockStart):
            assert open_index is None and event.index == expected
            open_index, expected = event.index, expected + 1
        elif isinstance(event, (tk.Delta, tk.BlockEnd)):
            assert event.index == open_index
            if isinstance(event, tk.BlockEnd):
                open_index = None
        else:
            pytest.fail(f"unexpected {event!r}")
    assert open_index is None or (cut_off and isinstance(events[-1], tk.StreamFailure))
