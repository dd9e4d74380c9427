"""Where this user's start-up cache lives (`_diskcache.py`) and the CLI servers
listen (`_cliserver.py`): imported by the thin `zviz` client, so only `os`."""

from __future__ import annotations

import os


def location() -> str:
    """Where the cache lives for this caller (it may not exist yet); "" when
    there is none (no absolute path to put it: the cache is off)."""
    explicit = os.environ.get("ZVIZ_CACHE_DIR")
    if explicit:
        path = explicit
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "zviz")
    return path if os.path.isabs(path) else ""  # (never relative to wherever the caller happens to be)
