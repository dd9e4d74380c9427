"""A classic-BPF interpreter for seccomp programs (tests only): runs the
compiled filter on a seccomp_data the test makes up, so every argument rule
can be tried with values (garbage high bits included) no kernel run needs."""

from __future__ import annotations

import struct

AUDIT_ARCH_X86_64 = 0xC000003E
RET_ACTION_FULL = 0xFFFF0000
ALLOW, NOTIFY, KILL_PROCESS = 0x7FFF0000, 0x7FC00000, 0x80000000
ERRNO = 0x00050000


def _alu(op: int, a: int, src: int) -> int:
    if op == 0x00:
        r = a + src
    elif op == 0x10:
        r = a - src
    elif op == 0x20:
        r = a * src
    elif op == 0x40:
        r = a | src
    elif op == 0x50:
        r = a & src
    elif op == 0x60:
        r = a << (src & 31)
    elif op == 0x70:
        r = a >> (src & 31)
    elif op == 0xA0:
        r = a ^ src
    else:
        raise ValueError(f"alu op {op:#x}")
    return r & 0xFFFFFFFF


def run(prog: bytes, nr: int, args=(), arch: int = AUDIT_ARCH_X86_64) -> tuple[int, int]:
    """(return value, instructions executed)."""
    args = list(args) + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & 0xFFFFFFFFFFFFFFFF for a in args])
    ins = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    a = x = 0
    mem = [0] * 16
    pc = steps = 0
    while True:
        code, jt, jf, k = ins[pc]
        steps += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            if mode == 0x20:  # ABS, W
                a = struct.unpack_from("<I", data, k)[0]
            elif mode == 0x60:
                a = mem[k]
            elif mode == 0x00:
                a = k
            else:
                raise ValueError(f"ld mode {code:#x}")
        elif cls == 0x01:  # LDX
            x = mem[k] if code & 0xE0 == 0x60 else k
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:  # ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            a = _alu(op, a, src)
        elif cls == 0x05:  # JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
            else:
                cond = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
                pc += jt if cond else jf
        elif cls == 0x06:  # RET
            return (a if code & 0x18 == 0x10 else k), steps
        elif cls == 0x07:
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
        pc += 1
