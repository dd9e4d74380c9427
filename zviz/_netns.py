"""The blank network namespace: a `none`-mode sandbox without a namespace of
its own until it makes a socket (docs/security-model.md, "Network").

Making a network namespace and freeing it (the kernel's `setup_net` and
`cleanup_net`) is most of a fresh sandbox's kernel time (docs/performance.md,
"The cold path"), and a `none` sandbox (no sockets but unix ones) usually
makes no socket at all: a snippet, a test, a build. So, where this process may
make and enter network namespaces (root):

- the sandbox starts in the *blank* namespace: one per host process, made
  once, whose loopback stays down and in which no socket is ever made. A
  sandbox's own user namespace holds no capability over it (it belongs to
  the host's), so nothing in it can change;
- its filter makes no socket in-kernel: every socket() and socketpair() is
  notified, and the supervisor makes the ones the policy allows (unix, and
  NETLINK_ROUTE) in the sandbox's *own* namespace, made at its first socket,
  and installs them in the caller (SECCOMP_IOCTL_NOTIF_ADDFD). A socket
  belongs for good to the namespace it was made in: a sandbox's abstract
  names, its /proc/net/unix and its interfaces (what a unix socket's ioctls
  show) are its own, as with a namespace made at clone.

What the sandbox sees of the blank namespace (its /proc/net, /proc/sys/net)
is the same in every sandbox and never changes: nothing is ever made there.
"""

from __future__ import annotations

import os
import threading

from . import _stage

# ZVIZ_BLANK_NETNS=0: every sandbox makes its own namespace at clone, as before (benchmarks' A/B)
ENABLED = os.environ.get("ZVIZ_BLANK_NETNS", "1") != "0"
_lock = threading.Lock()
_blank: int | None = None
_tried_by: int | None = None  # the euid that made it or tried (a process that changes its euid is asked again)


def usable() -> bool:
    """Whether sandboxes planned now start in the blank namespace."""
    return ENABLED and blank_fd() is not None


def blank_fd() -> int | None:
    """This process's blank network namespace (an fd it keeps), made at the
    first call; None where this process cannot make one (not root, a
    container's filter refusing unshare or setns)."""
    global _blank, _tried_by  # noqa: PLW0603 - the process's one blank namespace
    euid = os.geteuid()
    if _tried_by == euid:
        return _blank
    if euid != 0:  # (made as root, then root dropped: this process can no longer enter it)
        return None
    with _lock:
        if _tried_by != euid:
            if _blank is None:
                try:
                    fd = _stage.netns_new()
                except OSError:
                    fd = -1
                try:
                    if fd >= 0:
                        os.close(_stage.socket_in(fd, 1, 1, 0))  # (a probe that setns works here too)
                        _blank = fd
                except OSError:
                    os.close(fd)
            _tried_by = euid
    return _blank


def private() -> int:
    """A sandbox's own network namespace (an fd for the caller to own), for its
    sockets; its loopback down (a `none` sandbox has no inet sockets)."""
    return _stage.netns_new()


def socket_in(netns: int, family: int, kind: int, protocol: int) -> int:
    """A socket made in `netns` (the calling thread stays in its own)."""
    return _stage.socket_in(netns, family, kind, protocol)


def socketpair_in(netns: int, family: int, kind: int, protocol: int) -> tuple[int, int]:
    return _stage.socketpair_in(netns, family, kind, protocol)
