"""The SSE parser and writer, on their own: every split point, every line ending, comments and ids."""
import pytest

import tokligence as tk

STREAM = (b": keep-alive comment\n"
          b"event: message_start\ndata: {\"a\": 1}\n\n"
          b"data: line one\r\ndata: line two\r\n\r\n"
          b"id: 7\rretry: 1500\revent: ping\rdata: {}\r\r"
          b"data:no-space\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [("message_start", '{"a": 1}', None, None), (None, "line one\nline two", None, None),
            ("ping", "{}", "7", 1500), (None, "no-space", "7", None), (None, "[DONE]", "7", None)]


def summary(events):
    return [(e.event, e.data, e.id, e.retry) for e in events]


def test_parses_events_with_every_line_ending_and_field():
    # the last event id persists to later events, as the HTML spec's "last event ID" does
    assert summary(tk.SSEParser().feed(STREAM)) == EXPECTED


@pytest.mark.parametrize("split", range(1, len(STREAM)))
def test_chunks_split_at_any_byte_give_the_same_events(split):
    parser = tk.SSEParser()
    events = parser.feed(STREAM[:split]) + parser.feed(STREAM[split:])
    assert summary(events) == EXPECTED


def test_byte_at_a_time_gives_the_same_events_and_raw_bytes_rebuild_the_stream():
    parser = tk.SSEParser()
    events = [event for i in range(len(STREAM)) for event in parser.feed(STREAM[i:i + 1])]
    assert summary(events) == EXPECTED
    assert b"".join(e.raw for e in events) == STREAM


def test_multibyte_utf8_split_across_chunks_survives():
    data = "data: {\"text\": \"héllo 世界\"}\n\n".encode()
    parser = tk.SSEParser()
    events = [event for i in range(len(data)) for event in parser.feed(data[i:i + 1])]
    assert events[0].data == '{"text": "héllo 世界"}'


def test_unterminated_final_event_is_not_dispatched():
    parser = tk.SSEParser()
    assert parser.feed(b"data: partial") == []
    assert parser.close() == []


def test_writer_output_parses_back():
    payload = tk.sse_event("content_block_delta", {"type": "x", "text": "a\nb"}) + tk.sse_event(None, "[DONE]")
    events = tk.SSEParser().feed(payload)
    assert summary(events) == [("content_block_delta", '{"type":"x","text":"a\\nb"}', None, None),
                               (None, "[DONE]", None, None)]


LF_STREAM = (b": comment\nevent: a\ndata: 1\ndata: 2\n\n\ndata: {\"x\": \"\xc3\xa9\"}\nid: 9\n\ndata:\n\n"
             b"retry: 10\ndata: last\n\n")
LF_EXPECTED = [("a", "1\n2", None, None), (None, '{"x": "\u00e9"}', "9", None), (None, "", "9", None),
               (None, "last", "9", 10)]


PROVIDER_STREAM = (b"event: message_start\ndata: {\"type\": \"message_start\"}\n\n"
                   b"data: {\"choices\": [{\"delta\": {\"content\": \"caf\xc3\xa9\"}}]}\n\n"
                   b"event: ping\ndata: two\ndata: lines\n\n"
                   b"data: after\n\n"
                   b"event: odd\nretry: 5\n\n"
                   b"data: [DONE]\n\n")
PROVIDER_EXPECTED = [("message_start", '{"type": "message_start"}', None, None),
                     (None, '{"choices": [{"delta": {"content": "café"}}]}', None, None),
                     ("ping", "two\nlines", None, None), (None, "after", None, None), ("odd", "", None, 5),
                     (None, "[DONE]", None, None)]


SPLIT_CASES = [(stream, expected, split) for stream, expected in ((LF_STREAM, LF_EXPECTED),
                                                                   (PROVIDER_STREAM, PROVIDER_EXPECTED))
               for split in range(1, len(stream))]


@pytest.mark.parametrize("stream, expected, split", SPLIT_CASES,
                         ids=[f"{'lf' if stream is LF_STREAM else 'provider'}-{split}" for stream, _, split in SPLIT_CASES])
def test_line_feed_only_streams_split_anywhere_give_the_same_events_and_bytes(stream, expected, split):
    parser = tk.SSEParser()
    events = parser.feed(stream[:split]) + parser.feed(stream[split:])
    assert summary(events) == expected
    assert b"".join(e.raw for e in events) == stream
