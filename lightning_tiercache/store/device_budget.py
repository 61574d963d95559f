"""The device tier's budget, derived from the device allocator's state when placement decisions are made.

Note: [device budget from the allocator]
    A device budget fixed when the store opens is sized before the model moves to the device (on an H200,
    half of an empty GPU: about 70 GB whatever the model), and never sees the model, its optimizer state or
    the step's own tensors grow afterwards. Where the device has an allocator (:meth:`DeviceOps.memory` is not
    ``None``), the tier's effective budget is instead

        ``held + max(0, free + cached - headroom)``, capped by a configured ``device_bytes``,

    where ``held`` is what the store's device tier holds (those bytes are part of what the allocator has
    handed out), ``free + cached`` is what a new tensor could still get (driver-free memory plus what the
    caching allocator reserves unused), and ``headroom`` (:data:`HEADROOM_SHARE` of the device) is left for
    the work the store does not see: the rest of a forward, a backward's gradients, a generation's logits.

    Refreshing costs a driver call (``cudaMemGetInfo``) and an allocator statistics read, so it is not done
    per put. The store's own puts and moves do not make a snapshot stale: what the tier gains, ``free``
    loses, so ``held + free`` stays put. What a snapshot misses is memory others allocate or release, which
    changes at step and batch boundaries (the model moving to the device, optimizer state appearing, a
    batch's activations freed). So a snapshot is marked stale at every :meth:`TierStore.settle` (each batch
    boundary) and after every :data:`REFRESH_EVERY_PUTS` puts (a long forward), and the next decision that
    needs the budget (a put, ``room``, ``budgets``) refreshes it first. A store nobody uses makes no driver call.
"""

from __future__ import annotations

from lightning_tiercache.store.tiers.device import DeviceMemory

__all__ = ["HEADROOM_SHARE", "REFRESH_EVERY_PUTS", "DeviceBudget", "derive_device_budget"]

#: Share of the device's memory the derived budget leaves free for work the store does not see.
HEADROOM_SHARE = 0.2
#: Puts after which a snapshot of the allocator is refreshed even without a batch boundary.
REFRESH_EVERY_PUTS = 64


def derive_device_budget(memory: DeviceMemory, held: int, cap: int | None) -> int:
    """The device tier's budget for allocator state ``memory`` while the tier holds ``held`` bytes.

    Args:
        memory: the allocator's state (:meth:`~lightning_tiercache.store.tiers.device.DeviceOps.memory`).
        held: bytes the store's device tier holds now (already allocated on the device).
        cap: a configured ``device_bytes``: the budget never exceeds it.
    """
    headroom = int(memory.total * HEADROOM_SHARE)
    derived = held + max(0, memory.free + memory.cached - headroom)
    return derived if cap is None else min(cap, derived)


class DeviceBudget:
    """When the device tier's budget is re-derived from the allocator (Note: [device budget from the allocator]).

    Args:
        cap: the configured ``device_bytes`` (``None``: no cap).
        derived: whether the device has an allocator to derive from; without one the budget stays as configured.
    """

    def __init__(self, cap: int | None, derived: bool) -> None:
        self.cap = cap
        self.derived = derived
        self.stale = derived
        self.puts = 0
        self.refreshes = 0

    def due(self) -> bool:
        """Whether the next decision should refresh the snapshot first (read without the store lock)."""
        return self.derived and (self.stale or self.puts >= REFRESH_EVERY_PUTS)

    def put(self) -> None:
        """Count one put (store lock held)."""
        self.puts += 1

    def invalidate(self) -> None:
        """Memory others hold may have changed (a batch boundary, an OOM): refresh before the next decision."""
        self.stale = self.derived

    def refreshed(self) -> None:
        self.stale = False
        self.puts = 0
        self.refreshes += 1
