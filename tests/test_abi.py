"""The contract between Python and the C parts (zviz/_abi.h): the values the
pure modules keep (zviz/_abi.py) are the extension's; every struct format on
the Python side has the C record's size and field offsets (the extension
exports sizeof/offsetof in LAYOUTS); the binding refuses malformed buffers;
a failed step comes back as SetupError and then SandboxSetupError with its
path."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from zviz import SandboxSetupError, _abi, _kernel, _spec, _stage, _zygote
from zviz._spec import Command, StageSpec


def _offsets(fmt: str, names: list[str]) -> dict[str, int]:
    """Field offsets of a '='-format with one code (or count+code) per name."""
    assert fmt[0] == "="
    codes, i = [], 1
    while i < len(fmt):
        j = i
        while fmt[j].isdigit():
            j += 1
        codes.append(fmt[i:j + 1])
        i = j + 1
    assert len(codes) == len(names), (fmt, names)
    out, prefix = {}, "="
    for name, code in zip(names, codes, strict=True):
        out[name] = struct.calcsize(prefix)
        prefix += code
    return out


def _check(layout: str, fmt: str, names: list[str]) -> None:
    size, fields = _stage.LAYOUTS[layout]
    assert struct.calcsize(fmt) == size, (layout, struct.calcsize(fmt), size)
    offs = _offsets(fmt, names)
    for name, off in fields.items():
        assert offs[name] == off, (layout, name, offs[name], off)


def test_pure_copies_equal_the_extensions_values():
    names = [n for n in vars(_abi) if n.isupper()]
    assert len(names) >= 25
    for name in names:
        assert getattr(_abi, name) == getattr(_stage, name), name


def test_step_table_comes_from_the_extension():
    assert _kernel.STEPS is _stage.STEPS and _kernel.STEPS[0] is None
    steps = _kernel.STEPS[1:]
    assert len(set(steps)) == len(steps)
    # in the child's order (zviz/_stage.c child_main)
    for a, b in [("sync", "mount-bind"), ("mount-bind", "mount-root"), ("pivot-root", "setsid"),
                 ("no-new-privs", "landlock-restrict"), ("landlock-restrict", "stdio"), ("stdio", "rlimit"),
                 ("rlimit", "seccomp"), ("seccomp", "execve")]:
        assert steps.index(a) < steps.index(b), (a, b)
    assert set(_kernel.HINTS) <= set(steps)


def test_spec_records_match_the_c_layouts():
    _check("spec_header", _spec.SPEC_HEADER.format,
           ["magic", "flags", "clone_flags", "uid", "gid", "pdeathsig", "landlock_abi", "seccomp_flags", "pad",
            "ll_fs", "ll_net", "ll_scoped", "staging", "hostname", "uid_map", "gid_map", "n_binds", "n_ops",
            "n_masks", "n_rlimits", "n_ll_paths", "n_ll_ports", "bpf_off", "bpf_len"])
    _check("spec_bind", _spec.SPEC_BIND.format, ["src", "read_only"])
    _check("spec_op", _spec.SPEC_OP.format, ["kind", "path", "arg", "bind"])
    _check("spec_mask", _spec.SPEC_MASK.format, ["kind", "path"])
    _check("spec_rlimit", _spec.SPEC_RLIMIT.format, ["res", "pad", "soft", "hard"])
    _check("spec_path", _spec.SPEC_PATH.format, ["path", "pad", "access"])
    _check("spec_port", _spec.SPEC_PORT.format, ["port", "access"])
    _check("command_header", _spec.COMMAND_HEADER.format,
           ["magic", "n_argv", "n_envp", "fd_in", "fd_out", "fd_err", "init_fd", "status_fd", "track_map_fd",
            "track_value", "cgroup_fd", "netns_fd", "exe", "cwd"])


def test_zygote_request_and_status_records_match_the_c_layouts():
    _check("zreq_rl", _zygote.ZREQ_RL.format, ["res", "pad", "cur", "max"])
    size, fields = _stage.LAYOUTS["zreq"]
    assert _zygote._HEADER.size == size
    assert fields == {"magic": 0, "argc": 4, "envc": 8, "nrl": 12, "len": 16, "rl": 24}
    assert size == 24 + _zygote.MAX_RLIMITS * _zygote.ZREQ_RL.size
    size, fields = _stage.LAYOUTS["status_record"]
    assert _kernel._STATUS.size == size and fields == {"magic": 0, "wstatus": 4, "ru": 8}
    size, fields = _stage.LAYOUTS["child_error"]
    assert size == 12 and fields == {"step": 0, "err": 4, "index": 8}


def test_pump_record_matches_the_c_layout():
    from zviz import _pump
    _check("pump_record", _pump._RECORD.format, ["kind", "err", "fd", "cloexec", "name", "port", "key", "notif"])
    assert _stage.LAYOUTS["pump_record"][0] == 72 + _kernel._NOTIF.size
    assert _pump.available()  # this kernel's seccomp_notif is the size the thread was built for


def _null_command(**kw) -> Command:
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    base: dict = {"exe": b"/bin/true", "argv": (b"true",), "envp": (), "cwd": b"/", "stdin": fd, "stdout": fd,
                  "stderr": fd}
    base.update(kw)
    return Command(**base)


def test_the_binding_refuses_malformed_buffers():
    cmd = _null_command().pack()
    good = StageSpec(binds=(("/usr", True),), staging="/tmp", mount_ops=((_abi.OP_MOVE, "usr", "", 0),)).pack()
    with pytest.raises(ValueError, match="bad magic"):
        _stage.spawn(b"\0" * len(good), cmd)
    with pytest.raises(ValueError, match="shorter than its header"):
        _stage.spawn(good[:16], cmd)
    hdr = bytearray(good)
    n_binds = _stage.LAYOUTS["spec_header"][1]["n_binds"]
    struct.pack_into("=I", hdr, n_binds, _abi.MAX_BINDS + 1)
    with pytest.raises(ValueError, match="too many bind mounts"):
        _stage.spawn(bytes(hdr), cmd)
    hdr = bytearray(good)
    struct.pack_into("=I", hdr, _stage.LAYOUTS["spec_header"][1]["staging"], len(good) + 100)
    with pytest.raises(ValueError, match="string offset out of bounds"):
        _stage.spawn(bytes(hdr), cmd)
    op = _stage.LAYOUTS["spec_header"][0] + _stage.LAYOUTS["spec_bind"][0]
    hdr = bytearray(good)
    struct.pack_into("=i", hdr, op + _stage.LAYOUTS["spec_op"][1]["bind"], 5)
    with pytest.raises(ValueError, match="bind that does not exist"):
        _stage.spawn(bytes(hdr), cmd)
    with pytest.raises(ValueError, match="argv"):
        _stage.spawn(good, cmd[:_spec.COMMAND_HEADER.size])
    with pytest.raises(ValueError):
        StageSpec(binds=(("/x", False),) * (_abi.MAX_BINDS + 1)).pack()


def test_a_failed_step_names_its_step_errno_and_path():
    with pytest.raises(_stage.SetupError) as e:
        _stage.spawn(StageSpec().pack(), _null_command(exe=b"/nonexistent/zviz").pack())
    assert e.value.args == ("execve", errno.ENOENT, -1, None)
    with pytest.raises(SandboxSetupError) as e2:
        _kernel.spawn(StageSpec(), StageSpec().pack(), _null_command(cwd=b"/nonexistent/dir"))
    assert (e2.value.step, e2.value.errno, e2.value.path) == ("chdir", errno.ENOENT, "/nonexistent/dir")
    stage = StageSpec(rlimits=((_kernel.RLIMIT["nofile"], 2**40, 2**40),))  # above the kernel's nr_open
    with pytest.raises(SandboxSetupError) as e3:
        _kernel.spawn(stage, stage.pack(), _null_command())
    assert (e3.value.step, e3.value.path) == ("rlimit", "nofile")


def test_a_spawn_from_the_packed_spec_runs():
    sp = _kernel.spawn(StageSpec(), StageSpec().pack(), _null_command())
    _, status = os.waitpid(sp.pid, 0)
    sp.pidfd.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_stub_lists_what_the_extension_exports():
    import re

    stub = os.path.join(os.path.dirname(_stage.__file__), "_stage.pyi")
    with open(stub) as f:
        text = f.read()
    declared = set(re.findall(r"^(\w+):", text, re.MULTILINE))
    declared |= set(re.findall(r"^(?:def|class) (\w+)", text, re.MULTILINE))
    exported = {n for n in dir(_stage) if not n.startswith("__")}
    assert declared == exported


def test_every_step_has_a_row_in_errors_md():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "errors.md")
    with open(path) as f:
        text = f.read()
    missing = [s for s in _kernel.STEPS[1:]
               if f"| `{s}`" not in text and f"`{s}` /" not in text and f"/ `{s}`" not in text]
    assert not missing, missing
