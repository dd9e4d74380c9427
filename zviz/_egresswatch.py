"""Direct connects in a domains-mode sandbox whose proxy listens inside its
network namespace (`_egress.EgressProxy.listen_inside`): refused at once, and
seen by the host.

Inside that namespace (these functions run on the host's thread that entered
it, `_kernel.sockets_in_netns`):
- `route_everything_local`: "local 0.0.0.0/0 dev lo" and "local ::/0 dev lo"
  (rtnetlink, in the local table): every destination is the namespace's own,
  so a SYN to any address loops back over `lo`; nothing listens there but the
  proxy (127.0.0.1:3128, [::1]:3128; the sandbox may not bind TCP), so the
  kernel answers RST at once: ECONNREFUSED, never a hang, nothing leaves;
- `refusal_watchers`: raw IPPROTO_TCP sockets (IPv4, IPv6) with a classic BPF
  filter that passes only the kernel's answer to a SYN nothing listens for:
  a segment with RST and ACK set, SYN and FIN clear, and sequence number 0
  (RFC 9293: a reset for a segment without ACK takes SEQ 0; a reset that
  aborts a connection carries its send sequence). So the proxy's own
  connections, every data segment and the sandbox's talk to itself stay in
  the kernel; the host reads what passes (`read_refusal`: its source is the
  address and port the program asked for) and records a denial.

The pure parts (`route_message`, `refusal_filter`, `parse_refusal`) hold no I/O.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

_NETLINK_ROUTE = 0
_RTM_NEWROUTE = 24
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_RT_TABLE_LOCAL = 255
_RTPROT_BOOT = 3
_RT_SCOPE_HOST = 254
_RTN_LOCAL = 2
_RTA_OIF = 4
_SO_ATTACH_FILTER = 26
_SO_LOCK_FILTER = 44
SNAP = 128  # bytes of a passed packet: an IPv4 header (<= 60) and the TCP ports and flags
_RCVBUF = 64 * 1024  # a flood of resets waits here, then is dropped (the connects are refused either way)

_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10


def route_message(family: int, ifindex: int, seq: int) -> bytes:
    """RTM_NEWROUTE for "local <any>/0 dev <ifindex> table local"."""
    rtmsg = struct.pack("=BBBBBBBBI", family, 0, 0, 0, _RT_TABLE_LOCAL, _RTPROT_BOOT, _RT_SCOPE_HOST, _RTN_LOCAL, 0)
    rta = struct.pack("=HHI", 8, _RTA_OIF, ifindex)
    body = rtmsg + rta
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), _RTM_NEWROUTE, flags, seq, 0) + body


def _ack_errno(reply: bytes, seq: int) -> int:
    """The errno of a netlink ACK (0: done)."""
    off = 0
    while off + 16 <= len(reply):
        length, kind, _flags, rseq, _pid = struct.unpack_from("=IHHII", reply, off)
        if kind == _NLMSG_ERROR and rseq == seq and off + 20 <= len(reply):
            code: int = struct.unpack_from("=i", reply, off + 16)[0]
            return -code
        if length < 16:
            break
        off += (length + 3) & ~3
    return 5  # EIO: no answer to our request


def route_everything_local() -> list[int]:
    """In the calling thread's network namespace (its `lo` up): every
    destination local. The families done (IPv6 is skipped where the
    namespace has none). Raises OSError when IPv4's cannot be added."""
    ifindex = socket.if_nametoindex("lo")
    done: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as nl:
        nl.bind((0, 0))
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            nl.send(route_message(family, ifindex, seq))
            err = _ack_errno(nl.recv(4096), seq)
            if err == 17:  # EEXIST: already there (a second call for the same namespace)
                err = 0
            if err and family == socket.AF_INET6 and err in (97, 95, 22):  # EAFNOSUPPORT, EOPNOTSUPP, EINVAL
                continue  # no IPv6 in this namespace: nothing to reach over it either
            if err:
                raise OSError(err, f"a local route for every {'IPv6' if family == socket.AF_INET6 else 'IPv4'} "
                              "destination in the sandbox's network namespace")
            done.append(family)
    return done


def refusal_filter(family: int) -> bytes:
    """The classic BPF program (struct sock_fprog's instructions): pass
    SNAP bytes of a TCP segment with RST|ACK (no SYN, no FIN) and sequence
    number 0 (a refused connect's answer), drop all else. An IPv4 raw socket
    sees the IP header first (a fragment past the first is dropped); an IPv6
    one the TCP header."""
    ld_b, ld_h, ld_w, ldx_msh = 0x30, 0x28, 0x20, 0xB1  # BPF_LD|BPF_{B,H,W}|BPF_ABS, BPF_LDX|BPF_B|BPF_MSH
    ind = 0x40 - 0x20  # BPF_IND instead of BPF_ABS
    and_k, jeq_k, jset_k, ret_k = 0x54, 0x15, 0x45, 0x06

    def op(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog: list[bytes] = []
    if family == socket.AF_INET:
        prog += [op(ld_h, 0, 0, 6), op(jset_k, 7, 0, 0x1FFF),  # a later fragment: drop
                 op(ldx_msh, 0, 0, 0)]  # X = the IP header's length
        flags, seq = op(ld_b + ind, 0, 0, 13), op(ld_w + ind, 0, 0, 4)
    else:
        flags, seq = op(ld_b, 0, 0, 13), op(ld_w, 0, 0, 4)
    prog += [flags, op(and_k, 0, 0, _TCP_FIN | _TCP_SYN | _TCP_RST | _TCP_ACK), op(jeq_k, 0, 3, _TCP_RST | _TCP_ACK),
             seq, op(jeq_k, 0, 1, 0),
             op(ret_k, 0, 0, SNAP), op(ret_k, 0, 0, 0)]
    return b"".join(prog)


def refusal_watchers(families: list[int]) -> list[socket.socket]:
    """Raw TCP sockets in the calling thread's network namespace that
    receive the resets `refusal_filter` passes (nonblocking, filter locked)."""
    import ctypes

    made: list[socket.socket] = []
    try:
        for family in families:
            s = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.IPPROTO_TCP)
            made.append(s)
            code = refusal_filter(family)
            buf = ctypes.create_string_buffer(code, len(code))
            fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
            s.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
            s.setsockopt(socket.SOL_SOCKET, _SO_LOCK_FILTER, 1)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            # What was queued before the filter (any TCP packet since socket()): read and dropped.
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.recv(SNAP)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


def parse_refusal(family: int, data: bytes, source: str) -> tuple[str, int] | None:
    """The (address, port) a refused connect asked for, from the reset a
    watcher read (its source; `source`: the sender's address recvfrom gave,
    for IPv6, whose raw sockets see no IP header), or None (short, or not
    what the filter passes)."""
    if family == socket.AF_INET:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        ihl = (data[0] & 0xF) * 4
        if len(data) < ihl + 14:
            return None
        return str(ipaddress.IPv4Address(data[12:16])), struct.unpack_from("!H", data, ihl)[0]
    if len(data) < 14:
        return None
    addr = ipaddress.IPv6Address(source.split("%")[0])
    return str(addr.ipv4_mapped or addr), struct.unpack_from("!H", data, 0)[0]


def read_refusal(sock: socket.socket) -> tuple[str, int] | None:
    """One passed reset's (address, port); BlockingIOError when none is queued."""
    data, addr = sock.recvfrom(SNAP)
    return parse_refusal(sock.family, data, str(addr[0]) if addr else "::")
