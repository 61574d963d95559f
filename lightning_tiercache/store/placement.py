"""TierStore: one tensor store over device memory, host memory and disk: placement, budgets and accounting.

An entry lives in exactly one tier once its moves settle. New entries land in the highest tier allowed;
a tier over budget asks its policy for victims and moves them one tier down (skipping tiers with a zero
budget). ``get`` brings an entry back to the top tier; ``prefetch`` starts that early. *Required* entries
are never dropped; *cache* entries are dropped when nothing below has room.

Concurrency: one lock guards the entry table, budgets and policies, and is never held while bytes move.
The bytes are carried by the movers of :mod:`lightning_tiercache.store.moves`, one per direction, each owning
its buffers, events and jobs, through the device seam of :mod:`lightning_tiercache.store.tiers.device` (CUDA,
a CPU RAM budget, or the simulated asynchronous device of the tests). Each entry has at most one move in
flight, and ``get`` waits only for that move.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import enum
import itertools
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from lightning_tiercache.config import TierConfig
from lightning_tiercache.errors import EntryEvictedError, EntryNotFoundError, SpillError, StoreClosedError
from lightning_tiercache.store.budgets import resolve_budgets
from lightning_tiercache.store.codec import AutoCodec
from lightning_tiercache.store.device_budget import DeviceBudget, derive_device_budget
from lightning_tiercache.store.moves import Download, Jobs, Spill, Upload, spill_error_kind
from lightning_tiercache.store.policy import EvictionPolicy, make_policy
from lightning_tiercache.store.tiers import Tier
from lightning_tiercache.store.tiers.device import DeviceEvent, DeviceOps, make_ops
from lightning_tiercache.store.tiers.disk import DiskFullError, SpillDir
from lightning_tiercache.store.tiers.host import PinnedPool
from lightning_tiercache.store.tiers.trim import TRIM_EVERY_BYTES, Trimmer

__all__ = ["Entry", "Handle", "Kind", "Tier", "TierStore"]

log = logging.getLogger(__name__)
_TIERS = (Tier.DEVICE, Tier.HOST, Tier.DISK)
_store_ids = itertools.count(1)


class Kind(str, enum.Enum):
    """Whether an entry must come back (``REQUIRED``) or may be dropped under pressure (``CACHE``)."""

    REQUIRED = "required"
    CACHE = "cache"


@dataclasses.dataclass(frozen=True, slots=True)
class Handle:
    """Names one entry of one store. Cheap to copy and hash; holds no tensor."""

    id: int
    nbytes: int
    kind: Kind
    store: int


@dataclasses.dataclass(eq=False, slots=True)
class Entry:
    """One stored tensor: where it lives, its bytes there and its move in flight (guarded by the store lock)."""

    id: int
    kind: Kind
    key: str | None
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    top: Tier
    tier: Tier
    data: torch.Tensor | None = None
    buf: torch.Tensor | None = None  # pool buffer backing ``data`` in the host tier
    reader: DeviceEvent | None = None  # the last upload that reads ``buf`` (it goes back to the pool after it)
    event: DeviceEvent | None = None  # after which ``data`` is valid
    move: cf.Future[None] | None = None
    move_to: Tier | None = None
    pins: int = 0
    freed: bool = False
    dropped: bool = False
    no_disk: bool = False
    floor: Tier = Tier.DEVICE  # the highest tier pressure may move it down to (see ``put(evict_to=...)``)


class TierStore:
    """A thread-safe tiered tensor store. Use as a context manager or call :meth:`close`.

    Args:
        config: budgets, codec and policy; ``TierConfig()`` sizes everything from this machine.
        device_ops: the device seam (:mod:`lightning_tiercache.store.tiers.device`); ``None`` picks it for the
            configured device. The tests pass a ``SimulatedDevice``, whose ``device`` then replaces the config's.

    Example::

        with TierStore(TierConfig(device_bytes="1GiB", host_bytes="8GiB")) as store:
            h = store.put(t)
            store.prefetch([h])
            assert torch.equal(store.get(h), t)
            store.free(h)
    """

    def __init__(self, config: TierConfig | None = None, *, device_ops: DeviceOps | None = None) -> None:
        self.config = config or TierConfig()
        if device_ops is not None:
            self.device = device_ops.device
        elif self.config.device is not None:
            self.device = torch.device(self.config.device)
        else:
            self.device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else (torch.device("cpu"))
            )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._budget = resolve_budgets(self.config, self.device)
        self._own_ops = device_ops is None
        self._ops = ops = device_ops if device_ops is not None else make_ops(self.device)
        # Note: [device budget from the allocator] re-derived before the first decision, then when stale.
        cap = int(self.config.device_bytes) if self.config.device_bytes is not None else None
        self._device_budget = DeviceBudget(cap, derived=ops.has_allocator)
        pin = self.config.pin_memory if self.config.pin_memory is not None else ops.moves_bytes
        self._pool = (
            # Note: [pool across steps] idle buffers up to the host budget stay registered for the next step.
            PinnedPool(self._budget[Tier.HOST], pin=pin, allocate=ops.host_buffer) if ops.moves_bytes else None
        )
        self._spill: SpillDir | None = None
        self._lock = threading.Lock()
        self._id = next(_store_ids)
        self._ids = itertools.count(1)
        self._entries: dict[int, Entry] = {}
        self._keys: dict[str, int] = {}
        self._policies: dict[Tier, EvictionPolicy] = {t: make_policy(self.config.policy) for t in _TIERS}
        self._used = dict.fromkeys(_TIERS, 0)
        self._leaving = dict.fromkeys(_TIERS, 0)
        self._peak = dict.fromkeys(_TIERS, 0)  # since the store opened
        self._window_peak = dict.fromkeys(_TIERS, 0)  # since the last stats(reset_window=True)
        # Entries added to a tier already over its budget: past the one entry in flight that backpressure allows
        # (Note: [backpressure]); the summary names a tier over budget only then.
        self._added_over = dict.fromkeys(_TIERS, 0)
        self._counts: collections.Counter[str] = collections.Counter()
        self._busy_s: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._waits: collections.deque[float] = collections.deque(maxlen=4096)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=512)
        self._warned: set[str] = set()
        self._jobs = Jobs(self.config.io_threads, ops.bind_thread)
        args = (ops, self._pool, self._jobs, self._lock, self._landed, self._fail, self._counts)
        self._down = Download(*args, max_inflight_bytes=int(self.config.max_inflight_bytes))
        self._up = Upload(*args)
        self._disk = Spill(
            self._down, download=self._down, upload=self._up, ensure_dir=self._ensure_spill,
            spill_dir=lambda: self._spill, auto=AutoCodec(self.config.zstd_level), codec=self.config.codec,
            zstd_level=self.config.zstd_level, busy_s=self._busy_s, disk_failed=self._disk_failed,
            spill_lost=self._spill_lost, moved=self._spill_moved,
        )  # fmt: skip
        self._dropped_ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._closed = False
        # Note: [memory that leaves the process]: trim after half the device budget was released (at most
        # TRIM_EVERY_BYTES), so the RAM a forward spills leaves about as fast as the budget fills.
        self._trimmer = Trimmer(max(1 << 20, min(TRIM_EVERY_BYTES, self._budget[Tier.DEVICE] // 2)))
        #: Per-store state of the parts built on this store (e.g. the offloader ``offload_activations(store)``
        #: reuses), living as long as the store; keys are the parts' own.
        self.attachments: dict[Any, Any] = {}

    # ------------------------------------------------------------------ public API

    @property
    def budgets(self) -> dict[Tier, int]:
        """Current byte budget of each tier (the device tier's derived from its allocator where it has one)."""
        self._refresh_device_budget_if_due()
        with self._lock:
            return dict(self._budget)

    def return_free_memory(self) -> bool:
        """On a CPU device, hand the RAM freed entries released back to the OS once enough piled up.

        Returns whether it trimmed. Note: [memory that leaves the process]
        (:mod:`lightning_tiercache.store.tiers.trim`).
        """
        return not self._ops.moves_bytes and self._trimmer.trim_if_due()

    def room(self, tier: Tier) -> int:
        """Bytes of ``tier``'s budget not in use now (negative when it is over budget)."""
        if tier is Tier.DEVICE:
            self._refresh_device_budget_if_due()
        with self._lock:
            return self._budget[tier] - self._used[tier]

    @property
    def device_ops(self) -> DeviceOps:
        """The device seam this store moves bytes through."""
        return self._ops

    @property
    def spill_path(self) -> Path | None:
        """This store's private spill folder, once something was spilled."""
        return self._spill.path if self._spill is not None else None

    def put(
        self,
        tensor: torch.Tensor,
        *,
        kind: Kind | str = Kind.REQUIRED,
        key: str | None = None,
        tier: Tier | None = None,
        evict_to: Tier | None = None,
    ) -> Handle:
        """Hand ``tensor`` to the store and return soon; moves happen in the background.

        The store keeps a reference to ``tensor`` while it stays in the device tier: do not change it in
        place afterwards. ``tier`` is the highest tier the entry may land in; ``evict_to`` the highest tier
        pressure may later move it down to (``Tier.DISK`` skips the host tier, which frees nothing where the
        device is the CPU). An entry with a ``key`` can be found with :meth:`lookup`; a new entry with the same
        key replaces the old one.

        Waits while the device or host tier is over its budget and moves out of it are in flight
        (Note: [backpressure]), so a tier holds at most its budget plus the entry being put.

        Raises:
            TypeError: ``tensor`` is not a tensor, or is not a dense (strided) tensor.
            ValueError: ``tensor`` is on a device this store does not serve.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put() takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TypeError(f"put() takes dense (strided) tensors, got layout {tensor.layout}")
        kind = Kind(kind)
        top = self._top_tier(tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        ready = self._ops.ready(tensor)
        self._refresh_device_budget_if_due()
        waited_s = 0.0
        while True:
            with self._lock:
                self._check_open()
                if not self._over_with_moves():
                    break
            waited = self._jobs.wait_one()
            if waited is None:
                break
            waited_s += waited
        # Note: [no allocation under the lock] a pool miss pins fresh memory (a driver call, milliseconds):
        # the buffer of a put bound for the host tier is taken before the lock.
        spare = self._pool.take(nbytes) if self._pool is not None and tier is Tier.HOST and top < tier else None
        with self._lock:
            self._check_open()
            if waited_s:
                self._counts["backpressure_waits"] += 1
                self._busy_s["backpressure"] += waited_s
            if key is not None and key in self._keys:
                self._free_locked(self._entries[self._keys[key]])
            e = Entry(
                next(self._ids), kind, key, nbytes, tensor.dtype, tuple(tensor.shape), tensor.device, top, top,
                data=tensor.detach(), event=ready, floor=evict_to if evict_to is not None else top,
            )  # fmt: skip
            self._entries[e.id] = e
            if key is not None:
                self._keys[key] = e.id
            self._add(e, top)
            self._policies[top].insert(e.id)
            self._counts["puts"] += 1
            self._counts["put_bytes"] += nbytes
            self._device_budget.put()
            target = self._landing(e, max(top, tier if tier is not None else top))
            try:
                if target != top:
                    try:
                        self._start_move(e, target, host_buf=spare if target is Tier.HOST else None)
                        spare = None if target is Tier.HOST else spare
                    except (torch.OutOfMemoryError, RuntimeError):
                        pass  # the copy's target could not be allocated: the entry stays where it was put
                self._enforce(top, exclude=e.id)
            except BaseException:
                self._free_locked(e)  # the caller gets no handle: nothing may stay behind
                raise
            finally:
                if spare is not None and self._pool is not None:
                    self._pool.give(spare)
            return Handle(e.id, nbytes, kind, self._id)

    def get(self, handle: Handle, *, place: bool = True) -> torch.Tensor:
        """The entry's tensor, on the device it was put from; blocks until it is there.

        ``place=False`` reads the entry through: the caller gets a copy on its device and the entry stays in
        the tier it is in (a reader that keeps data off the device, such as offloaded KV).

        Raises:
            EntryNotFoundError: the handle was freed or is not from this store.
            EntryEvictedError: a cache entry was dropped; recompute it.
            SpillError: its spill file is missing or corrupt (the entry is removed).
        """
        with self._lock:
            e = self._entry(handle)
            e.pins += 1  # nothing moves it down until it has been handed out
        waited = 0.0
        dev: torch.Tensor | None = None  # Note: [no allocation under the lock] made before taking it
        forced = False
        try:
            while True:
                alloc = False
                with self._lock:
                    e = self._entry(handle)
                    leaving = e.move_to is not None and e.move_to > e.tier
                    stays = e.move is None and (not place or self._promotion_target(e) is None)
                    upload = e.tier is not e.top and self._ops.moves_bytes
                    if e.data is not None and (e.tier == e.top or leaving or stays) and (dev is not None or not upload):
                        # Resident at the top, being moved down while its bytes are still valid, or in
                        # memory that no tier above has room for.
                        self._policies[e.tier].access(e.id)
                        self._counts["gets"] += 1
                        self._counts["hits" if not waited else "gets_after_wait"] += 1
                        data, event = e.data, e.event
                        if upload and dev is not None:
                            # Note: [pool reuse] upload now, while the entry is pinned, and keep the pool
                            # buffer out of the pool until this upload has read it.
                            data, event = dev, self._ops.upload(data, dev)
                            self._counts["bytes_to_device"] += e.nbytes
                            if e.buf is not None:
                                e.reader = event
                        break
                    target = self._promotion_target(e) if e.move is None and place else None
                    hold = target is not None and not forced and self._over_with_moves()  # Note: [backpressure]
                    if hold:
                        pass
                    elif e.data is not None and upload and dev is None and (leaving or stays or target is Tier.DEVICE):
                        alloc = True
                    elif e.move is None and target is not None:
                        self._start_move(e, target, dev)
                        dev = None
                        continue
                    fut = e.move
                if hold:
                    held = self._jobs.wait_one()
                    waited += held or 0.0
                    forced = held is None  # nothing in flight after all: bring it up now
                    continue
                if alloc:
                    dev = self._ops.alloc(e.shape, e.dtype)
                    continue
                if fut is None:  # nothing above has room: read it through without placing it
                    if self._spill is None or e.tier is not Tier.DISK:
                        raise EntryNotFoundError(f"entry {e.id} has no bytes to read")
                    data, event = self._disk.read_through(e), None
                    if e.top is Tier.DEVICE and self._ops.moves_bytes:  # not in any pool
                        data, event = self._up.copy_in(data)
                    break
                start = perf_counter()
                cf.wait([fut])
                waited += perf_counter() - start
                err = fut.exception()
                if err is not None:
                    raise err
        finally:
            with self._lock:
                e.pins -= 1
                if not e.freed and not self._closed:
                    self._enforce(e.tier)
        if waited:
            with self._lock:
                self._counts["waits"] += 1
                self._busy_s["wait"] += waited
                self._waits.append(waited)
        return self._ops.hand_over(data, event)

    def prefetch(self, handles: Iterable[Handle]) -> None:
        """Start bringing entries back toward the top tier, in the given order. Unknown handles are skipped.

        Prefetch is speculative: an upload that would not fit the device's free memory without making the
        allocator release its caches is skipped (counted in ``prefetch_skipped``); ``get`` brings it later.
        A prefetch also never pushes a tier over its budget: an entry with no room above stays where it is until
        :meth:`get` asks for it.
        """
        with self._lock:
            self._check_open()
            todo: list[tuple[Entry, Tier]] = []
            for h in handles:
                e = self._entries.get(h.id) if h.store == self._id else None
                if e is None or e.move is not None or e.tier == e.top:
                    continue
                target = self._promotion_target(e, with_room=True)
                if target is not None:
                    todo.append((e, target))
        # Note: [no allocation under the lock] device tensors for the uploads are made first, outside it.
        devs: dict[int, torch.Tensor] = {}
        for e, target in todo:
            if self._needs_device_buffer(e, target):
                if not self._ops.can_allocate(e.nbytes):
                    continue
                try:
                    devs[e.id] = self._ops.alloc(e.shape, e.dtype)
                except (torch.OutOfMemoryError, RuntimeError):
                    continue
        with self._lock:
            for e, target in todo:
                if e.freed or e.move is not None or e.tier == e.top:
                    continue
                if self._promotion_target(e, with_room=True) is not target:
                    continue
                if self._needs_device_buffer(e, target) and e.id not in devs:
                    self._counts["prefetch_skipped"] += 1
                    continue
                self._counts["prefetches"] += 1
                try:
                    self._start_move(e, target, devs.get(e.id))
                except (torch.OutOfMemoryError, RuntimeError):  # best effort: get() will try again
                    log.debug("prefetch of entry %d failed; it stays in %s", e.id, e.tier.label)

    def _needs_device_buffer(self, e: Entry, dst: Tier) -> bool:
        """Whether moving ``e`` to ``dst`` uploads it from host memory (a device tensor is made first)."""
        return dst is Tier.DEVICE and e.tier is Tier.HOST and self._ops.moves_bytes

    def free(self, handle: Handle) -> None:
        """Forget an entry and release its bytes in every tier. Freeing twice is a no-op."""
        with self._lock:
            if self._closed or handle.store != self._id:
                return
            e = self._entries.get(handle.id)
            if e is not None:
                self._free_locked(e)

    def lookup(self, key: str) -> Handle | None:
        """The live entry stored under ``key``, or ``None``."""
        with self._lock:
            self._check_open()
            i = self._keys.get(key)
            if i is None:
                self._counts["lookup_misses"] += 1
                return None
            e = self._entries[i]
            self._counts["lookup_hits"] += 1
            return Handle(e.id, e.nbytes, e.kind, self._id)

    def where(self, handle: Handle) -> Tier:
        """The tier the entry settles in (its destination when a move is in flight)."""
        with self._lock:
            e = self._entry(handle)
            return e.move_to if e.move_to is not None else e.tier

    def pin(self, handle: Handle) -> None:
        """Keep an entry where it is until :meth:`unpin`; pins nest."""
        with self._lock:
            self._entry(handle).pins += 1

    def unpin(self, handle: Handle) -> None:
        with self._lock:
            e = self._entry(handle)
            e.pins = max(0, e.pins - 1)
            self._enforce(e.tier)

    def touch(self, handles: Iterable[Handle]) -> None:
        """Mark entries as used now (in order), without moving them."""
        with self._lock:
            for h in handles:
                e = self._entries.get(h.id) if h.store == self._id else None
                if e is not None:
                    self._policies[e.tier].access(e.id)

    def demote(self, tier: Tier = Tier.DEVICE, nbytes: int | None = None, wait: bool = True) -> int:
        """Move entries out of ``tier`` until ``nbytes`` left it (all unpinned ones if ``None``).

        Returns the bytes scheduled to leave. With ``wait`` the call returns once they left.
        """
        with self._lock:
            self._check_open()
            before = self._used[tier] - self._leaving[tier]
            target = 0 if nbytes is None else max(0, before - nbytes)
            self._enforce(tier, budget=target)
            moved = before - (self._used[tier] - self._leaving[tier])
            self._counts["demote_calls"] += 1
            self._device_budget.invalidate()
        if wait:
            self.settle()
        return moved

    def resize(self, tier: Tier, nbytes: int | str) -> None:
        """Change a tier's budget; a smaller budget moves entries down at once."""
        from lightning_tiercache.config import parse_bytes

        value = parse_bytes(nbytes, f"{tier.label}_bytes")
        with self._lock:
            self._check_open()
            self._budget[tier] = value
            if tier is Tier.DEVICE:  # the new cap; the allocator may allow less (next decision)
                self._device_budget.cap = value
                self._device_budget.invalidate()
            if tier is Tier.HOST and self._pool is not None:
                self._pool.max_idle_bytes = value  # Note: [pool across steps]
            self._enforce(tier)

    def clear_cache(self) -> int:
        """Drop every *cache* entry. Returns the bytes released."""
        with self._lock:
            victims = [e for e in self._entries.values() if e.kind is Kind.CACHE]
            for e in victims:
                self._free_locked(e, dropped=True)
            return sum(e.nbytes for e in victims)

    def settle(self, timeout_s: float | None = None) -> None:
        """Wait until no move is in flight (moves that start meanwhile are waited for too).

        Raises:
            TimeoutError: moves were still in flight after ``timeout_s``.
        """
        self._jobs.settle(timeout_s)
        self._device_budget.invalidate()  # a batch boundary: others' device memory may have changed

    def stats(self, reset_window: bool = False) -> dict[str, Any]:
        """A snapshot of counters: per-tier bytes/entries/budget/peaks, traffic, waits and failures.

        Per tier, ``peak_bytes`` is the highest use since the store opened, and ``window_peak_bytes`` the
        highest use since the last call with ``reset_window=True``, which starts a new window at the current
        use (for periodic sampling; :class:`~lightning_tiercache.lightning.telemetry.Telemetry` does it).
        """
        with self._lock:
            tiers = {}
            for t in _TIERS:
                tiers[t.label] = {
                    "bytes": self._used[t],
                    "entries": len(self._policies[t]),
                    "budget": self._budget[t],
                    "peak_bytes": self._peak[t],
                    "window_peak_bytes": self._window_peak[t],
                    "added_over_budget": self._added_over[t],
                }
                if reset_window:
                    self._window_peak[t] = self._used[t]
            waits = sorted(self._waits)
            out: dict[str, Any] = {"tiers": tiers, "entries": len(self._entries)}
            for name in (
                "puts", "put_bytes", "gets", "hits", "hits_in_flight", "gets_after_wait", "prefetches",
                "waits", "evictions", "drops", "spills", "spill_bytes", "spill_file_bytes", "reads", "read_bytes",
                "bytes_to_host", "bytes_to_device", "disk_full", "disk_errors", "corrupt", "missing",
                "overcommits", "promotions", "move_errors", "prefetch_skipped", "inflight_waits", "lookup_hits",
                "lookup_misses", "demote_calls", "writes_skipped", "backpressure_waits",
            ):  # fmt: skip
                out[name] = self._counts[name]
            out["wait_s"] = self._busy_s["wait"]
            out["backpressure_s"] = self._busy_s["backpressure"]
            out["memory_trims"] = self._trimmer.trims
            out["spill_files_reused"] = self._spill.reused if self._spill is not None else 0
            out["device_budget_refreshes"] = self._device_budget.refreshes
            out["wait_p50_s"] = waits[len(waits) // 2] if waits else 0.0
            out["wait_p95_s"] = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0
            out["pin_failures"] = self._pool.pin_failures if self._pool is not None else 0
            out["write_s"] = self._busy_s["write"]
            out["read_s"] = self._busy_s["read"]
            return out

    def drain_events(self) -> list[dict[str, Any]]:
        """Notable events since the last call (first spill, disk full, corruption, ...), oldest first."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events

    def close(self) -> None:
        """Finish in-flight moves, release every entry and delete the spill folder. Idempotent."""
        with self._lock:
            if self._closed:
                return
        try:
            self.settle(timeout_s=60)
        except TimeoutError:
            log.warning("closing the store with moves still in flight")
        with self._lock:
            self._closed = True
            for e in list(self._entries.values()):
                self._free_locked(e)
        self._jobs.shutdown()
        if self._spill is not None:
            self._spill.close()
        if self._pool is not None:
            self._pool.clear()
        if self._own_ops:
            self._ops.close()

    def __enter__(self) -> TierStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __bool__(self) -> bool:
        # An open store with no entries is still a store: ``if cb.store:`` must not depend on its size.
        return True

    def __contains__(self, handle: object) -> bool:
        with self._lock:
            return isinstance(handle, Handle) and handle.store == self._id and handle.id in self._entries

    def _refresh_device_budget_if_due(self) -> None:
        """Re-derive the device tier's budget from its allocator if the last snapshot is stale (lock not held).

        Note: [device budget from the allocator] (:mod:`lightning_tiercache.store.device_budget`).
        """
        if not self._device_budget.due():
            return
        memory = self._ops.memory()  # a driver call on CUDA: made outside the lock
        with self._lock:
            if self._closed or memory is None:
                return
            held = self._used[Tier.DEVICE]
            self._budget[Tier.DEVICE] = derive_device_budget(memory, held, self._device_budget.cap)
            self._device_budget.refreshed()
            self._enforce(Tier.DEVICE)

    # ------------------------------------------------------------------ placement (lock held)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("this TierStore is closed; open a new one")

    def _entry(self, handle: Handle) -> Entry:
        self._check_open()
        e = self._entries.get(handle.id) if isinstance(handle, Handle) and handle.store == self._id else None
        if e is None:
            if isinstance(handle, Handle) and handle.id in self._dropped_ids:
                raise EntryEvictedError(f"cache entry {handle.id} was dropped under memory pressure")
            raise EntryNotFoundError(f"no live entry for {handle!r}: freed, or from another store")
        return e

    def _top_tier(self, device: torch.device) -> Tier:
        if device.type == self.device.type and (device.index or 0) == (self.device.index or 0):
            return Tier.DEVICE
        if device.type == "cpu":
            return Tier.HOST
        raise ValueError(f"this store serves {self.device} (and cpu); got a tensor on {device}")

    def _lower(self, e: Entry, tier: Tier) -> Tier | None:
        for t in _TIERS[max(tier + 1, e.floor) :]:
            if self._budget[t] > 0 and not (t is Tier.DISK and e.no_disk):
                return t
        return None

    def _landing(self, e: Entry, start: Tier) -> Tier:
        """The highest tier at or below ``start`` (and at or below its ``floor`` after ``start``) whose budget can
        hold the entry at all, else its top tier."""
        for t in _TIERS[start:]:
            if t != start and t < e.floor:
                continue
            if self._budget[t] >= e.nbytes and not (t is Tier.DISK and e.no_disk):
                return t
        return e.top  # nothing below can take it: it stays, and pressure decides from there

    def _promotion_target(self, e: Entry, with_room: bool = False) -> Tier | None:
        """The highest tier above ``e`` that can hold it (``with_room``: without going over budget), or ``None``."""
        for t in _TIERS[e.top : e.tier]:
            if self._budget[t] >= e.nbytes + (self._used[t] if with_room else 0):
                return t
        return None

    def _over_with_moves(self) -> bool:
        """Whether a memory tier is over budget while moves out of it are in flight (lock held).

        Note: [backpressure]
            An entry on its way down keeps its bytes in the tier it leaves until the move finished (a CPU
            tensor until its spill write is done, device memory until its copy is). A producer faster than
            the moves (a forward against a disk) would fill the tier far past its budget; ``put`` and the
            promotion in ``get`` wait for a job to finish instead, so a tier peaks at its budget plus one
            entry. A tier over budget with nothing in flight (an overcommit) does not wait: that could not help.
        """
        return any(self._used[t] > self._budget[t] and self._leaving[t] > 0 for t in (Tier.DEVICE, Tier.HOST))

    def _add(self, e: Entry, tier: Tier) -> None:
        if self._used[tier] > self._budget[tier]:
            self._added_over[tier] += 1
        self._used[tier] += e.nbytes
        self._peak[tier] = max(self._peak[tier], self._used[tier])
        self._window_peak[tier] = max(self._window_peak[tier], self._used[tier])

    def _eligible(self, tier: Tier, exclude: int | None, stuck: set[int]) -> Callable[[int], bool]:
        def ok(i: int) -> bool:
            e = self._entries.get(i)
            return e is not None and e.move is None and e.pins == 0 and i != exclude and i not in stuck

        return ok

    def _enforce(self, tier: Tier, exclude: int | None = None, budget: int | None = None) -> None:
        """Move victims out of ``tier`` until what stays fits ``budget`` (the tier's budget by default)."""
        limit = self._budget[tier] if budget is None else budget
        stuck: set[int] = set()
        while self._used[tier] - self._leaving[tier] > limit:
            i = self._policies[tier].victim(self._eligible(tier, exclude, stuck))
            if i is None and exclude is not None:
                i, exclude = exclude, None  # the new entry alone is over budget: it has to move too
                if not self._eligible(tier, None, stuck)(i):
                    continue
            if i is None:
                if stuck:  # required entries with nowhere to go; pinned or moving ones resolve later
                    self._overcommit(tier)
                return
            e = self._entries[i]
            dst = self._lower(e, tier)
            if dst is Tier.DISK:
                self._make_disk_room(e.nbytes)
                if self._used[Tier.DISK] + e.nbytes > self._budget[Tier.DISK]:
                    dst = None
            if dst is None:
                if e.kind is Kind.CACHE:
                    self._free_locked(e, dropped=True)
                else:
                    stuck.add(i)
                continue
            self._counts["evictions"] += 1
            try:
                self._start_move(e, dst)
            except (torch.OutOfMemoryError, RuntimeError):
                stuck.add(i)  # could not allocate the copy's target: leave it where it is

    def _make_disk_room(self, nbytes: int) -> None:
        """Drop cache entries from disk (the bottom tier) until ``nbytes`` more fit, if possible."""
        stuck: set[int] = set()
        while self._used[Tier.DISK] + nbytes > self._budget[Tier.DISK]:
            i = self._policies[Tier.DISK].victim(
                lambda j: self._eligible(Tier.DISK, None, stuck)(j) and self._entries[j].kind is Kind.CACHE
            )
            if i is None:
                return
            self._free_locked(self._entries[i], dropped=True)

    def _overcommit(self, tier: Tier) -> None:
        """Required entries over ``tier``'s budget have no tier below with room: count, warn once, record."""
        self._counts["overcommits"] += 1
        below = ", ".join(f"{t.label}_bytes={self._budget[t]}" for t in _TIERS[tier + 1 :])
        self._warn_once(
            f"overcommit-{tier.label}",
            f"tiercache: the {tier.label} tier holds {self._used[tier]} bytes, over its budget "
            f"{tier.label}_bytes={self._budget[tier]}, and its required entries have nowhere to go "
            f"({below or 'no tier below'}); raise {tier.label}_bytes, or give a tier below room "
            "(host_bytes, disk_bytes), or use smaller batches",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        self._event(key.split("-")[0], message)

    def _event(self, name: str, detail: str) -> None:
        self._events.append({"time": time.time(), "event": name, "detail": detail})

    def _free_locked(self, e: Entry, dropped: bool = False) -> None:
        if e.freed:
            return
        e.freed = True
        e.dropped = dropped
        self._entries.pop(e.id, None)
        if e.key is not None and self._keys.get(e.key) == e.id:
            del self._keys[e.key]
        self._policies[e.tier].remove(e.id)
        if dropped:
            self._counts["drops"] += 1
            self._dropped_ids[e.id] = None
            if len(self._dropped_ids) > 65536:
                self._dropped_ids.popitem(last=False)
        if e.move is not None:
            return  # the move's completion releases both ends
        self._release(e, e.tier)

    def _release(self, e: Entry, tier: Tier) -> None:
        """Give back what ``e`` holds in ``tier`` (lock held)."""
        self._used[tier] -= e.nbytes
        if tier is Tier.DISK and self._spill is not None:
            self._spill.retire(e.id)  # Note: [recycled record files]
        elif tier is Tier.HOST:
            self._give_buf(e)
        elif self._ops.moves_bytes and not self._ops.done(e.event):
            # Note: [reload freed before use] an upload still writes this tensor; it was allocated on the
            # compute stream, which must not reuse its memory before the copy finished.
            self._ops.compute_wait(e.event)
        if tier is not Tier.DISK:
            e.data = None

    def _give_buf(self, e: Entry) -> None:
        """Return ``e``'s pool buffer once no queued upload reads it any more (lock held)."""
        buf, reader, e.buf, e.reader = e.buf, e.reader, None, None
        if buf is not None:
            self._up.recycle(buf, reader)

    # ------------------------------------------------------------------ moves (lock held)

    def _start_move(
        self, e: Entry, dst: Tier, dev: torch.Tensor | None = None, host_buf: torch.Tensor | None = None
    ) -> None:
        """Start moving ``e`` to ``dst`` (lock held). Synchronous where no bytes need to move.

        ``dev`` is the device tensor an upload from the host tier copies into, ``host_buf`` the pool buffer a
        download copies into; both are made outside the lock when the caller can.
        """
        src = e.tier
        if dst == src:
            return
        self._add(e, dst)
        if src > dst:
            self._counts["promotions"] += 1
        if {src, dst} <= {Tier.DEVICE, Tier.HOST} and not self._ops.moves_bytes:
            self._finish(e, src, dst, e.data, None, None)  # CPU: both budgets are RAM
            return
        e.move_to = dst
        self._leaving[src] += e.nbytes
        try:
            if dst is Tier.DISK:
                e.move = self._disk.write(e, src)
            elif src is Tier.DISK:
                e.move = self._disk.read(e, dst)
            elif dst is Tier.HOST:
                e.move = self._down.start(e, src, dst, host_buf)
            else:  # host -> device: launched now, fenced lazily on the consumer's stream
                self._up.start(e, src, dst, dev if dev is not None else self._ops.alloc(e.shape, e.dtype))
        except Exception:
            # An allocation failed (device OOM, no pinned memory): nothing moved, accounting is undone.
            if e.move_to is not None:
                self._fail(e, src, dst)
            self._counts["move_errors"] += 1
            raise

    def _landed(
        self, e: Entry, src: Tier, dst: Tier, data: torch.Tensor | None, buf: torch.Tensor | None, event: Any
    ) -> None:
        """An asynchronous move finished (lock held)."""
        self._leaving[src] -= e.nbytes
        self._finish(e, src, dst, data, buf, event)

    def _finish(
        self, e: Entry, src: Tier, dst: Tier, data: torch.Tensor | None, buf: torch.Tensor | None, event: Any
    ) -> None:
        """Complete a move (lock held): the entry now lives in ``dst``."""
        e.move = None
        e.move_to = None
        if e.freed:
            self._release(e, src)
            e.buf, e.data, e.event = buf, data, event
            self._release(e, dst)
            return
        if src is Tier.DISK and self._spill is not None:
            self._spill.retire(e.id)  # Note: [recycled record files]
        if src is Tier.HOST and buf is not e.buf:
            self._give_buf(e)
        self._used[src] -= e.nbytes
        self._policies[src].remove(e.id)
        e.tier = dst
        e.data = data if dst is not Tier.DISK else None
        e.buf = buf
        e.event = event
        self._policies[dst].insert(e.id)
        self._enforce(dst)

    def _fail(self, e: Entry, src: Tier, dst: Tier) -> None:
        """Undo a move that failed (lock held): the entry stays in ``src``."""
        e.move = None
        e.move_to = None
        self._leaving[src] -= e.nbytes
        self._used[dst] -= e.nbytes
        if e.freed:
            self._release(e, src)

    def _ensure_spill(self) -> SpillDir:
        if self._spill is None:
            self._spill = SpillDir(self.config.spill_parent)
            self._event("spill", f"first spill to disk at {self._spill.path}")
        return self._spill

    def _disk_failed(self, e: Entry, src: Tier, err: OSError) -> None:
        """A spill write failed (lock held): keep the entry in ``src`` and spill less from now on."""
        full = isinstance(err, DiskFullError)
        self._counts["disk_full" if full else "disk_errors"] += 1
        e.no_disk = True
        if full:
            self._budget[Tier.DISK] = min(self._budget[Tier.DISK], self._used[Tier.DISK] - e.nbytes)
        self._fail(e, src, Tier.DISK)
        self._warn_once(
            "disk_full" if full else f"disk_error-{err.errno}",
            f"tiercache: could not spill to disk ({err}); keeping entries in {src.label} memory "
            f"and lowering the disk budget",
        )

    def _spill_moved(self, e: Entry) -> None:
        """A spill write or read landed (lock not held): on a CPU device, hand freed RAM back when enough is.

        A write released the entry's RAM; a read stands for what backward freed meanwhile in the heap, since
        the reload itself is a mapping of its own. Note: [memory that leaves the process]
        (:mod:`lightning_tiercache.store.tiers.trim`).
        """
        if not self._ops.moves_bytes:
            self._trimmer.released(e.nbytes)
            self._trimmer.trim_if_due()

    def _spill_lost(self, e: Entry, dst: Tier | None, err: SpillError) -> None:
        """A spill record was missing or corrupt (lock held): the entry is gone."""
        kind = spill_error_kind(err)
        self._counts[kind] += 1
        self._event("corruption" if kind == "corrupt" else "missing", str(err))
        self._free_locked(e)
