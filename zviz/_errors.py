"""The exception tree: one root, split by who is at fault.

- `PolicyError`: the policy you gave is wrong (field, value, what is accepted).
- `UnsupportedKernelError` / `FeatureUnavailable`: this host lacks something;
  the message says what to install or enable.
- `SandboxSetupError`: setting the sandbox up failed at a named step (path, errno).
- `SandboxClosedError`: the sandbox was used after it was closed, or closed while the call ran.
- `CodeContextError`: a code context is broken or closed (see docs/code-contexts.md).

A syscall that the sandbox denies is not an exception: it is a result, in
`RunResult.denials`, `Sandbox.statistics()` and `Sandbox.events()`.
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # (not typing's: the CLI imports this module, and typing costs ~5 ms)
if TYPE_CHECKING:
    from typing import Any, ClassVar


class ZvizError(Exception):
    """Root of every error zviz raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # picklable whatever the subclass's __init__ takes (Ray and multiprocessing send errors
        # between processes): rebuilt from its args and attributes, without calling __init__
        state = dict(self.__dict__)
        if isinstance(self, OSError):  # its fields are slots, not in __dict__
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return _rebuild, (type(self), self.args, state)


def _rebuild(cls: type[ZvizError], args: tuple[object, ...], state: dict[str, object]) -> ZvizError:
    err = cls.__new__(cls, *args)  # OSError's __new__ sets errno/strerror from (errno, message)
    err.args = args
    for name, value in state.items():
        setattr(err, name, value)
    return err


class PolicyError(ZvizError, ValueError):
    """The policy is malformed: names the field, the value, and what is accepted."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"policy field {field!r}: got {value!r}; expected {expected}")


class TemplateError(ZvizError, ValueError):
    """A workspace template (`Sandbox.snapshot`, `open_sandbox(template=)`)
    cannot be made or used: names the path, what is wrong and the fix."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"template {path!r}: {problem}")


class _PolicyTypeError(PolicyError, TypeError):
    """A policy field of the wrong type (e.g. one string where a list of paths
    is expected): a PolicyError (a bad policy, CLI status 125) that is also the
    TypeError Python code expects for a wrong type."""


class FeatureUnavailable(ZvizError, RuntimeError):
    """An optional feature cannot be used on this host; the message gives the fix."""

    def __init__(self, feature: str, reason: str, fix: str) -> None:
        self.feature = feature
        self.reason = reason
        self.fix = fix
        super().__init__(f"{feature} is unavailable: {reason}. Fix: {fix}")


class UnsupportedKernelError(FeatureUnavailable):
    """The kernel lacks something zviz cannot work without."""


class SandboxSetupError(ZvizError, OSError):
    """Setting up the sandboxed process failed at `step` (with `path`, `errno`)."""

    def __init__(self, step: str, err: int, path: str | None = None, hint: str = "") -> None:
        self.step = step
        self.path = path
        where = f" ({path})" if path else ""
        name = _errno.errorcode.get(err, str(err))
        msg = f"sandbox setup failed at step {step!r}{where}: {name}: {os.strerror(err)}"
        if hint:
            msg += f". {hint}"
        super().__init__(err, msg)
        # OSError.__str__ would print "[Errno N] msg"; keep ours readable.
        self.args = (msg,)
        self.errno = err

    def __str__(self) -> str:
        return str(self.args[0])


class CommandNotFoundError(SandboxSetupError, FileNotFoundError):
    """The command to run was not found on the host, before anything was
    spawned (a command found there but outside the sandbox's paths fails
    inside instead: exit status 127, see docs/errors.md)."""

    def __init__(self, command: str, searched: str) -> None:
        if "/" in command:
            hint = "no such file (a relative path is taken from the workdir)"
        else:
            hint = (f"not found in PATH={searched!r} of the policy's environment; give an absolute "
                    "path or add its directory to the policy's read-only paths and env PATH")
        super().__init__("resolve-command", _errno.ENOENT, command, hint)


class ResourceExhausted(SandboxSetupError):
    """The host ran out of a resource zviz needs (file descriptors, processes,
    memory): `.limit` names it and the message says how to raise it or how
    to lower the load. Retrying later may succeed."""

    # errno -> (the limit, the fix)
    KNOWN: ClassVar[dict[int, tuple[str, str]]] = {
        _errno.EMFILE: ("open files of this process (RLIMIT_NOFILE)",
                        ("raise the soft limit (`ulimit -n`, resource.setrlimit(RLIMIT_NOFILE, ...)) or run fewer "
                         "sandboxes at once (ZVIZ_MAX_SANDBOXES)")),
        _errno.ENFILE: ("open files of the whole host (fs.file-max)",
                        "raise the sysctl fs.file-max or run fewer sandboxes at once"),
        _errno.EAGAIN: ("processes or threads (RLIMIT_NPROC, kernel.pid_max, kernel.threads-max, pids cgroup)",
                        ("raise the limit that applies (`ulimit -u`, sysctl kernel.pid_max) or run fewer "
                         "sandboxes at once")),
        _errno.ENOMEM: ("memory", "free memory on the host or run fewer sandboxes at once"),
    }

    def __init__(self, step: str, err: int, path: str | None = None, *, limit: str | None = None,
                 fix: str | None = None) -> None:
        known_limit, known_fix = self.KNOWN.get(err, ("a host resource", "run fewer sandboxes at once"))
        self.limit = limit or known_limit
        fix = fix or known_fix
        super().__init__(step, err, path, f"The host ran out of {self.limit}. Fix: {fix}")


class SandboxClosedError(ZvizError, RuntimeError):
    """The sandbox was used after it was closed (`aclose()`, the end of its
    `async with` block or event loop), or was closed while the call ran.

    `stdout` and `stderr`: for a `run()` that the close ended, what the
    command had written when the close came (what `RunResult` would have
    held); None otherwise."""

    def __init__(self, message: str, *, stdout: bytes | None = None, stderr: bytes | None = None) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled with its output: Ray, multiprocessing)
        return (_closed_error, (str(self), self.stdout, self.stderr))


def _closed_error(message: str, stdout: bytes | None, stderr: bytes | None) -> SandboxClosedError:
    return SandboxClosedError(message, stdout=stdout, stderr=stderr)


class CodeContextError(ZvizError, RuntimeError):
    """A code context cannot be used: its driver broke the protocol (a
    malformed, oversized or endless stream of frames, a closed channel), it
    did not answer in time, or it was closed. The message says which; a
    broken context can be `restart()`ed (its state is lost)."""


class ZvizWarning(UserWarning):
    """A layer was degraded (e.g. no user namespaces on this host)."""
