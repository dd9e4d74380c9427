"""DNS messages, the little a sandbox's resolver needs (pure, no I/O).

A domains-mode sandbox that goes out directly (docs/network.md, "direct")
asks its names of zviz: a UDP socket the host made in the sandbox's network
namespace answers every query sent to port 53 there. This module reads a
query and writes the answer: one question, class IN; A records (the
sandbox's own addresses for allowed names, from 198.18.0.0/15), no AAAA
(the answer for an allowed name is then empty: its programs go out over
IPv4), NXDOMAIN for a name that is not allowed, REFUSED for a name the host
could not check. Anything malformed is FORMERR when its header can be read,
and dropped otherwise.

Rules kept (RFC 1035): names are read without compression (a query has
none: a pointer is malformed), labels of at most 63 bytes, names of at most
255; the answer repeats the question as sent and points its records at it;
the RD bit is echoed and RA set. No EDNS (RFC 6891 allows a server without it
to answer without OPT).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

_HEADER = struct.Struct("!HHHHHH")
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
_QR, _AA, _RD, _RA = 0x8000, 0x0400, 0x0100, 0x0080
_OPCODE = 0x7800
MAX_MESSAGE = 512  # UDP without EDNS: a query longer than this is not a resolver's


@attrs.frozen
class Query:
    id: int
    rd: bool
    name: str  # lower case, no trailing dot, as sent (not checked as a host name)
    qtype: int
    qclass: int
    question: bytes  # the question section as sent (echoed in the answer)


class Malformed(ValueError):
    """A message that is not a query this module answers; `reply` is the
    FORMERR/NOTIMP to send, or None to drop it."""

    def __init__(self, reason: str, reply: bytes | None) -> None:
        super().__init__(reason)
        self.reply = reply


def parse_query(data: bytes) -> Query:
    """The query in `data`, or Malformed (with the reply to send, if any)."""
    if len(data) < _HEADER.size:
        raise Malformed("shorter than a header", None)
    qid, flags, qd, an, ns, _ar = _HEADER.unpack_from(data)
    if flags & _QR:
        raise Malformed("a response, not a query", None)  # never answer an answer (no loops)
    if len(data) > MAX_MESSAGE:
        raise Malformed("longer than 512 bytes", _error(qid, flags, FORMERR))
    if flags & _OPCODE:
        raise Malformed("not a standard query", _error(qid, flags, NOTIMP))
    if qd != 1 or an or ns:
        raise Malformed("not exactly one question", _error(qid, flags, FORMERR))
    labels = []
    pos = _HEADER.size
    total = 0
    while True:
        if pos >= len(data):
            raise Malformed("the name runs past the message", _error(qid, flags, FORMERR))
        n = data[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0:
            raise Malformed("a compressed or extended label in a question", _error(qid, flags, FORMERR))
        total += n + 1
        if total > 255 or pos + n > len(data):
            raise Malformed("the name is too long", _error(qid, flags, FORMERR))
        labels.append(data[pos:pos + n])
        pos += n
    if pos + 4 > len(data):
        raise Malformed("no type and class", _error(qid, flags, FORMERR))
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    question = data[_HEADER.size:pos + 4]
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        name = ""  # not a host name: the caller refuses it
    return Query(id=qid, rd=bool(flags & _RD), name=name, qtype=qtype, qclass=qclass, question=question)


def _error(qid: int, flags: int, rcode: int) -> bytes:
    return _HEADER.pack(qid, _QR | (flags & (_OPCODE | _RD)) | _RA | rcode, 0, 0, 0, 0)


def answer(q: Query, rcode: int = NOERROR, addresses: tuple[str, ...] = (), ttl: int = 5) -> bytes:
    """The response to `q`: `rcode`, and an A record for each IPv4 address
    (only for a type-A question: other types get none)."""
    records = []
    if rcode == NOERROR and q.qtype == TYPE_A and q.qclass == CLASS_IN:
        for a in addresses:
            packed = ipaddress.IPv4Address(a).packed
            records.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + packed)
    flags = _QR | _AA | (_RD if q.rd else 0) | _RA | rcode
    return _HEADER.pack(q.id, flags, 1, len(records), 0, 0) + q.question + b"".join(records)


def query(qid: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A query (for tests and the benchmark)."""
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")) + b"\0"
    return _HEADER.pack(qid, _RD, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, CLASS_IN)
