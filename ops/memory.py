"""Large buffers handed back to the OS as soon as they are freed (glibc's malloc).

glibc serves an allocation above its mmap threshold with its own mapping, unmapped on free.
The threshold starts at 128 KiB but rises to the size of any such buffer freed (up to
32 MiB), after which tensor-sized buffers come from the heap, where a freed one below a live
one stays in the process's RSS. A reply folded tensor by tensor frees one such buffer after
another between the running sums, so without a fixed threshold the ServerApp's RSS grows by
a fifth of the model over its live memory (bench/bench_aggregation.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["fix_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own mapping, from now on.

    Returns whether it took effect (False where the C library is not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, nbytes)) if name else False
    except (OSError, AttributeError):
        return False
