"""What a Lightning step may change that a retried step must find as it was: the rollback of one step.

A step that runs out of memory and is run again must count once: the values ``self.log`` put in the loop's
results, the states of torchmetrics metrics in the module or among the logged values, the module's buffers
(BatchNorm statistics) and AMP's per-optimizer scaler state. :class:`StepState` snapshots them before a step and
puts them back after a failed attempt, at a cost that does not grow with the size of the module's buffers
(:class:`~lightning_tiercache.oom.buffers.BufferSnapshot`) or of its metric states
(:class:`~lightning_tiercache.oom.rollback.MetricSnapshots` clones only states changed in place).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from torchmetrics import Metric

from lightning_tiercache.oom.buffers import BufferSnapshot
from lightning_tiercache.oom.recovery import OOMConfig
from lightning_tiercache.oom.rollback import MetricSnapshots

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SavedStep", "StepState", "set_log_batch"]


def _lightning_replaced() -> dict[type, tuple[str, ...]]:
    """Lightning's logged values assign their states (``self.value = self.value + ...``), never change them in
    place: snapshot them by reference (still checked by version counter, see
    :mod:`lightning_tiercache.oom.rollback`)."""
    try:
        from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
    except ImportError:  # another Lightning layout: learned per step instead
        return {}
    return {_ResultMetric: ("value", "cumulated_batch_size")}


def set_log_batch(results: Any, batch: Any) -> None:
    """Point the loop's results at ``batch``: ``self.log`` weighs mean-reduced values by the batch size it finds
    there, so each micro-batch's values are weighed by its own size."""
    if results is not None:
        results.batch = batch
        results.batch_size = None


class SavedStep(NamedTuple):
    """One snapshot taken by :meth:`StepState.save`."""

    metrics: list[tuple[Any, Any]]  # (metric, its MetricSnapshots snapshot)
    results: Any  # the loop's results object, or None
    logged: dict[str, Any]  # its entries before the step
    buffers: bool  # the module's buffers were saved too


class StepState:
    """Snapshots and rollback of a Lightning step's side effects, for the module of one Trainer.

    Args:
        config: ``restore_buffers`` and ``buffer_copy_bytes`` say which buffers are copied before a step.
    """

    def __init__(self, config: OOMConfig) -> None:
        self.config = config
        self.buffers: BufferSnapshot | None = None
        self.metrics: list[Any] = []
        self._snapshots = MetricSnapshots(_lightning_replaced())
        self._is_metric: dict[type, bool] = {}
        self._key: tuple[int, int] | None = None

    def refresh(self, trainer: pl.Trainer) -> None:
        """Look up the module's buffers and metrics once per epoch (a module walk is not free).

        Buffers or metrics added to the module in the middle of an epoch are rolled back from the next epoch on.
        """
        module = trainer.lightning_module
        key = (id(module), trainer.current_epoch)
        if self._key == key:
            return
        self._key = key
        named = list(module.named_buffers()) if self.config.restore_buffers else []
        self.buffers = BufferSnapshot(named, self.config.buffer_copy_bytes) if named else None
        self.metrics = [m for m in module.modules() if isinstance(m, Metric)]

    def forget(self) -> None:
        """Drop everything looked up (the next :meth:`refresh` looks again)."""
        self.buffers = None
        self.metrics = []
        self._key = None

    def save(self, results: Any, *, buffers: bool) -> SavedStep:
        """Snapshot what a step may log or accumulate: the loop's ``results``, module metrics and (``buffers``)
        the module's buffers, as :meth:`refresh` found them last."""
        logged = dict(results) if results is not None else {}
        save = self._snapshots.save
        kinds = self._is_metric
        states: list[tuple[Any, Any]] = []
        for m in self.metrics:  # a loop, not a comprehension: no frame of its own on this per-step path
            states.append((m, save(m)))
        for m in logged.values():
            is_metric = kinds.get(type(m))
            if is_metric is None:  # isinstance against torchmetrics' ABC is slow: once per type
                is_metric = kinds[type(m)] = isinstance(m, Metric)
            if is_metric:
                states.append((m, save(m)))
        saved_buffers = buffers and self.buffers is not None
        if saved_buffers:
            self.buffers.save()  # type: ignore[union-attr]
        return SavedStep(states, results, logged, saved_buffers)

    def learn(self, saved: SavedStep) -> None:
        """After a step that succeeded: learn which metric states it replaced and which it changed in place."""
        learn = self._snapshots.learn
        for m, s in saved.metrics:
            learn(m, s)

    def restore(self, saved: SavedStep, trainer: pl.Trainer | None = None) -> None:
        """Undo the step since ``saved``: logged entries, metric states, buffers and (with ``trainer``) AMP's
        per-optimizer scaler state, which a step that unscaled gradients before failing would leave behind."""
        results, logged = saved.results, saved.logged
        if results is not None:
            for key in [k for k in results if k not in logged]:
                del results[key]
        restore = self._snapshots.restore
        for m, s in saved.metrics:
            restore(m, s)
        if saved.buffers and self.buffers is not None:
            self.buffers.restore()
        if trainer is None:
            return
        scaler = getattr(getattr(trainer.strategy, "precision_plugin", None), "scaler", None)
        per_optimizer = getattr(scaler, "_per_optimizer_states", None)
        if isinstance(per_optimizer, dict):
            for opt in trainer.optimizers:
                per_optimizer.pop(id(opt), None)
