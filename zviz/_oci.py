"""OCI/Docker seccomp profiles <-> zviz policies. Pure: text in, values out.

Reading: a profile's allowed syscall names become `syscalls.allow`; paths,
network and limits come from the base policy (a seccomp profile says nothing
about them). Rules with argument conditions (`args`) cannot be expressed as a
plain allowlist entry and are refused with a PolicyError naming the syscall,
rather than silently widened; `includes`/`excludes` by capability or arch are
ignored (zviz runs without capabilities, on the native ABI only).

Writing (`zviz trace --oci`): `defaultAction: SCMP_ACT_ERRNO` and one allow
rule with every syscall name, for the native architecture.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import Any

import attrs

from . import _syscalls
from ._errors import PolicyError, ZvizWarning
from ._policy import Policy, Syscalls

ALLOW = "SCMP_ACT_ALLOW"


def policy_from_oci(text: str, *, base: Policy) -> Policy:
    try:
        prof = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError("oci", str(e), "a JSON seccomp profile") from None
    if not isinstance(prof, dict):
        raise PolicyError("oci", type(prof).__name__, "a JSON object")
    default = prof.get("defaultAction")
    if not isinstance(default, str) or default == ALLOW:
        raise PolicyError("oci.defaultAction", default,
                          "a denying action (SCMP_ACT_ERRNO, SCMP_ACT_KILL...): zviz only runs allowlists")
    rules = prof.get("syscalls", [])
    if not isinstance(rules, list):
        raise PolicyError("oci.syscalls", rules, "a list of rules")
    names: list[str] = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise PolicyError(f"oci.syscalls[{i}]", rule, "an object with names and action")
        if rule.get("action") != ALLOW:
            continue  # denials are zviz's default
        rule_names = rule.get("names", [rule["name"]] if "name" in rule else [])
        if not isinstance(rule_names, list) or not all(isinstance(n, str) for n in rule_names):
            raise PolicyError(f"oci.syscalls[{i}].names", rule_names, "a list of syscall names")
        if rule.get("args"):
            raise PolicyError(f"oci.syscalls[{i}].args", rule_names,
                              "rules without argument conditions (zviz applies its own, on registers)")
        names.extend(rule_names)
    known = [n for n in names if n in _syscalls.X86_64_NAMES]
    unknown = sorted(set(names) - set(known))
    if unknown and len(unknown) == len(set(names)):
        raise PolicyError("oci.syscalls", unknown[:5], "x86_64 syscall names")
    # Profiles written for containers (Docker's default allows ptrace, clone3,
    # personality...) grant what zviz keeps for escape attempts: those stay
    # denied, loudly. A policy that truly needs them says so in zviz's TOML.
    dropped = sorted(set(known) & _syscalls.DANGEROUS)
    if dropped:
        warnings.warn(f"OCI profile allows {', '.join(dropped)}: zviz keeps them denied "
                      "(use a TOML policy with syscalls.allow_dangerous to grant them)", ZvizWarning, stacklevel=2)
    sc = Syscalls(allow=tuple(dict.fromkeys(n for n in known if n not in _syscalls.DANGEROUS)))
    return attrs.evolve(base, syscalls=sc, name=prof.get("zviz_name", "oci"))


def oci_profile(names: Iterable[str]) -> dict[str, Any]:
    """The calls zviz's stage and init always make (zviz/_bpf.py STAGE_NEEDS)
    are included: another runtime does not grant them implicitly."""
    from ._bpf import STAGE_NEEDS

    names = set(names) | STAGE_NEEDS
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": sorted(set(names)), "action": ALLOW}],
    }
