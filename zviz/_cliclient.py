"""The `zviz` command's entry point, and its thin client of the CLI server.

`zviz run` is started once per shell command by agent tools, so what it costs
before the sandbox exists is paid every time: importing asyncio, anyio, attrs
and the sandbox modules alone is ~150 ms of CPU, ten times the interpreter's
own start-up. A `zviz run` therefore first asks a per-user server
(`_cliserver.py`) that has all of that loaded to run the command for it:
this module imports nothing but the interpreter's built-in modules, sends
its arguments, working directory and stdio fds (SCM_RIGHTS) over a unix
socket, and waits for the exit status. The server runs exactly the code the
in-process `zviz run` runs (`_cli._run`), writing to this process's stdout
and stderr, and kills the sandbox when this process dies or is signalled.

The server is used only when it would behave exactly as this process:

- one server per *context*: the zviz package it was started from (every
  file's size and mtime), the interpreter, zviz's environment variables and
  the temp dir, and the process's kernel context (`context()`: namespaces,
  cgroup, credentials, capabilities, no_new_privs, seccomp, LSM label,
  rlimits). A client whose context differs uses another server;
- the server checks the connecting process's context itself, from /proc
  through the peer's pidfd (SO_PEERPIDFD), and refuses any other: a process
  in a sandbox (other namespaces), or one more confined than the server
  (seccomp, no_new_privs, fewer capabilities) never gets a sandbox made by
  a less confined process (docs/security-model.md, "The CLI server");
- this process checks the listening one the same way before it sends
  anything (`peer_refusal`): whoever may write in the cache directory (a
  sandbox given it read-write) may bind a socket at a server's name, and
  must get neither this process's stdio fds nor a say in its exit status;
- anything unexpected (no server yet, a refused or dropped connection before
  the server accepted the request, arguments too large for one message)
  makes this process run the command itself, as before; a missing server is
  started in the background for the next call (it exits after
  `ZVIZ_SERVER_IDLE` seconds without a request, 300 by default).

`ZVIZ_SERVER=0` (or false, no, off: any value but 1, true, yes, on or empty)
turns the server off (every `zviz run` runs in its process).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

PROTOCOL = b"zviz-run 2"
MAX_REQUEST = 128 * 1024  # bytes of one request (SOCK_SEQPACKET: one message)
# the status lines of /proc/PID/status that describe what a process may do
_STATUS_FIELDS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:",
                  b"CapAmb:", b"NoNewPrivs:", b"Seccomp:", b"Seccomp_filters:")
_NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup", "time")
_ENV_PREFIXES = ("ZVIZ_",)
_ENV_NAMES = ("TMPDIR", "TEMP", "TMP", "HOME", "XDG_CACHE_HOME", "PYTHONHASHSEED")
_NOT_KEYED = ("ZVIZ_SERVER", "ZVIZ_SERVER_IDLE")
SO_PEERPIDFD = 77  # (Linux >= 6.5; the socket module names it from Python 3.12 on)
SO_PASSPIDFD = 76  # (the same: every message carries a pidfd of its sender, SCM_PIDFD)
SCM_PIDFD = 4
ACCEPTED = b"A"
CHALLENGE = b"P"  # + the number of one of the server's fds: open it through /proc and send it back
PROOF = b"p"
EXITED = b"X"
KILL = b"K"


def main(argv: Sequence[str] | None = None) -> int:
    """The `zviz` command: `zviz run` through the server when it can, else everything in this process."""
    args = list(sys.argv[1:] if argv is None else argv)
    _hold_closed_stdio()
    status = _through_server(args)
    if status is not None:
        return status
    from ._cli import main as cli_main

    return cli_main(args)


def _hold_closed_stdio() -> None:
    """/dev/null on each of fds 0-2 that the caller closed (`zviz run -- cat <&-`),
    which is what a closed stdin or stdout means to the command (EOF; output
    dropped). Else the next fd opened takes its number and is taken for the
    caller's stdio: the server's socket, sent to the server as the command's
    stdin (where the command read the server's answers and both hung), or the
    event loop's own fds."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                got = os.open(os.devnull, os.O_RDWR)  # (the lowest free number: fd)
            except OSError:
                return
            if got != fd:
                os.close(got)
                return


def wants_server(args: list[str]) -> bool:
    # on: unset, "", 1/true/yes/on; anything else is off (ZVIZ_SERVER=false or off
    # meant on before: the switch docs/security-model.md tells some callers to use)
    if os.environ.get("ZVIZ_SERVER", "").strip().lower() not in ("", "1", "true", "yes", "on"):
        return False
    i = 1 if args[:1] == ["--debug"] else 0
    return args[i:i + 1] == ["run"]


def context(proc: str) -> bytes:
    """What the kernel says a process may do and see (`proc`: "/proc/self" or
    "/proc/PID"), as bytes to compare: two processes with equal contexts get
    the same sandbox from the same arguments. (Their root directories too:
    a chrooted process sees other files at the same paths.)"""
    parts: list[bytes] = []
    with open(proc + "/status", "rb") as f:
        for line in f.read().splitlines():
            if line.startswith(_STATUS_FIELDS):
                parts.append(line)
    for ns in _NAMESPACES:
        try:
            parts.append(os.readlink(f"{proc}/ns/{ns}").encode())
        except FileNotFoundError:  # (a namespace type this kernel lacks)
            parts.append(ns.encode() + b":-")
    # the root directory (chroot): the same path names other files under another
    st = os.stat(proc + "/root")
    parts.append(f"root:{st.st_dev}:{st.st_ino}".encode())
    for name in ("cgroup", "limits", "attr/current"):
        try:
            with open(f"{proc}/{name}", "rb") as f:
                parts.append(f.read())
        except OSError:  # (attr/current: no LSM)
            parts.append(b"-")
    return b"\0".join(parts)


def peer_refusal(s: object, own: bytes) -> str:
    """Why the process at the other end of the connected unix socket `s` is not
    in the context `own` (this process's), or "". Both ends ask: the server,
    before it runs anything for a client; the client, before it sends its stdio
    fds and arguments to whatever listens at a server's name (anyone who can
    write in the cache directory, e.g. a sandbox given it read-write, can bind
    a socket there). The peer's /proc is read, then its pidfd (SO_PEERPIDFD,
    taken at connect time) shows it is still that process: a reused pid cannot
    lend its context."""
    import _socket

    assert isinstance(s, _socket.socket)
    try:
        pidfd = s.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        return f"no pidfd of the peer ({e.strerror})"
    try:
        cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        pid = int.from_bytes(cred[0:4], sys.byteorder, signed=True)
        uid = int.from_bytes(cred[4:8], sys.byteorder)
        if uid != os.geteuid():
            return f"the peer runs as uid {uid}"
        return process_refusal(pidfd, pid, own)
    finally:
        os.close(pidfd)


def process_refusal(pidfd: int, pid: int, own: bytes) -> str:
    """Why process `pid` (`pidfd`: the same process, taken by the kernel) is not in
    the context `own`, or "". /proc is read first, then the pidfd shows that the
    process is still alive, so the pid was not reused meanwhile."""
    import signal

    if pid <= 0:
        return "the peer is in a pid namespace this process cannot see, or gone"
    try:
        theirs = context(f"/proc/{pid}")
        signal.pidfd_send_signal(pidfd, 0)  # still that process: what /proc showed was its
    except OSError as e:
        return f"the peer's context cannot be read ({e.strerror})"
    if theirs != own:
        return f"pid {pid} runs in another context (namespaces, credentials, confinement or limits)"
    return ""


def _package_stamp() -> bytes:
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [here.encode(), sys.executable.encode(), sys.version.encode()]
    with os.scandir(here) as it:
        for e in it:
            if e.name.endswith((".py", ".so")) or e.name == "_zviz_init":
                st = e.stat(follow_symlinks=False)
                parts.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    parts.sort()
    return b"\0".join(parts)


def key(own: bytes | None = None) -> bytes:
    """Everything a server must share with its clients (see the module's text;
    `own`: this process's context(), when already read)."""
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith(_ENV_PREFIXES) and k not in _NOT_KEYED) or k in _ENV_NAMES)
    parts = [PROTOCOL, _package_stamp(), repr(env).encode(), context("/proc/self") if own is None else own]
    return b"\n".join(parts).replace(b"\0", b"\x1f")  # (a field of the NUL-separated request)


def server_dir() -> str:
    """Where this user's servers listen: `srv/` in the start-up cache's directory."""
    from ._cachedir import location

    base = location()
    return os.path.join(base, "srv") if base else ""


def open_server_dir() -> int:
    """An O_PATH fd on server_dir(), made 0700 in the cache directory when that
    exists; OSError unless both are directories only the caller owns and may use."""
    d = server_dir()
    if not d:
        raise FileNotFoundError("no cache directory (ZVIZ_CACHE_DIR, XDG_CACHE_HOME or HOME)")
    base = _private(os.path.dirname(d))
    try:
        try:
            os.mkdir(f"/proc/self/fd/{base}/srv", 0o700)
        except FileExistsError:
            pass
        return _private(f"/proc/self/fd/{base}/srv")
    finally:
        os.close(base)


def _private(path: str) -> int:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} is not private to uid {os.geteuid()} (owner {st.st_uid}, "
                                  f"mode {st.st_mode & 0o777:o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def name_of(k: bytes) -> str:
    import zlib

    return f"{zlib.crc32(k):08x}-{zlib.adler32(k):08x}"


def _through_server(args: list[str]) -> int | None:
    """The exit status of `zviz ARGS` run by the server, or None: run it here."""
    if not wants_server(args):
        return None
    try:
        own = context("/proc/self")
        k = key(own)
        name = name_of(k)
        dfd = open_server_dir()
    except (OSError, ValueError):
        return None
    try:
        if os.path.exists(f"/proc/self/fd/{dfd}/{name}.off"):
            return None  # (the server found this host unable to check its peers)
        import _socket

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            try:
                s.connect(f"/proc/self/fd/{dfd}/{name}.sock")
            except OSError:
                _start_server(dfd, name)
                return None
            if peer_refusal(s, own):
                # (not this context's server: never send it anything; one that
                # starts now takes the name back if no server of ours holds it)
                _start_server(dfd, name)
                return None
            return _request(s, k, args)
        finally:
            s.close()
    finally:
        os.close(dfd)


def _request(s: object, k: bytes, args: list[str]) -> int | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    fds, mask = [], 0
    blocking = {}
    for i in (0, 1, 2):
        try:
            blocking[i] = os.get_blocking(i)
        except OSError:
            continue
        fds.append(i)
        mask |= 1 << i
    body = b"\0".join([PROTOCOL, k, cwd.encode("utf-8", "surrogateescape"), str(mask).encode(),
                       *(a.encode("utf-8", "surrogateescape") for a in args)])
    if len(body) > MAX_REQUEST:
        return None
    try:
        status = _exchange(s, body, fds)
    finally:
        # the server makes these descriptions non-blocking while it pumps them
        # (shared with this process's caller: its terminal, its pipes) and puts
        # the flag back when done, which it never is if it was killed
        for i, was in blocking.items():
            try:
                if os.get_blocking(i) != was:
                    os.set_blocking(i, was)
            except OSError:
                pass
    if status == -1:
        print("zviz: error: the zviz server ended before the command did (its log: "
              f"{server_dir()}/*.log); ZVIZ_SERVER=0 runs commands without it", file=sys.stderr)
        return 126
    return status


def _exchange(s: object, body: bytes, fds: list[int]) -> int | None:
    """The command's exit status; None: not run (run it here); -1: the server
    ended while it ran."""
    import _socket
    import array
    import signal

    assert isinstance(s, _socket.socket)
    # a signal from here on is the command's: it is forwarded, and the server
    # (which reads it after the request) kills the sandbox; if the server never
    # takes the request, nothing runs and the status says which signal
    caught: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        caught.append(signum)
        try:
            s.send(KILL + str(signum).encode())
        except OSError:
            pass

    # (one the caller ignores stays ignored, as in a `zviz run` in its own
    # process: `nohup zviz run`, a background job of a script and its Ctrl-C)
    forwarded = [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                 if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        s.sendmsg([body], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        first = s.recv(16)
        if first[:1] == CHALLENGE and first[1:].isdigit():
            first = s.recv(16) if _prove(s, int(first[1:])) else b""
    except OSError:
        first = b""
    if first != ACCEPTED:  # refused or gone before it ran anything: run it here
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:  # (interrupted before anything ran: nothing to run)
            return 128 + caught[0]
        return None
    try:
        reply = s.recv(16)
    except OSError:
        reply = b""
    if reply[:1] == EXITED and reply[1:].isdigit():
        return int(reply[1:])
    return -1  # (the server ended before the command did)


def _prove(s: object, fd: int) -> bool:
    """Answer the server's challenge: its fd `fd`, opened through /proc/SERVER/fd,
    which needs ptrace access to the server (what a process in a Landlock domain
    has to no process outside it: the confinement /proc does not show)."""
    import _socket
    import array

    assert isinstance(s, _socket.socket)
    pid = int.from_bytes(s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)[0:4], sys.byteorder, signed=True)
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        s.sendmsg([PROOF], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [mine]).tobytes())])
    finally:
        os.close(mine)
    return True


def _start_server(dfd: int, name: str) -> None:
    """Start this context's server in the background (it runs nothing for this call).
    Its first act is to close every fd it inherited but its stdio."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import os; os.closerange(3, 1 << 20); import sys; sys.path.insert(0, {root!r}); "
            f"from zviz._cliserver import main; main({name!r})")
    try:
        log = os.open(f"/proc/self/fd/{dfd}/{name}.log",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ,
                       file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)],
                       setsid=True)
    except OSError:
        pass
    finally:
        os.close(log)
