"""Keep freed memory for reuse in CPU training (glibc ``mallopt``).

torch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold with fresh
``mmap`` pages and gives freed heap memory back to the system above its trim threshold, so a
training step that allocates the same multi-megabyte activations every iteration pays a page
fault per 4 KiB page, every time. Raising both thresholds lets the heap keep and reuse those
blocks, which speeds up both the batched augmentation and the training step (BENCHMARKS.md,
"Pretraining throughput"). The price: the process keeps its peak heap instead of returning it
between steps (BENCHMARKS.md, "Memory").

The same effect as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`` or preloading jemalloc /
tcmalloc (Intel's advice for PyTorch on CPUs), without touching the environment.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("ssl_pretrain")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 2**31 - 1

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); ``False`` where this is
    not glibc (macOS, musl, Windows) or ``mallopt`` refused, and nothing changed."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    if ok:
        log.debug("glibc malloc: mmap threshold %d MiB, trim threshold 2 GiB", MMAP_THRESHOLD_MAX // 2**20)
    return ok
