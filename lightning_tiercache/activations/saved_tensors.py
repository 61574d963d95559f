"""What activation offload hands autograd for each saved tensor, and the storage spans it stores.

``pack`` returns a :class:`Kept` for a tensor left where it is and a :class:`Saved` for one in the store. A
:class:`Saved` names a :class:`Slot` (one store entry: a span of one storage) and the view to rebuild from it;
views of one storage share a slot, and the slot frees its entry when the last view's saved variable dies.

Note: [frees from the garbage collector]
    A ``Slot`` frees its store entry when it dies. If it dies inside a garbage collection, that collection
    may have started in a thread holding the store's lock; freeing then would deadlock. ``gc_state.running``
    is true for the length of every collection, and the offloader then queues the free; the next
    ``pack``/``unpack``/``__enter__``/``__exit__``/``stats``/``flush`` call does it. The flag is a plain
    attribute, not a ``threading.Event``: an Event takes a lock, and a collection that starts while this
    thread holds that lock would deadlock in the callback.
Note: [in-place after save]
    Autograd skips its version check for tensors that go through saved-tensor hooks. ``Kept`` and ``Saved``
    record the version at save time and ``unpack`` repeats autograd's check, so an in-place change after
    saving still raises instead of silently using whichever value was copied.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import torch

from lightning_tiercache.activations.prefetch_plan import ForwardPass
from lightning_tiercache.store.placement import Handle

__all__ = [
    "Kept", "Saved", "Slot", "check_version", "extent", "gc_state", "keep", "storage_ref", "storage_span", "unkeep",
]  # fmt: skip


class _GCState:
    """``running`` is true while the garbage collector runs (Note: [frees from the garbage collector])."""

    running = False


gc_state = _GCState()


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    gc_state.running = phase == "start"


gc.callbacks.append(_on_gc)


class Kept:
    """A saved tensor left where it is; remembers its version for the check autograd skips with hooks."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version

    def get(self) -> torch.Tensor:
        check_version(self.tensor._version, self.version)
        return self.tensor


def check_version(now: int, saved: int) -> None:
    if now != saved:  # Note: [in-place after save]
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"it was saved at version {saved} and is now at version {now} (checked by lightning_tiercache's "
            "activation offload, since autograd skips this check for hooked tensors); use an out-of-place op"
        )


def keep(tensor: torch.Tensor) -> Kept:
    return Kept(tensor)


def unkeep(packed: Kept) -> torch.Tensor:
    return packed.get()


class Slot:
    """One store entry: a span of one storage, shared by every saved view inside it."""

    __slots__ = (
        "__weakref__", "dtype", "handle", "kept", "length", "nbytes", "pass_", "prefetched", "release",
        "seq", "start", "tensor", "unpacked",
    )  # fmt: skip

    def __init__(self, release: Callable[[Handle], None], pass_: ForwardPass, flat: torch.Tensor, start: int) -> None:
        self.release = release
        self.pass_ = pass_
        self.tensor: torch.Tensor | None = flat  # held while in the resident window of the forward
        self.dtype = flat.dtype
        self.start = start
        self.length = flat.numel()
        self.nbytes = self.length * flat.element_size()
        self.handle: Handle | None = None
        self.seq = -1
        self.kept = False
        self.prefetched = False
        self.unpacked = False

    def __del__(self) -> None:
        if self.handle is not None:
            self.release(self.handle)  # Note: [frees from the garbage collector]


class Saved:
    """What ``pack`` gives autograd for an offloaded tensor: its slot and the view to rebuild."""

    __slots__ = ("offset", "size", "slot", "src", "stride", "version")

    def __init__(self, slot: Slot, tensor: torch.Tensor) -> None:
        self.slot = slot
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.offset = tensor.storage_offset()
        self.version = tensor._version
        self.src = weakref.ref(tensor)


def extent(t: torch.Tensor) -> int:
    """Elements of storage ``t`` spans from its offset (``t`` is non-empty, strides are >= 0)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 1)


def storage_span(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A flat view of the storage span to store for ``t``, and where it starts (in elements).

    The whole storage when ``t`` covers at least half of it, so views like q, k and v of one projection share
    one entry; else just the elements ``t`` spans. Both are views: no copy is made here.
    """
    item = t.element_size()
    storage_bytes = int(t.untyped_storage().nbytes())
    span = extent(t)
    whole = storage_bytes // item
    if storage_bytes % item == 0 and 2 * span >= whole:
        start, length = 0, whole
    else:
        start, length = int(t.storage_offset()), span
    return t.detach().as_strided((length,), (1,), start), start


def storage_ref(storage: torch.UntypedStorage) -> Any:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(storage)
