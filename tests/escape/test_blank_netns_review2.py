"""A second hostile review of the blank network namespace: the 4096 live
sockets cap (zviz/_pump.c count_sockets_here, zviz/_sockets.py MAX_LIVE),
zviz/_hostpaths.py resolve, and stage_spawn's setns. Each test says what was
tried and what the host observed; one that found a bug says so (FOUND):
unbound netlink sockets went uncounted, concurrent runs of a sandbox
without a zygote each had the cap's worth, and resolve followed more than the
kernel's 40 symlinks.

Beside tests/escape/test_blank_netns_review.py (which it does not repeat)."""

from __future__ import annotations

import errno
import os

import pytest
import trio

import zviz
from zviz import _netns

from ..conftest import IS_ROOT

pytestmark = pytest.mark.skipif(not (IS_ROOT and _netns.usable()),
                                reason="the blank network namespace needs root (zviz makes and enters "
                                "network namespaces)")

from ..test_workdir import stat_and_realpath  # noqa: E402
from .test_blank_netns import _py, forked, making  # noqa: E402

# Netlink sockets never bound (no bind, no send: no autobind) are not in the
# kernel's netlink hash, so /proc/net/netlink does not list them.
UNBOUND_NETLINK = forked(6, making(900, "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)"))


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_unbound_netlink_sockets_count_toward_the_cap(pumps, monkeypatch):
    """FOUND (fixed): 5400 netlink route sockets never bound, across six
    processes. A netlink socket is in the kernel's netlink table (so in
    /proc/net/netlink, what the recount read) only once bound or autobound:
    all 5400 were made, host memory past the cap. Now the recount reads the
    namespace's /proc/net/sockstat ("sockets: used"): MAX_LIVE, then ENOBUFS."""
    from zviz import _pump, _sockets

    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return await _py(sb, UNBOUND_NETLINK, timeout=120)

    out = trio.run(main)
    assert out["made"] == _sockets.MAX_LIVE and errno.ENOBUFS in out["errnos"], out


# Each of two concurrent runs makes up to 4000 unix sockets (four processes of
# 1000) and holds them a while: both hold theirs at once.
HOLD = forked(4, making(1000), hold_s=3)  # (the other run makes and holds its own meanwhile)


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "no-zygote"])
def test_concurrent_runs_share_the_cap(zygote, pumps, monkeypatch):
    """FOUND (fixed, no-zygote): two runs of one sandbox at once, each making
    4000 sockets and holding them. A sandbox without a zygote gives each run a
    listener of its own, so a pump of its own, and each pump kept a tally of
    its own: both runs got their 4000 (8000 live, the cap 4096). Now the pumps
    of one namespace share one tally (zviz/_pump.c struct tally): 4096 in all.
    (A zygote serves every run on one listener, and Python keeps one tally
    per sandbox: held before too.)"""
    from zviz import _pump, _sockets

    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)
    from zviz._sandbox import _open_sandbox

    async def main():
        outs: list[dict] = []
        async with _open_sandbox(zviz.Policy.python(), zygote=zygote, use_pool=False) as sb:
            async def one():
                outs.append(await _py(sb, HOLD, timeout=120))

            async with trio.open_nursery() as n:
                n.start_soon(one)
                n.start_soon(one)
        return outs

    outs = trio.run(main)
    assert sum(o["made"] for o in outs) <= _sockets.MAX_LIVE, outs


# ---- zviz/_hostpaths.py resolve: what os.stat + os.path.realpath say


def _chain(d: str, name: str, n: int, target: str) -> str:
    """d/name0 -> d/name1 -> ... -> d/name{n-1} -> target: n links."""
    for i in range(n):
        os.symlink(f"{name}{i + 1}" if i < n - 1 else target, os.path.join(d, f"{name}{i}"))
    return os.path.join(d, f"{name}0")


@pytest.mark.parametrize("order", ["alone", "after-its-halves"])
def test_resolve_stops_at_the_kernels_40_links(tmp_path, order):
    """FOUND (fixed): a path that takes more than 40 symlinks (the kernel's
    ELOOP: os.stat fails, the stage could not follow it either) was resolved:
    alone (past 40 links resolve fell back to real_path, whose
    os.path.realpath has no such limit, and nothing checked that os.stat
    succeeds) and after the paths of its halves (their links were cached, so
    not counted again: 2 x 25 links read as 25). Now a cached link counts
    the links it took, and a path taken by real_path must stat."""
    from zviz import _hostpaths

    d = os.path.realpath(tmp_path)
    os.mkdir(os.path.join(d, "dir"))
    os.mkdir(os.path.join(d, "dir", "sub"))
    exact = _chain(d, "e", 40, "dir")  # 40: the kernel follows it
    over = _chain(d, "o", 41, "dir")  # 41: ELOOP
    half_a = _chain(d, "a", 25, "dir")
    _chain(os.path.join(d, "dir"), "b", 25, ".")  # (in dir: dir/b0 -> ... -> dir)
    two = half_a + "/b0/sub"  # 50 links in one lookup: ELOOP
    paths = [exact, over, two, exact + "/sub"]
    if order == "after-its-halves":
        paths = [half_a, half_a + "/b0", *paths]
    ref = stat_and_realpath(paths)
    assert exact in ref and over not in ref and two not in ref, ref  # (what the kernel says)
    assert _hostpaths.resolve(paths) == ref


def test_resolve_on_hostile_trees_says_what_stat_and_realpath_say(tmp_path):
    """Held: links to "/", to "..", relative links that climb past "/",
    names with spaces and newlines, a link to a file then "..", trailing
    "/." and "/", a loop, a link to a link to "/" then "..": resolve says
    what os.stat + os.path.realpath say for each."""
    from zviz import _hostpaths

    d = os.path.realpath(tmp_path)
    os.makedirs(os.path.join(d, "a b\nc", "in"))
    open(os.path.join(d, "file"), "w").close()
    links = {"root": "/", "up": "..", "climb": "../../../../../../../../..", "sp": "a b\nc", "f": "file",
             "loop1": "loop2", "loop2": "loop1", "rootroot": "root", "dot": ".", "self/": "sp/",
             "etc": "root/etc/../usr/./bin/"}
    for name, target in links.items():
        os.symlink(target, os.path.join(d, name.rstrip("/")))
    paths = [os.path.join(d, n) + tail for n in [*links, "a b\nc", "file"]
             for tail in ["", "/", "/.", "/..", "/../..", "/in", "/in/..", "/bin", "/etc/passwd", "/./."]]
    paths += ["/" + "../" * 5 + d.lstrip("/") + "/sp/in"]
    assert _hostpaths.resolve(paths) == stat_and_realpath(paths)


# ---- stage_spawn: the spawning thread's way into the blank namespace and back


def _thread_netns() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.stat(f"/proc/self/task/{tid}/ns/net").st_ino
        except OSError:
            pass  # (gone meanwhile)
    return out


def test_no_host_thread_stays_in_the_blank_namespace_after_spawns_that_fail_and_succeed():
    """Held: spawns that succeed, that fail at exec (no such program), at a
    setup step in the child (a hostname over HOST_NAME_MAX) and runs that
    make sockets (a pump thread in the sandbox's own namespace, ended at
    close), some at once from worker threads: afterwards every thread of the
    host process is in the process's own network namespace, none in the
    blank one."""
    import attrs

    from zviz._sandbox import _open_sandbox

    ours = os.stat("/proc/self/ns/net").st_ino
    fd = _netns.blank_fd()
    assert fd is not None
    blank = os.fstat(fd).st_ino

    async def main():
        seen_blank = []
        for zygote in (True, False):
            async with _open_sandbox(zviz.Policy.python(), zygote=zygote, use_pool=False) as sb:
                async def one(code):
                    await sb.run(["/usr/bin/python3", "-c", code], timeout=30)

                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(one, "import socket; socket.socketpair(); print(1)")
                        n.start_soon(one, "print(2)")
                r = await sb.run(["/nonexistent/program"], timeout=30)
                assert r.exit_code != 0
                if not zygote:
                    runner = sb._runner
                    runner._stage = attrs.evolve(runner._stage, hostname="h" * 100)
                    runner._stage_packed = None
                    with pytest.raises(zviz.SandboxSetupError, match="'hostname'"):
                        await sb.run(["/usr/bin/true"], timeout=30)
                seen_blank += [t for t, ino in _thread_netns().items() if ino == blank]
        return seen_blank

    assert trio.run(main) == []
    left = {t: ino for t, ino in _thread_netns().items() if ino != ours}
    assert not left, (left, ours, blank)


# Sockets whose every fd is closed but that live on: in flight in another
# socket's SCM_RIGHTS queue, or in a cycle of their own (a pair sent into its
# own queue, closed: garbage until the kernel's unix GC runs).
IN_FLIGHT = forked(6, """
    a, b = socket.socketpair()
    try:
        for i in range(1000):
            if k % 2:
                s = socket.socket(socket.AF_UNIX)
                made += 1
                a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
                s.close()
            else:
                s, t = socket.socketpair()
                made += 2
                s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [s.fileno(), t.fileno()]))])
                s.close(); t.close()
    except OSError as e:
        err = e.errno
    """ + making(700))  # (the kernel stops fds in flight at the user's RLIMIT_NOFILE: ETOOMANYREFS; then held ones)


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_sockets_in_flight_or_in_a_garbage_cycle_count_toward_the_cap(pumps, monkeypatch):
    """Held: six processes each make up to 1000 sockets (or pairs) whose fds
    they close while the sockets sit in an SCM_RIGHTS queue (another
    socket's, or a pair's own: a cycle only the unix GC frees), until the
    kernel's own limit on fds in flight (ETOOMANYREFS, ~1000 for the
    sandbox's uid), then hold 700 more each. The cap holds: the ones in
    flight are live sockets of the namespace (sockstat counts them until
    they are freed)."""
    from zviz import _pump, _sockets

    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return await _py(sb, IN_FLIGHT, timeout=120)

    out = trio.run(main)
    # (each process's own pair: 12 more than the tally of what the loop made)
    assert out["made"] <= _sockets.MAX_LIVE - 12 and errno.ENOBUFS in out["errnos"], out


def test_resolve_of_a_path_swapped_meanwhile_names_one_of_its_real_paths(tmp_path):
    """Held: a thread swaps a link on the way (renamed over: a link to a/, a
    link to b/, a directory c/, a link to a file) while resolve runs 2000
    times: each answer is a directory the path named at some moment (a/sub,
    b/sub, c/sub as l/sub, or absent; or c/sub under the name it was renamed
    to next: a readlink that fails as l is swapped sends the path to
    real_path, which opens it and names what it opened), never a directory
    the path never named. What the
    stage then binds is that real path, no symlink followed (zviz/_stage.c)."""
    import threading

    from zviz import _hostpaths

    d = os.path.realpath(tmp_path)
    for n in "abc":
        os.makedirs(os.path.join(d, n, "sub"))
    open(os.path.join(d, "f"), "w").close()
    link = os.path.join(d, "l")
    os.symlink("a", link)
    stop = threading.Event()

    def swap() -> None:
        i = 0
        while not stop.is_set():
            tmp = os.path.join(d, f"tmp{i}")
            kind = i % 4
            if kind == 2:
                os.mkdir(tmp)
                os.mkdir(os.path.join(tmp, "sub"))
            else:
                os.symlink(["a", "b", "", "f"][kind], tmp)
            if kind == 2 or not os.path.islink(link):  # (a directory and a link are not renamed over each other)
                os.rename(link, os.path.join(d, f"old{i}"))
            os.rename(tmp, link)
            i += 1

    t = threading.Thread(target=swap)
    t.start()
    seen = set()
    try:
        for _ in range(2000):
            got = _hostpaths.resolve([link + "/sub", link + "/sub/."])
            seen.update(real for _, real in got.values())
    finally:
        stop.set()
        t.join()
    # (and a directory that was at l, renamed away since: real_path names the directory it opened by
    # its name at the next moment, the same directory)
    was_at_l = {os.path.join(d, n, "sub") for n in os.listdir(d)
                if n.startswith("old") and not os.path.islink(os.path.join(d, n))}
    allowed = {os.path.join(d, n, "sub") for n in "ab"} | {link + "/sub"} | was_at_l
    assert seen and seen <= allowed, seen - allowed
