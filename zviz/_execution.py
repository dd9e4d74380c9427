"""What a code context hands out: `Execution`, `ExecutionError` and the
stream events (`StreamOutput`, `DisplayData`). Values only: no I/O.

A display bundle has Jupyter's `display_data` shape: MIME type -> value, with
text types as `str`, `application/json` as a JSON value and images as `bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs


def _lines(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _bundles(value: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class ExecutionError:
    """A cell's exception, as data: `name` (e.g. "ZeroDivisionError"), `value`
    (its message) and `traceback` (formatted lines, the cell's frames only)."""

    name: str
    value: str
    traceback: tuple[str, ...] = attrs.field(converter=_lines, default=())


@attrs.frozen(kw_only=True)
class StreamOutput:
    """A chunk of a cell's stdout or stderr, as it comes (`name` is "stdout"/"stderr")."""

    name: str
    text: str


@attrs.frozen(kw_only=True)
class DisplayData:
    """One rich output of a cell (a figure, `display(obj)`): a MIME bundle."""

    data: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class Execution:
    """The outcome of one cell (`CodeContext.run`, `Sandbox.run_python`).

    stdout/stderr: the cell's output (fd 1 and 2, subprocesses included), at
    most the context's `output_cap` bytes each; `output_dropped` counts the rest.
    result: the repr of the last expression (Jupyter-style), or None;
    `result_data` its whole MIME bundle (e.g. a DataFrame's text/html).
    error: None, or the exception the cell raised.
    display: MIME bundles in order (figures open at the end of the cell
    included); `display_dropped` counts those over the cap.
    interrupted: the cell was interrupted (interrupt() or its timeout).
    restarted: the context's process was killed or died during this cell and
    a fresh one was started from the template: every variable was lost.
    """

    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    result_data: Mapping[str, Any] | None = None
    error: ExecutionError | None = None
    display: tuple[Mapping[str, Any], ...] = attrs.field(converter=_bundles, default=())
    duration_s: float = 0.0
    interrupted: bool = False
    restarted: bool = False
    output_dropped: int = 0
    display_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None
