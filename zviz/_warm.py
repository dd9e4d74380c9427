"""One fresh sandbox per snippet, forked from a warm interpreter
(`zviz.run_snippet`; docs/performance.md, "Warm snippets").

A snippet harness (HumanEval, an RL reward, an MCP tool call) makes a
sandbox per program, and a program's own interpreter start is most of its
cost: `python3 -c pass` is ~14 ms of CPU, the sandbox ~6. Here the policy's
Python is started once per (interpreter, environment) on the host
(`_warmboot.py`: -I, the sandbox's environment, nothing else), and each
snippet's sandbox is made by the C stage *in a fork of it*
(`_stage.spawn_warm`): the same namespaces, root, rlimits, Landlock domain,
seccomp filter and supervisor as any sandbox of the policy, then the snippet
runs in the already-started interpreter instead of exec'ing a new one.

What it may not do, and so is checked before any server starts
(`why_not`): run an interpreter that a sandbox could have written (the
server runs its binary and standard library on the host; its site-packages,
.pth files and sitecustomize run only in each sandbox: -S, then site.main()
in the fork), or set start-up variables -I ignores and a fork cannot redo
(PYTHONHASHSEED, ...). Everything a snippet gets passes through a pipe from
the host into its own fork (never the server's memory, which every later
fork copies).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
import attrs

from . import _kernel, _netns
from ._errors import SandboxSetupError, ZvizError
from ._kernel import OwnedFd
from ._spec import Command, StageSpec
from ._warmcheck import (
    HANDLED_VARS as HANDLED_VARS,
    START_VARS as START_VARS,
    install_roots as install_roots,
    start_env,
    vm_size,
    why_not_env,
    why_not_memory,
    why_not_python,
)

if TYPE_CHECKING:
    from ._policy import Policy
    from ._process import Process
    from ._records import RunResult
    from ._sandbox import Sandbox

BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_warmboot.py")
SLOT = 100  # _warmboot.SLOT: the request's fds are dup'd to SLOT, SLOT+1, ...
MAX_INPUT = 1 << 20  # the snippet's code and environment: one pipe's worth (F_SETPIPE_SZ)
START_S = 20.0  # an interpreter that has not said "up" by then is not coming
MAX_SERVERS = 4  # per process: each is an idle interpreter (~10 MB)
REPLY_S = 20.0  # a fork server that does not answer a spawn (a sandbox's set-up is ~1 ms)
class NotWarm(ZvizError):
    """The warm path cannot run this snippet; the message says why (run_snippet
    then starts the interpreter in the sandbox, unless warm=True)."""


def writable_paths(policy: Policy, workdir: str) -> tuple[str, ...]:
    return (workdir, *policy.fs.read_write, *(b.source for b in policy.fs.binds if not b.read_only))


def snippet_input(python: str, code: str, env: Mapping[str, str], script: Sequence[str] = (),
                  name: str | None = None) -> bytes:
    """What the snippet reads (_warmboot): `python -c code`, or with `script`
    (FILE and its arguments) `python FILE ARGS...`; `python` is the
    interpreter's path in the sandbox, `name` its argv[0] as the caller gave it."""
    request: dict[str, object] = {"python": python, "name": name or python, "code": code, "env": dict(env)}
    if script:
        request["script"] = list(script)
    data = json.dumps(request).encode()
    if len(data) > MAX_INPUT:
        raise NotWarm(f"the snippet and its environment take {len(data)} bytes, over the warm path's {MAX_INPUT}")
    return data


def input_pipe(data: bytes) -> OwnedFd:
    """A pipe holding `data`, whole, its write end closed: the read end.
    Never blocks (it is written on the event loop, before anything reads
    it): a pipe made while the user's pipe buffers are over
    fs.pipe-user-pages-soft holds 8 KiB, which the sandboxes of an
    unprivileged zviz can bring about (their pipes are charged to the same
    user), and a bigger snippet then hung the whole host process. Data that
    does not fit is NotWarm: the snippet runs cold (its code in argv)."""
    import fcntl

    r, w = _kernel.pipe("warm-input")
    try:
        os.set_blocking(w.fd, False)
        if len(data) > fcntl.fcntl(w.fd, fcntl.F_GETPIPE_SZ):
            try:
                fcntl.fcntl(w.fd, fcntl.F_SETPIPE_SZ, len(data))
            except OSError as e:
                raise NotWarm(f"the snippet's input ({len(data)} bytes) does not fit in a pipe ({e.strerror})") \
                    from None
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(w.fd, view):]
            except BlockingIOError:
                raise NotWarm(f"the snippet's input ({len(data)} bytes) does not fit in a pipe (the user's pipe "
                              "buffers are over fs.pipe-user-pages-soft)") from None
    except BaseException:
        r.close()
        raise
    finally:
        w.close()
    return r


class Server:
    """One warm interpreter and its channel. `spawn` is one request and its
    reply, under a lock: blocking like `_kernel.spawn` (the fork server
    answers once the sandbox's set-up is done, ~1 ms)."""

    def __init__(self, python: str, env: tuple[tuple[str, str], ...]) -> None:
        self.python = python
        self.env = env
        self._lock = threading.Lock()
        self._loop_locks: weakref.WeakKeyDictionary[object, anyio.Lock] = weakref.WeakKeyDictionary()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.version = ""
        self.vm_size = 0  # its address space once up (bytes; 0: unknown), what each of its forks starts with
        # snippets running in its forks (server_for .. release, under _servers_lock):
        # its sandboxes die with it, so an evicted server lives on until they are done
        self.users = 0
        self.retired = False

    @property
    def alive(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            # (the policy's interpreter, checked by why_not_python; a fork and exec: off the loop)
            self._proc = await anyio.to_thread.run_sync(self._popen, theirs.fileno())
            theirs.close()
            with anyio.fail_after(START_S):
                await anyio.wait_readable(ours)
            first = ours.recv(4096)
        except TimeoutError:
            self._kill(ours)
            raise NotWarm(f"{self.python} did not start as a warm interpreter within {START_S:.0f} s") from None
        except OSError as e:  # (not a program: a directory named python3, no x bit; the cold start says why)
            theirs.close()
            self._kill(ours)
            raise NotWarm(f"{self.python} could not be started as a warm interpreter ({e.strerror})") from None
        except BaseException:
            theirs.close()
            self._kill(ours)
            raise
        if first[:2] != b"up":
            self._kill(ours)
            said = first[2:].decode(errors="replace") if first[:2] == b"no" else "it exited"
            raise Unservable(f"{self.python} cannot serve as a warm interpreter for this zviz ({said}); "
                          "it must be a CPython of zviz's own version and build ABI")
        self.version = json.loads(first[2:])[0]
        self.vm_size = vm_size(self._proc.pid)
        self._sock = ours  # (non-blocking: replies are awaited)

    def _popen(self, channel: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.python, "-I", "-S", BOOT, _kernel.stage_path(), str(channel)],
                                env=start_env(dict(self.env)), cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(channel,),
                                start_new_session=True)

    async def spawn(self, stage: StageSpec, packed: bytes, command: Command, input_fd: int) -> _kernel.Spawned:
        """The stage's spawn in a fork of the server: `command`'s fds (and
        `input_fd`, placed on the child's fd 6) travel by SCM_RIGHTS. The
        loop runs other tasks while the server works (~1-2 ms: the child's
        set-up); one request at a time per server, and not cancellable once
        sent (its reply names a live sandbox: the caller owns it then)."""
        fds = [command.stdin, command.stdout, command.stderr, command.status_fd, input_fd]
        if command.cgroup_fd >= 0:
            fds.append(command.cgroup_fd)
        slotted = attrs.evolve(command, stdin=SLOT, stdout=SLOT + 1, stderr=SLOT + 2, status_fd=SLOT + 3,
                               init_fd=SLOT + 4, cgroup_fd=SLOT + 5 if command.cgroup_fd >= 0 else -1,
                               track_map_fd=-1, track_value=0)
        if stage.blank_netns:  # the server enters the same blank namespace (zviz/_netns.py)
            slotted = _kernel.with_blank_netns(slotted, slot=SLOT + len(fds))
            blank = _netns.blank_fd()
            assert blank is not None  # (with_blank_netns checked)
            fds.append(blank)
        cmd = slotted.pack()
        msg = struct.pack("<II", len(packed), len(cmd)) + packed + cmd
        async with self._loop_lock():
            # held by a request from another thread's loop: no event crosses loops; rare, and ~1 ms
            while not self._lock.acquire(blocking=False):  # noqa: ASYNC110
                await anyio.sleep(0.0005)
            try:
                with anyio.CancelScope(shield=True):
                    reply, got = await self._request(msg, fds)
            finally:
                self._lock.release()
        owned = [OwnedFd(fd, "warm-reply") for fd in got]
        if reply[:2] == b"ok" and len(reply) == 6 and 1 <= len(owned) <= 2:
            (pid,) = struct.unpack("<i", reply[2:])
            return _kernel.Spawned(pid=pid, pidfd=owned[0], listener=owned[1] if len(owned) > 1 else None)
        for o in owned:
            o.close()
        if reply[:2] == b"er":
            kind, args = json.loads(reply[2:])
            if kind == "setup":
                raise _kernel.setup_failure(stage, command, tuple(args))
            if kind == "os":
                raise SandboxSetupError("spawn", int(args[0]), None, f"in the warm interpreter: {args[1]}")
            raise ValueError(f"the warm interpreter refused the spawn: {args[0]}")
        raise SandboxSetupError("spawn", 5, None, "the warm interpreter's reply was malformed")

    def _loop_lock(self) -> anyio.Lock:
        """The running event loop's lock on the server (a loop's tasks wait in turn, not spinning)."""
        key = _running_loop()
        lock = self._loop_locks.get(key)
        if lock is None:
            lock = self._loop_locks[key] = anyio.Lock()
        return lock

    async def _request(self, msg: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        sock = self._sock
        if sock is None:
            raise ServerGone("the warm interpreter is gone")
        try:
            socket.send_fds(sock, [msg], fds)
            with anyio.fail_after(REPLY_S):
                await anyio.wait_readable(sock)
            reply, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, 2)
        except (OSError, TimeoutError) as e:
            self.close()
            raise ServerGone(f"the warm interpreter stopped answering ({e or 'no reply'})") from None
        if not reply:
            self.close()
            raise ServerGone("the warm interpreter exited")
        return reply, got

    def _kill(self, sock: socket.socket | None) -> None:
        if sock is not None:
            sock.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """The server goes (its sandboxes die with it: their parent-death signal)."""
        sock, self._sock = self._sock, None
        self._kill(sock)


def _running_loop() -> object:
    """The running loop itself (asyncio's loop, trio's run token): what an anyio.Lock is bound to."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    import asyncio

    return asyncio.get_running_loop()


class ServerGone(ZvizError):
    """The warm interpreter died or stopped answering: started again once."""


class Unservable(NotWarm):
    """The interpreter cannot load zviz's stage (another CPython version or build)."""


_servers: dict[tuple[str, tuple[tuple[str, str], ...]], Server] = {}
_refused: dict[str, str] = {}  # interpreters that could not serve, and why
_servers_lock = threading.Lock()


async def server_for(python: str, env: Mapping[str, str]) -> Server:
    """The warm interpreter for `python` with the sandbox's `env`'s locale
    (all the server's start-up sees: start_env), started on first use (one
    per process and key, at most MAX_SERVERS: the oldest goes once its
    snippets are done; a dead one is started again). Held until `release`."""
    key = (python, tuple(sorted(start_env(env).items())))
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.alive:
            server.users += 1
            return server
        refused = _refused.get(python)
    if refused is not None:
        raise NotWarm(refused)
    server = Server(*key)
    try:
        await server.start()
    except Unservable as e:  # (not a timeout: this interpreter will never serve; not tried again)
        with _servers_lock:
            _refused[python] = str(e)
        raise
    with _servers_lock:
        other = _servers.get(key)
        if other is not None and other.alive:  # started meanwhile by another task
            server.close()
            other.users += 1
            return other
        _servers[key] = server
        server.users += 1
        old = list(_servers.values())[:-MAX_SERVERS]
        for o in old:
            forget_locked(o)
    return server


def release(server: Server) -> None:
    """A snippet of `server` is done (each server_for's)."""
    with _servers_lock:
        server.users -= 1
        if server.retired and server.users <= 0:
            server.close()


def forget_locked(server: Server) -> None:
    """Out of the cache; closed now if no snippet runs in it, else by the last
    `release` (closing it kills its sandboxes: an eviction for another
    environment's server used to kill a running snippet, which then seemed
    to exit 127 with no output)."""
    for k, v in list(_servers.items()):
        if v is server:
            del _servers[k]
    server.retired = True
    if server.users <= 0:
        server.close()


def forget(server: Server) -> None:
    with _servers_lock:
        forget_locked(server)


def _forget_inherited() -> None:
    """In a fork of this process (multiprocessing's workers): the servers'
    channels are shared with the parent, and both would send requests on one
    socket and read each other's replies (a sandbox's pidfd and seccomp
    listener went to the other process, whose supervisor then answered for
    that sandbox by its own policy; snippets read as exit 127), and the
    child's exit would kill the parent's servers. The child drops its copies
    (the processes are the parent's) and starts its own servers on use."""
    global _servers_lock  # noqa: PLW0603 - a lock another thread held at the fork stays held
    _servers_lock = threading.Lock()
    for server in _servers.values():
        server._lock = threading.Lock()
        sock, server._sock, server._proc = server._sock, None, None
        if sock is not None:
            sock.close()
    _servers.clear()


os.register_at_fork(after_in_child=_forget_inherited)


@atexit.register
def close_all() -> None:
    """Every warm interpreter of this process (also at exit)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for s in servers:
        s.close()


async def _server_for_sandbox(sb: Sandbox, python: str, env: Mapping[str, str]) -> tuple[Server, str]:
    """The warm interpreter for `python` in `sb` (NotWarm naming why not):
    the interpreter the sandbox would exec, at the same path on the host,
    which no sandbox can write, with a pid namespace to be pid 1 of."""
    from . import _linux, _plan

    plan = sb._plan
    if not plan.clone_flags & _linux.CLONE_NEWPID or not plan.mount_proc:
        raise NotWarm("the policy gives the sandbox no pid namespace of its own; a warm snippet is its pid 1")
    full = dict(plan.env)
    full.update(env)
    reason = why_not_env(full)
    if reason:
        raise NotWarm(reason)
    inside = sb._resolve([python], full)
    host = _plan.host_path(plan, sb.policy, sb.workdir, inside)
    if host != inside:
        raise NotWarm(f"{python} is {inside} in the sandbox, which is not the same file on the host")
    reason = why_not_python(host, writable_paths(sb.policy, sb.workdir))
    if reason:
        raise NotWarm(reason)
    server = await server_for(inside, full)
    reason = why_not_memory(sb.policy.limits.memory, server.vm_size)
    if reason:
        release(server)
        raise NotWarm(reason)
    return server, inside


async def run_snippet(code: str, policy: Policy | None = None, *, python: str = "python3", stdin: bytes = b"",
                      timeout: float | None = None, env: Mapping[str, str] | None = None,
                      warm: bool | None = None) -> RunResult:
    """Run `code` like `python -c code` in a fresh sandbox of its own, made for
    it and closed after (nothing of another snippet is in it: files,
    processes, Python state). The interpreter is a fork of a warm one
    (started once per interpreter and environment) where the policy allows,
    which skips its start-up; `warm=None` falls back to starting it in the
    sandbox otherwise, `warm=True` raises FeatureUnavailable naming why,
    `warm=False` always starts it. Returns the command's RunResult."""
    from ._errors import FeatureUnavailable
    from ._policy import Policy
    from ._sandbox import _open_sandbox

    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")
    if not isinstance(stdin, (bytes, bytearray, memoryview)):
        raise TypeError(f"stdin must be bytes, not {type(stdin).__name__}")
    if warm is not None and not isinstance(warm, bool):
        raise TypeError(f"warm must be True, False or None, not {warm!r}")
    policy = Policy.python() if policy is None else policy
    env = dict(env or {})
    async with _open_sandbox(policy, zygote=False) as sb:  # (a ready one from the pool, set_pool_size, if any)
        if warm is not False:
            try:
                return await _run_warm_in(sb, python, code, stdin, timeout, env, insist=bool(warm))
            except NotWarm as e:
                if warm:
                    raise FeatureUnavailable("a warm snippet", str(e), "run it with warm=None or warm=False "
                                             "(the interpreter then starts in the sandbox)") from None
        return await sb.run([python, "-c", code], stdin=stdin, timeout=timeout, env=env)


async def _run_warm_in(sb: Sandbox, python: str, code: str, stdin: bytes, timeout: float | None,
                       env: Mapping[str, str], *, insist: bool, script: Sequence[str] = ()) -> RunResult:
    """The snippet in `sb` through a warm interpreter (NotWarm: it cannot;
    nothing of it ran)."""
    limit = sb._timeout(timeout)  # (a bad timeout fails before anything starts)
    async with started(sb, python, code, env, stdin=bool(stdin), insist=insist, script=script) as proc:
        return await sb._to_end(proc, stdin, limit, None, None)


@contextlib.asynccontextmanager
async def started(sb: Sandbox, python: str, code: str, env: Mapping[str, str], *, stdin: bool,
                  insist: bool = False, script: Sequence[str] = ()) -> AsyncIterator[Process]:
    """`python -c code` (with `script`, FILE and its arguments: `python FILE
    ARGS...`, `code` unused) started in `sb` (a sandbox without a zygote: the
    fork is its pid 1) through a warm interpreter, its stdout and stderr
    piped, its stdin too if `stdin`, else /dev/null; the server is held until
    the block ends (NotWarm: it cannot, and nothing of it ran). Its record
    names `python` as given, as `sb.run([python, "-c", code])`'s does.
    zviz.run_snippet and `zviz run -- python3 -c CODE` or `-- python3 FILE
    ...` (_cli.py) start snippets this way."""
    from . import _capacity

    server, inside = await _server_for_sandbox(sb, python, env)
    held: Server | None = server  # released at the end (server_for's hold)
    try:
        full = dict(sb._plan.env)
        full.update(env)
        payload = snippet_input(inside, code, full, script, name=python)
        argv = (python, *script) if script else (python, "-c", code)
        proc: Process | None = None
        for attempt in (0, 1):
            # a pipe per attempt: the fork of a server that died before it
            # answered may have read the last one (the retry then read nothing)
            data = input_pipe(payload)
            try:
                with _capacity.exhaustion_as_error("spawn"):
                    proc = await sb._start(argv, env=env, stdin=stdin, stdout=True, stderr=True,
                                           warm=(server, data.fd))
                break
            except ServerGone as e:
                forget(server)
                release(server)
                held = None
                if attempt:  # twice in a row
                    if insist:
                        raise
                    raise NotWarm(str(e)) from None
                server = held = await server_for(inside, full)
            finally:
                data.close()
        assert proc is not None
        yield proc
    finally:
        if held is not None:
            release(held)
