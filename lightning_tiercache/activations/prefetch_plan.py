"""Backward-order prefetch for activation offload: record one step, plan the next.

One :class:`ForwardPass` holds what one forward saved, in forward order, and what its backward did: when each
saved entry was unpacked and how long ``unpack`` blocked. Backward consumes entries roughly in reverse forward
order, so while the backward of one region runs, the entries just below it in forward order are fetched.

:class:`PrefetchPlanner` turns a recorded pass into the prefetch lead of the next steps:

* ``lead_bytes``: how far below the entry being unpacked prefetch runs. To hide a reload, its copy must finish
  within the backward compute that runs before the entry is needed. With ``r`` the fastest measured backward
  rate of a region (saved bytes consumed per second of compute, waits excluded), ``load`` the measured seconds
  per byte of a reload and ``m`` the largest entry (or, when more, the most bytes one autograd node
  unpacked: a compiled region's node asks for all of its entries before computing), the lead must cover
  ``r * (m * load + latency)`` bytes; the planner keeps twice that, at least ``m``, at most ``max_lead_bytes``.
  When a step still waited, a boost factor grows the lead; it decays when steps stop waiting.

How much of the end of the forward stays resident is the device budget's call
(:mod:`lightning_tiercache.activations.budget`); the planner keeps the largest entry it measured, which that
plan reserves room for. The first step has no measurement: it runs with a lead of one entry, and measures.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import weakref
from typing import Any

import torch

from lightning_tiercache.errors import PinnedMemoryError
from lightning_tiercache.store.tiers.host import torch_pinned

__all__ = ["ForwardPass", "Measurement", "PrefetchPlanner", "measure_pass", "probe_h2d_bytes_per_s"]

_REGIONS = 8  # backward rate is measured per region of equal forward bytes
_SAFETY = 2.0
_LATENCY_S = 1e-3  # per reload: scheduling, a thread hop, an event
_MAX_BOOST = 16.0
_WAIT_SHARE = 0.01  # a step that waited more than this share of its backward grows the lead
_STATE_VERSION = 1


@dataclasses.dataclass(eq=False)
class ForwardPass:
    """What one forward handed to the store, and what its backward did with it.

    Attributes:
        order: weak references to the pass's entries (``_Slot`` objects), in forward order.
        ends: forward byte offset just after each entry (prefix sums of entry bytes).
        events: one ``(time_s, seq, nbytes, wait_s)`` per unpack, in unpack order.
        cursor: the next entry (``seq``) prefetch will consider, walking down; ``None`` before backward.
        graph_id: the autograd graph task whose backward moves ``cursor`` (a new backward restarts it).
        window: during forward, the entries still in the device tier, oldest first, with their bytes.
        dedup: during forward, storage address -> (storage weak reference, entry weak reference).
        small, small_bytes, params: this forward's saved tensors below the offloader's ``min_bytes`` (and their
            bytes) and parameters or views of them, all left in place; counted here, without the lock.
        stamps: on a device with its own clock, one pair of compute-stream timing events per unpack (before
            and after the hand-over); :meth:`device_timed` turns ``events`` into device times with them.
        tail_bytes, budget_bytes: the resident tail planned for this forward from the device tier's room, and
            that tier's budget when it started.
        offloaded_bytes: bytes this forward sent below the device tier.
        plan, plan_sizes: per entry of a forward shaped like the last measured one (``plan_sizes``, in forward
            order), whether it stays resident (see :func:`~lightning_tiercache.activations.budget.keep_plan`);
            ``None`` before a measured forward and from the first entry that differs from it on.
        planned_kept: bytes the plan kept resident so far.
        node, group_bytes, max_group_bytes: in backward, the autograd node that unpacked last (its ``id``), the
            bytes it unpacked, and the most one node unpacked: a compiled region's node needs all of its
            region's entries before it computes anything.
    """

    order: list[weakref.ref[Any]] = dataclasses.field(default_factory=list)
    ends: list[int] = dataclasses.field(default_factory=list)
    events: list[tuple[float, int, int, float]] = dataclasses.field(default_factory=list)
    cursor: int | None = None
    graph_id: int = -2
    max_item_bytes: int = 0
    forward_done: bool = False
    window: collections.deque[tuple[weakref.ref[Any], int]] = dataclasses.field(default_factory=collections.deque)
    window_bytes: int = 0
    dedup: dict[int, tuple[Any, weakref.ref[Any]]] = dataclasses.field(default_factory=dict)
    small: int = 0
    small_bytes: int = 0
    params: int = 0
    stamps: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    tail_bytes: int = 0
    budget_bytes: int = 0
    offloaded_bytes: int = 0
    plan: list[bool] | None = None
    node: int = 0
    group_bytes: int = 0
    max_group_bytes: int = 0
    plan_sizes: tuple[int, ...] = ()
    planned_kept: int = 0

    @property
    def total_bytes(self) -> int:
        return self.ends[-1] if self.ends else 0

    def sizes(self) -> tuple[int, ...]:
        """Bytes of each entry, in forward order."""
        return tuple(b - a for a, b in zip((0, *self.ends), self.ends, strict=False))

    def add(self, slot: Any, nbytes: int) -> int:
        """Append an entry; returns its forward sequence number."""
        self.order.append(weakref.ref(slot))
        self.ends.append(self.total_bytes + nbytes)
        self.max_item_bytes = max(self.max_item_bytes, nbytes)
        return len(self.order) - 1

    def due(self, seq: int, lead_bytes: int) -> list[Any]:
        """Live entries to prefetch now that ``seq`` was unpacked, nearest first.

        An entry is due when it ends within ``lead_bytes`` below the start of ``seq``; the entry just below
        ``seq`` is always due. Each entry is returned once per backward (the cursor only walks down).

        Note: [nodes that unpack upwards]
            A ``torch.compile`` graph's backward is one autograd node that unpacks everything its forward
            saved, in forward order, before computing: its first unpack is the lowest entry of its region. The
            entries above it that the walk had not reached yet are what that node unpacks next, so they are
            due first, in the order it asks for them.
        """
        out: list[Any] = []
        if self.cursor is not None and self.cursor > seq:
            for k in range(seq + 1, self.cursor + 1):
                slot = self.order[k]()
                if slot is not None:
                    out.append(slot)
        start = self.ends[seq - 1] if seq > 0 else 0
        floor = start - lead_bytes
        j = seq - 1 if self.cursor is None else min(self.cursor, seq - 1)
        while j >= 0 and (self.ends[j] >= floor or j == seq - 1):
            slot = self.order[j]()
            if slot is not None:
                out.append(slot)
            j -= 1
        self.cursor = j
        return out

    def record(self, time_s: float, seq: int, nbytes: int, wait_s: float, node: int = 0) -> None:
        """One unpack: ``nbytes`` is 0 for an entry unpacked before; ``node`` names the unpacking autograd node."""
        self.events.append((time_s, seq, nbytes, wait_s))
        if node != self.node:
            self.node, self.group_bytes = node, 0
        self.group_bytes += nbytes
        self.max_group_bytes = max(self.max_group_bytes, self.group_bytes)

    def device_timed(self, seconds_between: Any) -> bool:
        """Replace the host times of ``events`` by device times from ``stamps``; ``False`` if not all completed.

        Note: [device-timed plan]
            On CUDA an unpack hands its reload over with a stream wait: the host returns at once while the
            compute stream stalls until the copy landed. Host timestamps see no wait, so the lead would never
            grow; the compute-stream events before and after the hand-over measure the stall itself.
        """
        if len(self.stamps) != len(self.events) or not self.stamps:
            return True  # host-timed: nothing to convert
        first = self.stamps[0][1]
        out = []
        for (before, after), (_, seq, nbytes, _) in zip(self.stamps, self.events, strict=True):
            t, w = seconds_between(first, after), seconds_between(before, after)
            if t is None or w is None:
                return False
            out.append((t, seq, nbytes, w))
        self.events = out
        self.stamps = []
        return True


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one backward showed. Rates are bytes per second; ``load_s_per_byte`` 0 means reloads are free."""

    total_bytes: int
    max_item_bytes: int
    entries: int
    peak_rate_bps: float
    backward_s: float
    wait_s: float
    waits: int
    load_s_per_byte: float
    max_group_bytes: int = 0


def measure_pass(p: ForwardPass, load_s_per_byte: float, wait_threshold_s: float) -> Measurement | None:
    """Summarize a pass's backward; ``None`` when it has too few unpacks to say anything."""
    if len(p.events) < 2 or not p.ends:
        return None
    total = p.total_bytes
    region_bytes = [0] * _REGIONS
    region_s = [0.0] * _REGIONS
    seen: set[int] = set()
    wait_s = 0.0
    waits = 0
    prev_t = p.events[0][0]
    for i, (t, seq, nbytes, w) in enumerate(p.events):
        wait_s += w
        waits += w > wait_threshold_s
        if i:
            start = p.ends[seq - 1] if seq > 0 else 0
            r = min(_REGIONS - 1, start * _REGIONS // max(total, 1))
            region_s[r] += max(0.0, t - prev_t - w)
            if seq not in seen:
                region_bytes[r] += nbytes
        seen.add(seq)
        prev_t = t
    rates = [b / s for b, s in zip(region_bytes, region_s, strict=True) if b and s > 1e-5]
    peak = max(rates) if rates else 0.0
    backward_s = p.events[-1][0] - p.events[0][0]
    return Measurement(
        total, p.max_item_bytes, len(p.order), peak, backward_s, wait_s, waits, load_s_per_byte, p.max_group_bytes
    )


class PrefetchPlanner:
    """The tuned prefetch lead, updated from measured steps.

    Args:
        lead_bytes: a fixed lead; ``None`` plans it from measurement.
        keep_tail_bytes: a fixed upper bound of the resident tail (kept as ``fixed_tail``), or ``None``.
        max_lead_bytes: upper bound of a planned lead; ``None``: a fifth of a step's saved bytes.
    """

    def __init__(
        self, lead_bytes: int | None = None, keep_tail_bytes: int | None = None, max_lead_bytes: int | None = None
    ) -> None:
        self.fixed_lead = lead_bytes
        self.fixed_tail = keep_tail_bytes
        self.max_lead_bytes = max_lead_bytes
        self.planned_lead: int | None = None
        self.boost = 1.0
        self.peak_rate_bps = 0.0
        self.load_s_per_byte = 0.0
        self.measured_steps = 0
        self.entries_per_step = 0
        self.bytes_per_step = 0
        self.max_item_bytes = 0

    @property
    def lead_bytes(self) -> int:
        """The lead in use: the fixed one, else the planned one, else 0 (one entry ahead)."""
        if self.fixed_lead is not None:
            return self.fixed_lead
        return self.planned_lead or 0

    @property
    def lead_entries(self) -> float:
        """The lead in entries of an average size (for dashboards)."""
        if not self.entries_per_step or not self.bytes_per_step:
            return 1.0
        return max(1.0, self.lead_bytes / (self.bytes_per_step / self.entries_per_step))

    def update(self, m: Measurement) -> None:
        """Plan the next steps from a measured one."""
        waited = m.waits > 0 and m.wait_s > _WAIT_SHARE * max(m.backward_s, 1e-9)
        self.boost = min(_MAX_BOOST, self.boost * 1.5) if waited else max(1.0, self.boost * 0.9)
        # What one autograd node needs at once: an entry, or a compiled region's all (see ForwardPass.record).
        unit = max(m.max_item_bytes, m.max_group_bytes)
        need_s = unit * m.load_s_per_byte + (_LATENCY_S if m.load_s_per_byte > 0 else 0.0)
        model = _SAFETY * m.peak_rate_bps * need_s * self.boost
        cap = self.max_lead_bytes if self.max_lead_bytes is not None else m.total_bytes // 5
        lead = int(min(max(model, unit), max(cap, unit)))
        old = self.planned_lead
        self.planned_lead = lead if old is None else int(0.5 * old + 0.5 * lead)
        self.peak_rate_bps = (
            m.peak_rate_bps if not self.measured_steps else 0.5 * self.peak_rate_bps + 0.5 * (m.peak_rate_bps)
        )
        self.load_s_per_byte = m.load_s_per_byte
        self.measured_steps += 1
        self.entries_per_step = m.entries
        self.bytes_per_step = m.total_bytes
        self.max_item_bytes = m.max_item_bytes

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "planned_lead": self.planned_lead,
            "boost": self.boost,
            "peak_rate_bps": self.peak_rate_bps,
            "load_s_per_byte": self.load_s_per_byte,
            "measured_steps": self.measured_steps,
            "entries_per_step": self.entries_per_step,
            "bytes_per_step": self.bytes_per_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a plan saved by :meth:`state_dict`; an empty dict changes nothing.

        Raises:
            ValueError: the state is from another version or holds a bad value (the message names it).
        """
        if not state:
            return
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"activation offload state version={state.get('version')!r} is not {_STATE_VERSION}; "
                "drop the 'activations' entry from the checkpoint to re-measure"
            )
        lead = state.get("planned_lead")
        if lead is not None and (not isinstance(lead, int) or lead < 0):
            raise ValueError(f"planned_lead={lead!r} must be None or an int >= 0")
        for name in ("boost", "peak_rate_bps", "load_s_per_byte"):
            value = state.get(name, 0.0)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        self.planned_lead = lead
        self.boost = max(1.0, float(state.get("boost", 1.0)))
        self.peak_rate_bps = float(state.get("peak_rate_bps", 0.0))
        self.load_s_per_byte = float(state.get("load_s_per_byte", 0.0))
        self.measured_steps = int(state.get("measured_steps", 0))
        self.entries_per_step = int(state.get("entries_per_step", 0))
        self.bytes_per_step = int(state.get("bytes_per_step", 0))


def probe_h2d_bytes_per_s(device: torch.device) -> float:
    """Measured host-to-device copy bandwidth in bytes per second (32 MiB, on a side stream), from pinned memory,
    or pageable memory where none could be pinned (Note: [pinned memory is not a device OOM]: a failed pin here
    must not reach the step as an OOM)."""
    nbytes = 32 << 20
    try:
        host = torch_pinned(nbytes)
    except PinnedMemoryError:
        host = torch.empty(nbytes, dtype=torch.uint8)
    stream = torch.cuda.Stream(device=device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        dev = host.to(device, non_blocking=True)  # warm-up
        begin.record(stream)
        dev.copy_(host, non_blocking=True)
        end.record(stream)
    end.synchronize()
    seconds = max(begin.elapsed_time(end) / 1000.0, 1e-6)
    return nbytes / seconds
