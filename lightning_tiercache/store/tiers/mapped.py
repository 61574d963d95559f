"""Host buffers that leave the process when freed: what the disk tier reads lands in mappings of its own.

Note: [reads that leave the process]
    A tensor read back from disk is freed by backward (the main thread), but under glibc its bytes would
    come from the heap of the I/O thread that read it, and a heap keeps what is freed: the reloads of one
    step stayed resident beside backward's own temporaries. Buffers of at least :data:`MAPPED_MIN_BYTES`
    are therefore anonymous mappings of their own (``mmap``), seen as a tensor through
    ``torch.frombuffer``, which keeps the mapping alive for as long as the tensor's storage lives: every view
    (the reloaded tensor, autograd's views of it, numpy views) holds it, and the mapping is unmapped when the
    last one dies, never before. Transparent huge pages are asked for (``MADV_HUGEPAGE``), so a fresh 2 MiB
    page costs one page fault instead of 512 where the kernel has them. The process's allocator settings
    (``mallopt``) are left as they are.
"""

from __future__ import annotations

import mmap

import torch

__all__ = ["MAPPED_MIN_BYTES", "fresh_bytes"]

#: Buffers from this size on are mappings of their own; smaller ones come from the C allocator.
MAPPED_MIN_BYTES = 1 << 20
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_HUGE = getattr(mmap, "MADV_HUGEPAGE", None)


def fresh_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uninitialized host memory as a flat ``uint8`` tensor (zeroed when it is a mapping).

    From :data:`MAPPED_MIN_BYTES` on (where the platform has anonymous mappings) the memory is a mapping of its
    own, returned to the OS when the last tensor viewing it dies (Note: [reads that leave the process]).
    """
    if nbytes < MAPPED_MIN_BYTES or not _FLAGS:
        return torch.empty(nbytes, dtype=torch.uint8)
    m = mmap.mmap(-1, nbytes, flags=_FLAGS)
    if _HUGE is not None:
        try:
            m.madvise(_HUGE)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages it is
            pass
    return torch.frombuffer(m, dtype=torch.uint8)
