"""Copy the next batch to the device on a side stream while the current batch computes (CUDA).

Lightning 2.6 moves a batch in its loops as ``next(data_fetcher)`` -> ``precision_plugin.convert_input`` ->
``lightning_module._on_before_batch_transfer`` -> ``strategy.batch_to_device`` -> ``on_*_batch_start`` ->
the step. :class:`NextBatchCopier` wraps ``strategy.batch_to_device``; at a batch start it looks at the host
batch the fetcher will hand out next and starts copying its CPU tensors on a side stream. When that batch
reaches ``batch_to_device``, every CPU tensor that is still the very object it copied (identity, and the same
``_version``, so an in-place change in ``on_before_batch_transfer`` is noticed) is replaced by its copy, the
current stream waits for the copy, and the original ``batch_to_device`` runs on the result (its
``.to(device)`` is then a no-op, and ``on_after_batch_transfer`` runs as usual). Anything else takes the
original path unchanged, so the batch the step sees is the same either way.

Note: [lookahead]
    Lightning's ``_PrefetchDataFetcher`` fetches one batch ahead only when the loader has no length. For a
    sized loader the copier puts a one-item lookahead (:class:`_Lookahead`) under the fetcher's iterator:
    the fetcher's own ``fetched``/``done`` bookkeeping is untouched, and ``done`` is checked first, so the
    lookahead never reads past the epoch's last batch. The next batch is then read from the ``DataLoader``
    at the current batch's start instead of at the next ``next()``: a stateful loader's state in a mid-epoch
    checkpoint is one batch ahead, as with Lightning's own prefetching of unsized loaders, and a loading
    error surfaces at the next ``next()``, where it would have anyway.

Limits: the copy overlaps with compute only when the host tensors are pinned (``DataLoader(pin_memory=True)``);
from pageable memory it runs, correctly, but blocks the host. Nothing is copied when the module or
datamodule overrides ``transfer_batch_to_device``, for ``training_step(dataloader_iter)``, or for leaves that
are not plain tensors (objects with their own ``.to``); nor, in eval loops (whose inference tensors have no
version counter), when ``on_before_batch_transfer`` is overridden. At most one copy per loop kind (train,
eval) is held: one extra batch on the device. A loader that refills one host buffer for every batch is not
safe with reading ahead (nor with Lightning's own non-blocking copies).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import _TransferableDataType
from lightning_utilities.core.apply_func import apply_to_collection

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CopyOps", "CudaCopyOps", "NextBatchCopier", "peek_next_batch"]

log = logging.getLogger(__name__)

_END = object()  # the lookahead met the end of its iterator


class CopyOps(Protocol):
    """How copies start and are handed over (the CUDA streams and events; tests pass fakes)."""

    def copy_async(self, tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``tensors`` to ``device`` off the current stream; return the copies and a ready token."""
        ...

    def wait(self, token: Any, copies: list[torch.Tensor]) -> None:
        """Make the current stream wait for ``token`` before it uses ``copies``."""
        ...


class CudaCopyOps:
    """:class:`CopyOps` on one CUDA device: one side stream, an event per batch.

    Args:
        device: the CUDA device copies go to.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy_async(self, tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
        current = torch.cuda.current_stream(self.device)
        # A pinned source may still be filled by a copy queued on the current stream; the step about to run
        # is queued after this call, so waiting here does not cost the overlap.
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            copies = [t.to(device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def wait(self, token: Any, copies: list[torch.Tensor]) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(token)
        # The copies were allocated on the side stream: without this, freeing one while the step's kernels
        # still read it would let the allocator hand its memory to the next copy.
        for t in copies:
            t.record_stream(current)


class _Lookahead(Iterator[Any]):
    """An iterator that can show its next item without losing it (see Note: [lookahead])."""

    def __init__(self, it: Iterator[Any]) -> None:
        self.it = it
        self._held: list[Any] = []  # zero or one of: an item, _END, or the exception the early read raised

    def peek(self) -> Any:
        """The next item, or ``_END``; an error of the read is kept for the ``next()`` that would have met it."""
        if not self._held:
            try:
                self._held.append(next(self.it))
            except StopIteration:
                self._held.append(_END)
            except Exception as err:
                self._held.append(err)
                return _END
        item = self._held[0]
        return _END if isinstance(item, Exception) else item

    def __next__(self) -> Any:
        if not self._held:
            return next(self.it)
        item = self._held.pop()
        if item is _END:
            self._held.append(_END)  # an exhausted iterator stays exhausted
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item


def peek_next_batch(trainer: pl.Trainer) -> Any:
    """The host batch the active loop's data fetcher hands out next, or ``None`` if there is none or it is unknown.

    Reads Lightning 2.6 private attributes (``trainer._active_loop._data_fetcher``); anything unexpected gives
    ``None``. For a sized loader it installs a one-item lookahead under the fetcher's iterator (see
    Note: [lookahead]).
    """
    try:
        loop = getattr(trainer, "_active_loop", None)
    except RuntimeError:  # the property raises outside of a loop
        return None
    fetcher = getattr(loop, "_data_fetcher", None)
    batches = getattr(fetcher, "batches", None)
    # Only the prefetching fetcher has `batches`; `training_step(dataloader_iter)` steps move their own batches.
    if fetcher is None or not isinstance(batches, list) or getattr(fetcher, "done", True) is not False:
        return None
    if batches:
        item = batches[0]
    else:
        it = getattr(fetcher, "iterator", None)
        if it is None:
            return None
        if not isinstance(it, _Lookahead):
            it = _Lookahead(it)
            fetcher.iterator = it
        item = it.peek()
    # The combined loader yields (batch, batch_idx, dataloader_idx).
    return item[0] if isinstance(item, tuple) and len(item) == 3 else None


def _cpu_leaves(batch: Any) -> list[torch.Tensor]:
    """The CPU tensors ``move_data_to_device`` would move (it walks with the same rule: stop at ``.to``)."""
    leaves: list[torch.Tensor] = []

    def visit(data: Any) -> Any:
        if isinstance(data, torch.Tensor) and data.device.type == "cpu":
            leaves.append(data)
        return data

    apply_to_collection(batch, _TransferableDataType, visit)
    return leaves


@dataclasses.dataclass
class _Copy:
    source: torch.Tensor
    version: int | None  # None: an inference tensor, which has no version counter
    copy: torch.Tensor


@dataclasses.dataclass
class _InFlightCopies:
    copies: dict[int, _Copy]  # by id of the source
    token: Any


def _overrides(trainer: pl.Trainer, hook: str) -> bool:
    """Whether the trainer's module or datamodule overrides the batch hook ``hook``."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    owners = (getattr(trainer, "lightning_module", None), getattr(trainer, "datamodule", None))
    return any(o is not None and is_overridden(hook, o) for o in owners)


class NextBatchCopier:
    """Overlaps the host-to-device copy of batch N+1 with the compute of batch N, on one Trainer's strategy.

    Args:
        device: where batches go (the strategy's ``root_device``).
        ops: starts and hands over copies; ``None``: :class:`CudaCopyOps` (``device`` must be CUDA).
        peek: ``peek(trainer)`` gives the next host batch or ``None``; ``None``: :func:`peek_next_batch`.

    Raises:
        ValueError: ``ops`` is ``None`` and ``device`` is not a CUDA device.

    Example::

        copier = NextBatchCopier.for_trainer(trainer)   # None unless the strategy's device is CUDA
        copier.install(trainer)                         # in Callback.setup
        copier.copy_next(trainer, eval=False)           # in on_train_batch_start
        copier.uninstall()                              # in Callback.teardown and on_exception
    """

    def __init__(
        self,
        device: torch.device,
        *,
        ops: CopyOps | None = None,
        peek: Callable[[pl.Trainer], Any] | None = None,
    ) -> None:
        if ops is None and device.type != "cuda":
            raise ValueError(f"NextBatchCopier needs a CUDA device without ops=, got device={device}")
        self.device = device
        self.ops: CopyOps = ops if ops is not None else CudaCopyOps(device)
        self.peek = peek or peek_next_batch
        self._strategy: Any = None
        self._saved: tuple[bool, Any] = (False, None)
        self._pending: dict[str, _InFlightCopies] = {}
        self._peek_broken = False
        self._user_before_transfer = False
        self._told_unpinned = False
        self._stats = {"copied": 0, "matched": 0, "dropped": 0, "no_next": 0}

    @classmethod
    def for_trainer(cls, trainer: pl.Trainer) -> NextBatchCopier | None:
        """A copier for the trainer's CUDA device, or ``None`` on any other device (nothing to overlap)."""
        device = trainer.strategy.root_device
        return cls(device) if device.type == "cuda" else None

    @property
    def installed(self) -> bool:
        return self._strategy is not None

    def stats(self) -> dict[str, int]:
        """``copied`` batches started, ``matched`` batches served from a copy, ``dropped`` copies never used,
        ``no_next`` batch starts with no next batch to copy."""
        return dict(self._stats)

    # ------------------------------------------------------------------ install

    def install(self, trainer: pl.Trainer) -> None:
        """Wrap ``trainer.strategy.batch_to_device``; a second call is a no-op; nothing when the module or
        datamodule overrides ``transfer_batch_to_device`` (the copy would bypass it)."""
        strategy = trainer.strategy
        if self._strategy is strategy:
            return
        self.uninstall()
        if _overrides(trainer, "transfer_batch_to_device"):
            log.info("tiercache: transfer_batch_to_device is overridden; the next batch is not copied ahead")
            return
        self._user_before_transfer = _overrides(trainer, "on_before_batch_transfer")
        original = strategy.batch_to_device
        self._saved = ("batch_to_device" in vars(strategy), vars(strategy).get("batch_to_device"))
        self._strategy = strategy

        def batch_to_device(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if self._pending:
                device = kwargs.get("device", args[0] if args else None)
                if device is None or torch.device(device) == self.device:
                    batch = self._take(batch)
            return original(batch, *args, **kwargs)

        setattr(strategy, "batch_to_device", batch_to_device)  # noqa: B010

    def uninstall(self) -> None:
        """Put the strategy's ``batch_to_device`` back exactly and drop pending copies; safe to call again.

        A lookahead left under a fetcher's iterator keeps working; Lightning replaces it at the next epoch.
        """
        strategy = self._strategy
        self._stats["dropped"] += len(self._pending)
        self._pending.clear()
        if strategy is None:
            return
        had, value = self._saved
        if had:
            setattr(strategy, "batch_to_device", value)  # noqa: B010
        else:
            vars(strategy).pop("batch_to_device", None)
        self._strategy = None
        self._saved = (False, None)

    # ------------------------------------------------------------------ copy and hand over

    def copy_next(self, trainer: pl.Trainer, *, eval: bool) -> None:
        """At a batch start: start copying the next host batch of the active loop (replacing an unused copy)."""
        if self._strategy is None:
            return
        slot = "eval" if eval else "train"
        if self._pending.pop(slot, None) is not None:
            self._stats["dropped"] += 1
        host = None
        if not self._peek_broken:
            try:
                host = self.peek(trainer)
            except Exception as err:  # private Lightning attributes changed: stop trying, stay exact
                self._peek_broken = True
                log.debug("tiercache: cannot see the next batch (%r); next-batch copies are off", err)
        if host is None:
            self._stats["no_next"] += 1
            return
        try:
            leaves = _cpu_leaves(host)
        except Exception:  # a batch apply_to_collection cannot walk: the original path reports it
            return
        if not leaves or len({id(t) for t in leaves}) != len(leaves):  # repeated tensors: keep their aliasing
            return
        # Eval loops read batches under inference mode, and inference tensors have no version counter: an
        # in-place change after the copy would go unseen, and only on_before_batch_transfer could make one.
        versions = [None if t.is_inference() else t._version for t in leaves]
        if self._user_before_transfer and None in versions:
            return
        if not self._told_unpinned and not all(t.is_pinned() for t in leaves):
            self._told_unpinned = True
            log.info("tiercache: batches are not in pinned memory, so copying ahead cannot overlap compute; "
                     "set DataLoader(pin_memory=True)")  # fmt: skip
        copies, token = self.ops.copy_async(leaves, self.device)
        entries = {id(t): _Copy(t, v, c) for t, v, c in zip(leaves, versions, copies, strict=True)}
        self._pending[slot] = _InFlightCopies(entries, token)
        self._stats["copied"] += 1

    def _take(self, batch: Any) -> Any:
        """``batch`` with the copies of its unchanged CPU tensors in their place, or ``batch`` itself."""
        used: dict[str, list[torch.Tensor]] = {}

        def swap(data: Any) -> Any:
            if isinstance(data, torch.Tensor):
                for slot, pending in self._pending.items():
                    entry = pending.copies.get(id(data))
                    if (
                        entry is not None
                        and entry.source is data
                        and (entry.version is None or entry.version == data._version)
                    ):
                        used.setdefault(slot, []).append(entry.copy)
                        return entry.copy
            return data

        try:
            swapped = apply_to_collection(batch, _TransferableDataType, swap)
        except Exception:  # the original path walks the same way and reports it
            return batch
        if not used:
            return batch
        for slot, copies in used.items():
            pending = self._pending.pop(slot)  # each copy is handed out once
            self.ops.wait(pending.token, copies)
            self._stats["matched"] += 1
        return swapped
