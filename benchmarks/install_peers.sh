#!/usr/bin/env bash
# Install the peer sandboxes the benchmark suite compares zviz with, where this
# host can have them, plus matplotlib (the charts) into the project's .venv:
#
#   bubblewrap, firejail   Debian packages            (apt-get, root)
#   gVisor runsc           Debian package "runsc" (or "gvisor") if the archive has one
#   sandlock               PyPI, into .venv           (pip)
#   srt, codex             npm, global                (@anthropic-ai/sandbox-runtime, @openai/codex;
#                          srt also needs Debian's ripgrep and socat)
#   matplotlib             PyPI, into .venv           (the project's `bench` extra)
#
#   sudo benchmarks/install_peers.sh
#
# Never fails because something is missing or cannot be installed: it prints
# one line per peer ("installed ...", "already installed ...", or "not
# installed: REASON") and exits 0. benchmarks/run.py --peers marks the peers
# it cannot find "not installed" in its table.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV_PIP=.venv/bin/pip
export DEBIAN_FRONTEND=noninteractive

say() { printf 'install-peers: %s\n' "$*"; }

is_root=0
[ "$(id -u)" = 0 ] && is_root=1

# ---- Debian packages
apt_updated=0
apt_update() {
    [ $apt_updated = 1 ] && return 0
    apt_updated=1
    timeout 300 apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed (continuing with the cached lists)"
}
has_candidate() {  # a package the archive offers (no `| grep -q`: SIGPIPE + pipefail)
    local out
    out=$(apt-cache policy "$1" 2>/dev/null)
    [[ $out == *"Candidate: "[0-9]* ]]
}
apt_peer() {  # apt_peer LABEL BINARY PACKAGE...
    local label=$1 bin=$2; shift 2
    if command -v "$bin" >/dev/null 2>&1; then
        say "already installed: $label ($(command -v "$bin"))"
        return 0
    fi
    if [ $is_root = 0 ]; then
        say "not installed: $label (needs root: sudo $0)"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || { say "not installed: $label (no apt-get on this host)"; return 0; }
    apt_update
    local pkg
    for pkg in "$@"; do
        if has_candidate "$pkg"; then
            if timeout 600 apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
                    && command -v "$bin" >/dev/null 2>&1; then
                say "installed: $label (Debian package $pkg $(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null))"
            else
                say "not installed: $label (apt-get install $pkg failed)"
            fi
            return 0
        fi
    done
    say "not installed: $label (no Debian package: $* )"
}

apt_peer bubblewrap bwrap bubblewrap
apt_peer firejail firejail firejail
apt_peer "gVisor runsc" runsc runsc gvisor

# ---- npm (global): Anthropic's sandbox-runtime and OpenAI Codex's Linux sandbox
npm_peer() {  # npm_peer LABEL BINARY PACKAGE
    local label=$1 bin=$2 pkg=$3
    if command -v "$bin" >/dev/null 2>&1; then
        say "already installed: $label ($(command -v "$bin"))"
        return 0
    fi
    if [ $is_root = 0 ]; then
        say "not installed: $label (needs root for npm install -g: sudo $0)"
        return 0
    fi
    command -v npm >/dev/null 2>&1 || { say "not installed: $label (no npm on this host: apt-get install npm)"; return 0; }
    if timeout 600 npm install -g --silent "$pkg" >/dev/null 2>&1 && command -v "$bin" >/dev/null 2>&1; then
        say "installed: $label (npm $pkg $(npm ls -g --depth=0 "$pkg" 2>/dev/null | grep -o '@[0-9][^ ]*$' | tail -1))"
    else
        say "not installed: $label (npm install -g $pkg failed)"
    fi
}
apt_peer "ripgrep (for srt)" rg ripgrep
apt_peer "socat (for srt)" socat socat
npm_peer "Anthropic sandbox-runtime (srt)" srt @anthropic-ai/sandbox-runtime
npm_peer "OpenAI Codex (codex sandbox)" codex @openai/codex

# ---- PyPI, into the venv
if [ ! -x "$VENV_PIP" ]; then
    say "not installed: sandlock, matplotlib (no .venv here: run ./scripts/setup.sh first)"
    exit 0
fi
pip_peer() {  # pip_peer MODULE DIST
    local mod=$1 dist=$2
    if .venv/bin/python -c "import $mod" >/dev/null 2>&1; then
        say "already installed: $dist (.venv)"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    if ! timeout 300 "$VENV_PIP" download -q --no-deps -d "$tmp" "$dist" >/dev/null 2>&1; then
        say "not installed: $dist (not on PyPI for this Python/platform, or no network)"
    elif timeout 600 "$VENV_PIP" install -q "$dist" >/dev/null 2>&1 && .venv/bin/python -c "import $mod" >/dev/null 2>&1; then
        say "installed: $dist $(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$dist'))") (.venv)"
    else
        say "not installed: $dist (pip install failed)"
    fi
    rm -rf "$tmp"
}
pip_peer sandlock sandlock
pip_peer matplotlib matplotlib
exit 0
