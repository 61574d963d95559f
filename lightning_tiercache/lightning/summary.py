"""The run-end account of what the library did, read from the parts' own counters, in words and human numbers.

:class:`RunSummary` is built by :meth:`TierCacheCallback.summary` from :meth:`TierCacheCallback.stats` (the
parts' counters: live during a stage, the final ones after it), never from a logged row, so its peaks are the
peaks since the stage began, not those of the last logging window. ``str(summary)`` is the text the examples
print: what was offloaded and where, the memory that saved against the same run without offload (an estimate,
labelled as such), any tier that went over its budget and what to change, OOM recoveries and prefix reuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lightning_tiercache.config import format_bytes

__all__ = ["RunSummary", "TierUse", "format_count"]

_TIERS = ("device", "host", "disk")
_BUDGET_ARGS = {"device": "device_bytes", "host": "host_bytes", "disk": "disk_bytes"}


def format_count(n: float) -> str:
    """A count for people: ``4,088`` (a float rounded to an int), never scientific notation."""
    return f"{round(n):,}"


def _share(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 or x == 0 else f"{x:.1%}"


@dataclasses.dataclass(frozen=True)
class TierUse:
    """One tier over a stage: its highest use since the stage began and its budget (bytes), and how many entries
    came to it while it was already over that budget."""

    name: str
    peak_bytes: int
    budget_bytes: int
    added_over_budget: int = 0

    @property
    def over_budget(self) -> bool:
        """Whether the tier went over its budget by more than the one entry in flight that the store allows
        (Note: [backpressure] in ``store/placement.py``): entries came while it was over."""
        return self.budget_bytes > 0 and self.peak_bytes > self.budget_bytes and self.added_over_budget > 0


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What the callback's parts did in one stage (``fit``, ``validate``, ``test`` or ``predict``) on this rank.

    Args:
        stage: the Trainer stage.
        tiers: peak and budget of each tier, device first.
        stats: the parts' counters, as :meth:`TierCacheCallback.stats` returns them (``store``,
            ``activations``, ``oom``, ``kv``, ``batch_copy``: the parts that ran).
        rank: this process's rank; ``world_size``: the number of ranks (the figures are this rank's).
    """

    stage: str | None
    tiers: tuple[TierUse, ...]
    stats: Mapping[str, Mapping[str, Any]]
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_stats(
        cls, stage: str | None, stats: Mapping[str, Mapping[str, Any]], rank: int = 0, world_size: int = 1
    ) -> RunSummary:
        """Build the summary from the parts' counters."""
        tiers = stats.get("store", {}).get("tiers", {})
        uses = tuple(
            TierUse(t, int(tiers[t]["peak_bytes"]), int(tiers[t]["budget"]), int(tiers[t]["added_over_budget"]))
            for t in _TIERS if t in tiers
        )  # fmt: skip
        return cls(stage, uses, stats, rank, world_size)

    @property
    def peak_bytes(self) -> dict[str, int]:
        """Tier name -> highest bytes held since the stage began."""
        return {t.name: t.peak_bytes for t in self.tiers}

    @property
    def oom_retries(self) -> int:
        """Steps retried after an out-of-memory error (training and eval steps)."""
        oom = self.stats.get("oom", {})
        return int(oom.get("oom_retries", 0)) + int(oom.get("eval_oom_retries", 0))

    def saved_device_bytes(self) -> int | None:
        """Estimated device bytes activation offload saved per forward against the same forward without it.

        Without offload every activation a step saves for backward stays on the device until backward; with it,
        at most the device tier's peak does (what stays in place, small tensors and parameter views, is the
        same in both). ``None`` when nothing was offloaded.
        """
        act = self.stats.get("activations", {})
        steps = int(act.get("steps", 0))
        if not steps or not act.get("packed_bytes"):
            return None
        per_step = int(act["packed_bytes"]) // steps
        return max(0, per_step - self.peak_bytes.get("device", 0))

    def lines(self) -> list[str]:
        """The summary as short lines of text."""
        out = [f"tiercache {self.stage or 'run'} summary" + (f" (rank {self.rank} of {self.world_size})" if
               self.world_size > 1 else "")]  # fmt: skip
        out += self._store_lines() + self._activation_lines() + self._oom_lines() + self._kv_lines()
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _store_lines(self) -> list[str]:
        st = self.stats.get("store")
        if not st:
            return ["  store: not opened"]
        peaks = ", ".join(
            f"{t.name} {format_bytes(t.peak_bytes)} of {format_bytes(t.budget_bytes)}" for t in self.tiers
        )  # fmt: skip
        out = [f"  tier peaks (highest use / budget; one entry on its way down may pass it): {peaks}"]
        for t in self.tiers:
            if t.over_budget:
                out.append(
                    f"  over budget: the {t.name} tier peaked at {format_bytes(t.peak_bytes)}, "
                    f"{t.peak_bytes / t.budget_bytes:.1f}x its {format_bytes(t.budget_bytes)} budget, with "
                    f"{format_count(t.added_over_budget)} entries put while it was already over; raise "
                    f"{_BUDGET_ARGS[t.name]} to stay within it"
                )
        gets = int(st.get("gets", 0))
        hit = int(st.get("hits", 0)) / gets if gets else 1.0
        out.append(
            f"  store traffic: {format_count(st.get('puts', 0))} entries in, {format_count(gets)} read back "
            f"({_share(hit)} without waiting), {format_count(st.get('spills', 0))} spilled to disk "
            f"({format_bytes(st.get('spill_bytes', 0))}), {format_count(st.get('evictions', 0))} moved down a tier"
        )
        return out

    def _activation_lines(self) -> list[str]:
        act = self.stats.get("activations")
        if not act:
            return []
        steps = int(act.get("steps", 0))
        if not act.get("packed_bytes"):
            idle = int(act.get("idle_steps", 0))
            return [f"  activations: nothing was large enough to offload ({format_count(steps + idle)} forwards)"]
        per_step = int(act["packed_bytes"]) // max(1, steps)
        below = int(act.get("bytes_offloaded", 0)) // max(1, steps)
        out = [
            f"  activations: {format_bytes(per_step)} per forward went to the store, {format_bytes(below)} of it "
            f"below the device tier ({format_count(steps)} forwards, {format_bytes(act['packed_bytes'])} in all)"
        ]
        saved = self.saved_device_bytes()
        if saved is not None:
            out.append(
                f"  device memory saved: about {format_bytes(saved)} per forward against the same run without "
                f"offload (estimate: activation bytes per forward minus the device tier's peak)"
            )
        return out

    def _oom_lines(self) -> list[str]:
        oom = self.stats.get("oom")
        if not oom:
            return []
        parts = []
        for prefix, what in (("", "training"), ("eval_", "eval")):
            retries = int(oom.get(f"{prefix}oom_retries", 0))
            split = int(oom.get(f"{prefix}current_micro_batches", 1))
            if retries or split > 1:
                parts.append(
                    f"{what} steps retried after an out-of-memory error: {format_count(retries)}, now "
                    f"{format_count(split)} micro-batches per batch"
                )
        return [f"  OOM recovery: {'; '.join(parts) if parts else 'no out-of-memory errors'}"]

    def _kv_lines(self) -> list[str]:
        kv = self.stats.get("kv")
        if not kv:
            return []
        looked = int(kv.get("hits", 0)) + int(kv.get("misses", 0))
        if not looked:
            return ["  KV prefix reuse: no prompt was looked up"]
        return [
            f"  KV prefix reuse: {_share(float(kv.get('hit_rate', 0.0)))} of {format_count(looked)} prompt blocks "
            f"served from the cache, {format_count(kv.get('hit_tokens', 0))} prompt tokens not recomputed"
        ]
