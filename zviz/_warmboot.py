"""A warm interpreter (zviz/_warm.py): a fork server run by the policy's own
Python on the host, `python -I -S _warmboot.py STAGE_SO CHANNEL_FD`, never
imported by zviz. It serves one host process over CHANNEL_FD (SOCK_SEQPACKET):

    request:  <II spec length, command length> spec command, SCM_RIGHTS fds
              (dup'd to SLOT, SLOT+1, ...: the numbers the host packed
              into the command)
    reply:    b"ok" <i pid> with SCM_RIGHTS [pidfd, listener?], or
              b"er" JSON [kind, args] (a SetupError's args, an OSError's
              errno and text, a ValueError's text)

Each request is zviz._stage.spawn_warm: the stage's child (new namespaces,
root, Landlock, the policy's filter) is a fork of this interpreter; it forks
again in C, stays as the sandbox's pid 1 (it reaps, and reports the snippet's
end like zviz-init: the status record on fd 3), and the snippet comes back
here inside the sandbox (the end of this file). The snippet reads its code
and environment from fd 6, a pipe that the host fills and this server never
reads: nothing of one snippet passes through the memory that the next
snippet's fork copies. A snippet is `python -c CODE`,
or `python FILE ARGS...` ("script"): FILE is read in the sandbox; one that
is not a regular file there (a directory, a zip, a missing or unreadable
path) is handed to the interpreter itself, exec'd in the sandbox as `python
FILE ARGS...`, so that what it says and does is Python's own.

It holds nothing but its channel: a clean environment (the sandbox's),
stdio on /dev/null, cwd /, -I (no PYTHON* variable, no user site, no
script directory on sys.path) and -S: no site-packages, .pth file or
sitecustomize runs here on the host (each snippet runs `site.main()` in its
sandbox), only the interpreter's own installation, which zviz checks no
sandbox of the policy can write before it starts one.
It ends when the host's end of the channel closes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import site  # (its main() runs in each sandbox: -S)
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

SLOT = 100  # the request's fds land on SLOT.. (the host packs those numbers)
MAX_FDS = 8
STATUS_FD = 3  # zviz-init's status record (zviz/_abi.h)
INPUT_FD = 6  # the snippet's code and environment (the command's init_fd)
HEADER = struct.Struct("<II")


def _load_stage(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_stage", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no loader for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reply_error(chan: socket.socket, kind: str, args: Sequence[object]) -> None:
    chan.sendmsg([b"er" + json.dumps([kind, list(args)]).encode()])


def _serve(stage: Any, chan: socket.socket) -> None:
    """Returns only in a sandbox (the child of a spawn)."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 1 << 20, MAX_FDS)
        except OSError:
            sys.exit(0)
        if not msg:
            sys.exit(0)  # the host closed its end
        try:
            n_spec, n_cmd = HEADER.unpack_from(msg)
            spec = msg[HEADER.size:HEADER.size + n_spec]
            cmd = msg[HEADER.size + n_spec:HEADER.size + n_spec + n_cmd]
            for i, fd in enumerate(fds):
                os.dup2(fd, SLOT + i, inheritable=False)
                os.close(fd)
            try:
                got = stage.spawn_warm(spec, cmd)
            except stage.SetupError as e:
                _reply_error(chan, "setup", e.args)
                continue
            except OSError as e:
                _reply_error(chan, "os", (e.errno, str(e)))
                continue
            except (ValueError, struct.error) as e:
                _reply_error(chan, "value", (str(e),))
                continue
            if got is None:
                return  # in the sandbox: pid 1
            pid, pidfd, listener = got
            out = [pidfd] if listener < 0 else [pidfd, listener]
            try:
                socket.send_fds(chan, [b"ok" + struct.pack("<i", pid)], out)
            finally:
                for fd in out:
                    os.close(fd)
        finally:
            for i in range(len(fds)):
                try:
                    os.close(SLOT + i)
                except OSError:
                    pass


def _reap(_signum: int, _frame: object) -> None:
    """The sandboxes' pid 1s, as they exit (recv_fds is retried after this)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _read_input() -> dict[str, Any]:
    chunks = []
    while True:
        b = os.read(INPUT_FD, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(INPUT_FD)
    request: dict[str, Any] = json.loads(b"".join(chunks))
    return request


def _as_fresh_interpreter(request: dict[str, Any]) -> dict[str, Any]:
    """What `python -c CODE` would have set up in this sandbox, for what -I
    and the server's own start-up changed: the environment, sys.path's ''
    and PYTHONPATH, the signal handlers Python installs, argv, a new
    __main__, and none of the server's modules or fds."""
    import types

    os.close(STATUS_FD)
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    # sys.path as Python's start-up makes it: PYTHONPATH, then site (run here, in the sandbox: its
    # site-packages, .pth files and sitecustomize are the sandbox's view, and never run on the host),
    # then '' for -c (FILE's directory, its links resolved, for a script) unless PYTHONSAFEPATH
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    site.ENABLE_USER_SITE = (not env.get("PYTHONNOUSERSITE") and os.getuid() == os.geteuid()
                             and os.getgid() == os.getegid())
    site.main()
    site.enablerlcompleter()  # (what main() does unless isolated: sys.__interactivehook__)
    script = request.get("script")
    if not env.get("PYTHONSAFEPATH"):
        sys.path.insert(0, os.path.dirname(os.path.realpath(script[0])) if script else "")
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    if env.get("PYTHONUNBUFFERED"):
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(write_through=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    main = types.ModuleType("__main__")
    if script:  # `python FILE ARGS...`
        path = os.path.abspath(script[0])
        sys.argv[:] = list(script)
        sys.orig_argv[:] = [request["name"], *script]
        main.__dict__.update(__builtins__=__builtins__, __annotations__={}, __file__=path, __cached__=None,
                             __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    else:
        sys.argv[:] = ["-c"]
        sys.orig_argv[:] = [request["name"], "-c", request["code"]]
        main.__dict__.update(__builtins__=__builtins__, __annotations__={},
                             __loader__=importlib.machinery.BuiltinImporter)  # as `python -c`'s __main__
    sys.modules["__main__"] = main
    sys.modules.pop("_stage", None)
    return main.__dict__


def _script_source(request: dict[str, Any]) -> tuple[str, bytes]:
    """FILE's path (absolute, as Python names it) and bytes; anything but a
    regular file it can read is run by the interpreter itself, exec'd here in
    the sandbox (a directory or zip with __main__.py, or its own error)."""
    script = request["script"]
    path = os.path.abspath(script[0])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # (a FIFO: not opened blocking)
        try:
            import stat

            if stat.S_ISREG(os.fstat(fd).st_mode):
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                return path, b"".join(chunks)
        finally:
            os.close(fd)
    except OSError:
        pass
    os.close(STATUS_FD)  # (the interpreter exec'd does not get pid 1's status pipe)
    try:
        os.execve(request["python"], [request["name"], *script], request["env"])
    except OSError as e:
        os.write(2, f"zviz: cannot run {request['python']}: {e.strerror}\n".encode())
        os._exit(127)


def _run(code: str | bytes, globals_: dict[str, Any], filename: str = "<string>") -> int:
    """exec the snippet as `python -c` (or `python FILE`) does; its exit status."""
    try:
        exec(compile(code, filename, "exec"), globals_)  # the snippet, in its sandbox
    except SystemExit as e:
        return _exit_status(e)
    except BaseException as e:  # noqa: BLE001 - reported as `python -c` would
        tb = e.__traceback__
        tb = tb.tb_next if tb is not None else None  # from the snippet's frame on: none of ours
        try:
            sys.excepthook(type(e), e.with_traceback(tb), tb)
        except BaseException:  # noqa: BLE001
            pass
        return -int(signal.SIGINT) if isinstance(e, KeyboardInterrupt) else 1
    return 0


def _exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _finish(globals_: dict[str, Any], status: int) -> NoReturn:
    """Python's own exit, but for what the fork shares with the server: the
    non-daemon threads joined, the atexit handlers run, the snippet's own
    objects finalized (its __main__ and the modules it imported, cleared
    and collected: files it left open are flushed and closed), the standard
    streams flushed, then _exit. The interpreter's teardown of what the
    server had made is skipped: it would write to every page the fork
    shares (refcounts), ~5-8 ms of copy-on-write faults for nothing."""
    import gc

    threading = sys.modules.get("threading")
    for step in ((threading._shutdown if threading is not None else None), _run_atexit):
        if step is None:
            continue
        try:
            step()
        except SystemExit as e:
            status = _exit_status(e)
        except BaseException:  # noqa: BLE001 - as Python: reported, then the exit goes on
            try:
                sys.excepthook(*sys.exc_info())
            except BaseException:  # noqa: BLE001
                pass
    try:
        globals_.clear()
        for name in [n for n in sys.modules if n not in _SERVER_MODULES]:
            d = getattr(sys.modules.pop(name, None), "__dict__", None)
            if isinstance(d, dict):
                d.clear()
        d = None
        gc.collect()
        # what is still reachable (kept in a module of the server's: `json.f = open(...)`) is not torn
        # down, but its buffered data is written as the teardown would: the objects made since the
        # server froze its own are all a collection generation sees
        import io

        for obj in gc.get_objects():
            if isinstance(obj, io.IOBase) and obj is not sys.stdout and obj is not sys.stderr:
                try:
                    if not obj.closed and obj.writable():
                        obj.flush()
                except BaseException:  # noqa: BLE001
                    pass
    except BaseException:  # noqa: BLE001 - finalizers run as they can at any exit
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # noqa: BLE001 - Python's status for an unflushable stdout
            if status == 0:
                status = 120
    if status < 0:  # KeyboardInterrupt: as Python, killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def _run_atexit() -> None:
    import atexit

    atexit._run_exitfuncs()


if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, _reap)  # (not SIG_IGN: their CPU is then this process's cutime, as a shell's)
    try:
        _stage = _load_stage(sys.argv[1])
    except Exception as e:  # noqa: BLE001 - reported to the host as the reason
        os.write(int(sys.argv[2]), b"no" + f"{type(e).__name__}: {e}".encode())
        sys.exit(1)
    _chan = socket.socket(fileno=int(sys.argv[2]))
    _chan.send(b"up" + json.dumps([sys.version, sys.implementation.cache_tag]).encode())
    import gc

    # the compiler's one-time set-up (~1 ms on a first compile()), here once rather than in every snippet
    compile("pass", "<string>", "exec")
    gc.collect()
    gc.freeze()  # the server's objects: no collection in a fork walks (and so copies) them
    _SERVER_MODULES = frozenset(sys.modules)
    _serve(_stage, _chan)
    # ---- in a sandbox: the snippet (its pid 1 is the stage's C reaper), fds 0-3 and INPUT_FD only
    # The channel's fd is gone (the stage closed every fd but those above) and
    # its number may now be one of them (the host's socketpair number, kept by
    # the exec: 3 or 6 at times): detached, not closed, or that would close the
    # status pipe or the snippet's input.
    _chan.detach()
    del _stage, _chan
    _request = _read_input()
    _file, _code = _script_source(_request) if _request.get("script") else ("<string>", _request["code"])
    _globals = _as_fresh_interpreter(_request)
    del _request
    _finish(_globals, _run(_code, _globals, _file))
