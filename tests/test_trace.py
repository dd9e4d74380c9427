"""zviz trace, end to end: trace a program, run it again under the generated
policy (passes), run a more demanding one under it (denied, named)."""

import json
import os
import subprocess
import sys

import pytest

import zviz
import zviz.ebpf

ZVIZ = [sys.executable, "-m", "zviz._cli"]
PROGRAM = ("import json, csv\n"
           "rows = [{'a': i} for i in range(5)]\n"
           "with open('out.csv', 'w') as f:\n"
           "    w = csv.DictWriter(f, ['a']); w.writeheader(); w.writerows(rows)\n"
           "print(json.dumps({'n': len(rows)}))\n")
DEMANDING = "import socket; socket.socket(socket.AF_INET).connect(('127.0.0.1', 9))"
MODES = ["learn"] + (["ebpf"] if zviz.ebpf.status()[0] else [])


@pytest.mark.parametrize("mode", MODES)
def test_trace_then_run_then_deny(tmp_path, mode):
    toml, oci = tmp_path / "p.toml", tmp_path / "p.json"
    args = [*ZVIZ, "trace", "--json", "-o", str(toml), "--oci", str(oci)] + (["--learn"] if mode == "learn" else [])
    r = subprocess.run([*args, "--", "python3", "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out_line, rest = r.stdout.split("\n", 1)
    assert json.loads(out_line) == {"n": 5}  # the traced program's own output passes through
    report = json.loads(rest)
    assert report["mode"] == ("learning" if mode == "learn" else "ebpf")
    assert "openat" in report["syscalls"] and any(w.endswith("out.csv") for w in report["writes"])
    policy = zviz.Policy.from_toml(toml.read_text())
    names = policy.syscalls.names()
    assert "openat" in names and "socket" not in names and policy.net.mode == "none"
    assert len(names) < 120  # smaller than the preset it started from
    profile = json.loads(oci.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and len(profile["syscalls"]) == 1

    for policy_file in (toml, oci):
        again = subprocess.run([*ZVIZ, "run", "--policy", str(policy_file), "--", "python3", "-c", PROGRAM],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {"n": 5}

    denied = subprocess.run([*ZVIZ, "run", "--json", "--policy", str(toml), "--", "python3", "-c", DEMANDING],
                            capture_output=True, text=True, timeout=60)
    d = json.loads(denied.stdout)
    assert d["exit_code"] != 0 and "socket" in d["denials"]
    assert any("socket" in e for e in d["events"])


def test_trace_records_paths_outside_the_preset(tmp_path):
    import pathlib
    import shutil
    import tempfile

    data = pathlib.Path(tempfile.mkdtemp(prefix="trace-data-"))  # reachable by uid 65534
    os.chmod(data, 0o755)
    (data / "in.txt").write_text("42")
    os.chmod(data / "in.txt", 0o644)
    toml = tmp_path / "p.toml"
    prog = f"print(open({str(data / 'in.txt')!r}).read())"
    r = subprocess.run([*ZVIZ, "trace", "--learn", "-o", str(toml), "--", "python3", "-c", prog],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "42\n", r.stderr
    policy = zviz.Policy.from_toml(toml.read_text())
    assert str(data) in policy.fs.read_only
    again = subprocess.run([*ZVIZ, "run", "--policy", str(toml), "--", "python3", "-c", prog],
                           capture_output=True, text=True, timeout=60)
    shutil.rmtree(data)
    assert again.stdout == "42\n", again.stderr


def test_generator_is_pure_and_collapses_siblings():
    from zviz._generate import Peaks, TraceRecord, _collapse, generate

    assert _collapse({"/a/b/1", "/a/b/2", "/a/b/3", "/c"}) == ["/a/b", "/c"]
    rec = TraceRecord()
    rec.syscalls.update({"read": 3, "ptrace": 1, "write": 1})
    policy, notes = generate(rec, base=zviz.Policy.python(), workdir="/w", cwd="/w",
                             peaks=Peaks(wall_s=0.1, peak_rss=10 << 20, output=10))
    assert set(policy.syscalls.allow) == {"read", "write"}
    assert any("ptrace" in n for n in notes)
    assert policy.limits.memory == zviz.Policy.python().limits.memory and policy.limits.wall_s == 2


def test_trace_lives_in_the_core_and_ebpf_is_the_monitor_only():
    # zviz trace and its generator import neither the optional monitor package
    # nor the CLI; zviz.ebpf re-exports trace without importing the CLI back.
    code = ("import sys, zviz._trace, zviz._generate\n"
            "core_alone = 'zviz.ebpf' not in sys.modules\n"
            "import zviz.ebpf\n"
            "print(core_alone, 'zviz._cli' not in sys.modules, zviz.ebpf.trace is zviz._trace.trace)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]
