"""The code-context control protocol, sans I/O: frames and their checks.

A frame is `>II` (JSON length, blob length), then a JSON object, then the
blob: raw bytes (a PNG) that the JSON's "blobs" list cuts into MIME-typed
parts. The in-sandbox driver (`_driver.py`) writes the same format.

Rules (the host's side; everything from the driver is hostile):
- a header announcing more than MAX_JSON or MAX_BLOB is refused before a
  byte of the body is buffered: the decoder holds at most one frame;
- the JSON must parse (no NaN/Infinity, bounded nesting), be an object with a
  known "t", and every field of that type must have its type; anything else
  is a ProtocolError, and the caller marks the context broken;
- values are JSON or bytes with a MIME type: nothing is unpickled or
  evaluated, ever.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

import attrs

HEADER = struct.Struct(">II")
MAX_JSON = 4 * 1024**2  # one frame's JSON part
MAX_BLOB = 32 * 1024**2  # one frame's raw bytes (images)
MAX_DEPTH = 64  # nesting of JSON values from inside
MAX_MIMES = 16  # MIME types in one bundle

_MIME = re.compile(r"^[a-z]+/[A-Za-z0-9][A-Za-z0-9.+-]{0,100}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
BLOB_MIMES = frozenset({"image/png", "image/jpeg", "image/gif"})


class ProtocolError(Exception):
    """A frame broke the rules; the message says which (for CodeContextError)."""


def encode(obj: Mapping[str, Any], blobs: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """One frame (the host's to the driver; tests forge the driver's)."""
    body = dict(obj)
    if blobs:
        body["blobs"] = [[mime, len(data)] for mime, data in blobs]
    js = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    blob = b"".join(data for _, data in blobs)
    return HEADER.pack(len(js), len(blob)) + js + blob


@attrs.frozen
class Frame:
    kind: str
    fields: Mapping[str, Any]
    blobs: Mapping[str, bytes]


class Decoder:
    """Feed it bytes as they come; `next()` returns whole frames. Holds at
    most one frame's bytes (plus what one `feed` brought)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: tuple[int, int] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Frame | None:
        if self._need is None:
            if len(self._buf) < HEADER.size:
                return None
            jlen, blen = HEADER.unpack_from(self._buf)
            if jlen > MAX_JSON or blen > MAX_BLOB:
                raise ProtocolError(f"a frame of {jlen} + {blen} bytes (at most {MAX_JSON} + {MAX_BLOB})")
            if jlen == 0:
                raise ProtocolError("a frame without JSON")
            self._need = (jlen, blen)
            del self._buf[: HEADER.size]
        jlen, blen = self._need
        if len(self._buf) < jlen + blen:
            return None
        js = bytes(self._buf[:jlen])
        blob = bytes(self._buf[jlen: jlen + blen])
        del self._buf[: jlen + blen]
        self._need = None
        return parse(js, blob)


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


def loads(data: bytes) -> Any:
    """JSON from inside: strict UTF-8, no NaN/Infinity, bounded depth."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"malformed JSON ({type(e).__name__}: {str(e)[:200]})") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise ProtocolError(f"JSON nested deeper than {limit}")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def parse(js: bytes, blob: bytes) -> Frame:
    obj = loads(js)
    if not isinstance(obj, dict):
        raise ProtocolError("a frame that is not a JSON object")
    kind = obj.get("t")
    spec = SCHEMA.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ProtocolError(f"unknown frame type {str(kind)[:40]!r}")
    blobs: dict[str, bytes] = {}
    parts = obj.pop("blobs", [])
    if not isinstance(parts, list) or len(parts) > MAX_MIMES:
        raise ProtocolError("'blobs' must be a short list")
    off = 0
    for part in parts:
        if (not isinstance(part, list) or len(part) != 2 or part[0] not in BLOB_MIMES
                or not _is_int(part[1]) or part[1] < 0 or part[0] in blobs):
            raise ProtocolError(f"a bad blob entry {str(part)[:80]}")
        blobs[part[0]] = blob[off: off + part[1]]
        off += part[1]
    if off != len(blob):
        raise ProtocolError(f"blob parts add up to {off} bytes, the frame carries {len(blob)}")
    for field, check in spec.items():
        if field not in obj:
            raise ProtocolError(f"{kind!r} frame without {field!r}")
        if not check(obj[field]):
            raise ProtocolError(f"{kind!r} frame: bad {field!r}: {str(obj[field])[:80]}")
    if kind != "display" and blobs:
        raise ProtocolError(f"{kind!r} frame with blobs")
    if kind == "display":
        check_bundle(obj["data"], blobs)
    return Frame(str(kind), obj, blobs)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_any(v: Any) -> bool:
    return True


def _is_bundle_or_none(v: Any) -> bool:
    if v is None:
        return True
    check_bundle(v, {})
    return True


def _is_error_or_none(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict) and isinstance(v.get("ename"), str) and isinstance(v.get("evalue"), str)
        and isinstance(v.get("traceback"), list) and all(isinstance(x, str) for x in v["traceback"]))


def check_bundle(data: Any, blobs: Mapping[str, bytes]) -> None:
    """A Jupyter MIME bundle: text types are strings, JSON types any JSON,
    images come as blobs (never as text to decode)."""
    if not isinstance(data, dict) or len(data) + len(blobs) > MAX_MIMES:
        raise ProtocolError("a display bundle must be a JSON object of at most "
                            f"{MAX_MIMES} MIME types")
    for mime, value in data.items():
        if not _MIME.match(mime) or mime in BLOB_MIMES:
            raise ProtocolError(f"a bad MIME type in a bundle: {mime[:80]!r}")
        if mime == "application/json" or mime.endswith("+json"):
            continue
        if not isinstance(value, str):
            raise ProtocolError(f"a bundle's {mime} must be a string")


# Every frame the driver may send, and its fields' checks ("seq" echoes the
# host's request; the driver's pid never comes from JSON: see _context).
SCHEMA: dict[str, dict[str, Any]] = {
    "hello": {"v": _is_int, "python": _is_str, "errors": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items())},
    "display": {"seq": _is_int, "data": _is_any},
    "done": {"seq": _is_int, "result": _is_bundle_or_none, "error": _is_error_or_none, "interrupted": _is_bool},
    "value": {"seq": _is_int, "value": _is_any, "error": _is_opt_str},
    "ack": {"seq": _is_int, "error": _is_opt_str},
}


def is_name(name: object) -> bool:
    """A variable name `set_vars`/`get_var` accept (no dunder: the driver's
    namespace keeps `__builtins__` and friends)."""
    return isinstance(name, str) and bool(_NAME.match(name)) and not name.startswith("__")


def check_json_value(value: Any, what: str) -> bytes:
    """The JSON text of a value the caller gives (TypeError when it is not
    JSON: tuples, sets, bytes, NaN and non-string keys are refused too)."""
    def strict(v: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise TypeError(f"{what}: nested deeper than {MAX_DEPTH}")
        if v is None or isinstance(v, (bool, int, str)):
            return
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise TypeError(f"{what}: {v!r} is not a JSON number")
            return
        if isinstance(v, list):
            for x in v:
                strict(x, depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"{what}: JSON object keys are strings, got {type(k).__name__}")
                strict(x, depth + 1)
            return
        raise TypeError(f"{what}: a {type(v).__name__} is not a JSON value (use dict, list, str, int, float, "
                        "bool or None)")

    strict(value, 0)
    return json.dumps(value, allow_nan=False).encode()
