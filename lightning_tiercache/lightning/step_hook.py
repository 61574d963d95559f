"""The strategy hook: wraps a Trainer's strategy step calls for OOM split-and-retry and micro-batching.

Lightning's automatic optimization runs ``training_step`` inside the optimizer closure, then ``zero_grad``,
then ``strategy.backward(loss)``. The hook's ``training_step`` runs forward *and* backward of every
micro-batch itself (through the strategy's own ``backward``, so precision scaling and the backward hooks run
as usual), rolls back and retries on OOM, and hands the step's gradients to the closure's ``backward`` call,
which adds them to ``.grad`` and, under DDP, all-reduces them once (see Note: [no hang] in
:mod:`lightning_tiercache.oom.microbatch`). Gradients already in ``.grad`` from earlier batches of an accumulation
window stay untouched until then, so a failed attempt never corrupts them (see Note: [stale grads]).

Eval steps are split the same way; each micro-batch's ``self.log`` values and torchmetrics states are
snapshotted and restored if it runs out of memory, so no sample is counted twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric

from lightning_tiercache.errors import BatchSplitError
from lightning_tiercache.oom.microbatch import MicroBatchRunner, StepResult, attempt, oom_message, sync_gradients
from lightning_tiercache.oom.recovery import MicroBatchPolicy, OOMConfig, RankAgreement, now
from lightning_tiercache.oom.rollback import MetricSnapshots
from lightning_tiercache.oom.split import merge_outputs

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_tiercache.store.placement import TierStore

__all__ = ["StepHook"]

log = logging.getLogger(__name__)

_EVAL_STEPS = ("validation_step", "test_step", "predict_step")
_WRAPPED = ("training_step", "backward", *_EVAL_STEPS)


@dataclasses.dataclass(slots=True)
class _TrainPlan:
    """What the training steps of one epoch read from the Trainer (see :meth:`StepHook._train_plan`)."""

    epoch_loop: Any
    hooked: bool  # automatic optimization, optimizers, and a strategy that leaves accumulation to Lightning
    accumulate: int
    world: int
    results: Any


@dataclasses.dataclass(slots=True)
class _Step:
    """One training step's call, kept until its backward for a retry (Note: [fast path])."""

    original: Callable[..., Any]
    backward: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    accumulate: int
    results: Any = None
    buffers: list[torch.Tensor] | None = None  # clones of the module's buffers before the step
    saved: Any = None  # what `StepHook._save` returned before the step


@dataclasses.dataclass
class _PendingGrads:
    """The step's gradients, waiting for the closure's ``backward`` call."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    ddp: DistributedDataParallel | None
    must_sync: bool


def _lightning_replaced() -> dict[type, tuple[str, ...]]:
    """Lightning's logged values assign their states (``self.value = self.value + ...``), never change them in
    place: snapshot them by reference (still checked by version counter, see
    :mod:`lightning_tiercache.oom.rollback`)."""
    try:
        from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
    except ImportError:  # another Lightning layout: learned per step instead
        return {}
    return {_ResultMetric: ("value", "cumulated_batch_size")}


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {k: _detach(v) for k, v in x.items()}
    return x


class StepHook:
    """Split-and-retry for the steps of one Trainer, installed on its strategy.

    Args:
        config: OOM recovery settings.
        store: the TierStore whose device tier is demoted (ladder step 2) before splitting.
        forward_context: ``forward_context(batch)`` gives the context entered around each training forward the
            hook runs, with its (micro-)batch, or ``None`` for none (e.g. ``ActivationOffloader.context_for``).

    Example::

        hook = StepHook(OOMConfig(grow_back_after_steps=200))
        hook.install(trainer)      # in Callback.setup
        ...
        hook.uninstall()           # in Callback.teardown and on_exception
    """

    def __init__(
        self,
        config: OOMConfig | None = None,
        store: TierStore | None = None,
        forward_context: Callable[[Any], AbstractContextManager[Any] | None] | None = None,
    ) -> None:
        self.config = config or OOMConfig()
        self.store = store
        self.forward_context = forward_context
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        self.train_policy = MicroBatchPolicy(self.config, on_event=self._event)
        self.eval_policy = MicroBatchPolicy(self.config, on_event=self._event)
        self._trainer: pl.Trainer | None = None
        self._strategy: Any = None
        self._saved: dict[str, tuple[bool, Any]] = {}
        self._pending: _PendingGrads | None = None
        self._retry: tuple[Any, ...] | None = None  # a `_Step`'s fields (Note: [fast path])
        self._stage = "train"
        self._warned: set[str] = set()
        self._parts_key: tuple[int, int] | None = None
        self._snapshots = MetricSnapshots(_lightning_replaced())
        self._is_metric: dict[type, bool] = {}
        self._parts: tuple[list[torch.Tensor], list[Any]] = ([], [])
        self._plan: _TrainPlan | None = None

    # ------------------------------------------------------------------ install

    @property
    def installed(self) -> bool:
        return self._strategy is not None

    def install(self, trainer: pl.Trainer) -> None:
        """Wrap ``trainer.strategy``'s step calls and ``backward``; a second call only forgets the cached plan."""
        if self._strategy is trainer.strategy:
            self._plan = None  # another stage or module: read the Trainer again on the next step
            return
        self.uninstall()
        strategy = trainer.strategy
        originals = {name: getattr(strategy, name) for name in _WRAPPED}
        for name in _WRAPPED:
            self._saved[name] = (name in vars(strategy), vars(strategy).get(name))
        self._trainer, self._strategy = trainer, strategy
        setattr(strategy, "training_step", self._wrap_train(originals["training_step"], originals["backward"]))  # noqa: B010
        setattr(strategy, "backward", self._wrap_backward(originals["backward"]))  # noqa: B010
        for name in _EVAL_STEPS:
            setattr(strategy, name, self._wrap_eval(name, originals[name]))

    def uninstall(self) -> None:
        """Put the strategy's original methods back exactly; safe to call more than once."""
        strategy = self._strategy
        if strategy is None:
            return
        for name, (had, value) in self._saved.items():
            if had:
                setattr(strategy, name, value)
            else:
                vars(strategy).pop(name, None)
        self._saved.clear()
        self._strategy = self._trainer = None
        self._pending = self._retry = None
        self._parts_key = None
        self._parts = ([], [])
        self._plan = None

    @contextlib.contextmanager
    def installed_on(self, trainer: pl.Trainer) -> Any:
        """``with hook.installed_on(trainer): ...`` installs, and uninstalls even on exception."""
        self.install(trainer)
        try:
            yield self
        finally:
            self.uninstall()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "train": self.train_policy.state_dict(), "eval": self.eval_policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; missing parts (an older or empty state) keep defaults."""
        if "train" in state:
            self.train_policy.load_state_dict(state["train"])
        if "eval" in state:
            self.eval_policy.load_state_dict(state["eval"])

    def stats(self) -> dict[str, Any]:
        """Counters: ``oom_retries, splits, current_micro_batches, demotions, failed_attempts, grow_backs, ...``;
        the eval policy's under ``eval_*``."""
        out = self.train_policy.stats()
        out.update({f"eval_{k}": v for k, v in self.eval_policy.stats().items()})
        return out

    def drain_events(self) -> list[dict[str, Any]]:
        """Notable events since the last call (OOM retries, split changes), oldest first."""
        out = list(self.events)
        self.events.clear()
        return out

    def _event(self, name: str, detail: str) -> None:
        step = self._trainer.global_step if self._trainer is not None else -1
        self.events.append({"time": now(), "event": name, "detail": detail, "stage": self._stage, "step": step})

    # ------------------------------------------------------------------ helpers

    def _runner(self, policy: MicroBatchPolicy) -> MicroBatchRunner:
        device = getattr(self._strategy, "root_device", None)
        free = self._free_memory if self.store is not None else None
        return MicroBatchRunner(self.config, policy, RankAgreement(), free_memory=free, device=device)

    def _free_memory(self) -> int:
        from lightning_tiercache.store.placement import Tier

        if self.store is None:
            return 0
        freed = self.store.clear_cache()
        freed += self.store.demote(Tier.DEVICE)
        return freed

    def _installed_trainer(self) -> pl.Trainer:
        if self._trainer is None:
            raise RuntimeError("StepHook is not installed: call hook.install(trainer) first")
        return self._trainer

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _set_log_batch(self, batch: Any, results: Any = None) -> None:
        # `self.log` weighs mean-reduced values by the batch size it finds in the results' batch.
        if results is None:
            results = getattr(self._trainer, "_results", None)
        if results is not None:
            results.batch = batch
            results.batch_size = None

    def _module_parts(self) -> tuple[list[torch.Tensor], list[Any]]:
        """The module's buffers and torchmetrics metrics, looked up once per epoch (a module walk is not free).

        Buffers or metrics added to the module in the middle of an epoch are rolled back from the next epoch on.
        """
        trainer = self._installed_trainer()
        module = trainer.lightning_module
        key = (id(module), trainer.current_epoch)
        if self._parts_key != key:
            buffers = list(module.buffers()) if self.config.restore_buffers else []
            self._parts = (buffers, [m for m in module.modules() if isinstance(m, Metric)])
            self._parts_key = key
        return self._parts

    def _save(self, results: Any = None) -> Any:
        """Snapshot what a step may log or accumulate: the trainer's logged results and module metrics.

        The module's metrics are the ones :meth:`_module_parts` found last (each step looks them up first).
        """
        if results is None:
            results = getattr(self._installed_trainer(), "_results", None)
        logged = dict(results) if results is not None else {}
        save = self._snapshots.save
        kinds = self._is_metric
        states: list[tuple[Any, Any]] = []
        for m in self._parts[1]:  # a loop, not a comprehension: no frame of its own on this per-step path
            states.append((m, save(m)))
        for m in logged.values():
            is_metric = kinds.get(type(m))
            if is_metric is None:  # isinstance against torchmetrics' ABC is slow: once per type
                is_metric = kinds[type(m)] = isinstance(m, Metric)
            if is_metric:
                states.append((m, save(m)))
        return states, results, logged

    def _learn(self, saved: Any) -> None:
        learn = self._snapshots.learn
        for m, s in saved[0]:
            learn(m, s)

    def _restore(self, saved: Any) -> None:
        states, results, logged = saved
        if results is not None:
            for key in [k for k in results if k not in logged]:
                del results[key]
        restore = self._snapshots.restore
        for m, s in states:
            restore(m, s)
        scaler = getattr(getattr(self._strategy, "precision_plugin", None), "scaler", None)
        states = getattr(scaler, "_per_optimizer_states", None)
        if isinstance(states, dict) and self._trainer is not None:
            for opt in self._trainer.optimizers:
                states.pop(id(opt), None)

    def _ddp(self) -> DistributedDataParallel | None:
        model = getattr(self._strategy, "model", None)
        return model if isinstance(model, DistributedDataParallel) else None

    # ------------------------------------------------------------------ training

    def _wrap_train(self, original: Callable[..., Any], backward: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(self._training_step, original, backward)

    def _forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = None if self.forward_context is None else self.forward_context(args[0] if args else None)
        if ctx is None:
            return fn(*args, **kwargs)
        with ctx:
            return fn(*args, **kwargs)

    def _training_step(
        self, original: Callable[..., Any], backward: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        trainer = self._trainer
        if trainer is None:
            trainer = self._installed_trainer()  # raises
        self._stage = "train"
        self._retry = None
        if self._pending is not None:
            self._warn_once("pending", "tiercache oom: backward was skipped after a training step; dropping its grads")
            self._pending = None
        epoch_loop = trainer.fit_loop.epoch_loop
        batch_idx = epoch_loop.batch_idx
        plan = self._plan
        if plan is None or batch_idx == 0 or plan.epoch_loop is not epoch_loop:
            plan = self._plan = self._train_plan(trainer, epoch_loop)
        if not (self.config.enabled and args and plan.hooked):
            return self._forward(original, *args, **kwargs)
        window_start = batch_idx % plan.accumulate == 0
        if not (window_start and plan.world == 1 and self.train_policy.micro_batches == 1):
            step = _Step(original, backward, args, kwargs, plan.accumulate, plan.results)
            return self._split_step(step, plan.world, window_start, None)
        # Note: [fast path] one process, one micro-batch, first batch of an accumulation window: the step runs as if
        # the hook were not there (forward here, backward in the closure), after a snapshot of what it may log. An
        # OOM in forward rolls back and splits here; one in the closure's backward drops the failed graph, rolls
        # back and runs the split step inside that `backward` call (see `_wrap_backward`). This runs every step,
        # so it is written out inline, and what a retry needs waits in a tuple (fields of `_Step`, in order).
        buffers = self._parts[0]  # looked up on the epoch's first batch (see `_train_plan`)
        clones = [b.detach().clone() for b in buffers] if buffers else None
        saved = self._save(plan.results)
        out, failed = None, None
        try:
            ctx = None if self.forward_context is None else self.forward_context(args[0])
            if ctx is None:
                out = original(*args, **kwargs)
            else:
                with ctx:
                    out = original(*args, **kwargs)
        except Exception as exc:
            failed = oom_message(exc)
            if failed is None:
                raise
        # Note: [oom references] the exception and its frames are gone here.
        retry = (original, backward, args, kwargs, plan.accumulate, plan.results, clones, saved)
        if failed is None:
            if out is None:  # a skipped batch: no backward follows
                self.train_policy.on_success()
            else:
                self._retry = retry
            return out
        step = _Step(*retry)
        self._rollback(step)
        return self._split_step(step, 1, True, failed)

    def _train_plan(self, trainer: pl.Trainer, epoch_loop: Any) -> _TrainPlan:
        """What a training step reads from the Trainer that holds for an epoch, looked up again on each epoch's
        first batch: accumulation can change there (``GradientAccumulationScheduler``), and so can the module's
        buffers and metrics (:meth:`_module_parts`)."""
        strategy = self._strategy
        module = strategy.lightning_module
        self._module_parts()
        # The training loop's results (what `trainer._results` resolves to here, without its state checks).
        results = getattr(epoch_loop, "_results", None)
        return _TrainPlan(
            epoch_loop=epoch_loop,
            hooked=bool(module.automatic_optimization)
            and bool(strategy.optimizers)
            and not getattr(strategy, "handles_gradient_accumulation", False),
            accumulate=trainer.accumulate_grad_batches,
            world=trainer.world_size,
            results=results if results is not None else getattr(trainer, "_results", None),
        )

    def _rollback(self, step: _Step) -> None:
        for b, v in zip(self._parts[0], step.buffers or [], strict=True):
            b.copy_(v)
        self._restore(step.saved)
        step.buffers = step.saved = None

    def _params(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        # The gradients the closure's zero_grad would wipe: the optimizer's (read per step, so parameter groups
        # added by an unfreezing schedule are seen at once; no module walk).
        return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _micro_step(self, step: _Step) -> Callable[[Any, float], Any]:
        batch, rest, kwargs, accumulate = step.args[0], step.args[1:], step.kwargs, step.accumulate
        optimizer = self._strategy.optimizers[0]

        def micro_step(part: Any, scale: float) -> Any:
            if part is not batch:  # Lightning set the whole batch before this call
                self._set_log_batch(part, step.results)
            out = self._forward(step.original, part, *rest, **kwargs)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if isinstance(loss, torch.Tensor):
                scaled = loss if scale == 1.0 else loss * scale
                step.backward(scaled if accumulate == 1 else scaled / accumulate, optimizer)
            return _detach(out)

        return micro_step

    def _split_step(self, step: _Step, world: int, window_start: bool, failed: str | None) -> Any:
        """Run the step through the micro-batch runner: forward and backward here, gradients handed to the
        closure's ``backward`` (Note: [no hang] under DDP)."""
        params = self._params(self._strategy.optimizers[0])
        # Note: [stale grads] on the first batch of an accumulation window Lightning zeroes the grads right after
        # this call; release them now so a failed attempt's memory does not sit next to stale gradients.
        if window_start:
            for p in params:
                p.grad = None
        ddp = self._ddp() if world > 1 else None
        if ddp is None and world > 1:
            self._warn_once(
                "strategy",
                f"tiercache oom: {type(self._strategy).__name__} is not DDP; micro-batching works, but an OOM on one "
                "rank in backward can leave the other ranks waiting in the strategy's own collectives",
            )
        must_sync = ddp is not None and bool(ddp.require_backward_grad_sync)
        result = self._run_split(step, params, failed, ddp=ddp, combine=False)
        if result.grads is None:  # run_train(combine=False) always returns the step's grads
            raise RuntimeError("tiercache oom: the micro-batch runner returned no gradients")
        if all(o is None for o in result.outputs):
            return None
        self._pending = _PendingGrads(params, result.grads, ddp, must_sync)
        return self._combine(result)

    def _combine(self, result: StepResult) -> Any:
        if len(result.outputs) == 1:
            return result.outputs[0]
        pairs = [(o, s) for o, s in zip(result.outputs, result.sizes, strict=True) if o is not None]
        outs, sizes = [o for o, _ in pairs], [s for _, s in pairs]
        total = sum(sizes)
        share = (lambda s: s / total) if self.config.loss_reduction == "mean" else (lambda s: 1.0)
        losses: list[Any] = [o.get("loss") if isinstance(o, Mapping) else o for o in outs]
        loss = torch.stack([lo * share(s) for lo, s in zip(losses, sizes, strict=True)]).sum()
        if not isinstance(outs[0], Mapping):
            return loss
        extras = [{k: v for k, v in o.items() if k != "loss"} for o in outs]
        try:
            merged = merge_outputs(extras, sizes, self.config.merge_fn)
        except BatchSplitError:
            self._warn_once("extras", "tiercache oom: cannot merge training_step extras; kept the last micro-batch's")
            merged = extras[-1]
        return {"loss": loss, **merged}

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(closure_loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            retry, self._retry = self._retry, None
            if retry is not None:  # the backward of an unsplit step (Note: [fast path]), inline: it runs every step
                failed = None
                try:
                    out = original(closure_loss, *args, **kwargs)
                except Exception as exc:
                    failed = oom_message(exc)
                    if failed is None:
                        raise
                if failed is not None:  # Note: [oom references] outside the `except`: the exception is gone
                    return self._unsplit_backward_failed(retry, closure_loss, failed)
                self._learn(retry[-1])  # the `saved` field
                self.train_policy.on_success()
                return out
            pending, self._pending = self._pending, None
            if pending is None:
                return original(closure_loss, *args, **kwargs)
            for p, g in zip(pending.params, pending.grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            if pending.must_sync and pending.ddp is not None:
                sync_gradients(pending.params, pending.ddp.process_group, self.config.sync_bucket_bytes)
                pending.ddp.require_forward_param_sync = True
            return closure_loss

        return backward

    def _unsplit_backward_failed(self, retry: tuple[Any, ...], closure_loss: torch.Tensor, failed: str) -> Any:
        """The closure's backward of an unsplit step ran out of memory: the step again, split (Note: [fast path])."""
        step = _Step(*retry)
        # Note: [oom references] the closure still holds the loss, and through it the failed graph's saved
        # tensors: cut it loose so the retry has that memory. A view cannot be detached in place (it is kept).
        with contextlib.suppress(RuntimeError):
            closure_loss.detach_()
        params = self._params(self._strategy.optimizers[0])
        for p in params:  # the window's first batch: Lightning zeroed them just before this backward
            p.grad = None
        self._rollback(step)
        # `self.log` names values after the hook Lightning is in: this is still the training step's work.
        module = self._strategy.lightning_module
        fx, module._current_fx_name = module._current_fx_name, "training_step"
        try:
            self._run_split(step, params, failed, combine=True)
        finally:
            module._current_fx_name = fx
        return closure_loss

    def _run_split(
        self, step: _Step, params: list[torch.Tensor], failed: str | None, *, ddp: Any = None, combine: bool
    ) -> StepResult:
        """The micro-batch runner on ``step``'s batch (``failed``: the unsplit attempt's OOM, rolled back)."""
        self._module_parts()
        try:
            return self._runner(self.train_policy).run_train(
                step.args[0],
                self._micro_step(step),
                params,
                ddp=ddp,
                buffers=self._parts[0],
                save=lambda: self._save(step.results),
                restore=self._restore,
                combine=combine,
                failed=failed,
            )
        finally:
            self._set_log_batch(step.args[0], step.results)

    # ------------------------------------------------------------------ eval

    def _wrap_eval(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        stage = name.removesuffix("_step")

        def eval_step(*args: Any, **kwargs: Any) -> Any:
            if not (self.config.enabled and self.config.split_eval) or not args:
                return original(*args, **kwargs)
            self._stage = stage
            batch, rest = args[0], args[1:]
            self._module_parts()
            results = getattr(self._trainer, "_results", None)
            failed: str | None = None
            # Note: [fast path] for eval: one process, one micro-batch: the step runs as is after a snapshot.
            if self.eval_policy.micro_batches == 1 and self._installed_trainer().world_size == 1:
                saved = self._save(results)
                out, failed = attempt(original, *args, **kwargs)
                if failed is None:
                    self._learn(saved)
                    self.eval_policy.on_success()
                    return out
                self._restore(saved)
                del saved

            def micro_step(part: Any) -> Any:
                if part is not batch:
                    self._set_log_batch(part, results)
                return original(part, *rest, **kwargs)

            runner = self._runner(self.eval_policy)
            try:
                result = runner.run_eval(
                    batch, micro_step, save=lambda: self._save(results), restore=self._restore, failed=failed
                )
            finally:
                self._set_log_batch(batch, results)
            return runner.merge(result)

        return eval_step
