"""A code interpreter for an agent: cells that share state, rich results,
errors as data, an interrupt that keeps the state, a cheap fork, and warm
one-shot snippets (docs/code-contexts.md)."""

import trio

import zviz


async def main() -> None:
    async with zviz.open_sandbox(zviz.Policy.python()) as sb, sb.code_context(preload=("json",)) as ctx:
        await ctx.set_vars({"rows": [3, 1, 2]})
        ex = await ctx.run("total = sum(rows)\nprint('rows', len(rows))\nsorted(rows)")
        print("stdout:", ex.stdout.strip(), "| result:", ex.result)

        ex = await ctx.run("total / 0")
        print("error:", ex.error.name, "-", ex.error.value)

        ex = await ctx.run("import time\nwhile True: time.sleep(0.1)", timeout=0.5)
        print("interrupted:", ex.interrupted, "| state kept, total =", await ctx.get_var("total"))

        ex = await ctx.run("class Table:\n    def _repr_html_(self): return '<table><tr><td>6</td></tr></table>'\n"
                           "display(Table())")
        print("display:", [sorted(item) for item in ex.display])

        twin = await ctx.fork()  # a branch of the trajectory: same state, independent from now on
        await twin.run("total = -1")
        print("fork: parent", await ctx.get_var("total"), "| twin", await twin.get_var("total"))
        await twin.aclose()

        async for event in ctx.stream("for i in range(3): print('tick', i, flush=True)"):
            if isinstance(event, zviz.StreamOutput):
                print("streamed:", event.text.strip().replace("\n", ", "))

    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        first = await sb.run_python("import json\njson.seen = True\nx = 1\n'first'", preload=("json",))
        second = await sb.run_python("import json\n(hasattr(json, 'seen'), 'x' in globals())", preload=("json",))
        print("run_python:", first.result, second.result)


if __name__ == "__main__":
    trio.run(main)
