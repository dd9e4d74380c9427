"""zviz._snippets.SnippetWorker (what zviz.ray's actors run), without Ray."""

from __future__ import annotations

import asyncio

import zviz
from zviz import _snippets


def test_concurrent_first_calls_make_the_slots_sandboxes_once(monkeypatch):
    """A worker's first snippets can arrive together (an actor's in-flight calls):
    its slots' sandboxes are made once, and a snippet that follows another in the
    one slot (fresh_sandbox_every=2) sees what it left."""
    made = []
    create = zviz.Sandbox.create

    async def counting_create(*args, **kwargs):
        sb = await create(*args, **kwargs)
        made.append(sb)
        return sb

    monkeypatch.setattr(zviz.Sandbox, "create", counting_create)

    async def main():
        w = _snippets.SnippetWorker(zviz.Policy.python(), sandboxes=1, preload=(), python="python3",
                                    fresh_every=2, where={})
        try:
            first, second = await asyncio.gather(
                w.run("open('/tmp/left', 'w').write('x')"),
                w.run("import os\nos.path.exists('/tmp/left')"))
        finally:
            await w.aclose()
        return first, second

    first, second = asyncio.run(main())
    assert first.ok and second.ok, (first, second)
    assert second.result == "True", second
    assert len(made) == 1, f"{len(made)} sandboxes made for one slot"
    assert all(sb.closed for sb in made)
