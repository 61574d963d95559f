"""What a DDP rank that ran out of memory does so the other ranks never wait for it, with DDP's reducer kept.

On a step whose gradients DDP synchronizes, the reducer launches one all-reduce per gradient bucket from inside
backward, in bucket order, with any registered communication hook. The library lets that happen untouched on
every step that does not fail (DDP keeps its overlap of communication with backward, its comm hooks and its
buckets). A rank that runs out of memory must still take its part in every one of those all-reduces, or the
other ranks wait forever; then every rank must learn that the step failed. See Note: [completing the buckets].

Note: [completing the buckets] After an OOM the failing rank releases its failed graph and runs a backward of a
zero loss through the parameters whose gradients the reducer has not seen yet:

- OOM in forward: the failed forward never reached DDP's ``prepare_for_backward``, so :func:`zero_forward`
  runs one more forward through the DDP module that returns ``0 * sum(p[0])`` over every parameter DDP
  tracks (the wrapped module's own forward does not run) with buffer broadcast off for that call (the failed
  forward already broadcast), and the caller runs its backward: every bucket is launched, with zeros.
- OOM in backward: some parameters are already marked ready and their buckets may be on the wire. Marking one
  twice is an error in DDP, so :func:`finish_backward` sends zeros only through the parameters that the
  failed backward had not reached (told apart by :class:`GradMarks`, taken before that backward) and that
  belong to the failed graph (with ``find_unused_parameters`` the others were marked ready by DDP itself).

The all-reduced gradients of that step are then wrong on every rank, which is fine: the one-element flag the
caller reduces right after backward (:func:`step_failed`) tells every rank to discard them and retry split.
Collectives stay in the same order on every rank: the buckets, then the flag, then the retry's own.

Plain PyTorch; the Lightning step hook drives it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradMarks", "ddp_params", "finish_backward", "flag_group", "step_failed", "zero_forward", "zero_loss"]

_grad_of = operator.attrgetter("grad")


def ddp_params(ddp: DistributedDataParallel) -> list[torch.Tensor]:
    """The parameters whose gradients ``ddp``'s reducer waits for (trainable, not in ``parameters_to_ignore``)."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    return [p for name, p in ddp.module.named_parameters() if p.requires_grad and name not in ignored]


def zero_loss(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """A scalar zero that depends on every tensor in ``params`` (each one's gradient is all zeros)."""
    terms = [p.reshape(-1)[:1].sum() for p in params]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.float() for t in terms]).sum() * 0.0


def zero_forward(ddp: DistributedDataParallel, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One forward through ``ddp`` that returns :func:`zero_loss` of ``params`` (Note: [completing the buckets]).

    The wrapped module's own ``forward`` is replaced for this call only, the way Lightning redirects a DDP
    forward to ``training_step``; buffers are not broadcast again.
    """
    module = ddp.module
    own = vars(module)
    had, saved = "forward" in own, own.get("forward")
    sync = ddp.require_forward_param_sync
    module.forward = lambda *args, **kwargs: zero_loss(params)
    ddp.require_forward_param_sync = False
    try:
        out = ddp()
    finally:
        if had:
            own["forward"] = saved
        else:
            own.pop("forward", None)
        if not ddp.require_forward_param_sync:  # DDP sets it after a synced forward; else keep the caller's
            ddp.require_forward_param_sync = sync
    return out


class GradMarks:
    """Which ``.grad`` each parameter had before a backward, to tell afterwards which ones it reached.

    Taking the marks reads one attribute per parameter (and a version counter for gradients that exist, as
    under accumulation); nothing is copied.
    """

    __slots__ = ("grads", "versions")

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.grads: list[torch.Tensor | None] = list(map(_grad_of, params))
        self.versions = [-1 if g is None else g._version for g in self.grads]

    def reached(self, params: Sequence[torch.Tensor]) -> list[bool]:
        """For each parameter: did a backward since the marks accumulate into its ``.grad``?"""
        out = []
        for p, g, v in zip(params, self.grads, self.versions, strict=True):
            now = p.grad
            out.append(now is not g or (g is not None and g._version != v))
        return out


def _graph_leaves(root: Any) -> set[int]:
    """``id`` of every leaf tensor the autograd graph under ``root`` accumulates into (a walk of its nodes)."""
    leaves: set[int] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def finish_backward(
    ddp: DistributedDataParallel, params: Sequence[torch.Tensor], marks: GradMarks, loss: torch.Tensor | None
) -> None:
    """After this rank's backward through ``ddp`` ran out of memory: launch the buckets it had not launched.

    Args:
        ddp: the DDP module whose reducer the failed backward was feeding.
        params: :func:`ddp_params` of ``ddp``, in the order ``marks`` were taken.
        marks: taken right before the failed backward.
        loss: the failed backward's root, still holding its graph's structure (only read when
            ``find_unused_parameters`` is on, to leave out the parameters DDP already marked unused).
    """
    reached = marks.reached(params)
    pending = [p for p, r in zip(params, reached, strict=True) if not r]
    if ddp.find_unused_parameters and loss is not None and loss.grad_fn is not None:
        in_graph = _graph_leaves(loss.grad_fn)
        pending = [p for p in pending if id(p) in in_graph]
    if pending:
        torch.autograd.backward(zero_loss(pending))


def flag_group() -> Any:
    """A process group for the per-step flag that keeps it on the host: the default group if it is gloo, else
    a new gloo group (a collective: every rank must call this at the same point, as the step hook's install does).
    """
    if "gloo" in str(dist.get_backend()):
        return None
    return dist.new_group(backend="gloo")


def step_failed(oom: bool, at_size_one: bool, batch_size: int, group: Any = None) -> tuple[bool, bool, int]:
    """The per-step agreement of a synchronized DDP step: did any rank run out of memory?

    One all-reduce (MAX) of three host integers on ``group`` (see :func:`flag_group`); every rank calls it once
    per synchronized step, right after backward. Returns ``(some rank failed, some rank failed at one sample,
    largest batch size)``.
    """
    t = torch.tensor([int(oom), int(at_size_one), int(batch_size)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    a, b, c = t.tolist()
    return bool(a), bool(b), int(c)
