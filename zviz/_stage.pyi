# The C extension (zviz/_stage_py.c, zviz/_stage.c), for type checkers; the constants come from zviz/_abi.h.

class SetupError(Exception):
    """args: (step name, errno, index into the spec's table or -1, path or None)."""

def spawn(spec: bytes, command: bytes, /) -> tuple[int, int, int]:
    """Clone, set up the sandbox in the child, exec: (pid, pidfd, listener fd
    or -1). `spec` and `command` are StageSpec.pack() and Command.pack()
    (zviz/_spec.py). A failed step, id-map, cgroup or tracking write raises
    SetupError; a malformed buffer ValueError."""

def landlock_abi() -> int:
    """Landlock ABI version, or -errno."""

def netns_new() -> int:
    """A new, empty network namespace's fd (the calling thread stays in its own)."""

def socket_in(netns: int, family: int, type: int, protocol: int, /) -> int:
    """A socket made in the network namespace `netns` (the calling thread stays in its own)."""

def count_sockets_in(netns: int, /) -> int:
    """The sockets in the network namespace `netns`: its /proc/net/sockstat "sockets: used" (every socket made
    from user space and not yet freed, bound or not, in flight or not; the kernel's own not counted)."""

def socketpair_in(netns: int, family: int, type: int, protocol: int, /) -> tuple[int, int]:
    """A socket pair made in the network namespace `netns`."""

def pidfd_getfd(pidfd: int, fd: int, /) -> int:
    """Duplicate fd of the process behind pidfd (raises OSError)."""

def pump_start(listener: int, out: int, stop: int, netns: int = -1, gate: int = -1, dns4: int = -1,
               dns6: int = -1, sockets_ns: int = -1, sockets_allow: int = 0, /) -> object:
    """Start the thread that receives `listener`'s notifications (zviz/_pump.c); it
    duplicates the fds and ends on `stop` readable or the listener's hang-up. `netns` and
    `gate`: direct egress (the sandbox's network namespace, the gate's map). `sockets_ns`
    and `sockets_allow` (1 socket, 2 socketpair): the blank network namespace's sockets,
    made by the thread in the sandbox's own namespace."""

def pump_set_table(pump: object, blob: bytes, budget: int = -1, /) -> None:
    """The pump's table (40-byte entries, zviz/_pump.h) and, if >= 0, its budget of gated connects."""

def pump_set_names(pump: object, blob: bytes, /) -> None:
    """Direct egress: the names checked (272-byte entries, zviz/_pump.h), which the pump answers DNS for."""

def pump_give_back(pump: object, n: int, /) -> None:
    """`n` gated connects ended: the pump may make as many more."""

def gate_open(tgid: int, /) -> tuple[int, int]:
    """The gate's SOCKHASH map and attached SK_MSG program (zviz/_gate.c): (map fd, program fd).
    Sends by process `tgid` pass. OSError with the verifier's log on a refusal."""

def gate_add(map_fd: int, up: int, capture: int, /) -> bytes:
    """Hold TCP socket `up`'s sends (by other processes) in `capture`: the 48-byte key."""

def gate_key(up: int, /) -> bytes:
    """The gate's key of TCP socket `up`."""

def gate_remove(map_fd: int, key: bytes, which: int = -1, /) -> bool:
    """Take the connection's entries out (which: 0 its socket's, 1 its capture socket's, -1 both);
    False if none was in."""

def flight_check(buf: bytes, name: str, port: int, /) -> int:
    """The pump's fast first-flight check (zviz/_flight.c): 1 passes, 0 incomplete, -1 Python's."""

def dns_query_name(q: bytes, /) -> tuple[str, int, int] | None:
    """The pump's fast DNS read: (name, qtype, end of the question), or None (Python's)."""

def dns_answer(q: bytes, end: int, qtype: int, addr: bytes, /) -> bytes:
    """The pump's fast DNS answer: an A record with `addr` for type A, none for other types."""

def notif_sizes() -> tuple[int, int, int]:
    """SECCOMP_GET_NOTIF_SIZES: (seccomp_notif, seccomp_notif_resp, seccomp_data)."""

def seccomp_action_avail(action: int, /) -> bool:
    """SECCOMP_GET_ACTION_AVAIL."""

def kill_uid(uid: int, gid: int, /) -> int:
    """SIGKILL every process of `uid` (kill(-1) from a helper that takes it): 1 if any, 0 if none."""

def mount_template(lower: bytes, upper: bytes, work: bytes, target: bytes, owner_uid: int, owner_gid: int,
                   uid: int, gid: int, /) -> tuple[int, int, bytes | None]:
    """Mount a template's overlay on `target`: (-1, 0, helper), or (failing step, errno, None)."""

def reap_template_helper(helper: bytes, /) -> None:
    """Reap the helper process of a `mount_template` call and free its stack (exactly once)."""

STEPS: tuple[str | None, ...]
LAYOUTS: dict[str, tuple[int, dict[str, int]]]
MAX_RLIMITS: int
MAX_BINDS: int
MAX_MOUNT_OPS: int
MAX_MASKS: int
MASK_FILE: int
MASK_DIR: int
MASK_RDONLY: int
MASK_PIN: int
SPEC_ROOT_READONLY: int
SPEC_CGROUP_NS: int
SPEC_BLANK_NETNS: int
MAX_LIVE_SOCKETS: int
MAX_LL_PATHS: int
MAX_LL_PORTS: int
OP_MKDIR: int
OP_SYMLINK: int
OP_FILE: int
OP_MOVE: int
OP_PROC: int
OP_TMPFS: int
STATUS_FD: int
COMMAND_RULESET_FD: int
INIT_FD: int
STATUS_MAGIC: int
ZREQ_MAGIC: int
ZREQ_MAX_BYTES: int
SPEC_MAGIC: int
COMMAND_MAGIC: int
SPEC_MOUNT_NS: int
SPEC_MOUNT_PROC: int
SPEC_NEW_ROOT: int
SPEC_LOOPBACK_UP: int
SPEC_SETSID: int
SPEC_CREDS_LATE: int
SPEC_DROP_GROUPS: int
SPEC_DENY_SETGROUPS: int
SPEC_COMMAND_RULESET: int

# spawn_start's capsule (not a class of the module): its child, between its clone and its exec
PendingSpawn = object

def spawn_start(spec: bytes, command: bytes, /) -> PendingSpawn:
    """spawn's first half: clone, id maps, cgroup, and the child let go (what
    fails so far raises as spawn does). The child then sets itself up on its
    own; a pending spawn collected unfinished is aborted."""

def pending_info(pending: PendingSpawn, /) -> tuple[int, int]:
    """(the fd that turns readable once the child has exec'd or failed, the
    child's pid: unreaped until finish or abort); (-1, -1) once done."""

def spawn_finish(pending: PendingSpawn, /) -> tuple[int, int, int]:
    """spawn's second half, once pending_info's fd is readable (else it blocks):
    (pid, pidfd, listener fd or -1), or raises as spawn does."""

def spawn_abort(pending: PendingSpawn, /) -> None:
    """SIGKILL and reap the child; idempotent."""

def pending_kill(pending: PendingSpawn, /) -> None:
    """SIGKILL the child by its pidfd (finish or abort reaps it); nothing once done."""

def spawn_warm(spec: bytes, command: bytes, /) -> tuple[int, int, int] | None:
    """As spawn, but the child is a fork of this (single-threaded) interpreter
    that returns None inside the sandbox instead of exec'ing; the parent gets
    (pid, pidfd, listener fd or -1). The command's init_fd is placed on fd 6."""
