"""A private event-loop thread (trio) and the tool session that lives in it,
for frameworks whose executors are synchronous (smolagents, deep agents)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio.from_thread

from .._tools import SessionConfig, ToolSession


class Loop:
    def __init__(self, config: SessionConfig) -> None:
        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal(backend="trio"))
        self.session = ToolSession(config)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the loop thread (fn async), from any other thread."""
        return self.portal.call(fn, *args)

    def close(self) -> None:
        """Close the session (its sandbox), then stop the thread. Idempotent."""
        try:
            with contextlib.suppress(Exception):
                self.portal.call(self.session.aclose)
        finally:
            self._stack.close()
