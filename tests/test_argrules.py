"""Argument rules as data: the cube covers are exact complements, and the
high bits the kernel drops can never turn a refusal into a pass."""

import random

import pytest

from zviz import _argrules
from zviz._argrules import FULL, holds, values_except


@pytest.mark.parametrize(("refused", "bits", "high_zero"), [
    ((0, 1), 5, True), ((3,), 4, False), ((1024, 1026), 11, True), ((0x6610, 0x6611), 16, False),
    ((0, 7, 9, 12, 13), 4, False), (tuple(range(16)), 4, True), ((), 3, True),
])
def test_cover_is_the_exact_complement(refused, bits, high_zero):
    alts = values_except(0, refused, bits, high_zero=high_zero)
    for v in range(1 << bits):
        assert holds(alts, [v]) == (v not in refused), v
        for high in (1 << bits, 1 << 31, 1 << 32, 0xDEAD << 40):
            if high >= 1 << bits:
                assert holds(alts, [v | high]) == (not high_zero and v not in refused), (v, high)


def test_cover_sizes():
    assert len(values_except(0, (1024, 1026), 11, high_zero=True)) == 10
    assert len(values_except(0, (0x6610, 0x6611), 16, high_zero=False)) == 15
    assert len(values_except(0, (0, 1), 22, high_zero=True)) == 21


def test_conjoin_merges_conditions_on_one_argument():
    both = _argrules.conjoin(_argrules.bits_clear(3, 1), _argrules.bits_clear(3, 0x20000000))
    assert both == (((3, 0x20000001, 0),),)
    assert _argrules.conjoin(((((0, 1, 1)),),), ((((0, 1, 0)),),)) == ()  # contradiction: nothing passes


def test_checks_random_registers():
    rng = random.Random(17)
    for check in _argrules.HARDENING:
        for _ in range(2000):
            args = [rng.getrandbits(64) for _ in range(6)]
            refused = _argrules.refusal(check.syscall, args) is not None
            assert refused == any(not holds(c.allow, args) for c in _argrules.HARDENING if c.syscall == check.syscall)


def test_what_the_kernel_reads_decides():
    """For each hardening check, a register with garbage above the bits the
    kernel reads gets the verdict of the value the kernel would see."""
    cases = {"chmod": (1, 16), "fchmod": (1, 16), "fchmodat": (2, 16), "fchmodat2": (2, 16), "creat": (1, 16),
             "mknod": (1, 16), "mknodat": (2, 16), "pipe2": (1, 32), "recvmsg": (2, 32), "sendto": (3, 32),
             "ioctl": (1, 32)}
    rng = random.Random(5)
    for name, (arg, width) in cases.items():
        for _ in range(3000):
            args = [rng.getrandbits(64) for _ in range(6)]
            if rng.random() < 0.5:  # provoke the interesting bits
                args[arg] = (args[arg] & ~0o176001) | rng.choice((0o4000, 0o2000, 1, 0o200, 0o140000, 0))
            seen = list(args)
            seen[arg] &= (1 << width) - 1
            assert (_argrules.refusal(name, args) is None) == (_argrules.refusal(name, seen) is None), (name, args)


def test_self_only_and_other_tasks():
    r = _argrules.rules(net_mode="none", pid_ns=True)["sched_setscheduler"]
    assert holds(r, [0, 0, 0]) and holds(r, [2, 5, 0]) and not holds(r, [1, 5, 0]) and not holds(r, [2, 1, 0])
    assert not holds(r, [(1 << 32) | 1, 5, 0]) and not holds(r, [FULL, 0, 0])
    r = _argrules.rules(net_mode="none", pid_ns=False)["sched_setscheduler"]
    assert holds(r, [0, 3, 0]) and not holds(r, [2, 0, 0])


def test_network_device_ioctls_are_refused_whatever_the_high_bits():
    """allow and direct mode: SIOCGIF* (0x8910-0x8fff) refused, compared on the low 16 bits (a request
    number with garbage above them is the same ioctl to nothing, and refused too); the page-table ioctls
    stay refused; ordinary ioctls pass."""
    from zviz import _argrules as A

    alts = A.rules(net_mode="direct", pid_ns=True)["ioctl"]
    assert alts == A.rules(net_mode="allow", pid_ns=True)["ioctl"]
    for cmd in (0x8910, 0x8912, 0x8927, 0x8946, 0x8FFF, 0x1_0000_8912, 0xFFFF_0000_8933,
                A.PAGEMAP_SCAN, A.PROCMAP_QUERY):
        assert not A.holds(alts, [3, cmd, 0]), hex(cmd)
    for cmd in (0x5401, 0x541B, 0x8906, 0x890F, 0x9000):
        assert A.holds(alts, [3, cmd, 0]), hex(cmd)
    assert A.holds(A.rules(net_mode="none", pid_ns=True)["ioctl"], [3, 0x8912, 0])  # (its own namespace: lo)
