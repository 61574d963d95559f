"""The device budget's say in activation offload: how much of a forward stays resident, and who breaks it.

Offload moves only what must go. :func:`resident_tail_bytes` sizes the *resident tail*, the bytes of a forward
that stay in the store's device tier, from the room that tier has when the forward starts. The tail leaves a
reserve of the room free: entries on their way down still hold their bytes until their move finished (the
store's backpressure keeps that within the budget), and in backward the prefetch lead lands there while the
tail is still resident.

Which entries make up the tail: on the first forward (and any forward shaped unlike the last one), the end
of the forward, oldest entries leaving first as the window fills (their backward runs last, so their reload
has the most backward work to hide behind). Once a forward was measured, :func:`keep_plan` picks from its
entry sizes: the end that prefetch cannot hide stays, then the smallest entries; the largest leave, straight
from ``pack``.

:class:`CompiledBackwardCheck` watches unpacks for the one case where no plan can hold the budget: a
``torch.compile`` graph's backward is a single autograd node that unpacks every tensor its forward saved
before it computes anything, so everything offloaded from that graph is reloaded at once. When one such node
needs more than the whole device budget, offload cannot keep the budget there, and the check says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["RESERVE_SHARE", "CompiledBackwardCheck", "keep_plan", "resident_tail_bytes"]

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


def keep_plan(sizes: Sequence[int], tail_bytes: int, exposed_bytes: int) -> list[bool]:
    """Which entries of a forward shaped like a measured one stay resident (``True``) within ``tail_bytes``.

    Offload moves the largest entries whose reload backward can hide, and keeps the rest:

    1. the *exposed end*: entries with fewer than ``exposed_bytes`` (the prefetch lead) of the forward after
       them, and always the last one. Backward consumes them before prefetch can run far enough ahead, so a
       reload of one would be waited for. They are kept newest first, each as far as it fits.
    2. then the smallest of the others (among equal sizes the later ones, whose backward runs sooner), while
       they fit. The entries left over are the largest: the fewest records, and no more bytes than the budget
       needs moved (the room left unused is smaller than the smallest entry offloaded).

    Args:
        sizes: bytes of each entry, in forward order.
        tail_bytes: the bytes that may stay resident (:func:`resident_tail_bytes`).
        exposed_bytes: how far below the entry being unpacked prefetch runs.
    """
    keep = [False] * len(sizes)
    room = tail_bytes
    after = 0
    others: list[int] = []
    for i in range(len(sizes) - 1, -1, -1):
        if after < exposed_bytes or i == len(sizes) - 1:
            if sizes[i] <= room:
                keep[i] = True
                room -= sizes[i]
        else:
            others.append(i)
        after += sizes[i]
    for i in sorted(others, key=lambda j: (sizes[j], -j)):
        if sizes[i] > room:
            break
        keep[i] = True
        room -= sizes[i]
    return keep


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
