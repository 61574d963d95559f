"""Run one step as micro-batches with OOM retry: the engine under the strategy hook, usable without Lightning.

A training step runs forward and backward of each micro-batch in turn; each micro-batch loss is scaled by its
share of the batch, so the summed gradient equals the unsplit step's (up to summation order). Eval steps keep
the outputs of micro-batches that succeeded and split only what is left. The runner only runs steps that are
split (after an OOM, or when asked for micro-batches); a step that is not split is the framework's own.

Note: [no hang] DDP's own reducer launches gradient all-reduces from inside backward. If one rank runs out of
memory half-way through a split step's backward, the others would wait in those all-reduces forever. So a
split step under DDP never lets the reducer communicate: every forward and backward runs under ``no_sync``,
every rank calls :meth:`RankAgreement.max` after every micro-batch (whether it ran out of memory or not), and
:func:`sync_gradients` reduces the gradients once at the end, with the same ``* (1 / world)`` then SUM that
DDP's reducer uses. Module buffers are broadcast by DDP's forward as usual, and every rank runs the same
number of forwards, so those collectives match too. Steps that synchronize nothing (eval, and training steps
inside DDP's ``no_sync``) need no agreement: they run with :class:`~lightning_tiercache.oom.recovery.LocalAgreement`
and split on one rank alone.

Note: [local retries] A DDP forward broadcasts module buffers when the previous forward synchronized
gradients. An attempt that runs out of memory has already broadcast; a retry that only this rank runs must not
broadcast again (the other ranks would not join it), so with a rank-local agreement every attempt after the
first runs with ``require_forward_param_sync`` off. On ranks other than 0 the buffers restored before that
retry are the ones from before the broadcast, so they can differ from rank 0's until the next synchronized
step broadcasts again; parameters and gradients are unaffected.

Note: [oom references] Recovery runs outside the ``except`` block: the exception, its traceback and the frames
holding the failed attempt's activations are gone before gradients are rolled back and caches are emptied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from lightning_tiercache.errors import OOMRecoveryError
from lightning_tiercache.oom.buffers import BufferSnapshot
from lightning_tiercache.oom.recovery import (
    NEXT_STEPS,
    MicroBatchPolicy,
    OOMConfig,
    RankAgreement,
    alloc_retries,
    empty_caches,
    is_oom_error,
    memory_summary,
)
from lightning_tiercache.oom.split import SplitFn, batch_size_of, merge_outputs, split_batch

__all__ = ["Failure", "MicroBatchRunner", "StepResult", "attempt", "micro_batches", "oom_message", "sync_gradients"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepResult:
    """What one step produced: per-micro-batch outputs in order, their sizes, and the split used.

    ``grads`` holds the step's own gradients when the runner was asked not to add them into ``.grad``.
    """

    outputs: list[Any]
    sizes: list[int]
    micro_batches: int
    attempts: int
    grads: list[torch.Tensor | None] | None = None


def _shares(sizes: Sequence[int], reduction: str) -> list[float]:
    total = sum(sizes)
    if reduction == "sum" or total == 0:
        return [1.0] * len(sizes)
    return [s / total for s in sizes]


def micro_batches(
    batch: Any, n: int, *, split_fn: SplitFn | None = None, loss_reduction: str = "mean"
) -> list[tuple[Any, float]]:
    """Split ``batch`` into ``n`` micro-batches, each with the factor to multiply its loss by.

    For manual optimization: scale each micro-batch loss by its factor and call ``manual_backward`` on each;
    the summed gradient equals the whole batch's. Example::

        opt.zero_grad()
        for mb, scale in micro_batches(batch, 4):
            self.manual_backward(self.loss(mb) * scale)
        opt.step()
    """
    parts = split_batch(batch, n, split_fn)
    sizes = [batch_size_of(p) or 1 for p in parts]
    return list(zip(parts, _shares(sizes, loss_reduction), strict=True))


def oom_message(exc: BaseException) -> str | None:
    """A one-line description of ``exc`` if it is an out-of-memory error, else ``None``."""
    if not is_oom_error(exc):
        return None
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """Call ``fn(*args, **kwargs)``; return ``(result, None)``, or ``(None, message)`` if it ran out of memory."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:
        message = oom_message(exc)
        if message is None:
            raise
    # Note: [oom references] `exc` and its traceback are released here, before the caller recovers.
    return None, message


def _buckets(grads: list[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in group:
            if bucket and size + g.numel() * g.element_size() > cap:
                yield bucket
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            yield bucket


def sync_gradients(params: Sequence[torch.Tensor], group: Any = None, bucket_bytes: int = 25 * 2**20) -> None:
    """Average ``.grad`` over ranks like DDP's reducer: multiply by ``1 / world``, then all-reduce SUM.

    Parameters without a gradient on some rank take zeros there; parameters unused on every rank keep
    ``grad=None``. Every rank must call this with the same parameters in the same order.

    Raises:
        TypeError: a gradient is sparse.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    device = next((p.device for p in params), torch.device("cpu"))
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    grads = []
    for p, u in zip(params, used.tolist(), strict=True):
        if not u:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise TypeError("sync_gradients does not support sparse gradients; use dense embeddings with OOM recovery")
        grads.append(p.grad)
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat.mul_(1.0 / world)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@dataclasses.dataclass(frozen=True)
class Failure:
    """A whole-batch attempt the caller already ran at the learned split, that ran out of memory somewhere.

    Args:
        message: this rank's OOM message, or ``None`` if the OOM was on another rank.
        at_size_one: (agreed over ranks) some rank ran out of memory on a batch of one sample.
        batch_size: (agreed over ranks) the largest batch size of the attempt.
    """

    message: str | None
    at_size_one: bool = False
    batch_size: int = 1


class _Agreed(NamedTuple):
    """One round of agreement, identical on every rank."""

    oom: bool  # some rank ran out of memory in this micro-batch
    at_one: bool  # ... on a micro-batch of one sample
    k_max: int
    k_min: int  # differs from k_max only if the ranks' learned splits diverged (e.g. a partial state load)
    batch_max: int
    pressure: bool  # some rank's allocator had to retry (CUDA thrashing)

    @property
    def mismatch(self) -> bool:
        return self.k_max != self.k_min


class MicroBatchRunner:
    """Runs steps as micro-batches and walks the OOM ladder of :class:`~lightning_tiercache.oom.MicroBatchPolicy`.

    Args:
        config: the OOM settings.
        policy: the learned split (one policy per kind of step).
        agreement: cross-rank agreement; a single process needs none.
        free_memory: step (2) of the ladder: demote the store's device tier, return the bytes freed.
        device: the accelerator, for cache emptying, allocator-retry watching and memory summaries.
    """

    def __init__(
        self,
        config: OOMConfig,
        policy: MicroBatchPolicy,
        agreement: RankAgreement | None = None,
        free_memory: Callable[[], int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.agreement = agreement or RankAgreement()
        self.free_memory = free_memory
        self.device = device

    # ------------------------------------------------------------------ helpers

    def _parts(self, batch: Any, k: int) -> tuple[list[Any], list[int]]:
        parts = split_batch(batch, k, self.config.split_fn)
        sizes = [batch_size_of(p) or 1 for p in parts]
        return parts, sizes

    def _agree(self, oom: str | None, size: int, k: int, total: int, retries0: int) -> _Agreed:
        pressure = self.config.watch_alloc_retries and alloc_retries(self.device) > retries0
        v = self.agreement.max([oom is not None, oom is not None and size <= 1, k, -k, total, pressure])
        return _Agreed(bool(v[0]), bool(v[1]), v[2], -v[3], v[4], bool(v[5]))

    def _recover(self, demoted: bool, oomed: bool) -> bool:
        """Empty caches, maybe demote the store; return whether every rank that ran out of memory freed some."""
        empty_caches(self.device)
        if demoted or not self.config.demote_on_oom or self.free_memory is None:
            return False
        freed = self.free_memory() if oomed else 0
        empty_caches(self.device)
        return self.agreement.max([1 if (oomed and freed <= 0) else 0])[0] == 0

    def _fail(self, k: int, message: str | None) -> OOMRecoveryError:
        return OOMRecoveryError(
            f"out of memory even at {k} micro-batches (micro-batch size 1 or max_micro_batches="
            f"{self.config.max_micro_batches}); last error: {message or 'on another rank'}. "
            f"Memory: {memory_summary(self.device)}. Try: {NEXT_STEPS}."
        )

    def _buffer_snapshot(self, buffers: BufferSnapshot | Sequence[torch.Tensor]) -> BufferSnapshot | None:
        if not self.config.restore_buffers:
            return None
        if isinstance(buffers, BufferSnapshot):
            return buffers
        if not buffers:
            return None
        return BufferSnapshot([(str(i), b) for i, b in enumerate(buffers)], self.config.buffer_copy_bytes)

    # ------------------------------------------------------------------ training

    def run_train(
        self,
        batch: Any,
        micro_step: Callable[[Any, float], Any],
        params: Sequence[torch.Tensor],
        *,
        ddp: Any = None,
        buffers: BufferSnapshot | Sequence[torch.Tensor] = (),
        save: Callable[[], Any] | None = None,
        restore: Callable[[Any], None] | None = None,
        combine: bool = True,
        failed: Failure | str | None = None,
        forward_sync: bool | None = None,
    ) -> StepResult:
        """Run forward and backward of ``batch`` as micro-batches; retry on OOM per the ladder.

        Args:
            batch: the whole batch.
            micro_step: ``micro_step(part, scale)`` runs forward and backward of ``loss * scale`` (skip the
                multiply when ``scale == 1.0`` to stay bit-exact with an unsplit run) and returns its output.
            params: the parameters whose ``.grad`` the step accumulates into.
            ddp: a ``DistributedDataParallel`` module: micro-batches run under ``no_sync`` and the gradients are
                synced once at the end (if it would have synced).
            buffers: module buffers to snapshot and restore after a failed attempt (a
                :class:`~lightning_tiercache.oom.buffers.BufferSnapshot`, or the buffers: then one is built for
                this call).
            save: snapshot of caller state (logged metrics) taken before the step; ``restore`` rolls back to it.
            combine: add the step's gradients to the ones present before (and sync them); with ``False`` leave
                ``.grad`` as it was and return the step's gradients in ``StepResult.grads``.
            failed: the caller already ran the whole batch at the learned split and it ran out of memory (a
                message: on this process; a :class:`Failure`: agreed over ranks), and the caller rolled back
                (``save`` is the state from before that attempt). The runner goes on from that failure instead
                of trying the same split again.
            forward_sync: ``ddp.require_forward_param_sync`` for each attempt (``None``: its value now). With a
                rank-local agreement only the first attempt may broadcast buffers: the others run on this rank
                alone (see Note: [local retries]).

        Raises:
            OOMRecoveryError: out of memory at micro-batch size 1; ``.grad`` is back to what it was before.
        """
        prior = [p.grad for p in params]
        for p in params:
            p.grad = None
        snap = self._buffer_snapshot(buffers)
        if snap is not None:
            snap.save()
        state = save() if save is not None else None
        must_sync = ddp is not None and bool(ddp.require_backward_grad_sync)
        fwd_sync = bool(ddp.require_forward_param_sync) if ddp is not None and forward_sync is None else forward_sync
        local = self.agreement.world_size == 1
        retries0 = alloc_retries(self.device)
        total = batch_size_of(batch) or 1
        demoted = False
        attempts = 0
        k = self.policy.begin_step()
        while True:
            attempts += 1
            parts, sizes = self._parts(batch, k)
            shares = _shares(sizes, self.config.loss_reduction)
            outputs: list[Any] = []
            oom: str | None = None
            agreed = _Agreed(False, False, k, k, total, False)
            rerun = True
            if failed is not None:  # the caller's own attempt at this split; nothing to roll back again
                prior_failure = failed if isinstance(failed, Failure) else Failure(failed, sizes[0] <= 1, total)
                oom, failed, rerun = prior_failure.message, None, False
                agreed = _Agreed(True, prior_failure.at_size_one, k, k, max(total, prior_failure.batch_size), False)
            elif ddp is not None:
                # Note: [local retries] a retry agreed by no other rank must not broadcast buffers again.
                ddp.require_forward_param_sync = bool(fwd_sync) and not (local and attempts > 1)
            with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                for i in range(k if rerun else 0):
                    size = sizes[i] if i < len(parts) else 0
                    if i < len(parts):
                        out, oom = attempt(micro_step, parts[i], shares[i])
                        if oom is None:
                            outputs.append(out)
                        del out
                    agreed = self._agree(oom, size, k, total, retries0)
                    if agreed.oom or agreed.mismatch:
                        break
            if not (agreed.oom or agreed.mismatch):
                break
            # Note: [oom references] nothing from the failed attempt is referenced past this point.
            del outputs, parts
            for p in params:
                p.grad = None
            if snap is not None:
                snap.restore()
            if restore is not None:
                restore(state)
            if agreed.mismatch:
                k = self.policy.micro_batches = agreed.k_max
                continue
            can_retry = self._recover(demoted, oom is not None)
            demoted = demoted or (self.config.demote_on_oom and self.free_memory is not None)
            decision = self.policy.on_oom(
                at_size_one=agreed.at_one, can_retry_same=can_retry, batch_size=agreed.batch_max
            )
            if decision == "fail":
                for p, g in zip(params, prior, strict=True):
                    p.grad = g
                raise self._fail(k, oom)
            k = self.policy.micro_batches
        self.policy.on_success(agreed.pressure)
        step_grads = [p.grad for p in params]
        result = StepResult(outputs, sizes, k, attempts)
        if not combine:
            for p, g in zip(params, prior, strict=True):
                p.grad = g
            result.grads = step_grads
            return result
        for p, g in zip(params, prior, strict=True):
            if g is not None:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
        if must_sync:
            sync_gradients(params, getattr(ddp, "process_group", None), self.config.sync_bucket_bytes)
            ddp.require_forward_param_sync = True
        return result

    # ------------------------------------------------------------------ eval

    def run_eval(
        self,
        batch: Any,
        micro_step: Callable[[Any], Any],
        *,
        save: Callable[[], Any] | None = None,
        restore: Callable[[Any], None] | None = None,
        failed: Failure | str | None = None,
    ) -> StepResult:
        """Run an eval step as micro-batches; on OOM keep what succeeded and split only the rest.

        ``save``/``restore`` wrap every micro-batch, so a micro-batch that runs out of memory after logging or
        updating a metric leaves no trace, and samples that succeeded are never run (or counted) twice.
        ``failed``: as in :meth:`run_train`, the caller's own attempt of the whole batch at one micro-batch ran
        out of memory and was rolled back.

        Raises:
            OOMRecoveryError: out of memory at micro-batch size 1.
        """
        retries0 = alloc_retries(self.device)
        total = batch_size_of(batch) or 1
        k = self.policy.begin_step()
        parts, _ = self._parts(batch, k)
        queue: deque[Any] = deque(parts + [None] * (k - len(parts)))
        outputs: list[Any] = []
        sizes: list[int] = []
        demoted = False
        attempts = 1
        first = True
        agreed = _Agreed(False, False, k, k, total, False)
        while queue:
            part = queue.popleft()
            size = (batch_size_of(part) or 1) if part is not None else 0
            state = save() if save is not None else None
            oom: str | None
            if failed is not None:  # the caller's attempt of this very part
                prior_failure = failed if isinstance(failed, Failure) else Failure(failed, size <= 1, total)
                out, oom, failed = None, prior_failure.message, None
                agreed = _Agreed(True, prior_failure.at_size_one, k, k, max(total, prior_failure.batch_size), False)
            else:
                out, oom = attempt(micro_step, part) if part is not None else (None, None)
                agreed = self._agree(oom, size, k, total, retries0)
            mismatch = agreed.mismatch and first
            if not (agreed.oom or mismatch):
                if part is not None:
                    outputs.append(out)
                    sizes.append(size)
                first = False
                del out
                continue
            del out
            if restore is not None:
                restore(state)
            attempts += 1
            if mismatch:
                k = self.policy.micro_batches = agreed.k_max
                parts, _ = self._parts(batch, k)
                queue = deque(parts + [None] * (k - len(parts)))
                continue
            can_retry = self._recover(demoted, oom is not None)
            demoted = demoted or (self.config.demote_on_oom and self.free_memory is not None)
            before = self.policy.micro_batches
            decision = self.policy.on_oom(
                at_size_one=agreed.at_one, can_retry_same=can_retry, batch_size=agreed.batch_max
            )
            if decision == "fail":
                raise self._fail(before, oom)
            factor = max(1, self.policy.micro_batches // before)
            k = self.policy.micro_batches
            queue = deque(self._resplit([part, *queue], factor))
        self.policy.on_success(agreed.pressure)
        return StepResult(outputs, sizes, k, attempts)

    def merge(self, result: StepResult) -> Any:
        """The eval step's output for the whole batch, reassembled in order."""
        return merge_outputs(result.outputs, result.sizes, self.config.merge_fn)

    def _resplit(self, items: list[Any], factor: int) -> list[Any]:
        if factor == 1:
            return items
        out: list[Any] = []
        for item in items:
            pieces = self._parts(item, factor)[0] if item is not None else []
            out.extend(pieces + [None] * (factor - len(pieces)))
        return out
