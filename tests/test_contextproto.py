"""The code-context frame checker, without a kernel (sans I/O)."""

import json
import struct

import pytest

from zviz import _contextproto as proto

DONE = {"t": "done", "seq": 1, "result": {"text/plain": "2"}, "error": None, "interrupted": False}


def raw(js: bytes, blob: bytes = b"") -> bytes:
    return struct.pack(">II", len(js), len(blob)) + js + blob


def decode_all(data: bytes, step: int = 0) -> list:
    d = proto.Decoder()
    out = []
    chunks = [data[i: i + step] for i in range(0, len(data), step)] if step else [data]
    for c in chunks:
        d.feed(c)
        while (f := d.next()) is not None:
            out.append(f)
    return out


def test_frames_round_trip_whole_and_byte_by_byte():
    png = b"\x89PNG\r\n\x1a\n" + b"x" * 100
    data = proto.encode(DONE) + proto.encode({"t": "display", "seq": 1, "data": {"text/plain": "fig"}},
                                             (("image/png", png),))
    for step in (0, 1, 7):
        frames = decode_all(data, step)
        assert [f.kind for f in frames] == ["done", "display"]
        assert frames[0].fields["result"] == {"text/plain": "2"}
        assert frames[1].blobs == {"image/png": png} and "blobs" not in frames[1].fields


def test_an_oversized_header_is_refused_before_its_body_is_buffered():
    d = proto.Decoder()
    d.feed(struct.pack(">II", proto.MAX_JSON + 1, 0))
    with pytest.raises(proto.ProtocolError, match="at most"):
        d.next()
    d = proto.Decoder()
    d.feed(struct.pack(">II", 10, proto.MAX_BLOB + 1))
    with pytest.raises(proto.ProtocolError):
        d.next()
    d = proto.Decoder()
    d.feed(struct.pack(">II", 100, 0) + b"{")  # a frame in progress holds only what came
    assert d.next() is None and d.buffered == 1


@pytest.mark.parametrize(("body", "blob", "why"), [
    (b"not json", b"", "malformed JSON"),
    (b"\xff\xfe", b"", "malformed JSON"),
    (b"[]", b"", "not a JSON object"),
    (b'{"t": "pickle", "seq": 1}', b"", "unknown frame type"),
    (b'{"seq": 1}', b"", "unknown frame type"),
    (json.dumps({**DONE, "result": 5}).encode(), b"", "a display bundle"),
    (json.dumps({**DONE, "seq": "1"}).encode(), b"", "bad 'seq'"),
    (json.dumps({**DONE, "seq": True}).encode(), b"", "bad 'seq'"),
    (json.dumps({**DONE, "interrupted": 0}).encode(), b"", "bad 'interrupted'"),
    (json.dumps({k: v for k, v in DONE.items() if k != "error"}).encode(), b"", "without 'error'"),
    (json.dumps({**DONE, "error": {"ename": "E", "evalue": "v", "traceback": [1]}}).encode(), b"", "bad 'error'"),
    (b'{"t": "display", "seq": 1, "data": {"text/plain": NaN}}', b"", "NaN"),
    (b'{"t": "display", "seq": 1, "data": {"application/json": ' + b"[" * 100 + b"]" * 100 + b"}}", b"", "deeper"),
    (b'{"t": "display", "seq": 1, "data": {"application/json": ' + b"[" * 100000 + b"]" * 100000 + b"}}", b"",
     "malformed JSON|deeper"),
    (b'{"t": "display", "seq": 1, "data": {"image/png": "AAAA"}}', b"", "bad MIME"),
    (b'{"t": "display", "seq": 1, "data": {"text/html": 5}}', b"", "must be a string"),
    (b'{"t": "display", "seq": 1, "data": {"Text/HTML; x": "a"}}', b"", "bad MIME"),
    (b'{"t": "display", "seq": 1, "data": {}, "blobs": [["image/png", 10]]}', b"abc", "add up"),
    (b'{"t": "display", "seq": 1, "data": {}, "blobs": [["text/html", 3]]}', b"abc", "bad blob"),
    (b'{"t": "display", "seq": 1, "data": {}, "blobs": [["image/png", -1]]}', b"", "bad blob"),
    (json.dumps({**DONE, "blobs": [["image/png", 3]]}).encode(), b"abc", "with blobs"),
    (b"", b"", "without JSON"),
])
def test_every_broken_rule_is_a_protocol_error(body, blob, why):
    with pytest.raises(proto.ProtocolError, match=why):
        decode_all(raw(body, blob))


def test_json_values_from_the_caller_are_checked_strictly():
    assert proto.check_json_value({"a": [1, 2.5, None, True, "s"]}, "v") == b'{"a": [1, 2.5, null, true, "s"]}'
    for bad in ((1,), {1}, b"x", float("nan"), float("inf"), {1: 2}, object(), [[[[]]]] * 0 + [set()]):
        with pytest.raises(TypeError):
            proto.check_json_value(bad, "v")
    deep: list = []
    for _ in range(proto.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(TypeError, match="deeper"):
        proto.check_json_value(deep, "v")


def test_variable_names():
    assert proto.is_name("rows") and proto.is_name("_x1")
    for bad in ("__builtins__", "a b", "", "1x", "x-y", None, 3, "x" * 300):
        assert not proto.is_name(bad)
