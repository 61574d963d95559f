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

The all-reduced gradients of that step are then wrong on every rank, which is fine: a one-element-per-question
flag tells every rank to discard them and retry split (Note: [carried flag]). Collectives stay in the same
order on every rank: the buckets, then the flag, then the retry's own.

Note: [carried flag] Every rank must learn, before its optimizer steps, whether any rank failed in this step.
The default is one all-reduce of three host integers right after backward (:func:`step_failed`, on a gloo
group): a second rank-to-rank wait after DDP's own last bucket. On a model whose gradients are small that wait
is most of what the library adds (two gloo processes on a 2-core VM: a 3 ms step took about 1 ms longer), so
there the flag rides with the gradients instead: :class:`CarriedFlag` is DDP's communication hook
(``ddp.register_comm_hook``, DDP's public extension point), does what DDP's reducer does without a hook (scale
the bucket by ``1 / world_size``, multiplied as the reducer does, then an all-reduce SUM: the same bits), and
puts the flag into the last bucket as extra elements, so one all-reduce carries both. A failing rank sets its
flag before its zero-gradient backward launches the last bucket (Note: [completing the buckets]); an OOM after
this rank's last bucket went out is past recovery (the flag said "no failure" already) and raises
:class:`~lightning_tiercache.errors.OOMRecoveryError` on that rank.

Note: [where the flag rides] The hook is registered only where it was measured to pay
(:func:`can_carry_flag`): host gradients of float32/float64 within the inside limit (256 KiB), no hook
registered before the first training step (a module's ``on_fit_start``, Lightning's
``DDPStrategy(ddp_comm_hook=...)``), no DDP ``mixed_precision``, no sparse gradients, not compiled autograd's
Python reducer. For larger gradients a Python hook cost more than the wait it saves. On a 6x768 MLP (14 MB of
gradients, two gloo processes, one thread each; medians of 3, 2026-12-02, a busy machine) a backward took
39.6 ms with DDP's C++ reduce alone, 39.2 ms with the agreement after it, 42.6 ms with torch's own Python
``allreduce_hook``, and 42.5 ms with a hook that launched the flag's own all-reduce beside the last bucket
(not kept: :meth:`CarriedFlag.register` refuses where the flag cannot ride inside). CUDA was not measured, so
CUDA keeps the agreement after backward.

Plain PyTorch; the Lightning step hook drives it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CarriedFlag",
    "GradMarks",
    "can_carry_flag",
    "ddp_params",
    "finish_backward",
    "flag_group",
    "step_failed",
    "zero_forward",
    "zero_loss",
]

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


def can_carry_flag(ddp: DistributedDataParallel) -> bool:
    """Whether :class:`CarriedFlag` can be ``ddp``'s communication hook (Note: [carried flag]): no hook is
    registered yet, DDP's own ``mixed_precision`` is off, no module makes sparse gradients, and DDP reduces in
    its C++ reducer (not the per-parameter Python reducer of compiled autograd, which calls hooks per tensor)."""
    hooks = getattr(ddp, "_comm_hooks", None)  # DDP's record of `register_comm_hook` calls; unknown: do not try
    if hooks is None or hooks or getattr(ddp, "mixed_precision", None) is not None:
        return False
    if getattr(ddp, "_use_python_reducer", False):
        return False
    sparse = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    if any(isinstance(m, sparse) and m.sparse for m in ddp.module.modules()):
        return False
    # Note: [where the flag rides]: only gradients small enough for the flag to ride inside their bucket.
    params = ddp_params(ddp)
    return all(p.device.type == "cpu" and p.dtype in _INSIDE_DTYPES for p in params) and (
        sum(p.numel() * p.element_size() for p in params) <= _INSIDE_BYTES
    )


class CarriedFlag:
    """DDP's gradient all-reduce, plus this step's OOM flag carried with the last bucket (Note: [carried flag]).

    Per synchronized step: :meth:`arm` before forward, :meth:`fail` if this rank ran out of memory (before the
    zero-gradient backward), :meth:`collect` after backward.

    Example::

        flag = CarriedFlag()
        flag.register(ddp)          # once, before the first backward
        flag.arm(batch_size)
        loss = ddp(x).sum(); loss.backward()
        failed, at_one, largest = flag.collect()
    """

    __slots__ = ("_inside", "_inside_fut", "_values")

    def __init__(self) -> None:
        self._values = [0, 0, 0]
        self._inside: list[float] | None = None  # the flag's slots, read back from inside the last bucket
        self._inside_fut: torch.futures.Future[torch.Tensor] | None = None

    def register(self, ddp: DistributedDataParallel) -> None:
        """Make this ``ddp``'s communication hook; ``ValueError`` where :func:`can_carry_flag` says no (DDP has a
        hook already, or the gradients are too large for the flag to ride inside the last bucket)."""
        if not can_carry_flag(ddp):
            raise ValueError(
                "tiercache oom: the OOM flag cannot ride with this DDP's gradients (Note: [where the flag rides])"
            )
        ddp.register_comm_hook(ddp.process_group, self.hook)

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """The communication hook: DDP's own scale-and-sum of ``bucket`` on ``state`` (DDP's process group)."""
        group = state if state is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        tensor = bucket.buffer()
        # DDP's reducer without a hook multiplies by the reciprocal while copying into the bucket (not a
        # division, which can differ in the last bit): the same product here keeps every gradient bit.
        tensor.mul_(1.0 / world)
        if not bucket.is_last():
            return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(_first_value)
        # Note: [flag inside the bucket] the small host last bucket (`register` checked) takes the flag as extra
        # elements, so one all-reduce carries both: SUM of 0/1 says whether any rank failed, and each rank's
        # batch size sits in its own slot (the largest is read back). Exact: whole numbers below 2**24 in float32
        # or wider.
        slots = [0.0] * (2 + world)
        slots[0], slots[1] = float(self._values[0]), float(self._values[1])
        slots[2 + dist.get_rank(group)] = float(min(self._values[2], _EXACT_INT))
        joined = torch.cat([tensor, torch.tensor(slots, dtype=tensor.dtype)])
        fut = dist.all_reduce(joined, group=group, async_op=True).get_future()
        self._inside_fut = fut.then(functools.partial(self._read_inside, tensor.numel()))
        return self._inside_fut

    def _read_inside(self, n: int, fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        joined = fut.value()[0]
        self._inside = joined[n:].tolist()
        return joined[:n]

    def arm(self, batch_size: int) -> None:
        """A new synchronized step on a batch of ``batch_size``: nothing failed yet, no flag sent."""
        self._values = [0, 0, int(batch_size)]
        self._inside = self._inside_fut = None

    @property
    def sent(self) -> bool:
        """Whether this step's flag went out already (DDP launched the last bucket)."""
        return self._inside_fut is not None

    def fail(self) -> None:
        """This rank ran out of memory in this step (on the batch :meth:`arm` was given)."""
        self._values[0], self._values[1] = 1, int(self._values[2] <= 1)

    def collect(self) -> tuple[bool, bool, int] | None:
        """After backward: ``(some rank failed, some rank failed at one sample, largest batch size)``, or ``None``
        when DDP launched no last bucket in this step (then no rank sent a flag: agree another way)."""
        inside_fut, self._inside_fut = self._inside_fut, None
        if inside_fut is None:
            return None
        inside_fut.wait()  # done already: DDP's backward waited for it
        inside, self._inside = self._inside, None
        if inside is None:
            raise RuntimeError("tiercache oom: the last bucket's all-reduce finished without its flag")
        return inside[0] > 0, inside[1] > 0, int(max(inside[2:]))


_INSIDE_BYTES = 256 * 1024  # a last bucket up to this size takes the flag inside (two copies of it a step)
_EXACT_INT = 2**24  # whole numbers up to this are exact in float32


_INSIDE_DTYPES = (torch.float32, torch.float64)


# DDP compares a hook's annotations with its own types, and this module's are strings (postponed evaluation).
CarriedFlag.hook.__annotations__.update({"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]})


def _first_value(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
    return fut.value()[0]
