#!/usr/bin/env bash
# Run a command with every library held to AVX2 (see avx2_only.c): on a CPU with AVX-512, VNNI or
# AMX, figures for users whose CPUs have only AVX2.
#
#   scripts/avx2_only/run.sh python scripts/bench_latency.py
#
# Needs Linux on x86-64 with CPUID faulting (the "cpuid_fault" CPU flag: Intel since Ivy Bridge,
# AMD Zen 4 and later where the kernel supports it) and a C compiler (cc). The preloaded library
# is built once into the cache folder ($SSL_PRETRAIN_CACHE, else ~/.cache/ssl-pretrain).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "avx2_only: needs Linux on x86-64 (this is $(uname -s) $(uname -m))" >&2
    exit 3
fi
if ! grep -qw cpuid_fault /proc/cpuinfo; then
    echo "avx2_only: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo): cannot mask" >&2
    exit 3
fi
cache="${SSL_PRETRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ssl-pretrain}"
library="$cache/avx2_only.so"
if [[ ! -f "$library" || "$here/avx2_only.c" -nt "$library" ]]; then
    command -v cc >/dev/null || { echo "avx2_only: needs a C compiler (cc) to build the preloaded library" >&2; exit 3; }
    mkdir -p "$cache"
    cc -O2 -shared -fPIC -o "$library.tmp.$$" "$here/avx2_only.c"
    mv -f "$library.tmp.$$" "$library"
fi
# oneDNN and torch's own caps too, so their logs (and describe_cpu) say what is held
export LD_PRELOAD="$library${LD_PRELOAD:+:$LD_PRELOAD}"
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 SSL_CPUID_MASK=AVX2
exec "$@"
