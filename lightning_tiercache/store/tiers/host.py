"""The host tier's memory: on CUDA a pool of pinned buffers, reused by exact or near size."""

from __future__ import annotations

import bisect
import ctypes
import functools
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_tiercache.errors import PinnedMemoryError

__all__ = ["PinnedPool", "cuda_error_clearer", "is_pin_oom", "pinned_empty", "torch_pinned"]

log = logging.getLogger(__name__)


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown or CUDA already torn down: the OS reclaims it anyway
        log.debug("cudaHostUnregister(%#x) failed", ptr)


@functools.cache
def cuda_error_clearer() -> Callable[[], Any] | None:
    """``cudaGetLastError`` of the CUDA runtime this process uses, or ``None`` if it cannot be reached.

    Looked up once: in torch's ``cudart`` bindings if they offer it, else in the ``libcudart`` shared library
    already mapped into the process (the same runtime instance torch calls).
    """
    found: Callable[[], Any] | None = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if found is not None:
        return found
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in dict.fromkeys(line.rsplit(" ", 1)[-1] for line in maps.splitlines() if "libcudart.so" in line):
        try:
            return ctypes.CDLL(path).cudaGetLastError
        except (OSError, AttributeError):
            continue
    return None


def torch_pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked memory from PyTorch's caching host allocator (rounded up to a power of two).

    Raises:
        PinnedMemoryError: the allocator could not pin that much (Note: [pinned memory is not a device OOM]
            in :mod:`lightning_tiercache.oom.recovery`).
    """
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as err:
        if not is_pin_oom(err):
            raise
        raise PinnedMemoryError(f"could not pin {nbytes} bytes of host memory: {str(err).splitlines()[0]}") from err


def is_pin_oom(err: BaseException) -> bool:
    """Whether ``err``, raised by a pinned host allocation, says the memory was not there.

    torch's caching host allocator checks ``cudaHostAlloc`` (or ``cudaHostRegister``) with c10's CUDA check,
    which raises ``torch.AcceleratorError`` "CUDA error: out of memory" with ``error_code`` 2
    (``cudaErrorMemoryAllocation``).
    """
    return isinstance(err, PinnedMemoryError) or (
        isinstance(err, RuntimeError) and (getattr(err, "error_code", None) == 2 or "out of memory" in str(err))
    )


def pinned_empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked memory, exactly.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds each
    request up to a power of two and keeps freed blocks pinned; registering an ordinary allocation with
    ``cudaHostRegister`` pins exactly what was asked and unpins it when the buffer is collected. Falls back
    to PyTorch's allocator where registration fails, or where a failure could not be cleared.

    Note: [stale CUDA error]
        A failed ``cudaHostRegister`` stays the calling thread's last CUDA error; the next kernel launch
        check reads it and raises it as that kernel's error. So registration is tried only where
        ``cudaGetLastError`` can be reached to clear it (:func:`cuda_error_clearer`).
    """
    clear = cuda_error_clearer()
    if clear is not None:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            ok = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0
        except Exception:
            ok = False
        if ok:
            weakref.finalize(buf, _unregister, buf.data_ptr())
            return buf
        clear()
    return torch_pinned(nbytes)


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return pinned_empty(nbytes) if pin else torch.empty(nbytes, dtype=torch.uint8)


class PinnedPool:
    """Reuses pinned ``uint8`` buffers. A request takes the smallest cached buffer that is at least its size
    and at most ``slack`` times it; otherwise it allocates exactly what was asked (no power-of-two rounding).
    Cached (idle) bytes are kept under ``max_idle_bytes``, smallest buffers released first. Pinned buffers
    are registered with ``cudaHostRegister`` (exact sizes), falling back to PyTorch's pinned allocator.

    Args:
        max_idle_bytes: most bytes kept idle for reuse.
        slack: a cached buffer up to this many times a request's size may serve it.
        pin: page-locked buffers (else pageable ones: the bookkeeping alone).
        allocate: ``allocate(nbytes, pin)`` makes a fresh buffer (the device seam's ``host_buffer``).
    """

    def __init__(
        self,
        max_idle_bytes: int,
        slack: float = 1.25,
        pin: bool = True,
        allocate: Callable[[int, bool], torch.Tensor] | None = None,
    ) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._slack = slack
        self._pin = pin
        self._allocate = allocate or _host_buffer
        self._lock = threading.Lock()
        self._sizes: list[int] = []  # sorted sizes of idle buffers (with repeats)
        self._idle: dict[int, list[torch.Tensor]] = {}
        self.idle_bytes = 0
        self.allocated = 0
        self.reused = 0
        self.pin_failures = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes; slice it to the size you need."""
        with self._lock:
            i = bisect.bisect_left(self._sizes, nbytes)
            if i < len(self._sizes) and self._sizes[i] <= max(nbytes * self._slack, nbytes + 4096):
                size = self._sizes.pop(i)
                self.idle_bytes -= size
                self.reused += 1
                return self._idle[size].pop()
            self.allocated += 1
        try:
            return self._allocate(max(nbytes, 1), self._pin)
        except RuntimeError as err:  # Note: [pinned memory is not a device OOM]: fall back to pageable memory
            if not self._pin:  # any failure to pin: a pageable buffer still works, only slower
                raise
            self.pin_failures += 1
            if self.pin_failures == 1:
                warnings.warn(
                    f"tiercache: could not pin {nbytes} bytes of host memory ({err}); using pageable memory "
                    "for host-tier buffers that cannot be pinned (slower copies). Raise the locked-memory limit "
                    "(ulimit -l) or lower host_bytes",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self._allocate(max(nbytes, 1), False)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`take`. Callers must have finished every copy that reads it."""
        size = buf.numel()
        with self._lock:
            if size > self.max_idle_bytes:
                return
            while self.idle_bytes + size > self.max_idle_bytes and self._sizes:
                drop = self._sizes.pop(0)
                self._idle[drop].pop()
                self.idle_bytes -= drop
            bisect.insort(self._sizes, size)
            self._idle.setdefault(size, []).append(buf)
            self.idle_bytes += size

    def clear(self) -> None:
        with self._lock:
            self._sizes.clear()
            self._idle.clear()
            self.idle_bytes = 0
