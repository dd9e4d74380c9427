"""What zviz/_abi.h says, for the pure modules (which do not import the C
extension): limits, mount operation kinds, fd numbers, magic values and flags.
The extension exports the same names (`zviz._stage`), and the modules that
talk to it read them there; tests/test_abi.py checks that every value here
equals the extension's, and that the struct formats match its LAYOUTS."""

# limits of the stage's fixed-size tables
MAX_RLIMITS = 16
MAX_BINDS = 64
MAX_MOUNT_OPS = 256
MAX_MASKS = 64
MAX_LL_PATHS = 256
MAX_LL_PORTS = 64

# mount operations of a new root
OP_MKDIR, OP_SYMLINK, OP_FILE, OP_MOVE, OP_PROC, OP_TMPFS = 1, 2, 3, 4, 5, 6
# ... and the masks over it
MASK_FILE, MASK_DIR, MASK_RDONLY, MASK_PIN = 1, 2, 3, 4

# fds a sandbox's zviz-init starts with
STATUS_FD = 3  # run-init: the status pipe; zygote: the control socket
COMMAND_RULESET_FD = 7  # zygote: the ruleset of each command's own Landlock domain
INIT_FD = 6  # zviz-init (execveat), or a warm snippet's input (zviz/_warmboot.py)

# magic values
STATUS_MAGIC = 0x7A76697A
ZREQ_MAGIC = 0x7A727131
ZREQ_MAX_BYTES = 1 << 20
SPEC_MAGIC = 0x7A737031
COMMAND_MAGIC = 0x7A636D31

# spec_header.flags
SPEC_MOUNT_NS = 1 << 0
SPEC_MOUNT_PROC = 1 << 1
SPEC_NEW_ROOT = 1 << 2
SPEC_LOOPBACK_UP = 1 << 3
SPEC_SETSID = 1 << 4
SPEC_CREDS_LATE = 1 << 5
SPEC_DROP_GROUPS = 1 << 6
SPEC_DENY_SETGROUPS = 1 << 7
SPEC_COMMAND_RULESET = 1 << 8
SPEC_ROOT_READONLY = 1 << 9
SPEC_CGROUP_NS = 1 << 10
SPEC_BLANK_NETNS = 1 << 11
