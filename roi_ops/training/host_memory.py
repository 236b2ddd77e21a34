"""Keep freed host memory in the process, so that a CPU training step does not page-fault its activations in again.

glibc's ``malloc`` returns memory to the OS eagerly: a large block that the heap's free chunks cannot hold gets an
``mmap`` of its own (above a threshold that starts at 128 KiB and rises to at most 32 MiB), unmapped when freed, and
free memory at the top of the heap is trimmed once it exceeds twice that threshold. A training step allocates its
saved activations and gradients, frees them all, and allocates them again in the next step: each time the kernel
maps and zeroes the pages anew, one minor page fault per 4 KiB. With the adapter that is most of the step's extra
memory, every step (docs/training.md, "Host memory", and docs/performance.md, "Fourth pass", have the counts and
times). A caching allocator (PyTorch's own on CUDA, jemalloc or tcmalloc by ``LD_PRELOAD`` on CPU) keeps that
memory; :func:`retain_freed_host_memory` gets glibc to do the same from inside the process, without an environment
variable: no ``mmap`` for large blocks (they come from the heap, whose freed space is reused) and no trimming. The
process's resident memory then stays at its peak, which is what a training process reaches anyway.

``roi-ops train`` (:func:`roi_ops.training.trainer.train_adapter`) calls it when it trains on the CPU, unless
``TrainConfig.retain_host_memory`` is ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_host_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; 2 GiB of free heap top before a trim, i.e. never in practice

_applied: bool | None = None


def _glibc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    try:
        libc.gnu_get_libc_version  # only glibc has it (musl has no mallopt knobs of this kind)
        mallopt = libc.mallopt
    except AttributeError:
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def retain_freed_host_memory() -> bool:
    """Make glibc ``malloc`` keep freed memory for reuse (process-wide, from now on): ``M_MMAP_MAX = 0`` and
    ``M_TRIM_THRESHOLD`` = 2 GiB. Returns whether it applied (``False`` off Linux/glibc, where nothing changes).
    Calling it again does nothing more."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied
