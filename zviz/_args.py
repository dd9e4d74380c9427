"""Checks of the arguments of run() and start() (pure): a bad argument is the
caller's mistake, a TypeError or ValueError that says what is accepted, never
a PolicyError (which means "your policy is wrong")."""

from __future__ import annotations

import os
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence

OutputCallback = Callable[[bytes], Awaitable[None] | None]


def check_env(env: Mapping[str, str] | None) -> None:
    if env is None:
        return
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of NAME -> value strings, not {type(env).__name__}")
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"env must map strings to strings: got {k!r}: {v!r}")
        if not k or "=" in k or "\0" in k + v:
            raise ValueError(f"env entry {k!r}: names must be non-empty without '=' and nothing may contain NUL")


def command_argv(argv: Sequence[str] | str, shell: bool, cwd: str | None) -> tuple[str, ...]:
    """The argv to spawn for run()/start()'s argv, shell and cwd (checked)."""
    if shell:
        if not isinstance(argv, str):
            raise TypeError("with shell=True, the command is one string for /bin/sh -c")
        if "\0" in argv:
            raise ValueError("the shell command contains a NUL byte")
        if cwd is not None:
            argv = f"cd -- {shlex.quote(check_cwd(cwd))} || exit 126\n{argv}"
        return ("/bin/sh", "-c", argv)
    if isinstance(argv, (str, bytes)):
        raise TypeError(f"argv must be a sequence of strings, not a {type(argv).__name__} (it is never split: "
                        "pass a list, or shell=True to run a string with /bin/sh -c)")
    try:
        out = tuple(argv)
    except TypeError:
        raise TypeError(f"argv must be a sequence of strings, not {type(argv).__name__}") from None
    if not out:
        raise ValueError("argv is empty: give at least the command")
    if not all(isinstance(a, str) for a in out):
        raise TypeError(f"argv must be a sequence of strings: got {out!r}")
    if any("\0" in a for a in out):
        raise ValueError(f"argv contains a NUL byte: {out!r}")
    if cwd is not None:
        # The zygote starts every run in the workdir: a shell changes directory
        # first, then execs the command in place (same pid, same streams).
        out = ("/bin/sh", "-c", 'cd -- "$1" || exit 126; shift; exec "$@"', "zviz-cwd", check_cwd(cwd), *out)
    return out


def check_path(value: object, what: str = "a path") -> str:
    """A path argument as a str: os.PathLike accepted, anything else a
    TypeError, empty or with NUL a ValueError (the caller's mistake)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a path string, not {type(value).__name__}")
    if not value or "\0" in value:
        raise ValueError(f"{what} must be a non-empty path without NUL, not {value!r}")
    return value


def check_cwd(cwd: object) -> str:
    return check_path(cwd, "cwd")
