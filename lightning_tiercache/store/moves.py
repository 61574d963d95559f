"""Moves between tiers: one object per direction owning its buffers, events and background jobs.

:class:`~lightning_tiercache.store.placement.TierStore` decides *what* moves *where* (placement, budgets,
accounting); the movers here carry the bytes and report back through two callbacks, ``landed`` (the entry now
lives in the destination) and ``failed`` (it stays where it was), both called with the store lock held.

* :class:`Download`: device -> host. A pinned pool buffer, a copy queued on the device's download stream, and a
  fence job that waits for the copy's event before the entry lands in the host tier.
* :class:`Upload`: host -> device. A device tensor allocated on the compute stream, a copy on the upload stream,
  and the pool buffer kept out of the pool until every upload that reads it has completed.
* :class:`Spill`: host or device <-> disk, on the I/O threads.
* :class:`Jobs`: the named thread pools and every job not yet finished (what :meth:`TierStore.settle` waits for).

The device itself is behind :class:`~lightning_tiercache.store.tiers.device.DeviceOps` (CUDA, the CPU RAM
budget, or the simulated asynchronous device the tests use), so the same state machine runs everywhere.

Note: [pool reuse]
    The host tier's bytes live in pool buffers. An upload from such a buffer is queued on the upload stream;
    the buffer goes back to the pool (where the next download may overwrite it) only after every upload that
    reads it has completed, tracked by ``Entry.reader`` and :meth:`Upload.recycle`.
Note: [release after copy]
    A download's source stays referenced by the entry until the fence job saw the copy's event, so the
    device memory it reads cannot be reused under the copy.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
import typing
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch

from lightning_tiercache.errors import SpillCorruptError, SpillError, SpillMissingError
from lightning_tiercache.store.codec import AutoCodec, encode_with
from lightning_tiercache.store.tiers import Tier
from lightning_tiercache.store.tiers.device import DeviceEvent, DeviceOps
from lightning_tiercache.store.tiers.host import PinnedPool

if TYPE_CHECKING:
    from lightning_tiercache.store.placement import Entry
    from lightning_tiercache.store.tiers.disk import SpillDir

__all__ = ["Download", "Jobs", "Spill", "Upload", "host_view"]

#: ``landed(entry, src, dst, data, buf, event)``: the move finished (store lock held).
Landed = Callable[["Entry", Tier, Tier, "torch.Tensor | None", "torch.Tensor | None", Any], None]
#: ``failed(entry, src, dst)``: the move did not happen; the entry stays in ``src`` (store lock held).
Failed = Callable[["Entry", Tier, Tier], None]


def host_view(buf: torch.Tensor, like: torch.Tensor | Entry) -> torch.Tensor:
    """The first bytes of pool buffer ``buf`` seen as a tensor of ``like``'s dtype and shape."""
    nbytes = like.nbytes
    if not nbytes:
        return torch.empty(like.shape, dtype=like.dtype)
    return buf[:nbytes].view(like.dtype).view(like.shape)


class Jobs:
    """The store's background threads, and every job submitted to them that has not finished yet.

    Args:
        io_threads: threads for disk reads and writes.
        bind: runs first in every worker thread (points it at the store's device).
    """

    def __init__(self, io_threads: int, bind: Callable[[], None]) -> None:
        self.io = cf.ThreadPoolExecutor(io_threads, thread_name_prefix="tiercache-io", initializer=bind)
        self.fence = cf.ThreadPoolExecutor(1, thread_name_prefix="tiercache-fence", initializer=bind)
        self._inflight: set[cf.Future[None]] = set()
        self._lock = threading.Lock()  # taken inside the store lock or alone, never the other way round

    def submit(self, pool: cf.ThreadPoolExecutor, fn: Callable[..., None], *args: Any) -> cf.Future[None]:
        """Run ``fn`` in ``pool`` and track it until it finished (for :meth:`settle`)."""
        fut = pool.submit(fn, *args)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._untrack)  # runs at once, here, if it already finished
        return fut

    def _untrack(self, fut: cf.Future[None]) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def settle(self, timeout_s: float | None = None) -> None:
        """Wait until no job is in flight (jobs that start meanwhile are waited for too).

        Raises:
            TimeoutError: jobs were still running after ``timeout_s``.
        """
        if not self._inflight:  # the common case at a batch boundary; a set's truth value reads atomically
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._inflight)
            if not pending:
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            _, not_done = cf.wait(pending, timeout=left)
            if not_done and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(not_done)} moves still in flight after {timeout_s}s")

    def wait_one(self) -> float | None:
        """Block until one job in flight finishes: the seconds waited, or ``None`` when none was in flight."""
        with self._lock:
            pending = list(self._inflight)
        if not pending:
            return None
        start = perf_counter()
        cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        return perf_counter() - start

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.fence.shutdown(wait=True, cancel_futures=True)


class _Mover:
    """What every direction shares: the device, the pool, the jobs and the store's lock and callbacks."""

    def __init__(
        self,
        ops: DeviceOps,
        pool: PinnedPool | None,
        jobs: Jobs,
        lock: threading.Lock,
        landed: Landed,
        failed: Failed,
        counts: Any,
    ) -> None:
        self.ops = ops
        self.pool = pool
        self.jobs = jobs
        self.lock = lock
        self.landed = landed
        self.failed = failed
        self.counts = counts

    def take(self, nbytes: int) -> torch.Tensor:
        """A host buffer of at least ``nbytes`` bytes: from the pool when there is one."""
        if self.pool is not None:
            return self.pool.take(nbytes)
        return self.ops.host_buffer(nbytes, pin=False)

    def give(self, buf: torch.Tensor | None) -> None:
        if buf is not None and self.pool is not None:
            self.pool.give(buf)


class Download(_Mover):
    """Device -> host: a pool buffer, a copy on the download stream, a fence job, then the entry lands.

    Note: [bounded in flight]
        Without a bound, a forward that produces activations faster than the link drains them keeps every
        source tensor alive until its copy finished: device memory is freed later than without offload.
        Past ``max_inflight_bytes`` the compute stream waits for the oldest copy (on CUDA a stream wait, not a
        host wait) and the entry drops its source: in compute-stream order that memory is free again.
    """

    def __init__(self, *args: Any, max_inflight_bytes: int) -> None:
        super().__init__(*args)
        self.max_inflight_bytes = max_inflight_bytes
        self._inflight: collections.OrderedDict[int, tuple[Entry, DeviceEvent | None]] = collections.OrderedDict()
        self.inflight_bytes = 0

    def start(self, e: Entry, src: Tier, dst: Tier, buf: torch.Tensor | None = None) -> cf.Future[None]:
        """Queue the copy of ``e`` (lock held) into ``buf`` (or a pool buffer); returns the job that lands it."""
        host, done, buf = self.copy_out(typing.cast(torch.Tensor, e.data), e.event, buf)
        self._inflight[e.id] = (e, done)
        self.inflight_bytes += e.nbytes
        while self.inflight_bytes > self.max_inflight_bytes and len(self._inflight) > 1:
            _, (old, event) = self._inflight.popitem(last=False)
            self.inflight_bytes -= old.nbytes
            if not self.ops.done(event):
                self.ops.compute_wait(event)
                self.counts["inflight_waits"] += 1
            old.data = None  # Note: [bounded in flight] the compute stream is past its copy
        return self.jobs.submit(self.jobs.fence, self._fence, e, src, dst, host, buf, done)

    def copy_out(
        self, data: torch.Tensor, ready: DeviceEvent | None, buf: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DeviceEvent | None, torch.Tensor]:
        """Queue a copy of device tensor ``data`` into ``buf`` or a pool buffer; returns the view, event, buffer."""
        buf = buf if buf is not None else self.take(data.nbytes)
        host = host_view(buf, data)
        return host, self.ops.download(data, ready, host), buf

    def _fence(
        self, e: Entry, src: Tier, dst: Tier, host: torch.Tensor, buf: torch.Tensor, done: DeviceEvent | None
    ) -> None:
        self.ops.wait(done)
        with self.lock:
            if self._inflight.pop(e.id, None) is not None:
                self.inflight_bytes -= e.nbytes
            self.counts["bytes_to_host"] += e.nbytes
            self.landed(e, src, dst, host, buf, None)


class Upload(_Mover):
    """Host -> device: an allocation on the compute stream, a copy on the upload stream, a recycled buffer."""

    def copy_in(self, host: torch.Tensor) -> tuple[torch.Tensor, DeviceEvent | None]:
        """Queue a copy of ``host`` to the device; returns the device tensor and the copy's event."""
        dev = self.ops.alloc(tuple(host.shape), host.dtype)
        return dev, self.ops.upload(host, dev)

    def start(self, e: Entry, src: Tier, dst: Tier, dev: torch.Tensor) -> None:
        """Bring host entry ``e`` into device tensor ``dev`` (lock held); it lands at once, its copy queued."""
        done = self.ops.upload(typing.cast(torch.Tensor, e.data), dev)
        self.counts["bytes_to_device"] += e.nbytes
        old_buf, reader, e.buf, e.reader = e.buf, e.reader, None, None
        self.landed(e, src, dst, dev, None, done)
        if old_buf is not None:  # Note: [pool reuse] after this copy and any earlier upload read it
            self.recycle(old_buf, done, reader)

    def recycle(self, buf: torch.Tensor, *readers: DeviceEvent | None) -> None:
        """Give ``buf`` back to the pool once every copy in ``readers`` that reads it completed."""
        if self.pool is None:
            return
        if all(self.ops.done(r) for r in readers):
            self.pool.give(buf)
        else:
            self.jobs.submit(self.jobs.fence, self._recycle_job, buf, readers)

    def _recycle_job(self, buf: torch.Tensor, readers: tuple[DeviceEvent | None, ...]) -> None:
        for event in readers:
            self.ops.wait(event)
        self.give(buf)


class Spill(_Mover):
    """Host or device <-> disk on the I/O threads: encode and write a record, read and verify it back.

    Args:
        download: copies a device-tier entry to host memory before it is encoded.
        upload: copies a read record to the device when it goes straight back there.
        ensure_dir: the store's spill folder (made on first use; called with the lock held).
        spill_dir: the store's spill folder, ``None`` before the first spill.
        auto: the measuring codec picker, for ``codec="auto"``.
        codec, zstd_level: the configured codec and its level.
        busy_s: per-operation busy seconds, added under the lock.
        disk_failed: ``disk_failed(entry, src, err)`` after a write failed (lock held).
        spill_lost: ``spill_lost(entry, dst, err)`` after a read found the record missing or corrupt (lock held).
        moved: ``moved(entry)`` after a write landed and this thread let go of the bytes, or after a read
            landed (lock not held): where RAM freed meanwhile can be handed back to the OS.
    """

    def __init__(
        self,
        base: _Mover,
        *,
        download: Download,
        upload: Upload,
        ensure_dir: Callable[[], SpillDir],
        spill_dir: Callable[[], SpillDir | None],
        auto: AutoCodec,
        codec: str,
        zstd_level: int,
        busy_s: Any,
        disk_failed: Callable[[Entry, Tier, OSError], None],
        spill_lost: Callable[[Entry, Tier | None, SpillError], None],
        moved: Callable[[Entry], None] | None = None,
    ) -> None:
        super().__init__(base.ops, base.pool, base.jobs, base.lock, base.landed, base.failed, base.counts)
        self._download = download
        self._upload = upload
        self._ensure_dir = ensure_dir
        self._dir = spill_dir
        self._auto = auto
        self._codec = codec
        self._level = zstd_level
        self._busy_s = busy_s
        self._disk_failed = disk_failed
        self._spill_lost = spill_lost
        self._moved = moved

    def write(self, e: Entry, src: Tier) -> cf.Future[None]:
        """Start writing ``e`` from ``src`` to disk (lock held)."""
        return self.jobs.submit(self.jobs.io, self._write_job, e, src)

    def read(self, e: Entry, dst: Tier) -> cf.Future[None]:
        """Start reading ``e`` back from disk into ``dst`` (lock held)."""
        return self.jobs.submit(self.jobs.io, self._read_job, e, dst)

    def _write_job(self, e: Entry, src: Tier) -> None:
        try:
            self._write(e, src)
        except BaseException:
            with self.lock:
                if e.move is not None:
                    self.counts["disk_errors"] += 1
                    self.failed(e, src, Tier.DISK)
            raise

    def _write(self, e: Entry, src: Tier) -> None:
        with self.lock:
            if e.freed:  # freed while its write was queued: nothing needs these bytes any more
                self.counts["writes_skipped"] += 1
                self.landed(e, src, Tier.DISK, None, None, None)
                return
        data = typing.cast(torch.Tensor, e.data)
        buf: torch.Tensor | None = None
        if src is Tier.DEVICE and self.ops.moves_bytes:
            host, done, buf = self._download.copy_out(data, e.event)
            self.ops.wait(done)
        else:
            host = data
        try:
            with self.lock:
                folder = self._ensure_dir()
            start = perf_counter()
            if self._codec == "auto":
                codec, parts, aux = self._auto.encode(host)
            else:
                codec, parts, aux = encode_with(self._codec, host, self._level)
            encoded = perf_counter()
            written = folder.write(e.id, codec, host, parts, aux)
            seconds = perf_counter() - start
            self._auto.observe_disk(written, seconds - (encoded - start))
        except OSError as err:
            with self.lock:
                self._disk_failed(e, src, err)
            return
        finally:
            self.give(buf)
        with self.lock:
            self.counts["spills"] += 1
            self.counts["spill_bytes"] += e.nbytes
            self.counts["spill_file_bytes"] += written
            self._busy_s["write"] += seconds
            self.landed(e, src, Tier.DISK, None, None, None)
        if self._moved is not None:
            del data, host, parts  # the last references this thread holds to the written bytes
            self._moved(e)

    def _read_job(self, e: Entry, dst: Tier) -> None:
        try:
            self._read(e, dst)
        except SpillError:
            raise
        except BaseException:
            with self.lock:
                if e.move is not None:
                    self.failed(e, Tier.DISK, dst)
            raise

    def _read(self, e: Entry, dst: Tier) -> None:
        start = perf_counter()
        try:
            host = self._read_record(e)
        except SpillError as err:
            with self.lock:
                self.failed(e, Tier.DISK, dst)
                self._spill_lost(e, dst, err)
            raise
        seconds = perf_counter() - start
        event: DeviceEvent | None = None
        buf = None
        if dst is Tier.DEVICE and self.ops.moves_bytes:
            host, event = self._upload.copy_in(host)
        elif self.pool is not None and host.numel() and e.top is Tier.DEVICE:
            buf = self.pool.take(e.nbytes)
            pinned = host_view(buf, host)
            pinned.copy_(host)
            host = pinned
        with self.lock:
            self.counts["reads"] += 1
            self.counts["read_bytes"] += e.nbytes
            self.counts["bytes_to_device"] += e.nbytes if event is not None else 0
            self._busy_s["read"] += seconds
            self.landed(e, Tier.DISK, dst, host, buf, event)
        if self._moved is not None:
            self._moved(e)

    def _read_record(self, e: Entry) -> torch.Tensor:
        folder = self._dir()
        if folder is None:
            raise SpillMissingError(f"entry {e.id}: no spill folder holds its record")
        return folder.read(e.id)

    def read_through(self, e: Entry) -> torch.Tensor:
        """Read a spilled entry that no tier above can hold (pinned by the caller, lock not held).

        Raises:
            SpillError: the record is missing or corrupt (the entry is removed).
        """
        start = perf_counter()
        try:
            data = self._read_record(e)
        except SpillError as err:
            with self.lock:
                self._spill_lost(e, None, err)
            raise
        with self.lock:
            self.counts["gets"] += 1
            self.counts["reads"] += 1
            self.counts["read_bytes"] += e.nbytes
            self._busy_s["read"] += perf_counter() - start
        return data


def spill_error_kind(err: SpillError) -> str:
    """The counter a lost record adds to: ``corrupt`` or ``missing``."""
    return "corrupt" if isinstance(err, SpillCorruptError) else "missing"
