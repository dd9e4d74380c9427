# The C extension zviz/_stage.c (its PyMethodDef table), for type checkers.
from typing import Any

def spawn(spec: dict[str, Any], /) -> tuple[int, int, int]:
    """Clone, set up the sandbox in the child, exec. (pid, pidfd, listener fd
    or -1). A failed step raises ChildProcessError((step, errno, index)); a
    failed id-map or tracking write ChildProcessError((what, errno, msg, path))."""

def landlock_abi() -> int:
    """Landlock ABI version, or -errno."""

def pidfd_getfd(pidfd: int, fd: int, /) -> int:
    """Duplicate fd of the process behind pidfd (raises OSError)."""

def notif_sizes() -> tuple[int, int, int]:
    """SECCOMP_GET_NOTIF_SIZES: (seccomp_notif, seccomp_notif_resp, seccomp_data)."""

def seccomp_action_avail(action: int, /) -> bool:
    """SECCOMP_GET_ACTION_AVAIL."""
