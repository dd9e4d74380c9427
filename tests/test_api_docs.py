"""docs/api.md cannot drift from the code: every public signature the code
has (scripts/api_signatures.py) is on the page, exactly; no private
parameter is part of a public signature."""

from __future__ import annotations

import inspect
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import api_signatures  # noqa: E402


def _doc() -> str:
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        return f.read()


def test_every_public_signature_is_documented_exactly():
    documented = set(_entries())
    missing = [line for line in api_signatures.lines() if line not in documented]
    assert not missing, "docs/api.md lacks (or shows an outdated form of):\n" + "\n".join(missing)


def _entries() -> list[str]:
    """The reference's entries: each a `- ` item or a `### ` heading that starts with a code span."""
    return re.findall(r"^(?:- |### )`([^`]+)`", _doc().split("## Reference", 1)[1], re.M)


def test_no_stale_entries_in_the_reference():
    current = set(api_signatures.lines())
    # without the ray extra, zviz.ray cannot be imported: its section is not checked
    stale = [e for e in _entries() if e not in current and (api_signatures.RAY or not e.startswith("zviz.ray."))]
    assert not stale, "docs/api.md documents what the code no longer has:\n" + "\n".join(stale)


def test_the_check_catches_a_drift(monkeypatch):
    import zviz

    async def run(self, argv, *, stdin=b"", timeout=None, extra=1):  # a changed signature
        raise NotImplementedError

    monkeypatch.setattr(zviz.Sandbox, "run", run)
    with pytest.raises(AssertionError, match=r"Sandbox\.run"):
        test_every_public_signature_is_documented_exactly()


def test_no_private_parameters_in_public_signatures():
    import zviz
    import zviz.sync

    for title, obj in api_signatures.TOP:
        targets = [obj]
        if inspect.isclass(obj):
            targets = [getattr(obj, n) for n, v in vars(obj).items()
                       if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, classmethod))]
        for t in targets:
            params = inspect.signature(t).parameters
            assert not [p for p in params if p.startswith("_")], (title, t)
    assert "_trace" not in str(inspect.signature(zviz.open_sandbox))
    assert "_zygote" not in str(inspect.signature(zviz.Sandbox.create))
