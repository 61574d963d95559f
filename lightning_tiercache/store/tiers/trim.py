"""Giving freed host memory back to the operating system (glibc's ``malloc_trim``).

Note: [memory that leaves the process]
    Freeing a tensor returns its bytes to the C allocator, not to the OS. glibc raises its mmap threshold
    after the first large free, so later tensors of that size come from its heaps, and what a spill write
    releases stays resident: peak RSS does not drop although the bytes are on disk
    (``tests/lightning/test_memory_cpu.py`` fails without this). On a CPU device the store counts the RAM its
    spill writes release and, once half its device budget (at most :data:`TRIM_EVERY_BYTES`) piled up, trims:
    from the I/O thread that wrote, after it let go of the bytes, and from ``TierStore.return_free_memory``
    (the offloader calls it as each forward starts), never under the store's lock. Entries freed where they
    are (the resident tail, whatever backward frees in place) do not count: the run without the library
    frees the same memory, and trimming it only makes the next step fault its pages in again
    (``test_entries_freed_in_the_device_tier_trim_nothing``). What the disk tier reads back is a mapping of
    its own, gone when freed, with no trim needed (Note: [reads that leave the process] in
    :mod:`lightning_tiercache.store.tiers.mapped`). That has a consequence in backward: the run without the
    library frees each activation into the heap as backward consumes it, and backward's own temporaries
    (activation gradients, parameter gradients) reuse that memory; with the reloads in mappings of their own
    the temporaries grow the heap instead, and what they free stays resident. So the bytes each spill read
    brings back count too, and the I/O thread that read trims when they are due: on the 4-block GPT of
    ``bench activations`` the steady peak RSS growth went from 59-71 to 32-33 MiB of the plain run's 109
    (``tests/activations/test_memory_rss.py``). With nothing read back (everything fit) nothing is trimmed.
    Where the C library is not glibc, nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

__all__ = ["TRIM_EVERY_BYTES", "Trimmer"]

#: Released bytes after which free pages are handed back: rare enough that the trim's walk over the free
#: lists and the page faults of reusing the memory stay small against the I/O that released it.
TRIM_EVERY_BYTES = 64 << 20


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class Trimmer:
    """Counts released host bytes and hands free heap pages back to the OS when enough piled up.

    Args:
        every_bytes: released bytes between trims.
    """

    def __init__(self, every_bytes: int = TRIM_EVERY_BYTES) -> None:
        self.every_bytes = every_bytes
        self.trims = 0
        self._trim = _malloc_trim()
        self._released = 0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether this process's C library can trim (glibc)."""
        return self._trim is not None

    def released(self, nbytes: int) -> None:
        """Count ``nbytes`` of host memory freed (cheap; safe under other locks)."""
        if self._trim is not None:
            with self._lock:
                self._released += nbytes

    def trim_if_due(self) -> bool:
        """Trim when ``every_bytes`` were released since the last trim; returns whether it trimmed.

        Takes the C allocator's arena locks: call it without holding other locks.
        """
        with self._lock:
            if self._trim is None or self._released < self.every_bytes:
                return False
            self._released = 0
        self.trim()
        return True

    def trim(self) -> None:
        """Hand the C allocator's free pages back to the OS now."""
        if self._trim is not None:
            self._trim(0)
            with self._lock:
                self.trims += 1
