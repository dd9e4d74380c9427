/*
 * zviz/_stage.h: between the spawn path (zviz/_stage.c, no Python) and its
 * CPython binding (zviz/_stage_py.c, which parses the spec buffers into a
 * struct plan and calls stage_spawn).
 */
#ifndef ZVIZ_STAGE_H
#define ZVIZ_STAGE_H

#include <linux/filter.h>
#include <stdint.h>
#include <sys/resource.h>

#include "_abi.h"

/* Everything the child needs, prepared by the parent before clone(); strings
 * point into the caller's buffers, which outlive the spawn. */
struct plan {
    char **argv;
    char **envp;
    const char *exe;
    const char *cwd;
    int fd_in, fd_out, fd_err;
    int init_fd;   /* O_PATH fd of zviz-init, exec'd by fd (-1: exec exe directly) */
    int status_fd; /* placed on STATUS_FD */
    int go_r, go_w, err_w, listener_sock; /* filled in by stage_spawn */
    int parent_pidfd; /* filled in by stage_spawn: a pidfd of the caller's process (-1: none), for step_session */
    int cgroup_tasks_fd; /* filled in by stage_spawn: a v1 memory cgroup's `tasks`, joined by the child (-1: none) */
    int mount_ns, mount_proc, loopback_up, setsid, creds_late, new_root;
    const char *staging;
    int n_src;
    const char *src[MAX_BINDS];
    int src_ro[MAX_BINDS];
    int n_ops;
    int op_kind[MAX_MOUNT_OPS];
    const char *op_path[MAX_MOUNT_OPS];
    const char *op_arg[MAX_MOUNT_OPS];
    int op_src[MAX_MOUNT_OPS];
    int n_masks;
    int mask_kind[MAX_MASKS]; /* MASK_* */
    const char *mask_path[MAX_MASKS];
    int root_readonly;
    int cgroup_ns; /* unshare the cgroup namespace once in the sandbox's cgroup */
    const char *hostname;
    int drop_groups;
    long uid, gid; /* -1: leave as is */
    int n_rlimits;
    int rl_res[MAX_RLIMITS];
    struct rlimit rl_val[MAX_RLIMITS];
    int landlock_abi;
    int command_ruleset; /* zygote: leave a ruleset for one Landlock domain per command */
    uint64_t ll_fs, ll_net, ll_scoped;
    int n_ll_paths;
    const char *ll_path[MAX_LL_PATHS];
    uint64_t ll_access[MAX_LL_PATHS];
    int n_ll_ports;
    uint64_t ll_port[MAX_LL_PORTS];
    uint64_t ll_port_access[MAX_LL_PORTS];
    struct sock_fprog prog;
    unsigned int seccomp_flags;
    int pdeathsig;
};

/* What only the parent does: the clone flags, the id maps, the monitor. */
struct parent_plan {
    unsigned long clone_flags;
    const char *uid_map, *gid_map; /* NULL: none */
    int deny_setgroups;
    int track_map_fd; /* -1: no eBPF monitor */
    uint32_t track_value;
    int cgroup_fd; /* the memory cgroup: v2 `cgroup.procs` (the parent writes the pid), v1 `tasks` (the child
                    * writes "0"); -1: none */
    int blank_netns; /* SPEC_BLANK_NETNS: the child starts in netns_fd's network namespace, not a new one */
    int netns_fd;    /* entered by the parent around clone (its own namespace restored at once) */
};

enum spawn_failure {
    SPAWN_OK = 0,
    SPAWN_OSERROR,  /* in the parent, before the child ran: errno */
    SPAWN_STEP,     /* the child reported a failed step: step, err, index */
    SPAWN_ID_MAP,   /* writing an id map failed: what, err, path */
    SPAWN_TRACK,    /* the eBPF monitor's map update failed: err */
    SPAWN_CGROUP,   /* joining the memory cgroup failed: err */
    SPAWN_PROTOCOL, /* a short error record, or no listener: what */
};

struct spawn_result {
    enum spawn_failure failure;
    int pid, pidfd, listener; /* on success: the caller owns pidfd and listener */
    int step, err, index;
    const char *what;
    char path[64];
};

/* A child between its clone and its exec: what the parent holds of it. */
struct spawn_pending {
    int pid, pidfd;
    int errp; /* the setup's error pipe: EOF at exec, a child_error record on a failed step */
    int sv;   /* where the child sends its seccomp listener (-1: none) */
    int go;   /* the go pipe's write end, kept open: its hang-up tells the child its parent died */
    void *stack;
};

/* Clone a child that sets itself up from `p` and execs; wait until it has
 * (or failed). Does not touch Python: call it without the GIL. */
/* warm: the child is a fork of the caller that returns (out->pid == 0) inside the sandbox instead of exec */
void stage_spawn(struct plan *p, const struct parent_plan *pp, struct spawn_result *out, int warm);

/* stage_spawn in two halves, so that the caller's thread is free while the
 * child sets itself up (~1.2 ms: its namespaces, root, filters). start: the
 * clone, the id maps, the cgroup, the child let go; on SPAWN_OK `pend` holds
 * the child, and `p` (which the child reads, sharing our memory until exec)
 * must stay valid until finish or abort. finish: once pend->errp is readable
 * (it blocks until then), the outcome, as stage_spawn's; abort: SIGKILL, reap,
 * let go. Each leaves `pend` empty; neither touches Python. (Not warm.) */
void stage_spawn_start(struct plan *p, const struct parent_plan *pp, struct spawn_result *out,
                       struct spawn_pending *pend);
void stage_spawn_finish(struct spawn_pending *pend, struct spawn_result *out);
void stage_spawn_abort(struct spawn_pending *pend);
/* SIGKILL a pending child (by its pidfd), nothing else: finish or abort reaps it. */
void stage_spawn_kill(const struct spawn_pending *pend);
/* Let go of what `pend` holds without touching the child (a process forked
 * from the spawning one holds copies of its fds, not its child). */
void stage_spawn_forget(struct spawn_pending *pend);

/* SIGKILL every process of `uid` (a sandbox's own host uid) by kill(-1) from
 * a helper that takes it: 1 if any, 0 if none, -errno. Without the GIL. */
long stage_kill_uid(unsigned int uid, unsigned int gid);

/* Mount a template's overlay on a root caller's workdir (zviz/_snapshot.py):
 * 0, or -errno with *step the failing step. Without the GIL. On success,
 * *helper is a helper process to reap later (stage_reap_template_helper). */
struct template_helper {
    int pid;
    void *stack;
};
long stage_mount_template(const char *lower, const char *upper, const char *work, const char *target,
                          unsigned int owner_uid, unsigned int owner_gid, unsigned int uid, unsigned int gid,
                          int *step, struct template_helper *helper);
void stage_reap_template_helper(const struct template_helper *helper);

#endif
