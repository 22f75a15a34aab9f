"""The CPU allocator's part in a timing: page faults counted, and glibc told to keep freed memory.

On CPU, torch allocates tensors with the C library's malloc. glibc hands large freed blocks back to the OS
(blocks above its mmap threshold, and the top of the heap above its trim threshold), so a step that
allocates the same large tensors again touches fresh pages, and every page faults once (a few µs each in
a VM). Two steps that do identical arithmetic can then differ by tens of percent, depending on what the
heap looked like before them::

    minor_page_faults(f)   getrusage(RUSAGE_SELF).ru_minflt before and after a few calls of f
    keep_freed_memory()    mallopt(M_TRIM_THRESHOLD, 2^31 - 1); mallopt(M_MMAP_MAX, 0)
                           (the same as MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_MAX_ in the environment, and
                           close to what jemalloc or tcmalloc do, which PyTorch's CPU tuning guide suggests)

No torch import here, so a test can try ``keep_freed_memory`` in a small subprocess.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's <malloc.h>


def minor_page_faults(function: Callable[[], object], *, calls: int = 3) -> Optional[float]:
    """Minor page faults per call of ``function`` (None where the platform has no ``resource`` module)."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an integer >= 1, got {calls!r}")
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        function()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory in the process for good; False (and nothing changed) without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
