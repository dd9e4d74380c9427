"""The public surface is exactly this (like trio's test_exports)."""

import zviz

PUBLIC = {
    "Bind", "CodeContext", "CodeContextError", "CommandNotFoundError", "DenialEvent", "DisplayData", "DomainStatistics",
    "EgressEvent", "EgressStatistics", "Endpoint",
    "EventsMissed", "Execution", "ExecutionError", "FeatureUnavailable", "FileInfo", "Filesystem", "KernelFeatures",
    "Limits", "Namespaces", "Network", "Policy", "PolicyError", "Process", "ResourceExhausted", "RunResult",
    "SYSCALL_GROUPS", "Sandbox", "SandboxClosedError", "SandboxSetupError", "SandboxStatistics", "StreamOutput",
    "Syscalls", "SnapshotInfo", "TemplateError",
    "UnsupportedKernelError", "ZvizError", "ZvizWarning", "open_sandbox", "probe_host", "run_snippet",
    "set_pool_size",
}


def test_public_names():
    # ebpf, integrations: subpackages, imported on demand; sync: the blocking facade (a public module);
    # ray: the Ray integration (a public module of the `ray` extra, imported on demand)
    names = {n for n in dir(zviz) if not n.startswith("_")} - {"ebpf", "integrations", "sync", "ray"}
    assert names == PUBLIC
    assert sorted(zviz.__all__) == sorted(PUBLIC) and len(zviz.__all__) == len(PUBLIC)
    namespace: dict[str, object] = {}
    exec("from zviz import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC
    for name in PUBLIC - {"SYSCALL_GROUPS"}:
        assert getattr(zviz, name).__module__ == "zviz", name  # shown as zviz.X, like trio's names


def test_one_version_string():
    from importlib.metadata import version

    from zviz import _version

    assert zviz.__version__ == _version.__version__ == version("zviz")


def test_error_tree_split_by_blame():
    assert issubclass(zviz.PolicyError, zviz.ZvizError) and issubclass(zviz.PolicyError, ValueError)
    assert issubclass(zviz.SandboxSetupError, OSError)
    assert issubclass(zviz.UnsupportedKernelError, zviz.FeatureUnavailable)
    assert issubclass(zviz.CommandNotFoundError, FileNotFoundError)


def test_zviz_ray_is_not_imported_by_zviz():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import zviz, sys; print('ray' in sys.modules, hasattr(zviz, 'ray'))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_importing_ebpf_does_not_import_bcc():
    import subprocess
    import sys

    # a fresh interpreter: other tests of this run may have loaded bcc already
    out = subprocess.run([sys.executable, "-c", "import zviz, zviz.ebpf, sys; print('bcc' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_survive_pickling():
    """Errors cross process boundaries (Ray actors, multiprocessing): every field survives."""
    import errno
    import pickle

    from zviz import _errors

    errors = [zviz.PolicyError("fs.read_only", "/x", "a path that exists"), _errors._PolicyTypeError("env", 1, "a map"),
              zviz.SandboxSetupError("mount", errno.EPERM, "/x", "a hint"), zviz.CommandNotFoundError("ls", "/bin"),
              zviz.ResourceExhausted("clone", errno.EAGAIN, limit="processes"),
              zviz.FeatureUnavailable("landlock", "off", "enable it"), zviz.CodeContextError("broken")]
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.args == e.args, e
        assert back.__dict__ == e.__dict__, e
        if isinstance(e, OSError):
            assert (back.errno, back.strerror, back.filename) == (e.errno, e.strerror, e.filename), e
