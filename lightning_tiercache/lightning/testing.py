"""Testing helpers: inject ``torch.OutOfMemoryError`` at chosen points, to test OOM recovery in your pipeline.

Example::

    from lightning_tiercache.lightning.testing import OOMInjector

    injector = OOMInjector(above_batch_size=8, phase="backward")
    injector.attach(model.encoder)          # raise in backward whenever a batch larger than 8 samples reaches it
    trainer = L.Trainer(callbacks=[TierCacheCallback(), injector.callback()])
    trainer.fit(model)
    assert injector.injected > 0

The injector looks at the leading size of the first tensor entering the module (forward) or of the first
gradient flowing back out of it (backward). It never allocates anything itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection
from typing import Any

import torch

from lightning_tiercache.oom.split import batch_size_of

__all__ = ["PHASES", "InjectionPoint", "OOMInjector"]

PHASES = ("forward", "backward", "both")


@dataclasses.dataclass(frozen=True)
class InjectionPoint:
    """Where an injection check happens: what ``when`` receives."""

    phase: str  # "forward" or "backward"
    batch_size: int | None
    rank: int
    step: int
    call: int  # index of this check among all checks of the injector, from 0


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class OOMInjector:
    """Raises ``torch.OutOfMemoryError`` in forward or backward of the modules it is attached to.

    All given conditions must hold for an injection.

    Args:
        above_batch_size: inject only when the batch has more samples than this (``None``: any size).
        phase: ``"forward"``, ``"backward"`` or ``"both"``.
        ranks: inject only on these ranks (``None``: every rank).
        steps: inject only while :attr:`step` is one of these (``None``: every step). Set :attr:`step` yourself
            or let :meth:`callback` track ``trainer.global_step``.
        max_faults: stop after this many injections (``None``: no limit).
        when: a predicate on :class:`InjectionPoint` for anything else (e.g. ``lambda p: p.call in {0, 2}``).
        enabled: start armed; flip :attr:`enabled` to disarm.

    Raises:
        ValueError: bad ``phase`` or ``above_batch_size``/``max_faults`` below 0.
    """

    def __init__(
        self,
        *,
        above_batch_size: int | None = None,
        phase: str = "forward",
        ranks: Collection[int] | None = None,
        steps: Collection[int] | None = None,
        max_faults: int | None = None,
        when: Callable[[InjectionPoint], bool] | None = None,
        enabled: bool = True,
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        for name, value in (("above_batch_size", above_batch_size), ("max_faults", max_faults)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.above_batch_size = above_batch_size
        self.phase = phase
        self.ranks = None if ranks is None else frozenset(ranks)
        self.steps = None if steps is None else frozenset(steps)
        self.max_faults = max_faults
        self.when = when
        self.enabled = enabled
        self.step = 0
        self.injected = 0
        self.checks = 0
        self.log: list[InjectionPoint] = []
        self._handles: list[Any] = []

    def attach(self, module: torch.nn.Module) -> OOMInjector:
        """Check on every forward (and/or backward) of ``module``. Returns ``self``."""
        if self.phase in ("forward", "both"):
            self._handles.append(module.register_forward_pre_hook(self._forward_hook))
        if self.phase in ("backward", "both"):
            self._handles.append(module.register_full_backward_pre_hook(self._backward_hook))
        return self

    def detach(self) -> None:
        """Remove every hook this injector registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check(self, phase: str, batch_size: int | None) -> None:
        """Raise ``torch.OutOfMemoryError`` if the conditions hold (call it from your own code, too)."""
        point = InjectionPoint(phase, batch_size, _rank(), self.step, self.checks)
        self.checks += 1
        if not self._fires(point):
            return
        self.injected += 1
        self.log.append(point)
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by lightning_tiercache.lightning.testing.OOMInjector: {phase}, batch size "
            f"{batch_size}, rank {point.rank}, step {point.step})"
        )

    def _fires(self, p: InjectionPoint) -> bool:
        if not self.enabled or (self.max_faults is not None and self.injected >= self.max_faults):
            return False
        if self.above_batch_size is not None and (p.batch_size is None or p.batch_size <= self.above_batch_size):
            return False
        if self.ranks is not None and p.rank not in self.ranks:
            return False
        if self.steps is not None and p.step not in self.steps:
            return False
        return self.when is None or bool(self.when(p))

    def _forward_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.check("forward", batch_size_of(args))

    def _backward_hook(self, module: torch.nn.Module, grad_output: tuple[Any, ...]) -> None:
        self.check("backward", batch_size_of(grad_output))

    def callback(self) -> Any:
        """A Lightning callback that keeps :attr:`step` equal to ``trainer.global_step``."""
        import lightning.pytorch as pl

        injector = self

        class InjectorStepTracker(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
                injector.step = trainer.global_step

        return InjectorStepTracker()
