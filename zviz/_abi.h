/*
 * zviz/_abi.h: what the C parts and the Python side must agree on, in one
 * place. Included by the spawn path (zviz/_stage.c, zviz/_stage_py.c) and by
 * zviz-init (zviz/_init.c, which has no libc: only fixed-size types here).
 *
 * The extension exports all of it (zviz._stage: STEPS, the limits, the fd
 * numbers, the magic values, and the sizes and field offsets of every record
 * in LAYOUTS); Python reads those, and tests/test_abi.py checks the struct
 * formats and the pure modules' copies (zviz/_abi.py) against them.
 */
#ifndef ZVIZ_ABI_H
#define ZVIZ_ABI_H

/* ---- the child's setup steps, in the order it runs them (X: enum name, step name) */
#define ZVIZ_STEPS(X)                                   \
    X(SYNC, "sync")                                     \
    X(CGROUP, "cgroup")                                 \
    X(MOUNT_PRIVATE, "mount-private")                   \
    X(MOUNT_BIND, "mount-bind")                         \
    X(SETGROUPS, "setgroups")                           \
    X(SETRESGID, "setresgid")                           \
    X(SETRESUID, "setresuid")                           \
    X(MOUNT_ROOT, "mount-root")                         \
    X(MOUNT_OP, "mount-op")                             \
    X(MOUNT_PROC, "mount-proc")                         \
    X(PIVOT_ROOT, "pivot-root")                         \
    X(MOUNT_MASK, "mount-mask")                         \
    X(ROOT_READONLY, "root-readonly")                   \
    X(LOOPBACK, "loopback-up")                          \
    X(HOSTNAME, "hostname")                             \
    X(SETSID, "setsid")                                 \
    X(PDEATHSIG, "pdeathsig")                           \
    X(NO_NEW_PRIVS, "no-new-privs")                     \
    X(LANDLOCK_CREATE, "landlock-create")               \
    X(LANDLOCK_OPEN, "landlock-open")                   \
    X(LANDLOCK_RULE, "landlock-rule")                   \
    X(LANDLOCK_PORT, "landlock-port")                   \
    X(LANDLOCK_RESTRICT, "landlock-restrict")           \
    X(LANDLOCK_COMMAND, "landlock-command")             \
    X(STDIO, "stdio")                                   \
    X(RLIMIT, "rlimit")                                 \
    X(CHDIR, "chdir")                                   \
    X(DROP_CAPS, "drop-caps")                           \
    X(SECCOMP, "seccomp")                               \
    X(SEND_LISTENER, "send-listener")                   \
    X(EXECVE, "execve")

enum zviz_step {
    STEP_NONE = 0,
#define ZVIZ_STEP_ENUM(name, str) STEP_##name,
    ZVIZ_STEPS(ZVIZ_STEP_ENUM)
#undef ZVIZ_STEP_ENUM
    STEP_COUNT
};

/* ---- limits of the fixed-size tables */
#define MAX_RLIMITS 16   /* per spawn, and per zygote request */
#define MAX_BINDS 64     /* bind mounts of a new root */
#define MAX_MOUNT_OPS 256
#define MAX_MASKS 64     /* masks over the assembled root */
#define MAX_LL_PATHS 256 /* Landlock path rules */
#define MAX_LL_PORTS 64  /* Landlock port rules */

/* ---- mount operations of a new root (zviz/_plan.py plan_root) */
enum { OP_MKDIR = 1, OP_SYMLINK, OP_FILE, OP_MOVE, OP_PROC, OP_TMPFS };
/* ... and the masks over it, after pivot_root: host facts a container
 * runtime hides (MASK_FILE: /dev/null bound over it; MASK_DIR: an empty
 * read-only tmpfs; MASK_RDONLY: bound onto itself read-only; MASK_PIN: bound
 * onto itself as it is, so that the sandbox cannot rename or remove it) */
enum { MASK_FILE = 1, MASK_DIR, MASK_RDONLY, MASK_PIN };

/* ---- the fds a sandbox's zviz-init starts with (the stage places them) */
#define STATUS_FD 3          /* run-init: the status pipe; zygote: the control socket */
#define COMMAND_RULESET_FD 7 /* zygote: the ruleset of each command's own Landlock domain */
#define INIT_FD 6            /* the plan's init_fd: zviz-init (execveat), or a warm snippet's input (zviz/_warmboot.py) */

/* ---- the error pipe: a failing step writes this and exits 127 */
struct child_error {
    int step; /* enum zviz_step */
    int err;  /* errno */
    int index; /* which path, bind, rule or rlimit; -1: none */
};

/* ---- zviz-init -> supervisor: the program's end (its includer defines struct rusage) */
#define STATUS_MAGIC 0x7a76697aU /* "zviz" */
struct status_record {
    unsigned int magic;
    int wstatus;
    struct rusage ru; /* of the main child and everything it reaped */
};

/* ---- supervisor -> zygote: one command (SOCK_STREAM). The header, then
 * `len` bytes of NUL-terminated strings (exe, argc argv strings, envc envp
 * strings), with SCM_RIGHTS {stdin, stdout, stderr, status pipe} on the
 * first byte. Reply: an int32 (0 or -errno), with SCM_RIGHTS {pidfd of the
 * run-init} on success. A header with no strings and no fds is a barrier. */
#define ZREQ_MAGIC 0x7a727131U /* "zrq1" */
#define ZREQ_MAX_BYTES (1 << 20) /* argv + environment */
#define ZREQ_MAX_PTRS 65536
struct zreq_rl {
    unsigned int res, pad;
    unsigned long long cur, max;
};
struct zreq {
    unsigned int magic, argc, envc, nrl, len, pad;
    struct zreq_rl rl[MAX_RLIMITS];
};

/* ---- Python -> the spawn path: two buffers, each a header, fixed-size
 * tables and then a string area; every string is an offset into its own
 * buffer (0: none) and NUL-terminated inside it. The extension checks every
 * count against the limits above and every offset against the length.
 *
 * The sandbox's part (packed once per sandbox, zviz/_spec.py StageSpec.pack):
 *   struct spec_header
 *   struct spec_bind   binds[n_binds]
 *   struct spec_op     ops[n_ops]
 *   struct spec_mask   masks[n_masks]
 *   struct spec_rlimit rlimits[n_rlimits]
 *   struct spec_path   ll_paths[n_ll_paths]
 *   struct spec_port   ll_ports[n_ll_ports]
 *   the seccomp program (bpf_len bytes at bpf_off, 8-byte aligned)
 *   strings
 * The command's part (per spawn, zviz/_spec.py Command.pack):
 *   struct command_header
 *   unsigned int argv[n_argv], envp[n_envp] (string offsets)
 *   strings
 */
#define SPEC_MAGIC 0x7a737031U    /* "zsp1" */
#define COMMAND_MAGIC 0x7a636d31U /* "zcm1" */
enum {
    SPEC_MOUNT_NS = 1 << 0,
    SPEC_MOUNT_PROC = 1 << 1,
    SPEC_NEW_ROOT = 1 << 2,
    SPEC_LOOPBACK_UP = 1 << 3,
    SPEC_SETSID = 1 << 4,
    SPEC_CREDS_LATE = 1 << 5,
    SPEC_DROP_GROUPS = 1 << 6,
    SPEC_DENY_SETGROUPS = 1 << 7,
    SPEC_COMMAND_RULESET = 1 << 8,
    SPEC_ROOT_READONLY = 1 << 9,
    SPEC_CGROUP_NS = 1 << 10,
    SPEC_BLANK_NETNS = 1 << 11, /* the child starts in the caller's blank network namespace (command netns_fd) */
};
struct spec_header {
    unsigned int magic, flags;
    unsigned long long clone_flags;
    long long uid, gid; /* -1: keep */
    int pdeathsig, landlock_abi;
    unsigned int seccomp_flags, pad;
    unsigned long long ll_fs, ll_net, ll_scoped;
    unsigned int staging, hostname, uid_map, gid_map; /* string offsets */
    unsigned int n_binds, n_ops, n_masks, n_rlimits, n_ll_paths, n_ll_ports;
    unsigned int bpf_off, bpf_len;
};
struct spec_bind {
    unsigned int src, read_only;
};
struct spec_op {
    unsigned int kind, path, arg; /* OP_*, strings */
    int bind;                     /* OP_MOVE: index into binds */
};
struct spec_mask {
    unsigned int kind, path; /* MASK_*, string */
};
struct spec_rlimit {
    unsigned int res, pad;
    unsigned long long soft, hard;
};
struct spec_path {
    unsigned int path, pad;
    unsigned long long access;
};
struct spec_port {
    unsigned long long port, access;
};
struct command_header {
    unsigned int magic, n_argv, n_envp;
    int fd_in, fd_out, fd_err, init_fd, status_fd; /* init_fd -1: exec exe directly */
    int track_map_fd;                              /* -1: no eBPF monitor */
    unsigned int track_value;
    int cgroup_fd; /* the memory cgroup's cgroup.procs, which the parent writes the child's pid to (-1: none) */
    int netns_fd;  /* SPEC_BLANK_NETNS: the blank network namespace the parent enters around clone (-1: none) */
    unsigned int exe, cwd; /* string offsets */
};

#endif
