"""Peer sandboxes for benchmarks/run.py --peers.

Each peer wraps the same command the bare side runs, from the same trio
process, with the same environment and working directory; run.py interleaves
bare and peer A B A B on W0-W3 (+ W4) exactly as it does for zviz. A peer that
is not installed (or cannot run here) becomes a "not installed" row with the
reason; it is never an error of the suite. Install them with
`sudo benchmarks/install_peers.sh`.

The flags: each peer is asked for roughly what zviz's `Policy.python()` gives
(no network, the system read-only, one writable workdir, a private /tmp, new
namespaces where the tool has them), with the tool's own defaults otherwise:

  bubblewrap  bwrap --unshare-all --die-with-parent --new-session --cap-drop ALL
                    --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib
                    --symlink usr/lib64 /lib64 --ro-bind /etc /etc --proc /proc --dev /dev
                    --tmpfs /tmp --bind WORKDIR WORKDIR --chdir WORKDIR -- CMD
              (namespaces: user, pid, mount, ipc, uts, net, cgroup; no seccomp
              filter: bwrap only loads a precompiled one given as an fd)
  firejail    firejail --quiet --noprofile --net=none --private=WORKDIR --private-dev
                    --private-tmp --caps.drop=all --nonewprivs --seccomp --nogroups
                    --noroot -- CMD
              (its default seccomp blocklist; WORKDIR becomes the home directory,
              where the command starts, since the host /tmp is hidden)
  gVisor      runsc --network=none do CMD
              (Debian's runsc 2022-12-19, default platform ptrace; `runsc do`
              runs the host root read-only under a tmpfs overlay, the
              command in the current directory; needs root)
  sandlock    sandlock.Sandbox(fs_readable=[/usr, /lib, /lib64, /bin, /etc, /proc,
                    /dev], fs_writable=[WORKDIR], cwd=WORKDIR, clean_env=True, env=ENV,
                    no_coredump=True).run(CMD)   (Python API, in this process;
              network denied by default; its default syscall blocklist; its
              supervisor answers file opens over seccomp user notification)

  srt         srt -c 'CMD'   (Anthropic's sandbox-runtime, npm; its defaults without a
              settings file: no network, the file system read-only; bubblewrap
              namespaces and a seccomp filter underneath)
  codex       codex sandbox -- CMD   (OpenAI Codex CLI, npm; its default
              permission profile: read-only file system, no network, seccomp)

Commands are given relative paths for the workload scripts (W2, W3), run in
WORKDIR, so every peer's view of the file system finds them.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import trio

ZVIZ_CLI: str | None = None  # the `zviz` of the zviz-cli rows (cold.py --zviz-cli), else .venv/bin/zviz
TIMEOUT_S = 120.0  # per command: W3 under runsc or sandlock takes ~4 s here

def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def _deb_version(pkg: str) -> str | None:
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


class PeerFailed(Exception):
    """The peer ran the command and it failed (not an error of zviz's suite)."""


@dataclass
class Run:
    wall_s: float
    stdout: bytes
    cpu_ms: float  # reaped children (+ this process for in-process peers)


@dataclass
class Peer:
    key: str
    name: str
    flags: str
    version: str = "?"
    reason: str | None = None  # why not installed / not usable here (None: usable)
    installed: bool = False
    extra: dict = field(default_factory=dict)

    def short_label(self) -> str:
        """A short name for the charts: the tool and its upstream version."""
        v = self.version.split("-")[0].split("+")[0]
        if v.startswith("0.0~"):  # Debian's date-versioned snapshot (runsc)
            v = v[4:12]
        return f"{self.key} {v}" if v and v != "?" else self.key

    def probe(self) -> None:
        """Set self.reason if the peer is missing, and self.version."""
        raise NotImplementedError

    async def run(self, argv: list[str], workdir: str, env: dict[str, str]) -> Run:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CliPeer(Peer):
    binary: str = ""
    package: str = ""

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        raise NotImplementedError

    def probe(self) -> None:
        path = shutil.which(self.binary)
        if not path:
            self.reason = f"`{self.binary}` not found (sudo benchmarks/install_peers.sh)"
            return
        self.installed = True
        self.extra["path"] = path
        self.version = _deb_version(self.package) or _first_line([path, "--version"])

    async def run(self, argv: list[str], workdir: str, env: dict[str, str]) -> Run:
        cmd = self.wrap(argv, workdir)
        c0 = _children_cpu()
        t0 = time.perf_counter()
        with trio.move_on_after(TIMEOUT_S) as scope:  # a hung peer is its failure, not a hung suite
            p = await trio.run_process(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                       capture_stdout=True, capture_stderr=True, check=False)
        if scope.cancelled_caught:
            raise PeerFailed(f"{self.key}: {' '.join(cmd)} did not finish in {TIMEOUT_S:.0f} s")
        dt = time.perf_counter() - t0
        cpu = (_children_cpu() - c0) * 1e3
        if p.returncode != 0:
            raise PeerFailed(f"{self.key}: {' '.join(cmd)} exited {p.returncode}: {p.stderr[-400:]!r}")
        return Run(dt, p.stdout, cpu)


class Bwrap(CliPeer):
    binary, package = "bwrap", "bubblewrap"

    def __init__(self) -> None:
        super().__init__("bwrap", "bubblewrap", "bwrap --unshare-all --die-with-parent --new-session --cap-drop ALL "
                         "--ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 "
                         "--ro-bind /etc /etc --proc /proc --dev /dev --tmpfs /tmp --bind WORKDIR WORKDIR "
                         "--chdir WORKDIR -- CMD")

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/lib64", "/lib64", "--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev",
                "--tmpfs", "/tmp", "--bind", workdir, workdir, "--chdir", workdir, "--", *argv]


class Firejail(CliPeer):
    binary, package = "firejail", "firejail"

    def __init__(self) -> None:
        super().__init__("firejail", "firejail", "firejail --quiet --noprofile --net=none --private=WORKDIR "
                         "--private-dev --private-tmp --caps.drop=all --nonewprivs --seccomp --nogroups --noroot -- CMD")

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return ["firejail", "--quiet", "--noprofile", "--net=none", f"--private={workdir}", "--private-dev",
                "--private-tmp", "--caps.drop=all", "--nonewprivs", "--seccomp", "--nogroups", "--noroot",
                "--", *argv]


class Runsc(CliPeer):
    binary, package = "runsc", "runsc"

    def __init__(self) -> None:
        super().__init__("runsc", "gVisor runsc do (ptrace)", "runsc --network=none do CMD")

    def probe(self) -> None:
        super().probe()
        if self.reason is None and os.geteuid() != 0:
            self.reason = "`runsc do` needs root here"

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return ["runsc", "--network=none", "do", *argv]


class Sandlock(Peer):
    READ = ["/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev"]

    def __init__(self) -> None:
        super().__init__("sandlock", "sandlock (Python API)",
                         "sandlock.Sandbox(fs_readable=[/usr, /lib, /lib64, /bin, /etc, /proc, /dev], "
                         "fs_writable=[WORKDIR], cwd=WORKDIR, clean_env=True, env=ENV, no_coredump=True).run(CMD)")
        self._mod = None
        self._boxes: dict[tuple, object] = {}

    def probe(self) -> None:
        try:
            import sandlock  # type: ignore[import-not-found]
        except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
            self.reason = f"import sandlock: {type(e).__name__}: {e} (sudo benchmarks/install_peers.sh)"
            return
        self._mod = sandlock
        self.installed = True
        self.version = getattr(sandlock, "__version__", "?")
        try:
            abi, need = sandlock.landlock_abi_version(), sandlock.min_landlock_abi()
        except Exception:  # noqa: BLE001
            return
        self.extra["landlock_abi"] = abi
        if abi < need:
            self.reason = f"Landlock ABI {abi} < {need}, which sandlock needs"

    def _box(self, workdir: str, env: dict[str, str]) -> object:
        # One Sandbox per (workdir, env), built once: like zviz's sandbox, the
        # policy object is reused across runs, so the figures are per run.
        k = (workdir, tuple(sorted(env.items())))
        if k not in self._boxes:
            self._boxes[k] = self._mod.Sandbox(  # type: ignore[union-attr]
                fs_readable=[p for p in self.READ if os.path.exists(p)], fs_writable=[workdir], cwd=workdir,
                clean_env=True, env=env, no_coredump=True)
        return self._boxes[k]

    async def run(self, argv: list[str], workdir: str, env: dict[str, str]) -> Run:
        box = self._box(workdir, env)
        # sandlock's run() blocks (ctypes, the GIL released while it waits). It
        # is called on this thread, as the only thing the interleaved loop
        # does at that moment: no thread hop is added to its time.
        c0, s0 = _children_cpu(), _self_cpu()
        t0 = time.perf_counter()
        r = box.run(argv, timeout=TIMEOUT_S)  # type: ignore[attr-defined]
        dt = time.perf_counter() - t0
        cpu = ((_children_cpu() - c0) + (_self_cpu() - s0)) * 1e3
        await trio.sleep(0)
        if not r.success:
            raise PeerFailed(f"sandlock: {argv} exit {r.exit_code}: {r.stderr[-400:]!r}")
        return Run(dt, r.stdout, cpu)


class Srt(CliPeer):
    """Anthropic's sandbox-runtime (npm @anthropic-ai/sandbox-runtime): on Linux,
    bubblewrap plus a seccomp filter and proxies for the allowed network."""

    binary, package = "srt", ""

    def __init__(self) -> None:
        super().__init__("srt", "Anthropic sandbox-runtime (srt)",
                         "srt -c 'CMD'   (no settings file: its defaults, i.e. no network, the file system read-only; "
                         "new user, pid and net namespaces, seccomp)")

    def probe(self) -> None:
        super().probe()
        if self.reason is None:
            for dep in ("bwrap", "socat", "rg"):  # what srt checks for before it runs anything
                if not shutil.which(dep):
                    self.reason = f"srt needs `{dep}` (sudo benchmarks/install_peers.sh)"

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        # srt joins its arguments into one bash command line unquoted: hand it one, quoted
        return ["srt", "-c", shlex.join(argv)]


class Codex(CliPeer):
    """OpenAI Codex CLI's Linux sandbox (npm @openai/codex): `codex sandbox`."""

    binary, package = "codex", ""

    def __init__(self) -> None:
        super().__init__("codex", "OpenAI Codex sandbox (Linux)",
                         "codex sandbox -- CMD   (its default permission profile: the file system read-only, "
                         "no network, seccomp, no_new_privs)")

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return ["codex", "sandbox", "--", *argv]


class ZvizCli(CliPeer):
    """zviz's own command line, one `zviz run` per snippet (through its CLI
    server, the default): what an agent's shell tool pays. The server's CPU is
    outside the measured process tree: the system-wide column has it."""

    binary, package = "zviz", ""

    def __init__(self) -> None:
        super().__init__("zviz-cli", "zviz run (the command line, through its server)",
                         "zviz run --preset python -- CMD")

    def probe(self) -> None:
        path = ZVIZ_CLI or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "zviz")
        if not os.access(path, os.X_OK):
            self.reason = f"no {path} (scripts/setup.sh)"
            return
        self.installed = True
        self.extra["path"] = os.path.realpath(path)
        self.version = "this tree" if ZVIZ_CLI is None else path

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return [self.extra["path"], "run", "--preset", "python", "--", *argv]


class ZvizCliCold(ZvizCli):
    """The same with --cold: `PYTHON -c CODE` starts its interpreter in the
    sandbox instead of forking the server's warm one (what `zviz run` did
    before round 10)."""

    def __init__(self) -> None:
        CliPeer.__init__(self, "zviz-cli-cold", "zviz run --cold (the command line, through its server)",
                         "zviz run --cold --preset python -- CMD")

    def wrap(self, argv: list[str], workdir: str) -> list[str]:
        return [self.extra["path"], "run", "--cold", "--preset", "python", "--", *argv]


def all_peers(per_snippet: bool = False) -> list[Peer]:
    """The peers of run.py's tables; with `per_snippet`, also the agent tools'
    sandboxes (srt, codex: read-only by default, so only for benchmarks/cold.py's
    snippets, which write nothing)."""
    base: list[Peer] = [Bwrap(), Firejail(), Runsc(), Sandlock()]
    return [*base, Srt(), Codex(), ZvizCli(), ZvizCliCold()] if per_snippet else base
