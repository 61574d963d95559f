"""The strategy hook: Lightning's own steps until one runs out of memory, then split-and-retry.

The hook wraps a Trainer's strategy ``training_step``, ``backward`` and eval step calls. A step that does not
fail is Lightning's own (Note: [fast path]): forward here, then Lightning's closure, its ``zero_grad`` and its
``backward`` (or none, when the loop skips backward, as SWA's BatchNorm epoch does), DDP's reducer with its
bucketed overlap and any communication hook. What the hook adds is a snapshot of what the step may log or
update (:mod:`lightning_tiercache.lightning.step_state`) and, under DDP on steps that synchronize gradients,
a three-integer OOM flag that every rank reads after backward: one all-reduce of its own after backward, or,
for small host gradients, inside DDP's last gradient bucket with the library as DDP's communication hook
(Note: [carried flag] and Note: [where the flag rides] in :mod:`lightning_tiercache.oom.ddp`).

When forward or backward raises an OOM, the failed attempt is dropped and rolled back, and the step runs again
as micro-batches (:mod:`lightning_tiercache.lightning.split_step`, :class:`~lightning_tiercache.oom.MicroBatchRunner`),
so the optimizer steps once on the same gradient. Steps whose gradients no other rank waits for (one process,
DDP inside ``no_sync``, every eval step) recover on their own rank; a DDP step that synchronizes recovers on
every rank together (Note: [completing the buckets] in :mod:`lightning_tiercache.oom.ddp`). Strategies whose
forward has its own collectives (FSDP, DeepSpeed) run every training step through the runner with
agreement after each micro-batch, as their forwards must stay in lockstep anyway.

While the owner callback is not among ``trainer.callbacks`` (Lightning's batch-size search removes every
callback while it runs its trials, and needs to see the OOMs it probes for), the hook steps aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_tiercache.lightning.split_step import PendingGrads, Step, combine_outputs, micro_step_of
from lightning_tiercache.lightning.step_state import StepState, set_log_batch
from lightning_tiercache.oom.ddp import (
    CarriedFlag,
    GradMarks,
    can_carry_flag,
    ddp_params,
    finish_backward,
    flag_group,
    step_failed,
    zero_forward,
)
from lightning_tiercache.oom.microbatch import Failure, MicroBatchRunner, StepResult, attempt, oom_message
from lightning_tiercache.oom.recovery import LocalAgreement, MicroBatchPolicy, OOMConfig, RankAgreement, now
from lightning_tiercache.oom.split import batch_size_of

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
    hooked: bool  # automatic optimization, optimizers, a strategy that leaves accumulation to Lightning, owner listed
    accumulate: int
    results: Any
    ddp: DistributedDataParallel | None  # the DDP module, with more than one rank
    ddp_params: list[torch.Tensor]  # what its reducer waits for
    lockstep: bool  # several ranks and a forward with collectives of its own (not DDP): always split, agreed
    carrier: CarriedFlag | None  # DDP's communication hook carrying the OOM flag (Note: [carried flag])


def _forward_has_collectives(strategy: Any) -> bool:
    """Whether the strategy's forward communicates (sharded parameters are gathered): not DDP's."""
    from lightning.pytorch.strategies import DDPStrategy

    module = type(strategy).__module__
    return not isinstance(strategy, DDPStrategy) or "deepspeed" in module or "xla" in module


class _Method:
    """A wrapped strategy method that reads as the method it wraps: attributes come from the original.

    Note: [wrapped methods] the hook's wrappers are instance attributes of the strategy, so
    ``trainer.strategy.backward`` is the wrapper. What code reads from that attribute (a ``Mock``'s
    ``call_count`` when a test patched ``Strategy.backward``, ``__self__``, ``__name__``) is the original's.
    """

    __slots__ = ("__wrapped__", "_call")

    def __init__(self, call: Callable[..., Any], original: Callable[..., Any]) -> None:
        self._call = call
        self.__wrapped__ = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __repr__(self) -> str:
        return repr(self.__wrapped__)


class StepHook:
    """Split-and-retry for the steps of one Trainer, installed on its strategy.

    Args:
        config: OOM recovery settings.
        store: the TierStore whose device tier is demoted (ladder step 2) before splitting.
        forward_context: ``forward_context(batch)`` gives the context entered around each training forward the
            hook runs, with its (micro-)batch, or ``None`` for none (e.g. ``ActivationOffloader.context_for``).

    Attributes:
        owner: the callback that installed the hook; while it is not in ``trainer.callbacks`` the hook steps
            aside (``None``: never).

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
        self.owner: object | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        self.train_policy = MicroBatchPolicy(self.config, on_event=self._event)
        self.eval_policy = MicroBatchPolicy(self.config, on_event=self._event)
        self.state = StepState(self.config)
        self._trainer: pl.Trainer | None = None
        self._strategy: Any = None
        self._saved: dict[str, tuple[bool, Any]] = {}
        self._pending: PendingGrads | None = None
        self._retry: Step | None = None  # the unsplit step whose backward comes next (Note: [fast path])
        self._stage = "train"
        self._warned: set[str] = set()
        self._plan: _TrainPlan | None = None
        self._flag_group: Any = None
        self._flag_group_made = False
        self._carrier: tuple[DistributedDataParallel, CarriedFlag] | None = None
        self._eval_agreed = False  # eval steps agree across ranks (the strategy's forward communicates)

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
        if trainer.world_size > 1 and not self._flag_group_made and torch.distributed.is_initialized():
            self._flag_group = flag_group()  # every rank installs in `setup`: a collective is safe here
            self._flag_group_made = True
        originals = {name: getattr(strategy, name) for name in _WRAPPED}
        for name in _WRAPPED:
            self._saved[name] = (name in vars(strategy), vars(strategy).get(name))
        self._trainer, self._strategy = trainer, strategy
        self._eval_agreed = trainer.world_size > 1 and _forward_has_collectives(strategy)
        wrapped = {
            "training_step": self._wrap_train(originals["training_step"], originals["backward"]),
            "backward": self._wrap_backward(originals["backward"]),
            **{name: self._wrap_eval(name, originals[name]) for name in _EVAL_STEPS},
        }
        for name, call in wrapped.items():
            setattr(strategy, name, _Method(call, originals[name]))

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
        self._plan = None
        self._carrier = None  # the DDP of this fit keeps its hook; the next fit wraps a new DDP
        self.state.forget()

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

    def _runner(self, policy: MicroBatchPolicy, *, agreed: bool) -> MicroBatchRunner:
        device = getattr(self._strategy, "root_device", None)
        free = self._free_memory if self.store is not None else None
        agreement = RankAgreement() if agreed else LocalAgreement()
        return MicroBatchRunner(self.config, policy, agreement, free_memory=free, device=device)

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

    def _owner_listed(self, trainer: pl.Trainer) -> bool:
        return self.owner is None or self.owner in trainer.callbacks  # type: ignore[attr-defined]

    def _ddp(self) -> DistributedDataParallel | None:
        model = getattr(self._strategy, "model", None)
        return model if isinstance(model, DistributedDataParallel) else None

    def _params(self) -> list[torch.Tensor]:
        # The gradients the closure's zero_grad would wipe: the optimizer's (read when needed, so parameter groups
        # added by an unfreezing schedule are seen at once; no module walk).
        optimizer = self._strategy.optimizers[0]
        return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = None if self.forward_context is None else self.forward_context(args[0] if args else None)
        if ctx is None:
            return fn(*args, **kwargs)
        with ctx:
            return fn(*args, **kwargs)

    def _skip_backward(self) -> bool:
        # Lightning's flag for epochs that run forward only (SWA's BatchNorm update); read on the OOM path only.
        return bool(getattr(self._installed_trainer().fit_loop, "_skip_backward", False))

    # ------------------------------------------------------------------ training

    def _wrap_train(self, original: Callable[..., Any], backward: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(self._training_step, original, backward)

    def _train_plan(self, trainer: pl.Trainer, epoch_loop: Any) -> _TrainPlan:
        """What a training step reads from the Trainer that holds for an epoch, looked up again on each epoch's
        first batch: accumulation can change there (``GradientAccumulationScheduler``), and so can the module's
        buffers and metrics (:meth:`StepState.refresh`)."""
        strategy = self._strategy
        module = strategy.lightning_module
        self.state.refresh(trainer)
        # The training loop's results (what `trainer._results` resolves to here, without its state checks).
        results = getattr(epoch_loop, "_results", None)
        world = trainer.world_size
        ddp = self._ddp() if world > 1 else None
        hooked = (
            bool(module.automatic_optimization)
            and bool(strategy.optimizers)
            and not getattr(strategy, "handles_gradient_accumulation", False)
            and self._owner_listed(trainer)
        )
        return _TrainPlan(
            epoch_loop=epoch_loop,
            hooked=hooked,
            accumulate=trainer.accumulate_grad_batches,
            results=results if results is not None else getattr(trainer, "_results", None),
            ddp=ddp,
            ddp_params=ddp_params(ddp) if ddp is not None else [],
            lockstep=world > 1 and ddp is None,
            carrier=self._carrier_for(ddp) if ddp is not None and hooked and self.config.enabled else None,
        )

    def _carrier_for(self, ddp: DistributedDataParallel) -> CarriedFlag | None:
        """The OOM flag's carrier on ``ddp``, registered as its communication hook on its first training step
        (after every ``on_*_start`` hook, where a module registers its own), or ``None`` where it cannot be."""
        if self._carrier is not None and self._carrier[0] is ddp:
            return self._carrier[1]
        if not can_carry_flag(ddp):
            return None
        carrier = CarriedFlag()
        try:
            carrier.register(ddp)
        except RuntimeError:  # a hook registered through a path DDP does not record: keep it, agree after backward
            return None
        self._carrier = (ddp, carrier)
        return carrier

    def _training_step(
        self, original: Callable[..., Any], backward: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        trainer = self._trainer
        if trainer is None:
            trainer = self._installed_trainer()  # raises
        self._stage = "train"
        self._retry = None
        if self._pending is not None:
            self._warn_once("pending", "tiercache oom: backward was skipped after a split training step; dropped it")
            self._pending = None
        epoch_loop = trainer.fit_loop.epoch_loop
        batch_idx = epoch_loop.batch_idx
        plan = self._plan
        if plan is None or batch_idx == 0 or plan.epoch_loop is not epoch_loop:
            plan = self._plan = self._train_plan(trainer, epoch_loop)
        if not (self.config.enabled and args and plan.hooked):
            return self._forward(original, *args, **kwargs)
        ddp = plan.ddp
        step = Step(
            original,
            backward,
            args,
            kwargs,
            plan.accumulate,
            plan.results,
            window_start=batch_idx % plan.accumulate == 0,
            synced=ddp is not None and bool(ddp.require_backward_grad_sync),
            forward_sync=ddp is not None and bool(ddp.require_forward_param_sync),
        )
        if plan.lockstep:
            self._warn_once(
                "strategy",
                f"tiercache oom: {type(self._strategy).__name__} is not DDP; every step runs as micro-batches with "
                "cross-rank agreement, and an OOM inside the strategy's own collectives can still leave ranks waiting",
            )
            return self._split_step(step, agreed=True, failed=None)
        if self.train_policy.micro_batches > 1:
            return self._split_step(step, agreed=step.synced, failed=None)
        # Note: [fast path] an unsplit step runs as if the hook were not there (forward here, backward in the
        # closure), after a snapshot of what it may log or update. It runs every step, so it is written out inline.
        carrier = plan.carrier if step.synced else None
        if carrier is not None:
            carrier.arm(batch_size_of(args[0]) or 1)
        step.saved = self.state.save(plan.results, buffers=True)
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
        if failed is None:
            if out is None:  # a skipped batch: no backward follows
                self.train_policy.on_success()
            else:
                self._retry = step
            return out
        if step.synced and ddp is not None and not self._skip_backward():
            # The other ranks are about to all-reduce their gradients: take part with zeros, through Lightning's own
            # backward of this zero loss; the flag after it makes every rank retry (Note: [completing the buckets]).
            step.failed = failed
            self._retry = step
            if carrier is not None:
                carrier.fail()
            return zero_forward(ddp, plan.ddp_params)
        self.state.restore(step.saved, trainer)
        return self._split_step(step, agreed=False, failed=failed)

    def _split_step(self, step: Step, *, agreed: bool, failed: str | None) -> Any:
        """Run the step through the micro-batch runner: forward and backward here, gradients handed to the
        closure's ``backward`` (Note: [no hang] under DDP)."""
        params = self._params()
        # Note: [stale grads] on the first batch of an accumulation window Lightning zeroes the grads right after
        # this call; release them now so a failed attempt's memory does not sit next to stale gradients.
        if step.window_start:
            for p in params:
                p.grad = None
        ddp = self._ddp() if self._installed_trainer().world_size > 1 else None
        must_sync = ddp is not None and bool(ddp.require_backward_grad_sync)
        result = self._run_split(step, params, failed, ddp=ddp, agreed=agreed, combine=False)
        if result.grads is None:  # run_train(combine=False) always returns the step's grads
            raise RuntimeError("tiercache oom: the micro-batch runner returned no gradients")
        if all(o is None for o in result.outputs):
            return None
        self._pending = PendingGrads(params, result.grads, ddp, must_sync)
        return combine_outputs(result, self.config, self._warn_once)

    def _run_split(
        self,
        step: Step,
        params: list[torch.Tensor],
        failed: Failure | str | None,
        *,
        ddp: Any,
        agreed: bool,
        combine: bool,
    ) -> StepResult:
        """The micro-batch runner on ``step``'s batch (``failed``: the unsplit attempt's OOM, rolled back)."""
        trainer = self._installed_trainer()
        self.state.refresh(trainer)
        optimizer = self._strategy.optimizers[0]
        micro_step = micro_step_of(step, optimizer, self._forward, backward=not self._skip_backward())
        try:
            return self._runner(self.train_policy, agreed=agreed).run_train(
                step.args[0],
                micro_step,
                params,
                ddp=ddp,
                buffers=self.state.buffers or (),
                save=lambda: self.state.save(step.results, buffers=False),
                restore=lambda saved: self.state.restore(saved, trainer),
                combine=combine,
                failed=failed,
                forward_sync=step.forward_sync if ddp is not None else None,
            )
        finally:
            set_log_batch(step.results, step.args[0])

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(closure_loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            step, self._retry = self._retry, None
            if step is not None:  # the backward of an unsplit step (Note: [fast path])
                return self._unsplit_backward(step, original, closure_loss, args, kwargs)
            pending, self._pending = self._pending, None
            if pending is None:
                return original(closure_loss, *args, **kwargs)
            pending.apply(self.config.sync_bucket_bytes)
            return closure_loss

        return backward

    def _unsplit_backward(
        self,
        step: Step,
        original: Callable[..., Any],
        closure_loss: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Lightning's backward of an unsplit step; on an OOM here (or, under DDP, on any rank in this step) the
        step again, split."""
        plan = self._plan
        ddp = plan.ddp if plan is not None and step.synced else None
        marks = GradMarks(plan.ddp_params) if ddp is not None and plan is not None and step.failed is None else None
        prior = None
        if not step.window_start:  # gradients of earlier batches of the window are in `.grad`
            prior = self._protect_accumulated()
        failed = step.failed
        out = None
        try:
            out = original(closure_loss, *args, **kwargs)
        except Exception as exc:
            failed = oom_message(exc)
            if failed is None:
                raise
        # Note: [oom references] outside the `except`: the exception is gone.
        here = failed is not None
        carrier = plan.carrier if ddp is not None and plan is not None else None
        # The batch size matters to a retry and to the agreement after backward; a good step that needs neither
        # does not read it (the carried flag took it at `arm`).
        size = (batch_size_of(step.args[0]) or 1) if here or (ddp is not None and carrier is None) else 1
        if failed is not None and step.failed is None and ddp is not None and marks is not None and plan is not None:
            if carrier is not None:
                if carrier.sent:
                    self._oom_after_flag(failed)
                carrier.fail()
            finish_backward(ddp, plan.ddp_params, marks, closure_loss)
        agreed = carrier.collect() if carrier is not None else None
        if agreed is not None:
            oom, at_one, batch_max = agreed
        elif ddp is not None:
            oom, at_one, batch_max = step_failed(here, here and size <= 1, size, self._flag_group)
        else:
            oom, at_one, batch_max = here, here and size <= 1, size
        if not oom:
            if step.saved is not None:
                self.state.learn(step.saved)
            self.train_policy.on_success()
            return out
        return self._retry_split(step, closure_loss, prior, Failure(failed, at_one, batch_max), ddp)

    def _oom_after_flag(self, failed: str) -> None:
        from lightning_tiercache.errors import OOMRecoveryError

        raise OOMRecoveryError(
            f"out of memory in backward of batch {self._installed_trainer().fit_loop.epoch_loop.batch_idx} after "
            "this rank's last gradient bucket was sent: the other ranks were told the step succeeded, so it cannot "
            f"be retried together ({failed}). Lower the batch size, or register a DDP communication hook of your "
            "own, which makes every step agree after backward instead."
        )

    def _protect_accumulated(self) -> list[torch.Tensor | None] | None:
        """A copy of the gradients accumulated by the window's earlier batches, which a failed backward would
        change in place (``OOMConfig.protect_accumulated_grads``); ``None`` when off."""
        if not self.config.protect_accumulated_grads:
            return None
        return [None if p.grad is None else p.grad.detach().clone() for p in self._params()]

    def _retry_split(
        self,
        step: Step,
        closure_loss: torch.Tensor,
        prior: list[torch.Tensor | None] | None,
        failure: Failure,
        ddp: DistributedDataParallel | None,
    ) -> Any:
        """The unsplit step failed (here or on another rank): drop it, roll back, and run it split."""
        from lightning_tiercache.errors import OOMRecoveryError

        # Note: [oom references] the closure still holds the loss, and through it the failed graph's saved
        # tensors: cut it loose so the retry has that memory. A view cannot be detached in place (it is kept).
        with contextlib.suppress(RuntimeError):
            closure_loss.detach_()
        params = self._params()
        if step.window_start:  # Lightning zeroed them just before this backward
            for p in params:
                p.grad = None
        elif prior is not None:
            for p, g in zip(params, prior, strict=True):
                p.grad = g
        else:
            raise OOMRecoveryError(
                f"out of memory in backward of batch {self._installed_trainer().fit_loop.epoch_loop.batch_idx}, "
                "inside a gradient accumulation window, with OOMConfig(protect_accumulated_grads=False): the "
                "gradients accumulated so far cannot be rolled back. Turn protect_accumulated_grads on, or lower "
                "the batch size."
            )
        trainer = self._installed_trainer()
        if step.saved is not None:
            self.state.restore(step.saved, trainer)
        # `self.log` names values after the hook Lightning is in: this is still the training step's work.
        module = self._strategy.lightning_module
        fx, module._current_fx_name = module._current_fx_name, "training_step"
        try:
            self._run_split(step, params, failure, ddp=ddp, agreed=ddp is not None, combine=True)
        finally:
            module._current_fx_name = fx
        return closure_loss

    # ------------------------------------------------------------------ eval

    def _wrap_eval(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        stage = name.removesuffix("_step")

        def eval_step(*args: Any, **kwargs: Any) -> Any:
            trainer = self._installed_trainer()
            if not (self.config.enabled and self.config.split_eval and args and self._owner_listed(trainer)):
                return original(*args, **kwargs)
            self._stage = stage
            self.state.refresh(trainer)
            results = getattr(trainer, "_results", None)
            # Eval synchronizes no gradients: a rank splits on its own, unless the forward itself communicates.
            agreed = self._eval_agreed
            failed: str | None = None
            # Note: [fast path] for eval: one micro-batch: the step runs as is after a snapshot.
            if self.eval_policy.micro_batches == 1 and not agreed:
                saved = self.state.save(results, buffers=False)
                out, failed = attempt(original, *args, **kwargs)
                if failed is None:
                    self.state.learn(saved)
                    self.eval_policy.on_success()
                    return out
                self._eval_restore(saved, trainer)
                del saved
            batch, rest = args[0], args[1:]

            def micro_step(part: Any) -> Any:
                if part is not batch:
                    set_log_batch(results, part)
                return original(part, *rest, **kwargs)

            runner = self._runner(self.eval_policy, agreed=agreed)
            try:
                result = runner.run_eval(
                    batch,
                    micro_step,
                    save=lambda: self.state.save(results, buffers=False),
                    restore=lambda saved: self._eval_restore(saved, trainer),
                    failed=failed,
                )
            finally:
                set_log_batch(results, batch)
            return runner.merge(result)

        return eval_step

    def _eval_restore(self, saved: Any, trainer: pl.Trainer) -> None:
        self.state.restore(saved)
        # Note: [local retries] a failed DDP forward (validation inside fit) broadcast buffers already; the
        # retry on this rank alone must not, as DDP's own eval forward would have turned it off anyway.
        ddp = self._ddp()
        if ddp is not None and trainer.state.fn == "fit":
            ddp.require_forward_param_sync = False
