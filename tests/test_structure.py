"""The package's shape, checked from its source (no kernel needed): the rules
docs/architecture.md states, so that they cannot drift silently."""

import ast
import pathlib

import zviz

ROOT = pathlib.Path(zviz.__file__).parent
MODULES = sorted(ROOT.rglob("*.py"))
MAX_LINES = 500
LONG_REASON = "Why this module is long:"


def attributes_first_set_outside_init(source):
    """(class, attribute, method) for each `self.x = ...` of a class whose
    first assignment is not in its __init__ (nor a class-level annotation)."""
    out = []
    for cls in [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)]:
        in_init, elsewhere = set(), {}
        for fn in [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    targets = [node.target]
                else:
                    continue
                for target in targets:
                    for t in [target, *getattr(target, "elts", [])]:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            if fn.name == "__init__":
                                in_init.add(t.attr)
                            else:
                                elsewhere.setdefault(t.attr, fn.name)
        declared = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        out += [(cls.name, a, m) for a, m in elsewhere.items() if a not in in_init | declared]
    return out


def test_every_attribute_is_set_in_init():
    bad = [(m.name, *b) for m in MODULES for b in attributes_first_set_outside_init(m.read_text())]
    assert not bad


def test_the_attribute_check_catches_a_late_attribute():
    src = ("class A:\n    def __init__(self):\n        self.a = 1\n"
           "    def f(self):\n        self.a = 2\n        self.b = 3\n")
    assert attributes_first_set_outside_init(src) == [("A", "b", "f")]


def test_no_long_module_without_a_reason():
    for m in MODULES:
        text = m.read_text()
        if text.count("\n") > MAX_LINES:
            head = "\n".join(text.splitlines()[:40])
            assert LONG_REASON in head, f"{m}: over {MAX_LINES} lines, no reason at its top"


def test_process_knows_nothing_of_the_sandbox():
    # Process gets what it needs as Hooks; the sandbox uses _process's functions.
    src = (ROOT / "_process.py").read_text()
    tree = ast.parse(src)
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "_sandbox" not in imported and "_runner" not in imported
    assert "Sandbox" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    sandbox = ast.parse((ROOT / "_sandbox.py").read_text())
    private = {n.attr for n in ast.walk(sandbox) if isinstance(n, ast.Attribute)
               and isinstance(n.value, ast.Name) and n.value.id in ("proc", "p") and n.attr.startswith("_")}
    assert not private, private
