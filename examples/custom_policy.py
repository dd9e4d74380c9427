"""A custom policy: a read-only data directory, tight limits, and a look at
what the sandbox refused."""

import os
import tempfile

import attrs
import trio

import zviz


async def main() -> None:
    data = tempfile.mkdtemp(prefix="zviz-example-data-")
    os.chmod(data, 0o755)
    with open(os.path.join(data, "numbers.txt"), "w") as f:
        f.write("\n".join(str(i) for i in range(100)))
    os.chmod(os.path.join(data, "numbers.txt"), 0o644)

    base = zviz.Policy.python()
    policy = attrs.evolve(
        base.with_paths(read_only=[data]),
        name="example",
        limits=zviz.Limits(wall_s=5, memory="256M", processes=16, output="64K"),
        env={**base.env_dict(), "DATA": data},
    )
    print(policy.to_toml().splitlines()[0], "...")  # policies round-trip through TOML

    code = (
        "import os, ctypes\n"
        "nums = [int(x) for x in open(os.environ['DATA'] + '/numbers.txt')]\n"
        "print('sum', sum(nums))\n"
        "try:\n"
        "    open(os.environ['DATA'] + '/numbers.txt', 'a')\n"
        "except OSError as e:\n"
        "    print('write refused:', e.strerror)\n"
        "ctypes.CDLL(None).ptrace(0, 0, 0, 0)  # an escape attempt, refused and reported\n"
    )
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["python3", "-c", code])
        print(r.stdout.decode().strip())
        for event in sb.events_so_far():
            print("event:", event)
        print("denials:", dict(sb.statistics().denials))
    os.remove(os.path.join(data, "numbers.txt"))
    os.rmdir(data)


if __name__ == "__main__":
    trio.run(main)
