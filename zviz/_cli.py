"""The command line: `zviz run`, `zviz check`, `zviz gc`, `zviz trace` (see _trace.py) and `zviz mcp` (_mcp.py).

Every error is one line on stderr and a distinct exit status (docs/errors.md);
`--debug` shows the traceback.

Start-up is part of the cost of every `zviz run` (agent shell tools start one per
command), so this module imports only argparse and the exception tree at the top:
each subcommand is one `_add_<cmd>` (its arguments) and one `_cmd_<cmd>` (what it
does) that imports what it needs, and async ones run on asyncio through anyio
(trio, ~60 ms of imports, is never loaded). `zviz --help` loads no other module of
zviz; tests/test_cli_imports.py keeps it that way. To add a subcommand: write the
two functions and list `_add_<cmd>` in `_SUBCOMMANDS`.

Why this module is long: every subcommand's arguments must be here (`zviz
--help` sees them without importing anything else), with the glue of each; what
the subcommands do lives in the modules they import lazily.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence

from ._errors import (
    CommandNotFoundError,
    FeatureUnavailable,
    PolicyError,
    SandboxSetupError,
    ZvizError,
)

TYPE_CHECKING = False  # (not typing's: importing typing is ~5 ms of every `zviz` command)
if TYPE_CHECKING:
    import contextlib
    from typing import Any, TypeAlias

    from ._policy import Policy
    from ._process import Process
    from ._records import RunResult
    from ._sandbox import Sandbox

    Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_USAGE = 2
EXIT_HOST = 123  # the host lacks something (FeatureUnavailable)
EXIT_TIMEOUT = 124
EXIT_POLICY = 125
EXIT_SETUP = 126
EXIT_NOT_FOUND = 127
MAX_JSON_STDIN = 16 * 1024**2  # bytes of stdin `--json` holds in memory (in the CLI server: per client)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zviz", description="Run untrusted code in a light Linux sandbox.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return p


def _add_run(sub: Subparsers) -> None:
    r = sub.add_parser("run", help="run a command in a sandbox",
                       description="Run CMD in a sandbox. Exit status: the command's; 128+N when killed "
                       "by signal N; 124 on timeout; 125 bad policy; 126 setup failed; 127 not found.")
    r.set_defaults(func=_cmd_run)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--policy", metavar="FILE", help="policy file: zviz TOML, or an OCI seccomp profile (JSON)")
    src.add_argument("--preset", metavar="NAME", help="python | shell (default: shell)")
    r.add_argument("--workdir", metavar="DIR", help="use DIR as the read-write workdir (kept)")
    r.add_argument("--template", metavar="PATH", help="start the workdir from a template (made by --snapshot)")
    r.add_argument("--snapshot", metavar="PATH", help="after the command, save the workdir as a template at PATH")
    r.add_argument("--ro", metavar="PATH", action="append", default=[], help="add a read-only path")
    r.add_argument("--rw", metavar="PATH", action="append", default=[], help="add a read-write path")
    r.add_argument("--bind", metavar="HOST:INSIDE[:ro|:rw]", action="append", default=[],
                   help="show a host path at another path inside (read-only unless :rw), e.g. ./data:/data")
    r.add_argument("--net", metavar="MODE", action="append", default=[],
                   help="none | loopback | HOST:PORT (repeatable: an allowlist)")
    r.add_argument("--allow-domain", metavar="NAME[:PORT]", action="append", default=[],
                   help="egress by name through zviz's proxy (repeatable; '*.example.com' for its subdomains; "
                   "ports 80 and 443, and any PORT given)")
    r.add_argument("--deny-domain", metavar="NAME", action="append", default=[],
                   help="refuse NAME even when an --allow-domain matches it")
    r.add_argument("--add-host", metavar="NAME:IP", action="append", default=[],
                   help="pin NAME (a name an --allow-domain allows) to IP for the proxy (no DNS; a private "
                   "address is accepted for it)")
    r.add_argument("--egress-direct", action="store_true",
                   help="allowed names are resolved in the sandbox and connected straight out on the host's "
                   "sockets, each connection's first bytes checked (no proxy, no proxy variables; root)")
    r.add_argument("--timeout", metavar="S", type=float, help="wall-clock limit in seconds")
    r.add_argument("--memory", metavar="SIZE",
                   help="memory limit, e.g. 512M (per process, and per sandbox with a cgroup)")
    r.add_argument("--disk", metavar="SIZE", help="most the workdir may hold, e.g. 1G (root: a tmpfs workdir)")
    r.add_argument("--env", metavar="NAME=VALUE", action="append", default=[], help="set a variable")
    r.add_argument("--json", action="store_true", help="print the result record as JSON instead of passing stdio")
    r.add_argument("--monitor", action="store_true", help="attach the eBPF monitor (root, bcc)")
    r.add_argument("--cold", action="store_true",
                   help="for PYTHON -c CODE: start the interpreter in the sandbox (default: a fork of a warm one)")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command")


def _add_gc(sub: Subparsers) -> None:
    g = sub.add_parser("gc", help="remove workdirs (and uid leases) that a dead zviz process left behind",
                       description="Remove the workdirs of sandboxes whose host process is gone (crashed, "
                       "killed), after killing whatever still runs as their host uid. Live sandboxes and kept "
                       "workdirs are left alone. Only the caller's own workdirs (under $TMPDIR/zviz-<uid>). "
                       "Also empties the start-up cache (compiled filters, the host probe: $ZVIZ_CACHE_DIR, "
                       "else $XDG_CACHE_HOME/zviz or ~/.cache/zviz) and stops the `zviz run` servers.")
    g.set_defaults(func=_cmd_gc)
    g.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def _add_check(sub: Subparsers) -> None:
    c = sub.add_parser("check", help="what this host supports, and the fix for what is missing")
    c.set_defaults(func=_cmd_check)
    c.add_argument("--json", action="store_true")


def _add_trace(sub: Subparsers) -> None:
    t = sub.add_parser("trace", help="profile a command and write the smallest policy that lets it pass")
    t.set_defaults(func=_cmd_trace)
    t.add_argument("-o", "--output", metavar="POLICY.toml", help="write the policy here")
    t.add_argument("--oci", metavar="PROFILE.json", help="also write an OCI/Docker seccomp profile")
    t.add_argument("--base", metavar="PRESET", default="shell", help="preset whose paths and env start the policy")
    t.add_argument("--json", action="store_true", help="print the trace as JSON")
    t.add_argument("--timeout", metavar="S", type=float, default=60.0)
    t.add_argument("--learn", action="store_true",
                   help="force the seccomp learning mode (no eBPF; NOT a security boundary)")
    t.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")


def _run_async(fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], a: argparse.Namespace) -> int:
    """Run an async subcommand on asyncio (through anyio: the SDK runs on either loop;
    asyncio is in the standard library and already half loaded, trio is not)."""
    import anyio

    return anyio.run(fn, a, backend="asyncio")


class UsageError(Exception):
    pass


def _policy_from_args(a: argparse.Namespace) -> Policy:
    """`zviz run`'s policy flags made into a Policy (_cliargs; relative paths are the caller's)."""
    from ._cliargs import policy_from_args

    return policy_from_args(a, lambda path: _abs(a, path))


def _abs(a: argparse.Namespace, path: str) -> str:
    """`path` made absolute against the caller's working directory (the client's, in the server)."""
    cwd = getattr(a, "cwd", None)
    if cwd is not None:
        return os.path.normpath(os.path.join(cwd, path))
    try:
        return os.path.abspath(path)
    except FileNotFoundError:  # (getcwd: the current directory was removed)
        raise UsageError(f"{path!r} is relative and the current directory no longer exists: "
                         "cd to an existing directory, or give an absolute path") from None


def _fds(a: argparse.Namespace) -> tuple[int | None, int | None, int | None]:
    """The caller's stdin, stdout and stderr fds (the client's, in the server; None: closed)."""
    got: tuple[int | None, int | None, int | None] | None = getattr(a, "stdio", None)
    return (0, 1, 2) if got is None else got


def _argv(a: argparse.Namespace) -> list[str]:
    argv = list(a.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("a command is needed after '--', e.g. zviz run -- python3 -c 'print(1)'")
    return argv


def _cmd_run(a: argparse.Namespace) -> int:
    # Start-up allocates much and frees little (modules, classes): the cyclic
    # GC's passes over it were ~7% of `zviz run`'s CPU. It is off until the
    # sandbox is open (_start_up_done), then on again for however long the
    # command runs, with everything made so far frozen out of its passes.
    import gc

    gc.disable()
    try:
        return _run_async(_run_until_signalled, a)
    finally:
        gc.enable()


async def _run_until_signalled(a: argparse.Namespace) -> int:
    """`_run` in this process; SIGTERM or SIGHUP (unless ignored: nohup) closes
    the sandbox as Ctrl-C does, status 128+N (their default action ended the
    process with the sandbox's workdir and uid lease left on disk until `zviz gc`)."""
    import signal

    import anyio

    wanted = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    got: list[int] = []
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(*wanted) as signals:
                    async for signum in signals:
                        got.append(signum)
                        tg.cancel_scope.cancel()
                        return

            if wanted:
                tg.start_soon(watch)
            status = await _run(a)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # (the task group's: _run's own error, for main's mapping)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return 128 + got[0] if got else status


def _start_up_done() -> None:
    import gc

    gc.freeze()
    gc.enable()


async def _run(a: argparse.Namespace) -> int:
    from ._pool import pool_size
    from ._sandbox import _open_sandbox

    argv = _argv(a)
    for flag, given in (("--workdir", a.workdir), ("--template", a.template), ("--snapshot", a.snapshot)):
        if given == "":  # (else the current directory: a confusing error about it, or using it)
            raise UsageError(f"{flag} needs a path, not an empty string")
    if a.template is not None and a.workdir is not None:
        raise UsageError("--template starts a fresh workdir that goes with the sandbox: drop --workdir "
                         "(and keep what you need with --snapshot PATH)")
    policy = _policy_from_args(a)
    pool_size()  # a bad ZVIZ_POOL_SIZE fails every run alike (the CLI server's pool reads it; this process's none)
    in_server = getattr(a, "cwd", None) is not None
    workdir, template, snapshot = (None if p is None else _abs(a, p) for p in (a.workdir, a.template, a.snapshot))
    if workdir is not None and not os.path.isdir(workdir):  # noqa: ASYNC240 - one local stat
        raise PolicyError("--workdir", a.workdir, "an existing directory: create it first")
    # in its own process, no pool: the process ends with this sandbox, a pre-started one would be wasted
    pool_for: Callable[[Policy], bool] | None = getattr(a, "pool_for", None)
    code = _warm_code(a, argv)
    # One command: a pooled sandbox if one is ready, else one without a zygote (one spawn less), except
    # for domain egress, whose proxy listens in the namespace a zygote holds. PYTHON -c CODE: a sandbox
    # without a zygote, from the pool too (the warm fork is its pid 1).
    import contextlib

    async with contextlib.AsyncExitStack() as opened:
        try:
            sb = await opened.enter_async_context(_open_sandbox(
                policy, workdir=workdir, monitor=a.monitor, template=template, zygote=code is None,
                use_pool=pool_for is not None and pool_for(policy),
                one_command=code is None and policy.net.mode != "domains"))
        except ValueError as e:  # the SDK refusing an argument (a --workdir the sandbox's own uid cannot write)
            if isinstance(e, ZvizError):  # (PolicyError is a ValueError too: its own exit status)
                raise
            raise UsageError(str(e)) from None
        if not in_server:
            _start_up_done()
        status = await _run_in(sb, a, argv, policy, code)
        if snapshot is not None:
            await sb.snapshot(snapshot)
    if not in_server:
        # The sandbox's close returned once its processes were dead; its workdir goes after that. This
        # process ends with the loop, whose end cancels what is left natively on asyncio (a shield does
        # not hold then): a big workdir's removal in its thread was cut off and the workdir left behind.
        from ._lifecycle import released

        await released()
    return status


class _Warm:
    """What `zviz run` starts as a warm snippet: `PYTHON -c code`, or with
    `script` (FILE and its arguments) `PYTHON FILE ARGS...`."""

    __slots__ = ("code", "script")

    def __init__(self, code: str, script: tuple[str, ...] = ()) -> None:
        self.code = code
        self.script = script


def _warm_code(a: argparse.Namespace, argv: list[str]) -> _Warm | None:
    """`zviz run -- PYTHON -c CODE` or `-- PYTHON FILE [ARGS...]` in the CLI
    server (PYTHON named like a CPython: python3, /usr/bin/python3.11; no
    option before CODE or FILE), which starts as a fork of a warm interpreter
    (zviz/_warm.py, as zviz.run_snippet; where it cannot, as any command), or
    None: any other command (`sh -c CMD`, `python3 -u FILE`), --cold,
    --monitor (which follows the zygote's runs), or a `zviz run` in its own
    process (which would start the warm interpreter for one snippet and stop
    it)."""
    if getattr(a, "cwd", None) is None or a.cold or a.monitor or len(argv) < 2:
        return None
    from ._warmcheck import named_like_python

    if not named_like_python(argv[0]):
        return None
    if argv[1] == "-c":
        return _Warm(argv[2]) if len(argv) == 3 else None
    if argv[1].startswith("-") or not argv[1]:  # (an option, `-` for stdin, or no file)
        return None
    return _Warm("", tuple(argv[1:]))


async def _start(sb: Sandbox, argv: list[str], code: _Warm | None, held: contextlib.AsyncExitStack) -> Process:
    """`argv` started in `sb` with its stdio piped: through a warm interpreter
    where `code` says it may be and the policy allows (its server held by
    `held` until the command has ended), else as any command."""
    if code is not None:
        from . import _warm

        try:
            return await held.enter_async_context(_warm.started(sb, argv[0], code.code, {}, stdin=True,
                                                                script=code.script))
        except _warm.NotWarm:
            pass
    return await sb.start(argv)


async def _run_to_record(sb: Sandbox, argv: list[str], code: _Warm | None, data: bytes) -> RunResult:
    """--json's run: as _start's, to its end."""
    if code is not None:
        from . import _warm

        try:
            return await _warm._run_warm_in(sb, argv[0], code.code, data, None, {}, insist=False,
                                            script=code.script)
        except _warm.NotWarm:
            pass
    return await sb.run(argv, stdin=data)


async def serve_request(args: list[str], stdio: tuple[int | None, int | None, int | None], cwd: str,
                        pool_for: Callable[[Policy], bool]) -> int:
    """One `zviz ARGS` for a client of the CLI server (_cliserver.py), with the
    client's stdio fds and working directory; its sys.stdout/sys.stderr are the
    client's (the server's are per request); `pool_for(policy)`: whether its
    sandbox may come from (and be refilled in) the server's pool. The exit
    status, as main's."""
    try:
        a = _server_parser().parse_args(args)
    except SystemExit as e:  # (--help, a usage error: argparse has printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if a.cmd != "run":
        print("zviz: error: the zviz server runs only `zviz run`", file=sys.stderr)
        return EXIT_USAGE
    a.stdio, a.cwd, a.pool_for = stdio, cwd, pool_for
    try:
        return await _run(a)
    except Exception as e:  # noqa: BLE001  (main's mapping; anything else is a bug, shown to its caller)
        code = _status_for(a, e)
        if code is None:
            import traceback

            traceback.print_exception(e)
            return 1
        return code


_parsers: list[argparse.ArgumentParser] = []


def _server_parser() -> argparse.ArgumentParser:
    if not _parsers:
        _parsers.append(_parser())
    return _parsers[0]


async def _run_in(sb: Sandbox, a: argparse.Namespace, argv: list[str], policy: Policy, code: _Warm | None) -> int:
    import contextlib

    async with contextlib.AsyncExitStack() as held:
        return await _run_held(sb, a, argv, policy, code, held)


async def _run_held(sb: Sandbox, a: argparse.Namespace, argv: list[str], policy: Policy, code: _Warm | None,
                    held: contextlib.AsyncExitStack) -> int:
    import anyio

    from ._kernel import OwnedFd
    from ._proxy import FdReceiveStream, FdSendStream

    if a.json:
        import json

        wall = policy.limits.wall_s  # (an inherited stdin that never ends, e.g. a service's pipe, is bounded too)
        with anyio.move_on_after(wall if wall else float("inf")) as scope:
            data = await _read_stdin(_fds(a)[0])
        if scope.cancelled_caught:
            print(f"zviz: timed out after {wall:g} s reading stdin, which --json reads to its end before the "
                  "command starts: close it, or give </dev/null", file=sys.stderr)
            return EXIT_TIMEOUT
        r = await _run_to_record(sb, argv, code, data)
        record = r.to_json()
        stats = sb.statistics()
        if stats.syscalls is not None:
            record["syscalls"] = dict(stats.syscalls)
        record["events"] = [str(e) for e in sb.events_so_far()]
        failed = await _print_result(a, json.dumps(record, indent=2))
        return r.status if failed is None else failed
    # Passthrough through pipes (never the caller's terminal itself: no
    # TIOCSTI into it, no /dev/tty). Our stdio is duplicated so closing the
    # streams leaves sys.std* alone.
    proc = await _start(sb, argv, code, held)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # all piped
    stdin = proc.stdin
    fd_in, fd_out, fd_err = _fds(a)
    # the streams make their fds non-blocking, and a dup shares that flag with
    # the caller's descriptions (its terminal, its pipes): it is put back at the end
    blocking = {fd: os.get_blocking(fd) for fd in (fd_in, fd_out, fd_err) if fd is not None and _usable(fd)}
    ours_in = FdReceiveStream(OwnedFd(os.dup(fd_in), "cli-stdin")) if fd_in is not None and _usable(fd_in) else None
    # (a closed stdout or stderr of the caller: the command's output to it is dropped)
    ours_out = FdSendStream(OwnedFd(_dup_or_null(fd_out), "cli-stdout"))
    ours_err = FdSendStream(OwnedFd(_dup_or_null(fd_err), "cli-stderr"))
    timeout = policy.limits.wall_s

    async def pump(src: FdReceiveStream, dst: FdSendStream) -> None:
        try:
            async for chunk in src:
                await dst.send_all(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            if dst is stdin:
                dst.close()
            else:  # (the caller's end is gone, `zviz run -- yes | head`: the command's
                src.close()  # writes fail as in a shell's pipeline, SIGPIPE, not block until the timeout)

    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            if ours_in is not None:
                tg.start_soon(pump, ours_in, stdin)
            else:
                stdin.close()
            done_out, done_err = anyio.Event(), anyio.Event()

            async def pump_and_set(src: FdReceiveStream, dst: FdSendStream, ev: anyio.Event) -> None:
                try:
                    await pump(src, dst)
                finally:
                    ev.set()

            tg.start_soon(pump_and_set, proc.stdout, ours_out, done_out)
            tg.start_soon(pump_and_set, proc.stderr, ours_err, done_err)
            with anyio.move_on_after(timeout if timeout else float("inf")) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                timed_out = True
                proc.kill()
                await proc.wait()
            with anyio.move_on_after(2.0):
                await done_out.wait()
                await done_err.wait()
            tg.cancel_scope.cancel()
    finally:
        for s in (ours_in, ours_out, ours_err):
            if s is not None:
                s.close()
        for fd, was in blocking.items():
            if _usable(fd):
                os.set_blocking(fd, was)
    if timed_out:
        print(f"zviz: timed out after {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    rc = proc.returncode
    assert rc is not None
    for e in sb.events_so_far():
        print(f"zviz: {e}", file=sys.stderr)
    return 128 - rc if rc < 0 else rc


def _cmd_trace(a: argparse.Namespace) -> int:
    return _run_async(_trace, a)


async def _trace(a: argparse.Namespace) -> int:
    import json

    from ._oci import oci_profile
    from ._policy import Policy
    from ._trace import summary, trace

    argv = list(a.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("a command is needed after '--', e.g. zviz trace -o p.toml -- python3 -c 'print(1)'")
    base = Policy.preset(a.base)
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    t = await trace(argv, base=base, learn=True if a.learn else None, timeout=a.timeout, stdin=stdin)
    sys.stdout.buffer.write(t.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(t.stderr)
    if a.output:
        _write(a.output, t.policy.to_toml())
    if a.oci:
        _write(a.oci, json.dumps(oci_profile(t.policy.syscalls.names()), indent=2) + "\n")
    if a.json:
        print(json.dumps(t.to_json(), indent=2))
    else:
        print(summary(t), file=sys.stderr)
        if a.output:
            print(f"wrote {a.output}", file=sys.stderr)
        if a.oci:
            print(f"wrote {a.oci}", file=sys.stderr)
    return 0 if t.status == 0 else t.status


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise PolicyError("-o/--oci", path, f"a writable file ({e.strerror})") from None


async def _read_stdin(fd: int | None) -> bytes:
    """All of stdin for --json (nothing from a terminal; at most MAX_JSON_STDIN
    bytes, else a UsageError: the CLI server's memory is shared), read on the event
    loop from a dup (non-blocking, the flag put back after): cancelled, it
    leaves nothing behind. (Not a thread blocked in read(): in the CLI server
    one would outlive the request and its client, and read on from whatever
    file gets the closed fd's number next.)"""
    if fd is None or not _usable(fd) or os.isatty(fd):
        return b""
    from ._kernel import OwnedFd
    from ._proxy import FdReceiveStream

    was_blocking = os.get_blocking(fd)
    stream = FdReceiveStream(OwnedFd(os.dup(fd), "cli-stdin"))
    try:
        chunks, size = [], 0
        while chunk := await stream.receive_some():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_JSON_STDIN:
                raise UsageError(f"--json holds all of stdin in memory, and it is over {MAX_JSON_STDIN >> 20} MiB: "
                                 "without --json stdin is streamed to the command with no bound, or pass the "
                                 "input as a file (--ro FILE, or --bind FILE:/PATH)")
        return b"".join(chunks)
    finally:
        stream.close()
        if _usable(fd):
            os.set_blocking(fd, was_blocking)


async def _print_result(a: argparse.Namespace, text: str) -> int | None:
    """The command's result (--json's record) on the caller's stdout. In the CLI
    server, written on the event loop for as long as the caller takes to read it
    (the server's sys.stdout, for its own messages, gives up on a stuck reader).
    None when written, or the caller's reader gone (EPIPE: as the command's own
    output); else 1, said on stderr (a full disk, an I/O error: the record is lost)."""
    if getattr(a, "stdio", None) is None:
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except OSError as e:
            # (what is left in the buffer goes nowhere at exit, not into a second error)
            os.dup2(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), sys.stdout.fileno())
            return None if isinstance(e, BrokenPipeError) else _lost_result(e)
        return None
    fd = _fds(a)[1]
    if fd is None or not _usable(fd):
        return None
    import anyio

    from ._kernel import OwnedFd
    from ._proxy import FdSendStream

    was_blocking = os.get_blocking(fd)
    out = FdSendStream(OwnedFd(os.dup(fd), "cli-stdout"))
    try:
        await out.send_all((text + "\n").encode())
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # (the caller's stdout is gone)
    except OSError as e:
        return _lost_result(e)
    finally:
        out.close()
        if _usable(fd):
            os.set_blocking(fd, was_blocking)
    return None


def _lost_result(e: OSError) -> int:
    print(f"zviz: error: the --json record could not be written to stdout ({e.strerror})", file=sys.stderr)
    return 1


def _dup_or_null(fd: int | None) -> int:
    return os.dup(fd) if fd is not None and _usable(fd) else os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def _usable(fd: int | None) -> bool:
    if fd is None:
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _cmd_gc(a: argparse.Namespace) -> int:
    from . import _cachedir, _diskcache, _hostside, _ids, _workdir

    found = _workdir.sweep(dry_run=a.dry_run, min_age=60.0, on_stale=_hostside.reclaim)
    leases = _ids.sweep_leases(dry_run=a.dry_run, gone={s.path for s in found} if a.dry_run else ())
    verb = "would remove" if a.dry_run else "removed"
    for s in found:
        print(f"{verb} {s.path}" + (f" (owner was: {s.owner})" if s.owner else ""))
    for path in leases:
        print(f"{verb} uid lease {path}")
    cached = _diskcache.clear(dry_run=a.dry_run)
    if cached:
        print(f"{verb} {cached} start-up cache entr{'y' if cached == 1 else 'ies'} in {_cachedir.location()}")
    servers: list[int] = []
    if not a.dry_run:  # (a CLI server holds nothing but loaded code: the next `zviz run` starts one)
        from ._cliserver import stop_servers

        servers = stop_servers()
        for pid in servers:
            print(f"stopped the zviz run server (pid {pid})")
    if not found and not leases and not cached and not servers:
        print("nothing to remove")
    return 0


def _cmd_check(a: argparse.Namespace) -> int:
    import json

    import attrs

    from ._cgroup import where
    from ._probe import bcc_status, probe

    f = probe()
    ok_bcc, why_bcc = bcc_status()
    mem_kind, mem_parent, mem_reason = where()
    if a.json:
        d = attrs.asdict(f)
        d["bcc"] = {"available": ok_bcc, "detail": why_bcc}
        d["missing"] = [dict(feature=x, consequence=y, fix=z) for x, y, z in f.missing()]
        d["memory_cgroup"] = {"kind": mem_kind, "parent": mem_parent, "detail": mem_reason}
        print(json.dumps(d, indent=2))
        return 0
    rows = [
        ("kernel", f.kernel, True),
        ("landlock", f"ABI {f.landlock_abi}" if f.landlock_abi else f.landlock_reason, f.landlock_abi >= 1),
        ("user namespaces", "yes" if f.userns else f.userns_reason, f.userns),
        ("seccomp user notification", "yes" if f.seccomp_notify else "no", f.seccomp_notify),
        ("seccomp ADDFD", "yes" if f.seccomp_addfd else "no", f.seccomp_addfd),
        ("notify SYNC_WAKE_UP", "yes" if f.sync_wakeup else "no", f.sync_wakeup),
        ("pidfd", "yes" if f.pidfd else "no", f.pidfd),
        ("writable cgroup v2", f.cgroup_v2 or f.cgroup_reason, f.cgroup_v2 is not None),
        ("memory cgroup per sandbox", (f"{mem_kind} under {mem_parent}" if mem_kind else mem_reason),
         mem_kind is not None),
        ("eBPF monitor (bcc)", why_bcc, ok_bcc),
        ("running as", "root (each sandbox runs as a host uid of its own)" if f.is_root else f"uid {os.geteuid()}",
         True),
    ]
    w = max(len(r[0]) for r in rows)
    for name, val, good in rows:
        print(f"{'ok ' if good else '-- '} {name:<{w}}  {val}")
    missing = f.missing()
    if mem_kind is None:
        consequence = ("limits.memory bounds each process's address space only: memfd and shared memory, "
                       "pipe and socket buffers and page cache are not bounded, and memfd_create is refused "
                       f"by default ({mem_reason})")
        fix = "run as root, or delegate a cgroup v2 subtree with the memory controller and point ZVIZ_CGROUP at it"
        missing.append(("memory cgroup", consequence, fix))
    if not ok_bcc:
        missing.append(("eBPF monitor", "no per-syscall statistics; `zviz trace` uses the seccomp "
                        "learning mode", "run as root and ./scripts/setup-ebpf.sh"))
    if missing:
        print("\nmissing, what it means, and the fix:")
        for feat, consequence, fix in missing:
            print(f"  - {feat}: {consequence}.\n    fix: {fix}")
    return 0


def _add_mcp(sub: Subparsers) -> None:
    m = sub.add_parser("mcp", help="serve sandboxes to MCP clients: a sandbox and a Python per session "
                       "(docs/integrations.md)")
    m.set_defaults(func=_cmd_mcp)
    src = m.add_mutually_exclusive_group()
    src.add_argument("--policy", metavar="FILE", help="policy file: zviz TOML, or an OCI seccomp profile (JSON)")
    src.add_argument("--preset", metavar="NAME", help="python | shell (default: shell)")
    m.add_argument("--ro", metavar="PATH", action="append", default=[], help="add a read-only path (e.g. a venv)")
    m.add_argument("--python", metavar="PATH", default="python3", help="run_python's interpreter, inside (a venv's)")
    m.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at http://HOST:PORT/mcp (default: stdio)")
    m.add_argument("--idle-timeout", metavar="S", type=float, default=600.0,
                   help="close a session's sandbox after S seconds without a tool call (default 600)")
    m.add_argument("--max-sessions", metavar="N", type=int, default=16, help="most HTTP sessions at once (16)")


def _cmd_mcp(a: argparse.Namespace) -> int:
    try:
        from . import _mcp
    except ImportError as e:  # the optional extra
        raise FeatureUnavailable("zviz mcp", f"mcp cannot be imported ({e})", "pip install 'zviz[mcp]'") from None
    return _mcp.cli(a.policy, a.preset, a.ro, a.python, http=a.http, idle_timeout=a.idle_timeout,
                    max_sessions=a.max_sessions)


_SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (_add_run, _add_gc, _add_check, _add_trace, _add_mcp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    import warnings

    from ._errors import ZvizWarning

    warnings.simplefilter("default", ZvizWarning)
    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"zviz: warning: {msg}\n"
    try:
        return int(a.func(a))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        code = _status_for(a, e)
        if code is None:
            raise
        return code


def _status_for(a: argparse.Namespace, e: Exception) -> int | None:
    """The exit status for an error (printed), None for one that is a bug."""
    for kind, code in ((UsageError, EXIT_USAGE), (CommandNotFoundError, EXIT_NOT_FOUND), (PolicyError, EXIT_POLICY),
                       (SandboxSetupError, EXIT_SETUP), (FeatureUnavailable, EXIT_HOST), (ZvizError, EXIT_SETUP)):
        if isinstance(e, kind):
            return _fail(a, e, code)
    return None


def _fail(a: argparse.Namespace, e: BaseException, code: int) -> int:
    if a.debug:
        import traceback

        traceback.print_exception(e)
    print(f"zviz: error: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
