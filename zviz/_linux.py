"""Linux constants the pure layers need (no I/O, no C extension)."""

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The stage places zviz-init's status pipe on this fd (zviz/_stage.c, step 6).
STATUS_FD = 3
# ... and, for a zygote, the ruleset of the commands' own Landlock domains
# (zviz/_init.c run_program; the filter allows landlock_restrict_self on it).
COMMAND_RULESET_FD = 7
