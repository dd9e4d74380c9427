#!/usr/bin/env bash
# What zviz's eBPF monitor (zviz.ebpf, `zviz trace`) needs on Debian, as root:
#   1. bcc's Python binding: Debian's python3-bpfcc (pure Python over libbcc);
#   2. kernel headers for bcc's on-the-fly compilation. Debian ships headers only
#      for its own kernels; for a kernel without a matching package (as on a VM
#      running 6.18) /lib/modules/$(uname -r)/{build,source} are pointed at the
#      newest linux-headers-amd64 tree: zviz's programs use only tracepoints and
#      stable structures, which compile fine against it;
#   3. tracefs mounted at /sys/kernel/tracing;
#   4. the binding made importable from this project's .venv (a symlink to
#      Debian's bcc package; it is pure Python and works with any CPython 3.x).
# Idempotent. Prints what it did; exits non-zero only if bcc still cannot load.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "setup-ebpf: needs root (bcc loads programs into the kernel)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
need=()
dpkg -s python3-bpfcc >/dev/null 2>&1 || need+=(python3-bpfcc)
krel=$(uname -r)
if [ ! -e "/lib/modules/$krel/build/include" ]; then
    apt-cache policy "linux-headers-$krel" 2>/dev/null | grep -q 'Candidate: [0-9]' && need+=("linux-headers-$krel")
    dpkg -s linux-headers-amd64 >/dev/null 2>&1 || need+=(linux-headers-amd64)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup-ebpf: installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -e "/lib/modules/$krel/build/include" ]; then
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$arch_dir" ]; then
        echo "setup-ebpf: no kernel headers found under /usr/src" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$krel"
    ln -sfn "$arch_dir" "/lib/modules/$krel/build"
    ln -sfn "${common_dir:-$arch_dir}" "/lib/modules/$krel/source"
    echo "setup-ebpf: no headers for $krel; linked /lib/modules/$krel/build -> $arch_dir (fallback)"
fi

if ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs nodev /sys/kernel/tracing
    echo "setup-ebpf: mounted tracefs at /sys/kernel/tracing"
fi
if ! mountpoint -q /sys/kernel/debug && [ -d /sys/kernel/debug ]; then
    mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

bcc_dir=/usr/lib/python3/dist-packages/bcc
if [ -x .venv/bin/python ]; then
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sfn "$bcc_dir" "$site/bcc"
fi
py=${ZVIZ_PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=/usr/bin/python3
if "$py" -c 'import bcc' 2>/dev/null; then
    echo "setup-ebpf: bcc importable from $py"
else
    echo "setup-ebpf: bcc still not importable from $py" >&2
    exit 1
fi
