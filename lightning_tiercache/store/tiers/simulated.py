"""A simulated asynchronous device for CPU: the store's CUDA state machine, run where there is no GPU.

:class:`SimulatedDevice` implements :class:`~lightning_tiercache.store.device_ops.DeviceOps` with "device"
tensors in RAM and copies that complete *later*: each direction is a stream, a named worker thread that runs
its queue in order, sleeping a random delay (seeded) before each copy. Events complete when their stream
reaches them. The compute stream is the calling thread itself (CPU kernels run synchronously), so waiting on
the compute stream blocks the caller.

What a real device would get wrong silently, this one makes visible:

* fresh "device" allocations and host buffers are filled with a poison byte, so reading one before its copy
  landed gives wrong values, not a lucky match;
* a copy whose device-side tensor was dropped before the copy ran is recorded in
  :attr:`SimulatedDevice.violations` (on CUDA the allocator could have reused that memory);
* a store worker thread that calls into the device without :meth:`~SimulatedDevice.bind_thread` is recorded
  too (on CUDA it would make a context on GPU 0);
* ``capacity_bytes`` bounds reload allocations like device memory: over it, ``alloc`` counts a cache flush
  and raises ``torch.OutOfMemoryError``; ``pinned_bytes`` bounds page-locked host memory the same way, failing
  as torch's pinned allocator does (``torch.AcceleratorError``, "CUDA error: out of memory");
* ``total_bytes`` models the device allocator the store derives its device budget from
  (:meth:`~SimulatedDevice.memory`): the device holds ``model_bytes`` (everything the store does not own: set
  it to grow the model after the store opened) plus what :meth:`~SimulatedDevice.alloc` handed out and is
  still alive. A device tensor a test puts is "allocated" only if it came from ``alloc``.

Used by the test suite (``device_ops=SimulatedDevice(seed=...)`` on a :class:`~lightning_tiercache.TierStore`);
it is not faster or slower than anything real, so benchmarks never use it.
"""

from __future__ import annotations

import collections
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable

import torch

from lightning_tiercache.store.tiers.device import DeviceEvent, DeviceMemory, DeviceOps

__all__ = ["POISON", "SimEvent", "SimulatedDevice"]

#: The byte fresh simulated allocations are filled with.
POISON = 0xA5
_WORKER_PREFIX = "tiercache-"


class SimEvent:
    """An event of the simulated device; :attr:`time_s` is when its stream reached it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.time_s: float | None = None

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def complete(self) -> None:
        self.time_s = time.perf_counter()
        self._done.set()


class _Stream:
    """One in-order queue of work, run by one named thread."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def enqueue(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            fn = self._work.get()
            if fn is None:
                return
            fn()


class SimulatedDevice(DeviceOps):
    """A device whose copies complete later, on worker threads, after random delays.

    Args:
        seed: seeds the delays; one seed gives one interleaving family (thread scheduling still varies).
        max_delay_s: each copy waits a uniform random delay in ``[0, max_delay_s]`` before it runs.
        capacity_bytes: device memory available to reloads (``None``: unbounded).
        pinned_bytes: page-locked host memory available (``None``: unbounded).
        total_bytes: the device's memory, for :meth:`memory` (``None``: no allocator, the device budget is the
            configured number, as on a CPU device).
        model_bytes: device memory held by others from the start (the model); the attribute may change later.
    """

    moves_bytes = True

    def __init__(
        self,
        *,
        seed: int = 0,
        max_delay_s: float = 2e-3,
        capacity_bytes: int | None = None,
        pinned_bytes: int | None = None,
        total_bytes: int | None = None,
        model_bytes: int = 0,
    ) -> None:
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s={max_delay_s!r} must be >= 0")
        super().__init__(torch.device("cpu"))
        self.max_delay_s = max_delay_s
        self.capacity_bytes = capacity_bytes
        self.pinned_limit = pinned_bytes
        self.total_bytes = total_bytes
        self.has_allocator = total_bytes is not None
        self.model_bytes = model_bytes
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._down = _Stream("tiercache-sim-down")
        self._up = _Stream("tiercache-sim-up")
        self.violations: list[str] = []
        self.bound_threads: set[str] = set()
        self.allocated_bytes = 0
        self.pinned_bytes = 0
        self.flushes = 0
        self.queued_download_bytes = 0
        self.peak_queued_download_bytes = 0
        self.counts: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ threads

    def bind_thread(self) -> None:
        self._local.bound = True
        with self._lock:
            self.bound_threads.add(threading.current_thread().name)

    def _check_thread(self, what: str) -> None:
        t = threading.current_thread()
        if t.name.startswith(_WORKER_PREFIX) and not getattr(self._local, "bound", False):
            self._violate(f"{what} from unbound worker thread {t.name}")

    def _violate(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)

    def _delay(self) -> float:
        with self._lock:
            return self._rng.uniform(0.0, self.max_delay_s)

    # ------------------------------------------------------------------ memory

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        self._check_thread("host_buffer")
        size = max(nbytes, 1)
        if pin:
            with self._lock:
                if self.pinned_limit is not None and self.pinned_bytes + size > self.pinned_limit:
                    self.counts["pinned_failures"] += 1
                    raise _pinned_oom()
                self.pinned_bytes += size
        buf = torch.empty(size, dtype=torch.uint8)
        _poison(buf)
        if pin:
            weakref.finalize(buf, self._unpin, size)
        return buf

    def _unpin(self, size: int) -> None:
        with self._lock:
            self.pinned_bytes -= size

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self._check_thread("alloc")
        nbytes = _nbytes(shape, dtype)
        with self._lock:
            free = self._free_locked()
            if free is not None and nbytes > free:
                self.flushes += 1  # CUDA's allocator releases its whole cache before it gives up
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (simulated): tried to allocate {nbytes} bytes with {free} free"
                )
            self.allocated_bytes += nbytes
            self.counts["allocs"] += 1
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            _poison(out.view(-1).view(torch.uint8))
        weakref.finalize(out, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated_bytes -= nbytes

    def can_allocate(self, nbytes: int) -> bool:
        with self._lock:
            free = self._free_locked()
            return free is None or nbytes <= free

    def _free_locked(self) -> int | None:
        """Bytes ``alloc`` may still hand out (``None``: unbounded)."""
        bounds = []
        if self.capacity_bytes is not None:
            bounds.append(self.capacity_bytes - self.allocated_bytes)
        if self.total_bytes is not None:
            bounds.append(self.total_bytes - self.model_bytes - self.allocated_bytes)
        return max(0, min(bounds)) if bounds else None

    def memory(self) -> DeviceMemory | None:
        if self.total_bytes is None:
            return None
        with self._lock:
            self.counts["memory_queries"] += 1
            free = max(0, self.total_bytes - self.model_bytes - self.allocated_bytes)
        return DeviceMemory(total=self.total_bytes, free=free)

    # ------------------------------------------------------------------ copies

    def download(self, src: torch.Tensor, ready: DeviceEvent | None, dst: torch.Tensor) -> DeviceEvent | None:
        self._check_thread("download")
        nbytes = src.numel() * src.element_size()
        with self._lock:
            self.queued_download_bytes += nbytes
            self.peak_queued_download_bytes = max(self.peak_queued_download_bytes, self.queued_download_bytes)
            self.counts["downloads"] += 1
        return self._queue(self._down, "download", src, dst, ready, nbytes)

    def upload(self, src: torch.Tensor, dst: torch.Tensor) -> DeviceEvent | None:
        self._check_thread("upload")
        with self._lock:
            self.counts["uploads"] += 1
        return self._queue(self._up, "upload", src, dst, None, 0)

    def _queue(
        self, stream: _Stream, what: str, src: torch.Tensor, dst: torch.Tensor, ready: DeviceEvent | None, queued: int
    ) -> SimEvent:
        # The device side is held weakly, as a GPU stream holds nothing: if the store lets it go before the copy
        # ran, the caching allocator could have handed its memory to other work. The host side is pool memory
        # whose reuse the poison bytes and the data checks catch.
        device_side = weakref.ref(src if what == "download" else dst)
        host_side = dst if what == "download" else src
        delay = self._delay()
        done = SimEvent()

        def run() -> None:
            if ready is not None:
                ready.synchronize()
            if delay:
                time.sleep(delay)
            dev = device_side()
            if dev is None:
                self._violate(f"{what} ran after its device tensor was released (its memory could be reused)")
            elif dev.numel():
                if what == "download":
                    host_side.copy_(dev)
                else:
                    dev.copy_(host_side)
            with self._lock:
                self.queued_download_bytes -= queued
            done.complete()

        stream.enqueue(run)
        return done

    def hand_over(self, tensor: torch.Tensor, event: DeviceEvent | None) -> torch.Tensor:
        self.wait(event)  # the compute stream is this thread: ordering it after the copy means waiting
        return tensor

    def compute_wait(self, event: DeviceEvent | None) -> None:
        self.wait(event)

    def ready(self, tensor: torch.Tensor) -> DeviceEvent | None:
        return None  # CPU kernels finished before the call returned

    def stamp(self) -> DeviceEvent | None:
        event = SimEvent()
        event.complete()  # the compute stream is the calling thread: it is here now
        return event

    def seconds_between(self, start: DeviceEvent, end: DeviceEvent) -> float | None:
        t0, t1 = getattr(start, "time_s", None), getattr(end, "time_s", None)
        return None if t0 is None or t1 is None else t1 - t0

    def close(self) -> None:
        self._down.close()
        self._up.close()


def _pinned_oom() -> torch.AcceleratorError:
    """What torch raises when ``cudaHostAlloc`` fails: c10's CUDA check turns ``cudaErrorMemoryAllocation`` (2)
    into an ``AcceleratorError`` whose message starts "CUDA error: out of memory" and whose ``error_code`` is 2."""
    err = torch.AcceleratorError(
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
        "so the stacktrace below might be incorrect. (simulated cudaHostAlloc)"
    )
    err.error_code = 2  # type: ignore[attr-defined]
    return err


def _poison(buf: torch.Tensor) -> None:
    # numpy's fill runs on this thread; torch's may wait for its intra-op pool on a busy machine.
    buf.numpy().fill(POISON)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
