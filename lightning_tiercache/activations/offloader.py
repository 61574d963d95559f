"""Activation offload: tensors autograd saves in forward go to a :class:`~lightning_tiercache.TierStore`.

:class:`ActivationOffloader` installs ``torch.autograd.graph.saved_tensors_hooks``. ``pack`` hands each saved
tensor that passes the policy to the store and returns a small ``Saved`` record; ``unpack`` gets the
tensor back and starts fetching the entries the next backward regions need (see
:mod:`lightning_tiercache.activations.prefetch_plan`). The store entry is freed when autograd drops the saved
variable, so ``retain_graph=True``, double backward and an exception mid-forward need no special handling.

Policy (:mod:`lightning_tiercache.activations.policy`): parameters, leaves that need grad and views of either
stay put (offloading them frees nothing); tensors under ``min_bytes`` stay put; tensors sharing a storage are
stored once. Only what the device budget cannot hold is offloaded. On a first forward the end that fits stays
in the device tier (its backward runs first) and the oldest entries leave as it fills; on a forward shaped
like the last one, the measured sizes plan it: the end prefetch cannot hide and the smallest entries stay,
the largest leave straight from ``pack`` (see :mod:`lightning_tiercache.activations.budget`). Entries of
``torch.utils.checkpoint`` regions are the regions' inputs (autograd hands this offloader nothing else from
inside them), so with checkpointing the inputs are what is offloaded.

Note: [release after copy]
    On CUDA, ``TierStore.put(t, tier=HOST)`` records an event on the producing stream, copies on a side
    stream after it, and keeps ``t`` referenced until the copy finished; only then can the caching allocator
    reuse its memory. The offloader drops its own reference right after ``put``.
Note: [reload across streams]
    A reloaded tensor is made on the store's upload stream. ``TierStore.get`` makes the caller's stream wait
    for the copy and calls ``record_stream`` on it, so freeing the entry while backward kernels that read it
    are still queued cannot hand its memory to the next upload. The views ``unpack`` returns share that
    storage, so the same record covers them.

The records ``pack`` returns, and their lifetime and version-check notes, are in
:mod:`lightning_tiercache.activations.saved_tensors`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import typing
import weakref
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import torch

from lightning_tiercache.activations.budget import CompiledBackwardCheck, keep_plan, resident_tail_bytes
from lightning_tiercache.activations.idle import IdleGate
from lightning_tiercache.activations.policy import OFFLOAD_TIERS, OffloadConfig, SavePolicy, of_params
from lightning_tiercache.activations.prefetch_plan import (
    ForwardPass,
    PrefetchPlanner,
    measure_pass,
    probe_h2d_bytes_per_s,
)
from lightning_tiercache.activations.saved_tensors import (
    Kept,
    Saved,
    Slot,
    check_version,
    gc_state,
    keep,
    storage_ref,
    storage_span,
    unkeep,
)
from lightning_tiercache.store.placement import Handle, TierStore
from lightning_tiercache.store.tiers import Tier

__all__ = ["OFFLOAD_TIERS", "ActivationOffloader", "OffloadConfig", "no_offload", "offload_activations"]

log = logging.getLogger(__name__)
_TENSOR = torch.Tensor
_STRIDED = torch.strided
_MAX_PENDING_PASSES = 4
_IDLE = contextlib.nullcontext()
_COUNTERS = (
    "packed", "packed_bytes", "skipped_params", "skipped_small", "skipped_dup", "skipped_other", "skipped_bytes",
    "bytes_offloaded", "bytes_kept", "unpacks", "unpack_waits", "unpack_misses", "prefetches", "steps",
    "compiled_backward_warnings",
)  # fmt: skip


class ActivationOffloader:
    """Offloads tensors saved for backward to a :class:`~lightning_tiercache.TierStore`; reusable across steps.

    Enter it around a forward (``with offloader:`` or ``offload_activations(offloader)``) and run backward
    outside. The first step measures; later steps plan the prefetch lead and the resident tail from it.

    Args:
        store: where saved tensors go. Its device tier stands for accelerator memory.
        config: the policy; keyword arguments (the fields of :class:`OffloadConfig`) build one instead.
        module: the model, whose parameter and buffer storages are never offloaded (optional: parameters and
            their views are recognized without it; plain-tensor buffers are not).
        **kwargs: fields of :class:`OffloadConfig` (``min_bytes``, ``keep_tail_bytes``, ``lead_bytes``,
            ``max_lead_bytes``, ``prefetch``, ``dedup``, ``tier``, ``wait_threshold_s``).

    Raises:
        TypeError: ``store`` is not a TierStore, or both ``config`` and keyword arguments were given.
        ValueError: a keyword argument has a bad value (see :class:`OffloadConfig`).

    Example::

        off = ActivationOffloader(store, min_bytes="1MiB")
        for x, y in loader:
            with off:
                loss = model(x, y).loss
            loss.backward()
        waited_s = off.stats()["unpack_wait_s"]  # near 0: reloads were hidden behind backward
    """

    def __init__(
        self,
        store: TierStore,
        config: OffloadConfig | None = None,
        *,
        module: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(store, TierStore):
            raise TypeError(f"store must be a TierStore, got {type(store).__name__}")
        if config is not None and kwargs:
            raise TypeError("pass either config or keyword arguments, not both")
        self.store = store
        self.config = config if config is not None else OffloadConfig(**kwargs)
        self.module = module
        cfg = self.config
        self.planner = PrefetchPlanner(
            _opt_int(cfg.lead_bytes), _opt_int(cfg.keep_tail_bytes), _opt_int(cfg.max_lead_bytes)
        )
        self._min_bytes = int(cfg.min_bytes)
        self.policy = SavePolicy(self._min_bytes, module, store.device)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._deferred: collections.deque[Handle] = collections.deque()
        self._done: list[ForwardPass] = []
        self._counts: collections.Counter[str] = collections.Counter()
        self._times: dict[str, float] = {"unpack_wait_s": 0.0, "unpack_wait_max_s": 0.0}
        self._tier = self.config.offload_tier(store.device)
        if self.config.tier == "auto" and self._tier is Tier.DISK and not store.budgets[Tier.DISK]:
            self._tier = Tier.HOST  # spilling is off: the host tier is all there is below the device
        self.compiled_check = CompiledBackwardCheck()
        self._last_tail = 0
        self._last_sizes: tuple[int, ...] = ()
        self._keep_key: tuple[Any, ...] = ()
        self._keep: list[bool] | None = None
        self._last_store: dict[str, Any] | None = None
        self._last_offloaded = 0
        self._h2d_bytes_per_s: float | None = None
        self._last: dict[str, float] = {}
        self.gate = IdleGate(cfg.idle_probe_every)

    # ------------------------------------------------------------------ context

    def for_batch(self, batch: Any) -> contextlib.AbstractContextManager[Any]:
        """The context for one forward of ``batch``: this offloader, or no hooks at all when it has nothing to do.

        A forward that stored nothing lets later forwards of batches no larger run without the saved-tensor
        hooks (see :mod:`lightning_tiercache.activations.idle`); ``with offloader:`` always installs them.
        """
        ctx = self.context_for(batch)
        return _IDLE if ctx is None else ctx

    def context_for(self, batch: Any) -> ActivationOffloader | None:
        """:meth:`for_batch`, with ``None`` instead of an empty context (for callers that skip the ``with``)."""
        shapes, skip = self.gate.check(batch)
        if skip:
            return None
        self._local.shapes = shapes
        return self

    def __enter__(self) -> ActivationOffloader:
        if self._deferred:
            self._drain()
        if self._done:  # passes whose backward may have run (a list's truth value reads atomically)
            self._plan()
        self.policy.new_forward()
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        shapes, self._local.shapes = getattr(self._local, "shapes", None), None
        p = ForwardPass()
        # Note: [memory that leaves the process] the RAM the last backward's reloads held goes back to the OS.
        self.store.return_free_memory()
        room = self.store.room(Tier.DEVICE)
        p.tail_bytes = resident_tail_bytes(
            room, self.planner.lead_bytes, self.planner.max_item_bytes, self.planner.fixed_tail
        )
        p.budget_bytes = self.store.budgets[Tier.DEVICE]
        self._last_tail = p.tail_bytes
        if self._last_sizes:
            p.plan_sizes = self._last_sizes
            p.plan = self._keep_plan(p.tail_bytes)
        self._stack().append((hooks, p, shapes))
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, p, shapes = self._stack().pop()
        hooks.__exit__(*exc)
        if exc[0] is None:
            # Nothing left the device tier: forwards of batches no larger fit the budget too.
            self.gate.observe(shapes, stored=p.offloaded_bytes > 0)
            self._last_sizes = p.sizes()
        self._end_forward(p)
        if self._deferred:
            self._drain()

    def _stack(self) -> list[tuple[Any, ForwardPass, Any]]:
        stack: list[tuple[Any, ForwardPass, Any]] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _keep_plan(self, tail: int) -> list[bool]:
        """The keep plan for a forward like the last one, within ``tail`` (made again only when either changed)."""
        key = (self._last_sizes, tail, self.planner.lead_bytes)
        if self._keep is None or key != self._keep_key:
            self._keep_key, self._keep = key, keep_plan(self._last_sizes, tail, self.planner.lead_bytes)
        return self._keep

    def _end_forward(self, p: ForwardPass) -> None:
        """What is still in the resident window joins the planned keeps: it stays in the device tier."""
        kept = p.planned_kept
        for ref, _ in p.window:
            slot = ref()
            if slot is not None and slot.tensor is not None:
                slot.tensor = None
                slot.kept = True
                kept += slot.nbytes
        p.window.clear()
        p.window_bytes = 0
        p.dedup.clear()
        p.forward_done = True
        with self._lock:
            self._counts["steps"] += 1
            self._counts["bytes_kept"] += kept
            self._counts["skipped_small"] += p.small
            self._counts["skipped_bytes"] += p.small_bytes
            self._counts["skipped_params"] += p.params
            if p.order:
                self._done.append(p)
                del self._done[:-_MAX_PENDING_PASSES]

    # ------------------------------------------------------------------ pack

    def pack(self, tensor: torch.Tensor) -> Saved | Kept:
        """Hand ``tensor`` to the store (or leave it where it is); called by autograd in forward."""
        if self._deferred:
            self._drain()
        stack = getattr(self._local, "stack", None)
        p = stack[-1][1] if stack else None
        # Note: [pack fast path] autograd calls this for every saved tensor, and most are small plain tensors or
        # views of parameters (a linear layer saves its weight transposed). Those leave after a few attribute
        # reads, counted on their forward's pass without the lock (`_end_forward` adds the counts up). In place,
        # beside a step's kernels, the full checks took 1.4-2.2 us a small tensor and 10-17 us a weight view, and
        # made a short forward with nothing to offload 28% slower (13% now; hooks that do nothing: 3%).
        if (
            p is not None
            and type(tensor) is _TENSOR
            and tensor.layout == _STRIDED
            and not (tensor.is_quantized or tensor.is_nested)
        ):
            nbytes = tensor.nbytes
            if nbytes < self._min_bytes:
                p.small += 1
                p.small_bytes += nbytes
                return Kept(tensor)
            if of_params(tensor):
                p.params += 1
                return Kept(tensor)
        reason = self.policy.skip_reason(tensor)
        if reason is not None or p is None:
            reason = reason or "other"  # no pass: hooks of another thread's context (cannot happen; be safe)
            with self._lock:
                self._counts[f"skipped_{reason}"] += 1
                if reason != "params":
                    self._counts["skipped_bytes"] += tensor.numel() * tensor.element_size()
            return Kept(tensor)
        if self.config.dedup:
            slot = self.policy.find_dup(p, tensor)
            if slot is not None:
                with self._lock:
                    self._counts["skipped_dup"] += 1
                return Saved(slot, tensor)
        flat, start = storage_span(tensor)
        slot = Slot(self._release, p, flat, start)
        slot.seq = p.add(slot, slot.nbytes)
        if self.config.dedup:
            storage = tensor.untyped_storage()
            p.dedup[storage.data_ptr()] = (storage_ref(storage), weakref.ref(slot))
        offloaded = self._place(p, slot, flat)
        p.offloaded_bytes += offloaded
        with self._lock:
            self._counts["packed"] += 1
            self._counts["packed_bytes"] += slot.nbytes
            self._counts["bytes_offloaded"] += offloaded
        return Saved(slot, tensor)

    def _place(self, p: ForwardPass, slot: Slot, flat: torch.Tensor) -> int:
        """Store a new entry: resident, offloaded, or in the resident window; returns the bytes sent down."""
        plan = p.plan
        if plan is not None:
            seq = slot.seq
            if seq < len(plan) and p.plan_sizes[seq] == slot.nbytes:
                if plan[seq] and p.planned_kept + slot.nbytes <= p.tail_bytes:
                    slot.handle = self.store.put(flat, evict_to=self._tier)
                    slot.tensor = None
                    slot.kept = True
                    p.planned_kept += slot.nbytes
                    return 0
                slot.handle = self.store.put(flat, tier=self._tier)
                slot.tensor = None
                return slot.nbytes
            p.plan = None  # this forward differs from the measured one: the window decides from here on
        tail = p.tail_bytes - p.planned_kept
        if slot.nbytes > tail:  # cannot stay resident whatever comes after it
            slot.handle = self.store.put(flat, tier=self._tier)
            slot.tensor = None
            offloaded = slot.nbytes
        else:
            slot.handle = self.store.put(flat, evict_to=self._tier)
            p.window.append((weakref.ref(slot), slot.nbytes))
            p.window_bytes += slot.nbytes
            offloaded = self._shrink_window(p, tail)
        return offloaded

    def _shrink_window(self, p: ForwardPass, tail: int) -> int:
        """Move the oldest window entries down until the window fits ``tail``; returns the bytes moved."""
        moved = 0
        while p.window_bytes > tail and p.window:
            ref, nbytes = p.window.popleft()
            p.window_bytes -= nbytes
            slot = ref()
            if slot is None or slot.tensor is None or slot.handle is None:
                continue
            if self.store.where(slot.handle) is not Tier.DEVICE:  # pressure already moved it down
                slot.tensor = None
                moved += slot.nbytes
                continue
            # Freed before the new entry is made, so the device tier never counts these bytes twice.
            old, slot.handle = slot.handle, None
            self.store.free(old)
            slot.handle = self.store.put(slot.tensor, tier=self._tier)  # Note: [release after copy]
            slot.tensor = None
            moved += slot.nbytes
        return moved

    # ------------------------------------------------------------------ unpack

    def unpack(self, packed: Saved | Kept) -> torch.Tensor:
        """The saved tensor back, on its device; called by autograd in backward."""
        if isinstance(packed, Kept):
            return packed.get()
        if self._deferred:
            self._drain()
        src = packed.src()
        if src is not None:
            check_version(src._version, packed.version)
        slot = packed.slot
        p = slot.pass_
        if slot.handle is None:
            raise RuntimeError("tiercache: a saved activation was used after its store entry was released")
        graph = torch._C._current_graph_task_id()
        if graph != p.graph_id:
            p.graph_id = graph
            p.cursor = None
        ops = self.store.device_ops
        before = ops.stamp()  # Note: [device-timed plan]
        start = perf_counter()
        stored = self.store.get(slot.handle)
        now = perf_counter()
        wait = now - start
        if before is not None:
            p.stamps.append((before, ops.stamp()))
        out = stored.as_strided(packed.size, packed.stride, stored.storage_offset() + packed.offset - slot.start)
        if self.config.prefetch and p.forward_done:
            due = p.due(slot.seq, self.planner.lead_bytes)
            handles = [s.handle for s in due if s.handle is not None and not s.kept and not s.unpacked]
            if handles:
                for s in due:
                    s.prefetched = True
                self.store.prefetch(handles)
                with self._lock:
                    self._counts["prefetches"] += len(handles)
        p.record(now, slot.seq, 0 if slot.unpacked else slot.nbytes, wait, id(torch._C._current_autograd_node()))
        if not slot.unpacked and p.offloaded_bytes and self.compiled_check.observe(slot.nbytes, p.budget_bytes):
            with self._lock:
                self._counts["compiled_backward_warnings"] += 1
        with self._lock:
            self._counts["unpacks"] += 1
            self._counts["unpack_waits"] += wait > self.config.wait_threshold_s
            self._counts["unpack_misses"] += not (slot.kept or slot.prefetched or slot.unpacked)
            self._times["unpack_wait_s"] += wait
            self._times["unpack_wait_max_s"] = max(self._times["unpack_wait_max_s"], wait)
        slot.unpacked = True
        return out

    # ------------------------------------------------------------------ lifetime

    def _release(self, handle: Handle) -> None:
        """Free a dead slot's entry (called from ``Slot.__del__``)."""
        if gc_state.running:  # Note: [frees from the garbage collector]
            self._deferred.append(handle)
            return
        try:
            self.store.free(handle)
        except Exception:  # a finalizer must not raise; the store logs its own failures
            log.debug("tiercache: could not free an activation entry", exc_info=True)

    def _drain(self) -> None:
        while self._deferred:
            try:
                handle = self._deferred.popleft()
            except IndexError:
                return
            self.store.free(handle)

    def flush(self) -> None:
        """Free the entries of saved tensors that died inside a garbage collection (normally done lazily)."""
        self._drain()

    def close(self) -> None:
        """Release what this offloader still holds. The store stays open (it is the caller's)."""
        self._drain()
        with self._lock:
            self._done.clear()

    # ------------------------------------------------------------------ planning

    def _plan(self) -> None:
        """Measure the passes whose backward ran and update the plan."""
        seconds_between = self.store.device_ops.seconds_between
        with self._lock:
            # A pass whose device events have not all completed yet waits for a later plan (no sync here).
            ready = [p for p in self._done if p.events and p.device_timed(seconds_between)]
            self._done = [p for p in self._done if p not in ready]
            offloaded = self._counts["bytes_offloaded"]
        if not ready:
            return
        load = self._load_s_per_byte(offloaded)
        for p in ready:
            m = measure_pass(p, load, self.config.wait_threshold_s)
            if m is None:
                continue
            self.planner.update(m)
            self._last = {"backward_s": m.backward_s, "unpack_wait_s": m.wait_s, "unpack_waits": float(m.waits)}

    def _load_s_per_byte(self, offloaded: int) -> float:
        """Seconds per offloaded byte to bring it back, from the store's counters since the last plan."""
        st = self.store.stats()
        prev = self._last_store or {"spill_bytes": 0, "read_bytes": 0, "read_s": 0.0}
        self._last_store = st
        d_off = offloaded - self._last_offloaded
        self._last_offloaded = offloaded
        d_read = st["read_bytes"] - prev["read_bytes"]
        disk = (st["read_s"] - prev["read_s"]) / d_read if d_read > 0 else self.planner.load_s_per_byte
        frac_disk = min(1.0, (st["spill_bytes"] - prev["spill_bytes"]) / d_off) if d_off > 0 else 0.0
        host = 0.0
        if self.store.device.type == "cuda":
            if self._h2d_bytes_per_s is None:
                self._h2d_bytes_per_s = probe_h2d_bytes_per_s(self.store.device)
            host = 1.0 / self._h2d_bytes_per_s
        return frac_disk * disk + (1.0 - frac_disk) * host

    # ------------------------------------------------------------------ reporting and state

    def stats(self) -> dict[str, Any]:
        """Counters since construction, the plan in use and the last measured step.

        A forward's ``steps``, and the small and parameter tensors it leaves in place, are counted when it ends.
        Keys: ``packed``, ``packed_bytes``, ``skipped_params``, ``skipped_small``, ``skipped_dup``,
        ``skipped_other``, ``skipped_bytes`` (small and other tensors left in place), ``bytes_offloaded``
        (bytes sent below the device tier), ``bytes_kept`` (the resident tails), ``unpacks``, ``unpack_waits``,
        ``unpack_wait_s``, ``unpack_wait_max_s``, ``unpack_misses``, ``prefetches``, ``steps``, ``measured_steps``,
        ``lead_bytes``, ``keep_tail_bytes`` (the last forward's resident tail, from the device budget),
        ``prefetch_lead`` (the lead in average entries), ``compiled_backward_warnings`` (1 once a compiled
        graph's backward reloaded more than the budget allows, see
        :class:`~lightning_tiercache.activations.budget.CompiledBackwardCheck`),
        ``last_backward_s``, ``last_unpack_wait_s``, ``last_unpack_waits``, ``pending_frees``, ``idle_steps``
        (forwards that ran without hooks: nothing to offload).
        """
        self._drain()
        with self._lock:
            out: dict[str, Any] = {k: self._counts[k] for k in _COUNTERS}
            out["unpack_wait_s"] = self._times["unpack_wait_s"]
            out["unpack_wait_max_s"] = self._times["unpack_wait_max_s"]
        out["measured_steps"] = self.planner.measured_steps
        out["lead_bytes"] = self.planner.lead_bytes
        out["keep_tail_bytes"] = self._last_tail
        out["prefetch_lead"] = self.planner.lead_entries
        out["last_backward_s"] = self._last.get("backward_s", 0.0)
        out["last_unpack_wait_s"] = self._last.get("unpack_wait_s", 0.0)
        out["last_unpack_waits"] = int(self._last.get("unpack_waits", 0))
        out["pending_frees"] = len(self._deferred)
        out["idle_steps"] = self.gate.skipped
        return out

    def state_dict(self) -> dict[str, Any]:
        """The tuned plan (lead, tail, measured rates), so a resumed run need not re-measure."""
        return {**self.planner.state_dict(), "h2d_bytes_per_s": self._h2d_bytes_per_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty dict changes nothing.

        Raises:
            ValueError: the state is from another version or holds a bad value.
        """
        if not state:
            return
        bw = state.get("h2d_bytes_per_s")
        if bw is not None and (not isinstance(bw, int | float) or not bw > 0):
            raise ValueError(f"h2d_bytes_per_s={bw!r} must be None or a number > 0")
        self.planner.load_state_dict({k: v for k, v in state.items() if k != "h2d_bytes_per_s"})
        self._h2d_bytes_per_s = float(bw) if bw is not None else None


# ---------------------------------------------------------------------- helpers


def _opt_int(value: int | str | None) -> int | None:
    return None if value is None else int(value)


@contextlib.contextmanager
def offload_activations(target: TierStore | ActivationOffloader, **kwargs: Any) -> Iterator[ActivationOffloader]:
    """Offload tensors saved for backward inside the ``with`` block.

    Args:
        target: a store or an offloader. With a store, the offloader it made for the same arguments before is
            used again (one per store and set of arguments, ``module`` included), so the steps after the
            first run on the measured plan.
        **kwargs: offloader arguments, only with a store.

    Raises:
        TypeError: ``target`` is neither, or keyword arguments came with an offloader.

    Example::

        with TierStore(cfg) as store:
            with offload_activations(store):
                loss = model(x).loss
            loss.backward()
    """
    if isinstance(target, ActivationOffloader):
        if kwargs:
            raise TypeError(f"offload_activations(offloader) takes no keyword arguments, got {sorted(kwargs)}")
        off = target
    elif isinstance(target, TierStore):
        off = _offloader_of(target, kwargs)
    else:
        raise TypeError(f"offload_activations() takes a TierStore or an ActivationOffloader, got {type(target)}")
    with off:
        yield off


def _offloader_of(store: TierStore, kwargs: dict[str, Any]) -> ActivationOffloader:
    """The offloader ``store`` keeps for these arguments (made on first use; unhashable ones are not kept)."""
    try:
        key = ("offloader", tuple(sorted((k, id(v) if k == "module" else v) for k, v in kwargs.items())))
        hash(key)
    except TypeError:
        return ActivationOffloader(store, **kwargs)
    off = store.attachments.get(key)
    if off is None:
        off = store.attachments[key] = ActivationOffloader(store, **kwargs)
    return typing.cast(ActivationOffloader, off)


@contextlib.contextmanager
def no_offload() -> Iterator[None]:
    """Keep tensors saved inside the block where they are (the innermost hooks win), e.g. a small head.

    Example::

        with offload_activations(store):
            h = model.body(x)
            with no_offload():
                loss = model.head(h)
    """
    with torch.autograd.graph.saved_tensors_hooks(keep, unkeep):
        yield
