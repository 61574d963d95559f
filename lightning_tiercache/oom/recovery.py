"""OOM recovery: detection, the micro-batch ladder with grow-back, cross-rank agreement, memory summaries.

The ladder for one step (see :class:`MicroBatchPolicy`):

1. drop every reference into the failed attempt (recovery runs *outside* the ``except`` block), roll the
   step's partial gradients back, reset the AMP scaler's per-step state, ``gc`` and empty allocator caches;
2. demote what the :class:`~lightning_tiercache.TierStore` holds on the device and retry once at the same
   size if that freed memory;
3. split the batch into twice as many micro-batches and retry;
4. at micro-batch size 1 (or ``max_micro_batches``), raise :class:`~lightning_tiercache.OOMRecoveryError`
   with a memory summary and what to try next.

After ``grow_back_after_steps`` good steps the policy tries half as many micro-batches; a grow-back that
fails doubles the wait before the next try at that size (exponential back-off).

Every decision is made from values that all ranks agree on (:class:`RankAgreement`), so every rank takes the
same branch and runs the same collectives. This module does not import Lightning.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch
import torch.distributed as dist

from lightning_tiercache.errors import PinnedMemoryError
from lightning_tiercache.oom.split import MergeFn, SplitFn

__all__ = [
    "LOSS_REDUCTIONS",
    "LocalAgreement",
    "MicroBatchPolicy",
    "OOMConfig",
    "RankAgreement",
    "alloc_retries",
    "empty_caches",
    "is_oom_error",
    "memory_summary",
]

log = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("mean", "sum")

# Messages of out-of-memory errors that do not arrive as ``torch.OutOfMemoryError``: wrapped CUDA errors,
# other accelerators, the CPU allocator, and cuDNN/cuBLAS failing to allocate workspace under pressure.
_OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",  # torch.AcceleratorError from a raw cudaMalloc (and cudaHostAlloc: _from_pinning)
    "HIP out of memory",
    "XPU out of memory",
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


@dataclasses.dataclass(frozen=True)
class OOMConfig:
    """How out-of-memory errors in a step are recovered.

    Args:
        enabled: recover at all; ``False`` lets every OOM propagate.
        initial_micro_batches: micro-batches per step before any OOM (1 = run the batch whole).
        max_micro_batches: never split further than this; an OOM there raises ``OOMRecoveryError``.
        grow_back_after_steps: good steps at a split before trying half as many micro-batches; 0 never grows
            back.
        max_backoff_exponent: a failed grow-back doubles its wait, at most ``2**max_backoff_exponent`` times.
        loss_reduction: ``"mean"`` if the step's loss is a mean over samples (each micro-batch loss is scaled
            by its share of the batch), ``"sum"`` if it is a sum (micro-batch losses are added unscaled).
        split_fn: ``split_fn(batch, n)`` for batch types the built-in rules do not cover.
        merge_fn: ``merge_fn(outputs, sizes)`` to reassemble eval outputs the built-in rules do not cover.
        split_eval: also split and retry validation, test and predict steps.
        demote_on_oom: on OOM, clear the store's cache entries and demote its device tier before splitting.
        watch_alloc_retries: on CUDA, a rising ``num_alloc_retries`` (allocator thrashing) postpones grow-back.
        restore_buffers: snapshot module buffers (BatchNorm statistics) each step and restore them after a
            failed attempt, so a retried step updates them once.
        buffer_copy_bytes: buffers up to this size are copied before each step; larger ones are only watched
            (version counters), and a failed attempt that changed one in place is reported, not undone.
        protect_accumulated_grads: with gradient accumulation, keep a copy of the gradients accumulated so far
            during each later micro-step's backward, so an OOM there rolls back exactly (costs one copy of the
            gradients per such step); ``False``: such an OOM raises ``OOMRecoveryError``.
        sync_bucket_bytes: bucket size of the one gradient all-reduce per step under DDP.

    Raises:
        ValueError: a field is out of range; the message names the field, the value and what is allowed.
    """

    enabled: bool = True
    initial_micro_batches: int = 1
    max_micro_batches: int = 1024
    grow_back_after_steps: int = 100
    max_backoff_exponent: int = 6
    loss_reduction: str = "mean"
    split_fn: SplitFn | None = None
    merge_fn: MergeFn | None = None
    split_eval: bool = True
    demote_on_oom: bool = True
    watch_alloc_retries: bool = True
    restore_buffers: bool = True
    buffer_copy_bytes: int = 2**20
    protect_accumulated_grads: bool = True
    sync_bucket_bytes: int = 25 * 2**20

    def __post_init__(self) -> None:
        for name, low in (
            ("initial_micro_batches", 1),
            ("max_micro_batches", 1),
            ("grow_back_after_steps", 0),
            ("max_backoff_exponent", 0),
            ("sync_bucket_bytes", 1),
            ("buffer_copy_bytes", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OOMConfig.{name} must be an int >= {low}, got {value!r}")
        if self.initial_micro_batches > self.max_micro_batches:
            raise ValueError(
                f"OOMConfig.initial_micro_batches={self.initial_micro_batches} exceeds "
                f"max_micro_batches={self.max_micro_batches}"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"OOMConfig.loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        for name in ("split_fn", "merge_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"OOMConfig.{name} must be callable or None, got {type(value).__name__}")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the allocator ran out of memory (any accelerator, the CPU, cuDNN under pressure),
    so that a smaller batch can help. A failed pinned host allocation is not one (Note: [pinned memory is not a
    device OOM])."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError) or not exc.args or not isinstance(exc.args[0], str):
        return False
    message = exc.args[0]
    return any(m in message for m in _OOM_MESSAGES) and not _from_pinning(exc, message)


def _from_pinning(exc: BaseException, message: str) -> bool:
    """Whether ``exc`` was raised by a page-locked host allocation.

    Note: [pinned memory is not a device OOM]
        torch's device allocators (the caching allocator and the ``cudaMallocAsync`` backend) raise
        ``torch.OutOfMemoryError``. A pinned host allocation goes through the caching *host* allocator, which
        checks ``cudaHostAlloc``/``cudaHostRegister`` with c10's CUDA check: ``torch.AcceleratorError``,
        "CUDA error: out of memory", ``error_code`` 2, the same as a raw ``cudaMalloc`` outside the allocator
        (an extension's, a context's), which does mean device memory. So the message alone cannot tell them
        apart; where it was raised can. A pinned failure is: the store's :class:`PinnedMemoryError` (the store
        itself falls back to pageable memory), DataLoader's pin-memory thread (which re-raises it as "Caught
        AcceleratorError in pin memory thread ..."), a frame named ``pin_memory`` (``Tensor.pin_memory``
        callers: DataLoader's ``pin_memory`` and the custom batch types it calls), and ``save_on_cpu``'s pack
        (``torch.empty(..., pin_memory=True)``). Splitting the batch does not give the host more locked memory,
        so these surface as they are.
    """
    if isinstance(exc, PinnedMemoryError) or " in pin memory thread" in message:
        return True
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "pin_memory" or (code.co_name == "pack_to_cpu" and "autograd" in code.co_filename):
            return True
        tb = tb.tb_next
    return False


def _cuda_ready(device: torch.device | None) -> bool:
    return (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized()


def empty_caches(device: torch.device | None = None) -> None:
    """Collect garbage (reference cycles through failed frames) and return cached allocator blocks."""
    gc.collect()
    if _cuda_ready(device):
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # emptying the cache can itself fail under pressure; nothing to undo
            if not is_oom_error(exc):
                raise


def alloc_retries(device: torch.device | None = None) -> int:
    """CUDA's ``num_alloc_retries`` (the allocator freed its cache to satisfy a request); 0 off CUDA."""
    if not _cuda_ready(device):
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def memory_summary(device: torch.device | None = None) -> str:
    """One line of memory facts: accelerator allocated/reserved/peak/free on CUDA, RSS and available RAM."""
    gib = 2**30
    parts = []
    if _cuda_ready(device):
        free, total = torch.cuda.mem_get_info(device)
        parts.append(
            f"cuda allocated {torch.cuda.memory_allocated(device) / gib:.2f} GiB, "
            f"reserved {torch.cuda.memory_reserved(device) / gib:.2f} GiB, "
            f"peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB, "
            f"free {free / gib:.2f} of {total / gib:.2f} GiB, alloc retries {alloc_retries(device)}"
        )
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    parts.append(f"process RSS {rss / gib:.2f} GiB, RAM available {vm.available / gib:.2f} of {vm.total / gib:.2f} GiB")
    return "; ".join(parts)


NEXT_STEPS = (
    "turn on activation offload (TierCacheCallback(offload_activations=True)), use activation checkpointing, "
    "a shorter sequence length, bf16-mixed precision, or shard the model (FSDP)"
)


class RankAgreement:
    """Element-wise MAX of small int vectors over all ranks: the one collective every OOM decision uses.

    Every rank must call :meth:`max` the same number of times, in the same order; the hook guarantees that by
    calling it after every micro-batch on every rank, whether or not that rank ran out of memory.

    Args:
        group: the process group (``None``: the default group).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.calls = 0

    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return int(dist.get_world_size(self.group))

    def _device(self) -> torch.device:
        backend = str(dist.get_backend(self.group))
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``values`` over ranks (the values themselves in a single process)."""
        if self.world_size == 1:
            return [int(v) for v in values]
        self.calls += 1
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]


class LocalAgreement(RankAgreement):
    """The agreement of a step that synchronizes nothing across ranks: this rank's own values, no collective.

    Eval steps and training steps inside DDP's ``no_sync`` use it, so one rank can split its batch alone and no
    collective depends on the ranks seeing the same number of batches.
    """

    @property
    def world_size(self) -> int:
        return 1


@dataclasses.dataclass
class _Counters:
    oom_retries: int = 0
    failed_attempts: int = 0
    splits: int = 0
    demotions: int = 0
    grow_backs: int = 0
    failed_grow_backs: int = 0
    pressure_steps: int = 0
    good_steps_total: int = 0


class MicroBatchPolicy:
    """The learned split of one kind of step (training or eval): how many micro-batches, and when to change.

    ``begin_step`` picks the split for the next step (maybe a grow-back trial), ``on_success`` and ``on_oom``
    feed back what happened. All inputs must be rank-agreed values so every rank decides alike.

    Args:
        config: limits and grow-back settings.
        on_event: called with ``(event, detail)`` for every split change.
    """

    def __init__(self, config: OOMConfig, on_event: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.micro_batches = config.initial_micro_batches
        self.good_steps = 0
        self.grow_failures: dict[int, int] = {}
        self.trial_from: int | None = None
        self.counters = _Counters()
        self._on_event = on_event

    def _event(self, name: str, detail: str) -> None:
        log.info("tiercache oom: %s: %s", name, detail)
        if self._on_event is not None:
            self._on_event(name, detail)

    def grow_back_wait(self, target: int) -> int:
        """Good steps needed before trying ``target`` micro-batches (doubles with every failed try)."""
        exponent = min(self.grow_failures.get(target, 0), self.config.max_backoff_exponent)
        return self.config.grow_back_after_steps * 2**exponent

    def begin_step(self) -> int:
        """The number of micro-batches for the next step; starts a grow-back trial when one is due."""
        base = self.config.grow_back_after_steps
        if self.micro_batches > 1 and base > 0 and self.trial_from is None:
            target = max(1, self.micro_batches // 2)
            if self.good_steps >= self.grow_back_wait(target):
                self.trial_from = self.micro_batches
                self.micro_batches = target
                self.good_steps = 0
                self._event("grow_back_trial", f"{self.trial_from} -> {target} micro-batches")
        return self.micro_batches

    def on_success(self, pressure: bool = False) -> None:
        """The step finished. ``pressure``: the allocator thrashed, so postpone grow-back."""
        if self.trial_from is not None:
            self.counters.grow_backs += 1
            self.grow_failures.pop(self.micro_batches, None)
            self._event("grow_back", f"now {self.micro_batches} micro-batches")
            self.trial_from = None
        self.counters.good_steps_total += 1
        if pressure:
            self.counters.pressure_steps += 1
            self.good_steps = 0
        else:
            self.good_steps += 1

    def on_oom(self, *, at_size_one: bool, can_retry_same: bool, batch_size: int) -> str:
        """Decide after an agreed OOM: ``"retry"`` (same split), ``"split"`` (twice as many) or ``"fail"``.

        Args:
            at_size_one: some rank ran out of memory on a micro-batch of one sample.
            can_retry_same: the store freed device memory and this step has not retried at this size yet.
            batch_size: the largest batch size over ranks (no point splitting past it).
        """
        self.counters.failed_attempts += 1
        self.counters.oom_retries += 1
        self.good_steps = 0
        if self.trial_from is not None:
            self.counters.failed_grow_backs += 1
            self.grow_failures[self.micro_batches] = self.grow_failures.get(self.micro_batches, 0) + 1
            self._event(
                "grow_back_failed",
                f"{self.micro_batches} micro-batches ran out of memory; back to {self.trial_from}, next try after "
                f"{self.grow_back_wait(self.micro_batches)} good steps",
            )
            self.micro_batches, self.trial_from = self.trial_from, None
            return "retry"
        if can_retry_same:
            self.counters.demotions += 1
            self._event("demote_retry", f"store freed device memory; retrying at {self.micro_batches} micro-batches")
            return "retry"
        nxt = self.micro_batches * 2
        if at_size_one or self.micro_batches >= batch_size or nxt > self.config.max_micro_batches:
            return "fail"
        self.counters.splits += 1
        self._event("split", f"{self.micro_batches} -> {nxt} micro-batches")
        self.micro_batches = nxt
        return "split"

    def stats(self) -> dict[str, Any]:
        return {
            **vars(self.counters),  # flat ints: no need for asdict's deep copy
            "current_micro_batches": self.micro_batches,
            "good_steps": self.good_steps,
            "in_grow_back_trial": self.trial_from is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "micro_batches": self.trial_from if self.trial_from is not None else self.micro_batches,
            "good_steps": self.good_steps,
            "grow_failures": {str(k): v for k, v in self.grow_failures.items()},
            "counters": dataclasses.asdict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mb = int(state["micro_batches"])
        self.micro_batches = max(1, min(mb, self.config.max_micro_batches))
        self.good_steps = int(state.get("good_steps", 0))
        self.grow_failures = {int(k): int(v) for k, v in state.get("grow_failures", {}).items()}
        self.trial_from = None
        known = {f.name for f in dataclasses.fields(_Counters)}
        self.counters = _Counters(**{k: int(v) for k, v in state.get("counters", {}).items() if k in known})


def now() -> float:
    """Wall clock for event records."""
    return time.time()
