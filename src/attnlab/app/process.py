"""Process-wide settings of attnlab's programs: the ``attnlab`` command sets them at its entry point,
and the benchmarks that measure it set them the same way. The library itself never changes them.

- ``OMP_WAIT_POLICY=PASSIVE``: on a machine whose cores are busy with other work, spinning OpenMP
  threads made a training step 3.3x slower (12.2 s against 3.7 s, measured on this project's 2-core
  machine). OpenMP reads it when PyTorch's library loads, so it is set before torch is imported.
- Freed memory stays in the process (``keep_freed_memory``): decoding allocates and frees tensors of
  a few megabytes at every step, and glibc's malloc hands such memory back to the kernel as soon as
  it is freed, so that the next step takes it back page by page. Translating test_2016_flickr with
  the tiny model (beam 4, one thread) cost 176,000 page faults and 0.41 s of system time that way;
  with freed memory kept, 140 faults and no measurable system time (the wall time fell from 4.2-4.5
  s to 3.9-4.0 s). PyTorch's CPU tuning guide recommends jemalloc or TCMalloc for the same reason;
  this is glibc's own switch for it. A process's memory then stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["set_process_defaults", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP_UP_TO = 1 << 30  # free memory at the top of the heap kept for reuse, at most (bytes)
_MMAP_FROM = 32 << 20  # blocks from this size are mapped on their own: glibc's largest threshold on 64 bits
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def set_process_defaults() -> None:
    """The settings above, each unless the user made it (by its environment variable)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (up to 1 GiB) instead of returning it to the
    kernel at once, and to map only blocks of 32 MiB or more on their own. Returns whether both were
    set: False where the C library is not glibc (nothing to do there; musl's ``mallopt`` does
    nothing and says so), or where the user has set any of malloc's environment variables, or any
    glibc tunable (``GLIBC_TUNABLES``): the user's own allocator settings stand, whole."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    mapped = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM))  # refused where 32 MiB is above the limit (32 bits)
    return kept and mapped
