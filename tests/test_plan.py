"""The planner: (Policy, Host) -> SandboxPlan -> StageSpec, Command. Pure: hosts are made up here."""

import attrs
import pytest

import zviz
from zviz import Filesystem, Limits, Network, Policy, PolicyError, _kernel, _plan
from zviz._probe import KernelFeatures

FEATURES = KernelFeatures(kernel="6.18", landlock_abi=7, landlock_reason="ABI 7", userns=True, userns_reason="ok",
                          seccomp_notify=True, seccomp_addfd=True, sync_wakeup=True, wait_killable_recv=True,
                          pidfd=True, cgroup_v2=None, cgroup_reason="hybrid", is_root=False)
DIRS = dict.fromkeys(("/usr", "/bin", "/etc", "/lib", "/lib64", "/run", "/tmp", "/var/tmp", "/dev/shm",
                      "/tmp/zviz-w", "/srv", "/srv/data", "/"), True)
DIRS.update({"/dev/null": False, "/dev/zero": False, "/dev/urandom": False, "/srv/file.txt": False})
INF = _plan.INFINITY
HARD = {"cpu": INF, "fsize": INF, "core": INF, "nproc": INF, "nofile": 4096, "as": INF}


def host(euid=1000, memory_cgroup=True, links=None, **feat):
    return _plan.Host(features=attrs.evolve(FEATURES, **feat), euid=euid, egid=euid, is_dir=DIRS, rlimit_hard=HARD,
                      memory_cgroup=memory_cgroup, memory_cgroup_reason="made up", links=links or {})


def plan(policy=None, h=None, workdir="/tmp/zviz-w"):
    policy = policy or Policy(fs=Filesystem(read_only=("/usr", "/bin", "/etc", "/lib", "/lib64")))
    return _plan.plan_sandbox(policy, h or host(), workdir=workdir)


def test_unprivileged_maps_own_uid_and_denies_setgroups():
    p = plan()
    assert p.clone_flags & _kernel.CLONE_NEWUSER and p.clone_flags & _kernel.CLONE_NEWPID
    assert p.clone_flags & _kernel.CLONE_NEWNET  # every network mode has its own namespace
    assert p.uid_map == "1000 1000 1\n" and p.deny_setgroups and not p.drop_groups
    assert p.uid == 1000 and p.host_uid == 1000
    assert not p.degraded


def test_root_runs_sandbox_as_nobody_and_drops_groups():
    p = plan(h=host(euid=0))
    assert p.uid_map == "1000 65534 1\n" and p.gid_map == "1000 65534 1\n"
    assert p.drop_groups and not p.deny_setgroups
    assert p.host_uid == 65534


def test_root_without_userns_still_drops_to_nobody_after_mounts():
    p = plan(h=host(euid=0, userns=False, userns_reason="off"))
    assert not p.clone_flags & _kernel.CLONE_NEWUSER
    assert p.clone_flags & _kernel.CLONE_NEWPID
    assert p.uid == 65534 and p.creds_late
    assert any("user namespace" in d for d in p.degraded)


def test_unprivileged_without_userns_degrades_loudly():
    p = plan(h=host(userns=False, userns_reason="sysctl"))
    assert p.clone_flags == 0
    assert p.uid == -1
    assert len(p.degraded) >= 5
    # RLIMIT_NPROC would count every process of the user: left off.
    assert "nproc" not in [n for n, _, _ in p.rlimits]


def test_landlock_rights():
    p = plan(Policy(fs=Filesystem(read_only=("/usr", "/srv/file.txt"), read_write=("/srv/data",))))
    rules = dict(p.landlock.paths)
    assert rules["/usr"] == _plan.RO
    assert rules["/srv/data"] & _plan.FS_WRITE_FILE and rules["/srv/data"] & _plan.FS_MAKE_REG
    # a file gets file rights only (Landlock refuses directory rights on files)
    assert rules["/srv/file.txt"] == _plan.FS_EXECUTE | _plan.FS_READ_FILE
    # the rules name paths as the sandbox sees them: the workdir is /workspace
    assert rules["/workspace"] & _plan.FS_REMOVE_FILE and "/tmp/zviz-w" not in rules
    assert not rules["/workspace"] & (_plan.FS_MAKE_CHAR | _plan.FS_MAKE_BLOCK)
    assert rules["/home/sandbox"] & _plan.FS_WRITE_FILE and not rules["/home/sandbox"] & _plan.FS_EXECUTE
    assert rules["/dev/null"] & _plan.FS_WRITE_FILE and "/dev/random" not in rules  # absent on this host
    assert rules["/proc"] == _plan.FS_READ_FILE | _plan.FS_READ_DIR
    assert p.landlock.handled_net == _plan.NET_BIND_TCP | _plan.NET_CONNECT_TCP and p.landlock.ports == ()
    assert p.landlock.scoped == _plan.SCOPE_ABSTRACT_UNIX | _plan.SCOPE_SIGNAL


def test_landlock_by_abi():
    p = plan(h=host(landlock_abi=3))
    assert p.landlock.handled_net == 0 and p.landlock.scoped == 0
    assert p.landlock.handled_fs & _plan.FS_TRUNCATE and not p.landlock.handled_fs & _plan.FS_IOCTL_DEV
    p = plan(h=host(landlock_abi=0, landlock_reason="disabled"))
    assert p.landlock is None and any("Landlock" in d for d in p.degraded)


def test_allowlist_ports_and_loopback():
    pol = Policy(net=Network(mode="allow", allow=["127.0.0.1:8080", "10.0.0.1:8080", "10.0.0.2:443"]))
    p = plan(pol)
    assert p.landlock.ports == ((443, _plan.NET_CONNECT_TCP), (8080, _plan.NET_CONNECT_TCP))
    p = plan(Policy(net=Network(mode="loopback")))
    assert p.clone_flags & _kernel.CLONE_NEWNET and p.loopback_up
    assert p.landlock.handled_net == 0  # its own loopback: TCP is unrestricted inside


def test_new_root_holds_only_listed_paths():
    h = attrs.evolve(host(), links={"/bin": "/usr/bin"})
    p = plan(h=h)
    r = p.new_root
    assert r.staging == "/tmp" and r.private_tmp
    sources = [s for s, _ in r.binds]
    # /bin is a symlink into /usr, which is bound: recreated as a symlink, not bound
    assert "/bin" not in sources and (_plan.OP_SYMLINK, "bin", "usr/bin", -1) in r.ops
    assert ("/usr", True) in r.binds and ("/tmp/zviz-w", False) in r.binds and ("/dev/null", False) in r.binds
    kinds = [(k, path) for k, path, _, _ in r.ops]
    # the workdir is bound at /workspace, HOME is a tmpfs of the sandbox's own
    assert (_plan.OP_MOVE, "workspace") in kinds and (_plan.OP_MOVE, "tmp/zviz-w") not in kinds
    assert (_plan.OP_TMPFS, "home/sandbox") in kinds
    assert (_plan.OP_FILE, "dev/null") in kinds and (_plan.OP_PROC, "proc") in kinds
    # every move names a bind that exists, and each bind is moved once
    moves = [i for k, _, _, i in r.ops if k == _plan.OP_MOVE]
    assert sorted(moves) == list(range(len(r.binds)))


def test_no_private_tmp_when_the_policy_grants_tmp():
    p = plan(Policy(fs=Filesystem(read_write=("/tmp",))))
    assert not p.new_root.private_tmp
    assert ("/tmp", False) in p.new_root.binds


def test_whole_host_read_only_means_no_new_root_and_says_so():
    h = attrs.evolve(host(), is_dir={**DIRS, "/": True})
    p = plan(Policy(fs=Filesystem(read_only=("/",))), h=h)
    assert p.new_root is None and p.mount_proc
    assert any("whole host" in d for d in p.degraded)
    assert dict(p.landlock.paths)["/"] == _plan.RO


def test_missing_policy_path_is_an_error():
    with pytest.raises(Exception, match="/nope"):
        plan(Policy(fs=Filesystem(read_only=("/nope",))))


def test_rlimits_clamped_to_host_ceiling():
    p = plan(Policy(limits=Limits(open_files=100000, cpu_s=2.5)))
    lim = {n: (s, h) for n, s, h in p.rlimits}
    assert lim["nofile"] == (4096, 4096)
    assert lim["cpu"] == (3, 4)
    assert lim["core"] == (0, 0)


def test_env_is_clean_home_is_private_and_the_workspace_fixed():
    p = plan(Policy(env={"PATH": "/usr/bin", "X": "1"}))
    env = dict(p.env)
    assert env == {"PATH": "/usr/bin", "X": "1", "HOME": "/home/sandbox", "PWD": "/workspace"}
    assert p.cwd == p.workspace == "/workspace" and p.home == "/home/sandbox"
    p = plan(Policy(env={"PATH": "/usr/bin"}, fs=Filesystem(tmp_size=None)))
    # no private /tmp (nor HOME): temp files and HOME in the workspace
    assert dict(p.env)["TMPDIR"] == dict(p.env)["HOME"] == "/workspace" and p.home is None
    # without a new root (the whole host read-only), the workdir is where it is on the host
    p = plan(Policy(fs=Filesystem(read_only=("/",))))
    assert p.cwd == p.workspace == "/tmp/zviz-w" and dict(p.env)["HOME"] == "/tmp/zviz-w"


def test_binds_at_another_path():
    b = zviz.Bind(source="/srv/data", target="/data")
    p = plan(Policy(fs=Filesystem(read_only=("/usr",), binds=[b, "/srv/file.txt:/in/f.txt:rw"])))
    r = p.new_root
    assert ("/srv/data", True) in r.binds and ("/srv/file.txt", False) in r.binds
    ops = [(k, path) for k, path, _, _ in r.ops]
    assert (_plan.OP_MOVE, "data") in ops and (_plan.OP_FILE, "in/f.txt") in ops
    rules = dict(p.landlock.paths)
    assert rules["/data"] == _plan.RO and "/srv/data" not in rules
    assert rules["/in/f.txt"] & _plan.FS_WRITE_FILE and not rules["/in/f.txt"] & _plan.FS_MAKE_REG  # a file
    assert _plan.host_path(p, Policy(fs=Filesystem(binds=[b])), "/tmp/zviz-w", "/data/x/y") == "/srv/data/x/y"
    assert _plan.host_path(p, Policy(), "/tmp/zviz-w", "/workspace/a") == "/tmp/zviz-w/a"
    assert _plan.host_path(p, Policy(), "/tmp/zviz-w", "/home/sandbox/.rc") is None
    with pytest.raises(zviz.PolicyError, match="new root"):
        plan(Policy(fs=Filesystem(read_only=("/",), binds=[b])))
    for bad in ("/workspace", "/workspace/x", "/", "/tmp/x", "/proc", "/home"):
        with pytest.raises(zviz.PolicyError, match=r"fs\.binds\.target"):
            zviz.Bind(source="/srv/data", target=bad)
    with pytest.raises(zviz.PolicyError, match=r"fs\.binds\.target"):
        Filesystem(read_only=("/usr",), binds=[zviz.Bind(source="/srv/data", target="/usr/data")])
    with pytest.raises(zviz.PolicyError, match=r"fs\.read_write"):  # a writable bind of a system path
        plan(Policy(fs=Filesystem(binds=["/etc:/e:rw"])))
    with pytest.raises(TypeError):
        Filesystem(binds="/srv/data:/data")
    pol = Policy(fs=Filesystem(binds=[b]))
    assert Policy.from_toml(pol.to_toml()).fs.binds == (b,)


def test_steps_read_in_order():
    steps = plan().steps()
    assert steps[0].startswith("namespaces: user, pid, mount")
    assert steps[-1].startswith("seccomp allowlist")
    assert steps.index("no_new_privs") > next(i for i, s in enumerate(steps) if s.startswith("landlock"))


def test_command_spec_runs_zviz_init():
    cmd = _plan.command_spec(plan(), exe=b"/usr/bin/python3", argv=(b"python3", b"-c", b"1"), envp=(b"A=1",),
                             stdio=(10, 11, 12), status_fd=14, init_fd=13)
    assert cmd.argv[:3] == (b"zviz-init", b"3", b"/usr/bin/python3")
    assert cmd.argv[3:] == (b"python3", b"-c", b"1")
    assert (cmd.stdin, cmd.stdout, cmd.stderr, cmd.status_fd, cmd.init_fd) == (10, 11, 12, 14, 13)
    assert cmd.cwd == b"/workspace"  # the workdir, as the sandbox sees it


def test_stage_spec_once_per_sandbox_and_its_zygote_variant():
    p = plan()
    stage = _plan.stage_spec(p, bpf=b"\0" * 8, seccomp_flags=8)
    assert stage.setsid and stage.pdeathsig == 9
    assert stage.binds == p.new_root.binds and stage.mount_ops == p.new_root.ops
    assert [r for r, _, _ in stage.rlimits] == [_plan.RLIMIT[n] for n, _, _ in p.rlimits]
    z = _plan.zygote_stage_spec(stage)
    assert z.rlimits == () and z.command_ruleset == (stage.landlock_abi > 0)
    assert attrs.evolve(z, rlimits=stage.rlimits, command_ruleset=False) == stage  # nothing else differs
    cmd = _plan.zygote_command(p, z, ctrl_fd=20, devnull=21, init_fd=22)
    assert cmd.argv == (b"zviz-init", b"--zygote", b"3", b"7" if z.command_ruleset else b"-")


def test_empty_argv_refused():
    with pytest.raises(PolicyError):
        _plan.command_spec(plan(), exe=b"/bin/true", argv=(), envp=(), stdio=(0, 1, 2), status_fd=-1, init_fd=-1)


# ---- issue 16: real paths, masks, memory cgroup, disk


def test_read_write_link_to_root_or_a_system_dir_is_refused():
    for target in ("/", "/etc", "/usr", "/proc/sys", "/dev/shm", "/sys/fs/cgroup"):
        pol = Policy(fs=Filesystem(read_only=("/usr",), read_write=("/srv/data",)))
        with pytest.raises(PolicyError, match="-> " + target):
            plan(pol, host(links={"/srv/data": target}))
    # a parent of a system directory is refused as well, even without a link
    with pytest.raises(PolicyError, match=r"fs\.read_write"):
        plan(Policy(fs=Filesystem(read_write=("/srv",))), host(links={"/srv": "/"}))
    # a read-only link to '/' hides a whole-host listing
    with pytest.raises(PolicyError, match=r"fs\.read_only"):
        plan(Policy(fs=Filesystem(read_only=("/srv/data",))), host(links={"/srv/data": "/"}))


def test_bind_sources_are_real_paths_and_rules_are_where_the_sandbox_sees_them():
    pol = Policy(fs=Filesystem(read_only=("/usr", "/bin"), read_write=("/srv/data",)))
    p = plan(pol, host(links={"/bin": "/usr/bin", "/srv/data": "/tmp/zviz-w"}))
    srcs = [s for s, _ in p.new_root.binds]
    assert "/tmp/zviz-w" in srcs and "/srv/data" not in srcs  # the real path is bound (at /srv/data)
    assert (_plan.OP_SYMLINK, "bin", "usr/bin", -1) in p.new_root.ops  # a link to a listed path stays a link
    rules = dict(p.landlock.paths)
    assert "/usr/bin" in rules and "/bin" not in rules  # the stage follows no symlink: the rule is on the target
    assert "/srv/data" in rules


def test_read_write_link_into_a_read_only_path_is_refused():
    pol = Policy(fs=Filesystem(read_only=("/usr",), read_write=("/srv/data",)))
    with pytest.raises(PolicyError, match="read-only /usr"):
        plan(pol, host(links={"/srv/data": "/usr/lib"}))


def test_masks_and_read_only_root():
    p = plan(Policy(fs=Filesystem(read_only=("/usr", "/etc"))))
    masks = {path: kind for kind, path in p.new_root.masks}
    for f in ("/proc/kcore", "/proc/cmdline", "/proc/sys/kernel/random/boot_id", "/proc/kallsyms",
              "/proc/interrupts", "/etc/machine-id"):
        assert masks[f] == _plan.MASK_FILE
    assert masks["/proc/pressure"] == _plan.MASK_DIR and masks["/proc/sys"] == _plan.MASK_RDONLY
    kinds = [path for _, path in p.new_root.masks]
    assert kinds.index("/proc/sys") < kinds.index("/proc/sys/kernel/random/boot_id")  # the mask lands on top
    assert "/sys/firmware" not in masks  # /sys is not listed
    assert p.new_root.root_readonly and _plan.stage_spec(p, bpf=b"", seccomp_flags=0).root_readonly


def test_memory_cgroup_or_memfd_refused():
    p = plan()
    assert p.memory_cgroup == Limits().memory and p.deny_syscalls == () and not p.degraded
    p = plan(h=host(memory_cgroup=False))
    assert p.memory_cgroup is None and p.deny_syscalls == ("memfd_create",)
    assert any(d.startswith("no memory cgroup") and ";" not in d for d in p.degraded)
    opted = Policy(fs=Filesystem(read_only=("/usr",)), limits=Limits(memfd_without_cgroup=True))
    p = plan(opted, host(memory_cgroup=False))
    assert p.deny_syscalls == () and any("unbounded" in d for d in p.degraded)
    p = plan(Policy(fs=Filesystem(read_only=("/usr",)), limits=Limits(memory=None)), host(memory_cgroup=False))
    assert p.memory_cgroup is None and p.deny_syscalls == () and not p.degraded


def test_disk_limit_root_only():
    pol = Policy(fs=Filesystem(read_only=("/usr",), disk="1G"))
    assert plan(pol, host(euid=0)).disk == 1024**3
    p = plan(pol, host())
    assert p.disk is None and any("fs.disk is not enforced" in d for d in p.degraded)


def test_network_namespace_per_mode_and_where_it_cannot_be_made():
    for mode, allow in (("none", ()), ("loopback", ()), ("allow", ["127.0.0.1:80"])):
        p = plan(Policy(net=Network(mode=mode, allow=allow)))
        assert p.clone_flags & _kernel.CLONE_NEWNET, mode
        assert p.loopback_up == (mode == "loopback")  # allow: an empty namespace, its loopback down
    # no user namespace and not root: none degrades loudly, the others refuse
    p = plan(h=host(userns=False, userns_reason="sysctl"))
    assert not p.clone_flags & _kernel.CLONE_NEWNET
    assert any("net namespace off" in d and "abstract unix socket names" in d for d in p.degraded)
    with pytest.raises(PolicyError, match="network namespaces can be created"):
        plan(Policy(net=Network(mode="allow", allow=["127.0.0.1:80"]), namespaces=_ns(user=False)),
             h=host(userns=False, userns_reason="sysctl"))


def _ns(**kw):
    from zviz import Namespaces

    return Namespaces(**kw)


def test_loopback_without_a_user_namespace_needs_root_at_open():
    pol = Policy(fs=Filesystem(read_only=("/usr",)), net=Network(mode="loopback"),
                 namespaces=attrs.evolve(Policy().namespaces, user=False))
    with pytest.raises(PolicyError, match=r"namespaces\.user"):
        plan(pol, h=host(euid=1000))
    assert plan(pol, h=host(euid=0)).clone_flags & _kernel.CLONE_NEWNET


def test_degraded_says_what_commands_of_one_sandbox_lose():
    none = plan(Policy(), host(landlock_abi=0))
    assert any("commands of one sandbox are not separated" in d for d in none.degraded), none.degraded
    abi5 = plan(Policy(), host(landlock_abi=5))
    assert any("commands of one sandbox can signal each other" in d for d in abi5.degraded), abi5.degraded
    assert not any("commands of one sandbox" in d for d in plan().degraded)
    # the ruleset of the commands' own domains: only with Landlock
    stage = _plan.stage_spec(none, bpf=b"", seccomp_flags=0)
    assert not _plan.zygote_stage_spec(stage).command_ruleset
    z = _plan.zygote_stage_spec(_plan.stage_spec(abi5, bpf=b"", seccomp_flags=0))
    assert z.command_ruleset and z.ll_scoped == 0


def test_hidden_dirs_below_a_writable_bind_are_pinned_and_found_through_links():
    """zviz's own directories (Host.hidden, real paths): masked where a listed
    path shows them, also when the listed path is a link to their parent;
    below a read-write bind each directory between the bind and the mask is
    bound onto itself first (a mount point cannot be renamed away), and
    nothing is pinned below a read-only one."""
    h = attrs.evolve(host(), hidden=("/srv/data/home/.cache/zviz",),
                     links={"/home/me": "/srv/data/home"})
    rw = _plan.plan_masks({"/srv/data": False}, h, with_proc=False)
    assert rw == ((_plan.MASK_PIN, "/srv/data/home"), (_plan.MASK_PIN, "/srv/data/home/.cache"),
                  (_plan.MASK_DIR, "/srv/data/home/.cache/zviz"))
    ro = _plan.plan_masks({"/srv/data": True}, h, with_proc=False)
    assert ro == ((_plan.MASK_DIR, "/srv/data/home/.cache/zviz"),)
    linked = _plan.plan_masks({"/home/me": False}, h, with_proc=False)
    assert linked == ((_plan.MASK_PIN, "/home/me/.cache"), (_plan.MASK_DIR, "/home/me/.cache/zviz"))
    bound = _plan.plan_masks({}, h, with_proc=False, binds=(zviz.Bind(source="/srv/data", target="/data",
                                                                      read_only=False),))
    assert bound == ((_plan.MASK_PIN, "/data/home"), (_plan.MASK_PIN, "/data/home/.cache"),
                     (_plan.MASK_DIR, "/data/home/.cache/zviz"))
