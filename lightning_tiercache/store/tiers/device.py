"""The device seam of the store: how bytes move between device memory and host memory, and when they are there.

The movers (:mod:`lightning_tiercache.store.moves`) own buffers, events and jobs; they ask a
:class:`DeviceOps` to queue copies, allocate, and wait. Three devices implement it:

* :class:`DeviceOps` itself: a CPU whose "device" tier is a RAM budget. Device and host memory are the same,
  so a move between those tiers is bookkeeping (``moves_bytes`` is ``False``) and nothing is queued.
* :class:`CudaOps`: side streams for each direction, blocking events, allocations on the compute stream.
* :class:`~lightning_tiercache.store.simulated.SimulatedDevice`: copies that complete later on worker threads
  with random delays, so CPU CI runs the same asynchronous state machine as CUDA.

The contract every implementation keeps (the movers rely on it):

* ``download(src, ready, dst)`` and ``upload(src, dst)`` return at once; the copy has happened only once the
  returned event completed. Until then ``src`` must stay alive and ``dst`` must not be read or reused.
* ``hand_over(event)`` orders the compute stream (the caller's work) after ``event``; ``compute_wait`` does the
  same for backpressure. Neither blocks the host on CUDA.
* ``wait(event)`` blocks the calling host thread, sleeping (never spinning) until ``event`` completed.
* ``bind_thread()`` runs first in every worker thread that calls into the device.
* ``memory()`` is cheap but not free (a driver call on CUDA): the store asks it at decision points, not per put
  (Note: [device budget from the allocator] in :mod:`lightning_tiercache.store.budgets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

__all__ = ["CudaOps", "DeviceEvent", "DeviceMemory", "DeviceOps", "cuda_event", "make_ops"]


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceMemory:
    """The device allocator's state, as the device budget is derived from it.

    Attributes:
        total: the device's memory.
        free: memory the driver has not handed to anyone (``cudaMemGetInfo``).
        cached: memory the allocator holds but no tensor uses (reserved minus allocated): new tensors reuse it.
    """

    total: int
    free: int
    cached: int = 0


class DeviceEvent(Protocol):
    """What the movers need of an event: ``torch.cuda.Event`` has it."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DeviceOps:
    """A CPU device: its memory is the host's, so moves between the device and host tiers copy nothing.

    Args:
        device: the device whose memory the device tier stands for.
    """

    #: Whether device and host tiers are distinct memories (a move between them copies bytes).
    moves_bytes = False
    #: Whether :meth:`memory` reports an allocator the device budget is derived from.
    has_allocator = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def bind_thread(self) -> None:
        """Make the calling worker thread use :attr:`device` (initializer of the store's thread pools)."""

    def ready(self, tensor: torch.Tensor) -> DeviceEvent | None:
        """An event on the compute stream after the work that produced ``tensor`` (``None``: already done)."""
        return None

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        """``nbytes`` of fresh host memory as ``uint8``, page-locked when ``pin``."""
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def download(self, src: torch.Tensor, ready: DeviceEvent | None, dst: torch.Tensor) -> DeviceEvent | None:
        """Queue ``dst.copy_(src)`` (device to host) after ``ready``; returns the copy's event."""
        dst.copy_(src)
        return None

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized device tensor, allocated on the compute stream."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def can_allocate(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit without making the allocator release its caches (speculative work asks)."""
        return True

    def upload(self, src: torch.Tensor, dst: torch.Tensor) -> DeviceEvent | None:
        """Queue ``dst.copy_(src)`` (host to device, ``dst`` from :meth:`alloc`); returns the copy's event."""
        dst.copy_(src)
        return None

    def wait(self, event: DeviceEvent | None) -> None:
        """Block the calling thread until ``event`` completed."""
        if event is not None:
            event.synchronize()

    def done(self, event: DeviceEvent | None) -> bool:
        """Whether ``event`` completed (``None`` always has)."""
        return event is None or event.query()

    def hand_over(self, tensor: torch.Tensor, event: DeviceEvent | None) -> torch.Tensor:
        """Make ``tensor`` (written by a copy that ends with ``event``) safe to use from the caller's stream."""
        return tensor

    def compute_wait(self, event: DeviceEvent | None) -> None:
        """Order the compute stream after ``event`` without blocking the host (backpressure)."""

    def stamp(self) -> DeviceEvent | None:
        """A timing event recorded on the compute stream now (``None``: the host clock is the device's)."""
        return None

    def seconds_between(self, start: DeviceEvent, end: DeviceEvent) -> float | None:
        """Device time from ``start`` to ``end`` (two :meth:`stamp` events); ``None`` until both completed."""
        return None

    def memory(self) -> DeviceMemory | None:
        """The allocator's state now; ``None`` where the device tier is a plain byte budget (a CPU device)."""
        return None

    def close(self) -> None:
        """Release what the device holds (streams, threads)."""


def cuda_event(timing: bool = False) -> Any:
    """A CUDA event a host thread can wait for without spinning a core (``blocking=True``).

    Note: [blocking events]
        ``torch.cuda.Event()`` defaults to ``blocking=False``: ``synchronize()`` then busy-waits, and each
        worker thread waiting on a copy burns a core for as long as the copy takes.
    """
    return torch.cuda.Event(enable_timing=timing, blocking=True)


class CudaOps(DeviceOps):
    """One CUDA device: a download stream, an upload stream, and the caller's stream as the compute stream.

    Note: [stream lifetimes]
        A tensor handed to the store was produced on the compute stream, possibly by kernels still queued.
        :meth:`ready` records an event there; the download stream waits for it, and the source tensor stays
        referenced until the copy's event completed (or the compute stream was made to wait for it), so the
        caching allocator cannot give its memory to another kernel mid-copy. A reload is allocated on the
        compute stream (its block belongs to the stream that reads it); the upload stream waits for the point
        of allocation, copies, and the compute stream waits for the copy in :meth:`hand_over`. A reload
        dropped before it was handed over gets :meth:`compute_wait` first, so the compute stream cannot reuse
        its block under the copy.
    """

    moves_bytes = True
    has_allocator = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        with torch.cuda.device(device):
            self._down = torch.cuda.Stream(device=device)
            self._up = torch.cuda.Stream(device=device)

    def bind_thread(self) -> None:
        # Note: [worker device] without this, a worker's first CUDA call makes a context on GPU 0.
        torch.cuda.set_device(self.device)

    def ready(self, tensor: torch.Tensor) -> DeviceEvent | None:
        if not tensor.is_cuda:
            return None
        event = cuda_event()
        event.record(torch.cuda.current_stream(tensor.device))
        return event

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        from lightning_tiercache.store.tiers.host import pinned_empty

        return pinned_empty(nbytes) if pin else super().host_buffer(nbytes, pin)

    def download(self, src: torch.Tensor, ready: DeviceEvent | None, dst: torch.Tensor) -> DeviceEvent | None:
        with torch.cuda.stream(self._down):
            if ready is not None:
                self._down.wait_event(ready)  # type: ignore[arg-type]
            if src.numel():
                dst.copy_(src, non_blocking=True)
            done = cuda_event()
            done.record(self._down)
        return done

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def can_allocate(self, nbytes: int) -> bool:
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if cached >= nbytes:
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return bool(free >= nbytes)

    def memory(self) -> DeviceMemory | None:
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)  # one read for both (each accessor reads them all)
        cached = stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)
        return DeviceMemory(total=int(total), free=int(free), cached=max(0, int(cached)))

    def upload(self, src: torch.Tensor, dst: torch.Tensor) -> DeviceEvent | None:
        alloc_point = cuda_event()
        alloc_point.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._up):
            self._up.wait_event(alloc_point)
            if src.numel():
                dst.copy_(src, non_blocking=src.is_pinned())
            done = cuda_event()
            done.record(self._up)
        return done

    def hand_over(self, tensor: torch.Tensor, event: DeviceEvent | None) -> torch.Tensor:
        if event is not None and tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).wait_event(event)  # type: ignore[arg-type]
        return tensor

    def compute_wait(self, event: DeviceEvent | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)  # type: ignore[arg-type]

    def stamp(self) -> DeviceEvent | None:
        event = cuda_event(timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds_between(self, start: DeviceEvent, end: DeviceEvent) -> float | None:
        if not (start.query() and end.query()):
            return None
        return float(start.elapsed_time(end)) / 1000.0  # type: ignore[attr-defined]


def make_ops(device: torch.device) -> DeviceOps:
    """The device seam for ``device``: :class:`CudaOps` on CUDA, the RAM-budget CPU device otherwise."""
    return CudaOps(device) if device.type == "cuda" else DeviceOps(device)
