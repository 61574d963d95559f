"""When a forward has nothing to offload, later forwards of batches no larger skip the saved-tensor hooks.

Autograd calls the offloader's ``pack`` and ``unpack`` once per saved tensor, even for the small ones it leaves
in place; on a short step that costs more than anything else the callback does. :class:`IdleGate` remembers
the shapes of batches whose forward stored nothing, and lets a later forward run without hooks when its batch
is no larger in any dimension of any tensor (same structure, same non-tensor values, no wider dtype): for a
model whose saved tensors grow with its inputs, nothing it saves can then reach ``min_bytes`` either.

Models whose saved sizes depend on the data rather than the shapes (mixture-of-experts routing, for one) are
why the gate is re-checked: every ``probe_every`` skipped forwards one runs with the hooks again, and a forward
with hooks that does store something forgets every remembered shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["IdleGate", "batch_shapes", "covers"]

_MAX_SHAPES = 8
_SCALARS = (int, float, bool, str, bytes, type(None))
_TENSOR = torch.Tensor


def batch_shapes(batch: Any) -> Any:
    """A comparable summary of ``batch``: tensors become ``(shape, itemsize)``; ``None`` if a leaf is unknown.

    Lists, tuples and mappings are walked; plain scalars are kept as values; any other object (a custom batch
    class) makes the whole summary ``None``, so the gate never skips for it.
    """
    cls = type(batch)
    # Flat lists, tuples and dicts of tensors first, in plain loops (no recursion, no comprehension frame):
    # this runs every step.
    if cls is list or cls is tuple:
        flat: list[Any] = []
        for item in batch:
            if type(item) is not _TENSOR:
                break
            flat.append((item.shape, item.dtype.itemsize))
        else:
            return ("seq", tuple(flat))
    elif cls is dict:  # Hugging Face style
        items: list[Any] = []
        for key, item in batch.items():
            if type(item) is not _TENSOR:
                break
            items.append((key, (item.shape, item.dtype.itemsize)))
        else:
            return ("map", tuple(items))
    if isinstance(batch, torch.Tensor):
        return (batch.shape, batch.dtype.itemsize)  # torch.Size is a tuple
    if isinstance(batch, list | tuple):
        out = []
        for item in batch:
            s = batch_shapes(item)
            if s is None:
                return None
            out.append(s)
        return ("seq", tuple(out))
    if isinstance(batch, Mapping):
        items = []
        for key, item in batch.items():
            s = batch_shapes(item)
            if s is None:
                return None
            items.append((key, s))
        return ("map", tuple(items))
    if isinstance(batch, _SCALARS):
        return ("value", batch)
    return None


def covers(big: Any, small: Any) -> bool:
    """Whether batch summary ``small`` is no larger than ``big`` everywhere (see :func:`batch_shapes`)."""
    if len(big) == 2 and isinstance(big[0], tuple):  # a tensor: (shape, itemsize)
        if not (len(small) == 2 and isinstance(small[0], tuple)):
            return False
        (bshape, bsize), (sshape, ssize) = big, small
        if ssize > bsize or len(sshape) != len(bshape):
            return False
        return all(s <= b for s, b in zip(sshape, bshape, strict=True))
    kind = big[0]
    if kind != small[0]:
        return False
    if kind == "value":
        return bool(big[1] == small[1])
    if len(big[1]) != len(small[1]):
        return False
    if kind == "map":
        return all(bk == sk and covers(bv, sv) for (bk, bv), (sk, sv) in zip(big[1], small[1], strict=True))
    return all(covers(b, s) for b, s in zip(big[1], small[1], strict=True))


class IdleGate:
    """Decides per forward whether the saved-tensor hooks can stay out.

    Args:
        probe_every: after this many skipped forwards, the next one runs with the hooks; ``0`` never skips.

    Example::

        gate = IdleGate(64)
        shapes, skip = gate.check(batch)
        if not skip:
            ...  # forward with the hooks; it stored `stored` entries
            gate.observe(shapes, stored=stored)
    """

    def __init__(self, probe_every: int) -> None:
        self.probe_every = probe_every
        self.shapes: list[Any] = []
        self.skipped = 0
        self._since_probe = 0
        self._last: Any = None  # the last summary found covered: the common case is the same shapes again

    def check(self, batch: Any) -> tuple[Any, bool]:
        """``(summary of batch, whether its forward may skip the hooks)``."""
        if self.probe_every <= 0:
            return None, False
        shapes = batch_shapes(batch)
        if shapes is None:
            return shapes, False
        if shapes != self._last:
            if not any(covers(big, shapes) for big in self.shapes):
                return shapes, False
            self._last = shapes
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return shapes, False
        self._since_probe += 1
        self.skipped += 1
        return shapes, True

    def observe(self, shapes: Any, *, stored: bool) -> None:
        """What a forward with the hooks did: ``stored`` anything in the store, for a batch summarized ``shapes``."""
        if stored:
            self.shapes.clear()
            self._last = None
        elif shapes is not None and not any(covers(big, shapes) for big in self.shapes):
            kept = [s for s in self.shapes if not covers(shapes, s)]
            self.shapes = [*kept[-(_MAX_SHAPES - 1) :], shapes]
            self._last = None

    def reset(self) -> None:
        """Forget every remembered shape (the next forwards run with the hooks)."""
        self.shapes.clear()
        self._since_probe = 0
        self._last = None
