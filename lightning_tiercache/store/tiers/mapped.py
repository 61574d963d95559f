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

Note: [reads from the page cache]
    A record just written sits in the page cache. Reading it into fresh memory costs the kernel zeroing each
    new page and then copying the file into it: on a 2-core VM that took 0.65-0.74 s of the compute thread's
    time per GB moved, against 0.03-0.05 s for mapping the file itself (``bench``-style probe: a GEMM loop
    beside an I/O thread, 2026-12-02). :func:`file_bytes` therefore maps a record of at least
    :data:`MAPPED_MIN_BYTES` privately (copy on write: a write to the tensor copies that page and never
    reaches the file). ``MAP_POPULATE`` is not used: on a private writable mapping it write-faults every
    page, which is the copy again. The checksum pass that follows touches every page, so the pages are
    mapped before the tensor is handed out. The mapping keeps the file's bytes alive after the store
    unlinks or renames it, and leaves the process with the last view, like :func:`fresh_bytes`. The store
    overwrites a record file only once no tensor maps its old record (Note: [recycled record files] in
    :mod:`lightning_tiercache.store.tiers.disk`). A record file truncated by another process while mapped
    would raise ``SIGBUS`` instead of a typed error; only this user can do that, in the private (0700) spill
    folder.
"""

from __future__ import annotations

import mmap

import torch

__all__ = ["MAPPED_MIN_BYTES", "file_bytes", "fresh_bytes"]

#: Buffers from this size on are mappings of their own; smaller ones come from the C allocator.
MAPPED_MIN_BYTES = 1 << 20
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_HUGE = getattr(mmap, "MADV_HUGEPAGE", None)
#: Whether :func:`file_bytes` can map files here (POSIX private mappings).
MAPS_FILES = hasattr(mmap, "MAP_PRIVATE")


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


def file_bytes(fd: int, nbytes: int) -> tuple[torch.Tensor, mmap.mmap]:
    """The first ``nbytes`` of the open file ``fd`` as a flat ``uint8`` tensor over a private mapping, and the
    mapping (alive while any view of the tensor is).

    Writes to the tensor copy the page they touch and never reach the file (Note: [reads from the page
    cache]). The caller may close ``fd`` at once; the mapping lives as long as the last tensor viewing it.

    Raises:
        OSError: the file cannot be mapped (for example a file system without mappings); read it instead.
    """
    m = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(m, dtype=torch.uint8), m
