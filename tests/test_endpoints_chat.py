"""OpenAI Chat Completions through the gateway, with the official openai SDK as the client."""
import json

import openai
import pytest

from conftest import provider_section


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0, **kw)


@pytest.fixture
def gw(gateway_factory, mock):
    return gateway_factory(provider_section("local", mock) + "[routes]\n* = local\n")


def test_non_stream_completion_relays_the_provider_answer(gw, mock):
    mock.enqueue({"text": "Hello there", "usage": {"input": 12, "output": 3}})
    reply = client(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello there"
    assert reply.usage.prompt_tokens == 12 and reply.usage.completion_tokens == 3
    sent = mock.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert dict(sent.headers)["authorization"] == "Bearer sk-test-local"


def test_passthrough_keeps_unknown_fields_and_the_exact_body(gw, mock):
    mock.enqueue({"text": "ok"})
    client(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"vendor_knob": {"deep": [1, 2]}}, seed=7)
    sent = mock.requests[-1]
    assert sent.json["vendor_knob"] == {"deep": [1, 2]} and sent.json["seed"] == 7


def test_client_accept_encoding_is_never_forwarded(gw, mock):
    mock.enqueue({"text": "ok"})
    client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"accept-encoding": "br, zstd", "x-custom-trace": "t1"})
    headers = dict(mock.requests[-1].headers)
    assert headers["accept-encoding"] == "identity"
    assert headers["x-custom-trace"] == "t1"


def test_stream_relays_deltas_and_drops_the_usage_chunk_the_client_did_not_ask_for(gw, mock):
    mock.enqueue({"text": "one two three", "deltas": 3, "usage": {"input": 5, "output": 3}})
    chunks = list(client(gw).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert all(c.choices for c in chunks), "a usage-only chunk leaked to a client that did not ask"
    assert mock.requests[-1].json["stream_options"] == {"include_usage": True}


def test_stream_keeps_the_usage_chunk_when_the_client_asks(gw, mock):
    mock.enqueue({"text": "hi", "usage": {"input": 5, "output": 1, "cached": 2}})
    chunks = list(client(gw).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 7
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2


def test_streamed_tool_calls_arrive_with_their_arguments(gw, mock):
    mock.enqueue({"tool_calls": [{"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                                 {"id": "call_b", "name": "get_time", "arguments": '{"tz": "CET"}'}],
                  "finish": "tool_calls", "deltas": 4})
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("get_weather", "get_time")]
    stream = client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "?"}],
                                                tools=tools, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "args": ""})
                entry["args"] += call.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["args"])) for c in calls.values()] == [
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"tz": "CET"})]


def test_embeddings_are_forwarded(gw, mock):
    result = client(gw).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    assert mock.requests[-1].path == "/v1/embeddings"


def test_models_list_shows_provider_models_and_aliases(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock, extra="models = m-one, m-two") +
                         "[aliases]\nfast = m-one\nclaude-* = m-two\n")
    ids = [m.id for m in client(gw).models.list()]
    assert ids == ["m-one", "m-two", "fast"]


def test_alias_rewrites_the_model_sent_upstream(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock) + "[routes]\nreal-* = local\n[aliases]\nclaude-* = real-model\n")
    mock.enqueue({"text": "ok"})
    client(gw).chat.completions.create(model="claude-opus-4-8", messages=[{"role": "user", "content": "x"}])
    assert mock.requests[-1].json["model"] == "real-model"


def test_provider_prefix_routes_and_is_stripped(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock))
    mock.enqueue({"text": "ok"})
    client(gw).chat.completions.create(model="local/meta-llama/llama-3", messages=[{"role": "user", "content": "x"}])
    assert mock.requests[-1].json["model"] == "meta-llama/llama-3"


def test_unrouted_model_is_a_404_naming_the_routes(gateway_factory, mock):
    gw = gateway_factory(provider_section("local", mock) + "[routes]\nllama* = local\n")
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).chat.completions.create(model="mystery", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"
    assert "llama*=local" in caught.value.body["message"]
    assert mock.requests == []


def test_upstream_rate_limit_surfaces_as_rate_limit_error_with_retry_after(gw, mock):
    mock.enqueue({"status": 429, "headers": {"retry-after": "7"}})
    with pytest.raises(openai.RateLimitError) as caught:
        client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == "7"


def test_upstream_server_error_surfaces_as_internal_server_error(gw, mock):
    mock.enqueue({"status": 500})
    with pytest.raises(openai.InternalServerError):
        client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_loopback_answers_every_request_without_configuration(gateway_factory):
    gw = gateway_factory()
    reply = client(gw).chat.completions.create(model="anything", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "echo: ping"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    chunks = list(client(gw).chat.completions.create(model="anything", stream=True,
                                                     messages=[{"role": "user", "content": "ping"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: ping"
    embedding = client(gw).embeddings.create(model="anything", input="text")
    assert len(embedding.data[0].embedding) == 16
