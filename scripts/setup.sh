#!/usr/bin/env bash
# Set up zviz for development: a virtual environment at .venv/ with zviz
# installed in editable mode (its C parts compiled), plus the test tools
# (pytest, ruff, mypy, nox: the `test` extra).
# Idempotent; safe to run again. As root on Debian it also installs what is
# missing from the system (a C compiler) and, with --ebpf, the eBPF monitor's
# dependencies (see scripts/setup-ebpf.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: need Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null
    else
        echo "setup: a C compiler is needed (apt-get install gcc libc6-dev)" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip setuptools wheel
extras=${ZVIZ_EXTRAS:-test}
# editable_mode=compat: a path entry in site-packages, which type checkers and
# IDEs follow (the default mode's import hook is invisible to them)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]" \
    --config-settings editable_mode=compat

if [ "${1:-}" = "--ebpf" ]; then
    ./scripts/setup-ebpf.sh
fi
