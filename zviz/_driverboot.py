"""How the code-context driver (_driver.py) is handed to the sandbox's
interpreter: `python3 -c BOOT role preload magic code source`, its bytecode
when that interpreter's magic number is ours (no compile: about a third of
the driver's start), else its source; the source sent has no docstrings,
comments or blank lines. Host side only."""

from __future__ import annotations

import functools
import pathlib

# The driver's start (`python3 -c BOOT role preload magic code source`): its
# bytecode when the interpreter's magic number is ours (no compile, a third of
# the driver's start), else its source; sys.argv is left as [-c, role, preload].
BOOT = ("import sys, marshal\na = sys.argv\n"
        "m = getattr(sys.modules.get('_frozen_importlib_external'), 'MAGIC_NUMBER', b'')\n"
        "c = marshal.loads(bytes.fromhex(a[4])) if m.hex() == a[3] else compile(a[5], '<string>', 'exec')\n"
        "del a[3:], a, m\nexec(c)\n")


@functools.cache
def code() -> tuple[str, str, str]:
    """(magic number, marshalled code, source) of the driver, in hex for the bytecode."""
    import importlib.util
    import marshal

    source = source_text()
    return importlib.util.MAGIC_NUMBER.hex(), marshal.dumps(compile(source, "<string>", "exec")).hex(), source


@functools.cache
def source_text() -> str:
    """The driver's source as sent (`python3 -c`): without its docstrings,
    comments and blank lines, which every start would compile for nothing
    (a third of its bytes). Lines are dropped whole: what runs is its text."""
    import ast

    text = (pathlib.Path(__file__).with_name("_driver.py")).read_text()
    lines = text.splitlines()
    drop: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and isinstance(body, list) and len(body) > 1
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str) and body[0].end_lineno is not None):
            drop.update(range(body[0].lineno - 1, body[0].end_lineno))
    strings = {n for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and node.end_lineno != node.lineno for n in range(node.lineno, (node.end_lineno or 0) + 1)}
    kept = [line for i, line in enumerate(lines) if i not in drop and (i + 1 in strings or (
        line.strip() and not line.lstrip().startswith("#")))]
    return "\n".join(kept) + "\n"
