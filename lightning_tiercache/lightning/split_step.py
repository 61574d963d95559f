"""Running one Lightning step as micro-batches: what the step hook hands the micro-batch runner.

The runner (:class:`~lightning_tiercache.oom.microbatch.MicroBatchRunner`) knows nothing of Lightning. Here a
training step becomes ``micro_step(part, scale)`` calls of the strategy's own ``training_step`` and
``backward`` (so precision scaling and the backward hooks run as usual), the micro-batch outputs become one
``training_step`` output, and a split step's gradients wait in :class:`PendingGrads` for the closure's
``backward`` call, which adds them to ``.grad`` (and, under DDP, all-reduces them once, see Note: [no hang] in
:mod:`lightning_tiercache.oom.microbatch`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_tiercache.errors import BatchSplitError
from lightning_tiercache.lightning.step_state import SavedStep, set_log_batch
from lightning_tiercache.oom.microbatch import StepResult, sync_gradients
from lightning_tiercache.oom.recovery import OOMConfig
from lightning_tiercache.oom.split import merge_outputs

__all__ = ["PendingGrads", "Step", "combine_outputs", "detach", "micro_step_of"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Step:
    """One training step's call and what the hook knew before it ran, kept until its backward for a retry."""

    original: Callable[..., Any]
    backward: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    accumulate: int
    results: Any
    saved: SavedStep | None = None
    window_start: bool = True  # first batch of an accumulation window: Lightning zeroes the grads before backward
    synced: bool = False  # DDP synchronizes this step's gradients (not inside `no_sync`)
    forward_sync: bool = False  # DDP's `require_forward_param_sync` before the step's forward
    failed: str | None = None  # this rank's forward ran out of memory (Note: [completing the buckets])


@dataclasses.dataclass
class PendingGrads:
    """A split step's gradients, waiting for the closure's ``backward`` call."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    ddp: DistributedDataParallel | None
    must_sync: bool

    def apply(self, bucket_bytes: int) -> None:
        """Add the gradients to ``.grad`` (and all-reduce them once if DDP would have)."""
        for p, g in zip(self.params, self.grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        if self.must_sync and self.ddp is not None:
            sync_gradients(self.params, self.ddp.process_group, bucket_bytes)
            self.ddp.require_forward_param_sync = True


def detach(x: Any) -> Any:
    """``x`` with every tensor (also inside a mapping) detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {k: detach(v) for k, v in x.items()}
    return x


def micro_step_of(
    step: Step,
    optimizer: Any,
    forward: Callable[..., Any],
    *,
    backward: bool,
) -> Callable[[Any, float], Any]:
    """``micro_step(part, scale)`` for the runner: the step's forward on ``part`` and (``backward``) the
    strategy's backward of its loss times ``scale`` (and ``1 / accumulate``, as Lightning's closure divides)."""
    batch, rest, kwargs, accumulate = step.args[0], step.args[1:], step.kwargs, step.accumulate

    def micro_step(part: Any, scale: float) -> Any:
        if part is not batch:  # Lightning set the whole batch before this call
            set_log_batch(step.results, part)
        out = forward(step.original, part, *rest, **kwargs)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if backward and isinstance(loss, torch.Tensor):
            scaled = loss if scale == 1.0 else loss * scale
            step.backward(scaled if accumulate == 1 else scaled / accumulate, optimizer)
        return detach(out)

    return micro_step


def combine_outputs(result: StepResult, config: OOMConfig, warn_once: Callable[[str, str], None]) -> Any:
    """One ``training_step`` output from the micro-batches': the loss weighed by micro-batch share, the extras
    merged (or the last micro-batch's, with a warning, if they cannot be merged)."""
    if len(result.outputs) == 1:
        return result.outputs[0]
    pairs = [(o, s) for o, s in zip(result.outputs, result.sizes, strict=True) if o is not None]
    outs, sizes = [o for o, _ in pairs], [s for _, s in pairs]
    total = sum(sizes)
    share = (lambda s: s / total) if config.loss_reduction == "mean" else (lambda s: 1.0)
    losses: list[Any] = [o.get("loss") if isinstance(o, Mapping) else o for o in outs]
    loss = torch.stack([lo * share(s) for lo, s in zip(losses, sizes, strict=True)]).sum()
    if not isinstance(outs[0], Mapping):
        return loss
    extras = [{k: v for k, v in o.items() if k != "loss"} for o in outs]
    try:
        merged = merge_outputs(extras, sizes, config.merge_fn)
    except BatchSplitError:
        warn_once("extras", "tiercache oom: cannot merge training_step extras; kept the last micro-batch's")
        merged = extras[-1]
    return {"loss": loss, **merged}
