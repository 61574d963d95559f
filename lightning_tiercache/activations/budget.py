"""The device budget's say in activation offload: how much of a forward stays resident, and who breaks it.

Offload moves only what must go. :func:`resident_tail_bytes` sizes the *resident tail*, the end of the forward
that stays in the store's device tier, from the room that tier has when the forward starts. What does not fit
leaves from the start of the forward, whose backward runs last, so its reload has the most backward work to
hide behind. The tail leaves a reserve of the room free: entries on their way down still hold their bytes
until their move finished (the store's backpressure keeps that within the budget), and in backward the
prefetch lead lands there while the tail is still resident.

:class:`CompiledBackwardCheck` watches unpacks for the one case where no plan can hold the budget: a
``torch.compile`` graph's backward is a single autograd node that unpacks every tensor its forward saved
before it computes anything, so everything offloaded from that graph is reloaded at once. When one such node
needs more than the whole device budget, offload cannot keep the budget there, and the check says so once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["RESERVE_SHARE", "CompiledBackwardCheck", "resident_tail_bytes"]

#: Share of the device tier's room kept free of the resident tail (moves in flight, then the prefetch lead).
RESERVE_SHARE = 0.25
_COMPILED_NODE = "CompiledFunction"  # AOTAutograd's autograd.Function, named CompiledFunctionBackward in backward


def resident_tail_bytes(room: int, lead_bytes: int, max_item_bytes: int, fixed: int | None = None) -> int:
    """Bytes at the end of a forward that may stay in the device tier.

    Args:
        room: the device tier's budget minus what it holds when the forward starts.
        lead_bytes: the planned prefetch lead (0 before any measurement).
        max_item_bytes: the largest entry of the last measured forward (0 before any measurement).
        fixed: a tail the user asked for; it is kept only as far as the budget allows.

    Returns:
        ``room`` less a reserve of at least a quarter of it, the lead and two of the largest entries; never
        negative, and at most ``fixed`` when given.
    """
    reserve = max(int(room * RESERVE_SHARE), lead_bytes, 2 * max_item_bytes)
    tail = max(0, room - reserve)
    return tail if fixed is None else min(fixed, tail)


class CompiledBackwardCheck:
    """Warns once when one compiled region's backward needs more stored bytes at once than the device budget.

    Call :meth:`observe` from ``unpack`` with the bytes of each store entry it hands out for the first time
    (resident or reloaded), and the device tier's budget.
    """

    def __init__(self) -> None:
        self.warned = False
        self.triggered_bytes = 0
        self._node: Any = None
        self._bytes = 0

    def observe(self, nbytes: int, budget_bytes: int) -> bool:
        """Count ``nbytes`` for the autograd node now running; returns whether this call warned."""
        if self.warned:
            return False
        node = torch._C._current_autograd_node()
        if node is not self._node:
            self._node, self._bytes = node, 0
        if node is None:
            return False
        self._bytes += nbytes
        if self._bytes <= budget_bytes or not node.name().startswith(_COMPILED_NODE):
            return False
        self.warned = True
        self.triggered_bytes = self._bytes
        warnings.warn(
            f"tiercache: the backward of a torch.compile graph needed {_size(self._bytes)} of stored activations "
            f"at once, more than the device budget of {_size(budget_bytes)}: a compiled graph's backward unpacks "
            "every tensor it saved before computing, so offload saves no memory across it. Compile per block "
            "instead of the whole model (for example "
            "`for block in model.blocks: block.compile()`), so each block's backward reloads only its own "
            "activations; or turn activation offload off for this model.",
            RuntimeWarning,
            stacklevel=4,
        )
        return True


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
