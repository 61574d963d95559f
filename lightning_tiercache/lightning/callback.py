"""TierCacheCallback: the Lightning face of lightning_tiercache (a thin shell over the parts below it)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_tiercache.config import TierConfig, parse_bytes
from lightning_tiercache.lightning.batch_copy import NextBatchCopier
from lightning_tiercache.lightning.runtime import TierRuntime, kv_config, oom_config
from lightning_tiercache.lightning.summary import RunSummary
from lightning_tiercache.lightning.telemetry import Telemetry
from lightning_tiercache.store.events import gather_events
from lightning_tiercache.store.placement import TierStore

if TYPE_CHECKING:
    from lightning_tiercache.activations.offloader import ActivationOffloader
    from lightning_tiercache.kv.generate import GenerateHook
    from lightning_tiercache.lightning.step_hook import StepHook

__all__ = ["TierCacheCallback"]

log = logging.getLogger(__name__)
_EVAL_STAGES = ("validate", "test", "predict")


class TierCacheCallback(Callback):
    r"""Tiered memory for fine-tuning and eval: activation offload, OOM recovery, a tiered KV cache, telemetry.

    One :class:`~lightning_tiercache.TierStore` per process (per rank, each with a private spill folder) lives
    from ``setup`` to ``teardown``. During ``fit`` saved activations go to the store; in every stage an OOM
    strategy hook splits and retries a step that ran out of memory; in eval stages a
    :class:`~lightning_tiercache.TieredKVCache` serves repeated prompt prefixes, and HF models inside the
    module use it in ``generate``. Teardown and exceptions release everything and delete the spill files.
    With no arguments it sizes the tiers from what this machine has free.

    The arguments are flat keywords (one ``--tiercache.<argument>`` each under LightningCLI, see
    :class:`~lightning_tiercache.lightning.cli.TierCacheCLI`), in groups: store, activations, OOM, KV,
    telemetry and the batch copy.

    Args:
        device_bytes: **store** -- device-tier budget (``"8GiB"`` or bytes); ``None``: half of the free CUDA
            memory, or a quarter of available RAM on a CPU-only machine.
        host_bytes: **store** -- host-tier budget; ``None``: half of available RAM.
        disk_bytes: **store** -- disk-tier budget; ``0`` turns spilling off; ``None``: half of the free disk.
        spill_dir: **store** -- parent of each rank's private spill folder; ``None``: the system temp dir.
        codec: **store** -- spill codec, one of ``auto``, ``none``, ``zstd``, ``byteplane`` (all lossless).
        policy: **store** -- eviction policy: ``lru``, ``lfu``, ``s3fifo`` or a registered name.
        io_threads: **store** -- disk I/O threads per rank.
        offload_activations: **activations** -- offload saved activations to the store during ``fit``.
        min_offload_bytes: **activations** -- activations smaller than this stay where they are.
        offload_tier: **activations** -- where offloaded activations go: ``host``, ``disk``, or ``auto`` (host
            with CUDA; disk on a CPU-only machine, whose host tier is the same RAM, so only the disk frees memory
            there). Only what the device budget (``device_bytes``) cannot hold is offloaded.
        offload_keep_tail_bytes: **activations** -- most bytes at the end of the forward kept resident
            (``None``: what the device budget leaves room for).
        offload_idle_probe_every: **activations** -- once a forward had nothing to offload, forwards of batches
            no larger skip the saved-tensor hooks except one in this many; ``0`` keeps them on (models whose
            saved sizes depend on the data, not the input shapes).
        oom_recovery: **OOM** -- split and retry steps that run out of memory (train, validate, test, predict).
        oom_initial_micro_batches: **OOM** -- micro-batches per step before any OOM.
        oom_max_micro_batches: **OOM** -- most micro-batches a batch is split into.
        oom_grow_back_after_steps: **OOM** -- good steps after which half as many micro-batches are tried
            (``0``: never).
        oom_loss_reduction: **OOM** -- ``mean`` or ``sum``: how the step's loss is reduced over samples.
        oom_split_eval: **OOM** -- also split and retry validation, test and predict steps.
        split_fn: **OOM** -- ``split_fn(batch, n)`` for batch types the built-in rules do not split.
        merge_fn: **OOM** -- ``merge_fn(outputs, sizes)`` for eval outputs the built-in rules do not merge.
        kv_cache: **KV** -- HF models in the module use a tiered KV cache with prefix reuse in ``generate``.
        kv_block_tokens: **KV** -- tokens per prefix block (the unit of reuse).
        kv_offload: **KV** -- also tier the K/V working set (device holds ``kv_device_layers`` layers).
        kv_device_layers: **KV** -- layers assembled on the device when ``kv_offload`` is on.
        kv_persist_dir: **KV** -- folder where prefix blocks survive process restarts (``None``: off).
        kv_quant: **KV** -- codec of stored prefix blocks: ``none`` (exact), ``int8`` or ``int4`` (lossy).
        kv_model_version: **KV** -- names the weights in block keys; ``None``: a fingerprint of the weights,
            plus the global step during ``fit``.
        log_metrics: **telemetry** -- hand the ``tiercache/*`` values to the Trainer's loggers; ``False``: no
            key reaches any logger (and nothing is sampled; :meth:`stats` and :meth:`summary` still work).
        log_every_n_steps: **telemetry** -- log every this many steps; ``None``: the Trainer's
            ``log_every_n_steps`` (its ``0``: only at the end of each stage).
        progress_bar: **telemetry** -- show ``tc_hit_rate`` (store gets served without waiting),
            ``tc_device_use`` (device-tier peak / budget) and ``tc_micro_batches`` (micro-batches per batch,
            1 = no split) on the progress bar from the first logged row on; ``False`` leaves the bar untouched.
        wandb_extras: **telemetry** -- with a ``WandbLogger``, define metric summaries and log the
            ``tiercache/events`` table.
        copy_next_batch: **batch copy** -- on CUDA, copy the next batch to the device on a side stream while
            this one computes (overlaps only from pinned memory: ``DataLoader(pin_memory=True)``); nothing on
            other devices.

    Raises:
        ValueError: a size, name or count is invalid (the message names the argument, the value and the valid
            values).

    Example::

        trainer = L.Trainer(callbacks=[TierCacheCallback(host_bytes="16GiB")], logger=WandbLogger())
        trainer.fit(model, datamodule)
        print(TierCacheCallback.get(trainer).summary())  # what was offloaded, OOM recoveries, prefix reuse

    Reading the counters (from a LightningModule: ``cb = TierCacheCallback.get(self.trainer)``):
    :meth:`stats` returns every part's counters (``store``, ``activations``, ``oom``, ``kv``, ``batch_copy``),
    live during a stage and the final ones after it; :meth:`summary` turns them into a
    :class:`~lightning_tiercache.lightning.summary.RunSummary`. The live parts are :attr:`store`,
    :attr:`offloader`, :attr:`step_hook`, :attr:`kv_generate` and :attr:`copier` (``None`` outside a stage
    or when off).

    Logged keys (once the library did something in the stage: stored or read an entry, retried an OOM, reused
    a prompt prefix; from then on every ``log_every_n_steps`` batches that step the optimizer, and at the end
    of each stage when batches were not logged yet, at the last batch's step; eval under DDP at the stage's end
    only; through ``trainer.loggers``, reduced across ranks;
    :data:`lightning_tiercache.lightning.telemetry.METRICS` is the full table with units and reductions):
    ``tiercache/{device,host,disk}/{bytes,entries,budget_use,peak_bytes}``, ``tiercache/hit_rate``,
    ``tiercache/prefetch/{wait_share,wait_p50_s,wait_p95_s,wait_s}``,
    ``tiercache/bandwidth/{to_device,to_host,to_disk,from_disk}_bytes_per_s``, ``tiercache/puts``,
    ``tiercache/gets``, ``tiercache/spills``, ``tiercache/evictions``, ``tiercache/drops``,
    ``tiercache/overcommits``, ``tiercache/disk_errors_recovered``, ``tiercache/ranks``,
    ``tiercache/host_ram/{rss_bytes,available_bytes}``,
    ``tiercache/device_memory/{allocated_bytes,reserved_bytes,alloc_retries}`` (CUDA),
    ``tiercache/activations/{offloaded_bytes,unpack_wait_share,unpack_wait_s,prefetch_lead}`` (fit),
    ``tiercache/oom/{retries,micro_batches}``, ``tiercache/kv/{hit_rate,hit_tokens,blocks,evictions}`` (eval),
    and with W&B the ``tiercache/events`` table. ``peak_bytes`` and ``budget_use`` are per logging window;
    the peaks since the stage began are in :meth:`stats` and :meth:`summary`.
    """

    def __init__(
        self,
        *,
        device_bytes: int | str | None = None,
        host_bytes: int | str | None = None,
        disk_bytes: int | str | None = None,
        spill_dir: str | None = None,
        codec: Literal["auto", "none", "zstd", "byteplane"] = "auto",
        policy: str = "lru",
        io_threads: int = 2,
        offload_activations: bool = True,
        min_offload_bytes: int | str = "64KiB",
        offload_tier: str = "auto",
        offload_keep_tail_bytes: int | str | None = None,
        offload_idle_probe_every: int = 64,
        oom_recovery: bool = True,
        oom_initial_micro_batches: int = 1,
        oom_max_micro_batches: int = 1024,
        oom_grow_back_after_steps: int = 100,
        oom_loss_reduction: Literal["mean", "sum"] = "mean",
        oom_split_eval: bool = True,
        split_fn: Callable[[Any, int], list[Any]] | None = None,
        merge_fn: Callable[[list[Any], list[int]], Any] | None = None,
        kv_cache: bool = True,
        kv_block_tokens: int = 64,
        kv_offload: bool = False,
        kv_device_layers: int = 1,
        kv_persist_dir: str | None = None,
        kv_quant: Literal["none", "int8", "int4"] = "none",
        kv_model_version: str | None = None,
        log_metrics: bool = True,
        log_every_n_steps: int | None = None,
        progress_bar: bool = True,
        wandb_extras: bool = True,
        copy_next_batch: bool = True,
    ) -> None:
        # Validate now (not at setup), so a bad YAML fails before the run starts.
        tier_config = TierConfig(
            device_bytes=device_bytes, host_bytes=host_bytes, disk_bytes=disk_bytes, spill_dir=spill_dir,
            codec=codec, policy=policy, io_threads=io_threads,
        )  # fmt: skip
        offload: dict[str, Any] = {
            "min_bytes": parse_bytes(min_offload_bytes, "min_offload_bytes"),
            "idle_probe_every": offload_idle_probe_every,
            "tier": offload_tier,
        }
        if offload_keep_tail_bytes is not None:
            offload["keep_tail_bytes"] = parse_bytes(offload_keep_tail_bytes, "offload_keep_tail_bytes")
        with _named_as_arguments(_OOM_ARGUMENTS):
            oom = oom_config(
                enabled=oom_recovery, initial_micro_batches=oom_initial_micro_batches,
                max_micro_batches=oom_max_micro_batches, grow_back_after_steps=oom_grow_back_after_steps,
                loss_reduction=oom_loss_reduction, split_eval=oom_split_eval, split_fn=split_fn, merge_fn=merge_fn,
            )  # fmt: skip
        with _named_as_arguments(_KV_ARGUMENTS):
            kv = kv_config(
                kv_cache, block_tokens=kv_block_tokens, offload=kv_offload, device_layers=kv_device_layers,
                persist_dir=kv_persist_dir, quant=kv_quant,
            )  # fmt: skip
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be an int >= 1 or None")
        from lightning_tiercache.activations.offloader import OFFLOAD_TIERS

        if offload_tier not in OFFLOAD_TIERS:
            raise ValueError(f"offload_tier={offload_tier!r} is not one of {', '.join(OFFLOAD_TIERS)}")
        n = offload_idle_probe_every
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"offload_idle_probe_every={n!r} must be an int >= 0")
        for name, flag in (("copy_next_batch", copy_next_batch), ("log_metrics", log_metrics)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False")
        self.runtime = TierRuntime(
            tier_config, offload=offload if offload_activations else None, oom=oom, kv=kv,
            kv_model_version=kv_model_version,
        )  # fmt: skip
        self.log_metrics = log_metrics
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = progress_bar
        self.wandb_extras = wandb_extras
        self.copy_next_batch = copy_next_batch
        self.copier: NextBatchCopier | None = None  # set up on CUDA; kept after teardown for its stats()
        self.telemetry: Telemetry | None = None
        self.last_metrics: dict[str, float] = {}
        self._wandb: Any = None
        self._state: dict[str, Any] = {}
        self._stage: str | None = None
        self._final_stats: dict[str, dict[str, Any]] = {}
        self._eval_batches = 0
        self._unlogged: tuple[str, int] | None = None  # (stage, step) of the last batch not yet logged
        self._bar_values: dict[str, float | int] = {}
        self._bar_patch: tuple[Any, bool, Any] | None = None
        self._engaged = False  # a window showed work in this stage (Note: [pay for telemetry])

    # Live parts built in `setup` (threads, locks, patched Lightning objects): not copied or pickled.
    _LIVE = ("copier", "telemetry", "_wandb", "_bar_patch")

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, ``pickle``) keeps the settings and the learned state, not the live parts:
        it is a callback as after ``teardown``, ready for another Trainer."""
        state = dict(vars(self))
        state["_state"] = self.state_dict()
        for name in self._LIVE:
            state[name] = None
        return state

    @property
    def store(self) -> TierStore | None:
        """This rank's store between ``setup`` and ``teardown``, else ``None`` (its counters: :meth:`stats`)."""
        return self.runtime.store

    @property
    def offloader(self) -> ActivationOffloader | None:
        """The activation offloader during ``fit`` (``None`` otherwise or when ``offload_activations=False``)."""
        return self.runtime.offloader

    @property
    def step_hook(self) -> StepHook | None:
        """The strategy hook that recovers from OOM (and enters the offloader around forwards), or ``None``."""
        return self.runtime.hook

    @property
    def kv_generate(self) -> GenerateHook | None:
        """The ``generate`` hook of the module's HF models, or ``None``; ``make_cache(model)`` gives a cache."""
        return self.runtime.kv

    @property
    def kv_cache(self) -> GenerateHook | None:
        """The former name of :attr:`kv_generate` (it is the ``generate`` hook, not a cache)."""
        return self.kv_generate

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every part's counters: ``store``, ``activations``, ``oom``, ``kv``, ``batch_copy`` (the parts that run).

        During a stage they are live; after ``teardown`` (or an exception) they are the final counters of the
        last stage. ``store`` is :meth:`TierStore.stats` (per tier ``peak_bytes``: since the stage began);
        ``activations`` :meth:`ActivationOffloader.stats`; ``oom`` the step hook's (``oom_retries``,
        ``current_micro_batches``, ... and ``eval_*``); ``kv`` the ``generate`` hook's; ``batch_copy`` the
        CUDA next-batch copier's.
        """
        if self.store is None:
            return {k: dict(v) for k, v in self._final_stats.items()}
        parts: dict[str, Any] = {
            "store": self.store,
            "activations": self.offloader,
            "oom": self.step_hook if self.step_hook is not None and self.step_hook.config.enabled else None,
            "kv": self.kv_generate,
            "batch_copy": self.copier,
        }
        return {name: dict(part.stats()) for name, part in parts.items() if part is not None}

    def summary(self) -> RunSummary:
        """What the parts did in the current (or last) stage, as a :class:`RunSummary`.

        ``print(cb.summary())`` gives the run-end text: what was offloaded and where, the estimated device memory
        saved, tiers over budget, OOM recoveries and prefix reuse. Its peaks are the peaks since the stage began.
        """
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        stage = None if self._stage is None else str(getattr(self._stage, "value", self._stage))  # TrainerFn
        return RunSummary.from_stats(stage, self.stats(), rank=rank, world_size=world)

    @staticmethod
    def get(trainer: pl.Trainer) -> TierCacheCallback:
        """The trainer's ``TierCacheCallback`` (for ``self.trainer`` in a LightningModule).

        Raises:
            LookupError: the trainer has no ``TierCacheCallback``.
        """
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, TierCacheCallback):
                return cb
        raise LookupError("the trainer has no TierCacheCallback; add one: Trainer(callbacks=[TierCacheCallback()])")

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        device = trainer.strategy.root_device
        self.runtime.open(
            device, pl_module, train=stage == "fit", state=self._state, local_world_size=trainer.num_devices
        )
        if self.runtime.hook is not None:
            self.runtime.hook.owner = self  # steps aside while Lightning's batch-size search unlists callbacks
            self.runtime.hook.install(trainer)
        self.copier = NextBatchCopier.for_trainer(trainer) if self.copy_next_batch else None
        if self.copier is not None:
            self.copier.install(trainer)
        self._final_stats = {}
        self.telemetry = None
        if not self.log_metrics:
            return  # nothing sampled, nothing logged, the bar untouched
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or None
        self.telemetry = Telemetry(every, device=device)
        self._engaged = False  # Note: [pay for telemetry]
        if self.wandb_extras and trainer.is_global_zero:
            from lightning_tiercache.lightning.wandb_support import find_wandb_logger

            wandb_logger = find_wandb_logger(trainer.loggers)
            if wandb_logger is not None:
                from lightning_tiercache.lightning.wandb_support import WandbBridge

                self._wandb = WandbBridge(wandb_logger)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(keep_kv=stage in _EVAL_STAGES)  # Note: [KV across stages] (runtime)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._state, **self.runtime.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Note: [restore after setup] Lightning restores callback state after ``setup``: the parts exist and
        # take it now; a later ``setup`` (the next trainer call) starts from it too.
        self._state = dict(state_dict)
        self.runtime.load_state_dict(state_dict)

    # ------------------------------------------------------------------ stage and batch boundaries

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runtime.set_weights_version(pl_module, trainer.global_step)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runtime.set_weights_version(pl_module, None)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runtime.set_weights_version(pl_module, None)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start(trainer, batch, eval=False)

    def _batch_start(self, trainer: pl.Trainer, batch: Any, *, eval: bool) -> None:
        """Settle the store, prefetch the batch's KV blocks (eval) and start copying the next batch (CUDA)."""
        self.runtime.batch_start(batch, eval=eval)
        if self.copier is not None:
            self.copier.copy_next(trainer, eval=eval)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.runtime.kv is not None:
            self.runtime.set_weights_version(pl_module, trainer.global_step)  # KV of older weights is never served
        if self.telemetry is None or not _steps_optimizer(trainer, pl_module, batch_idx):
            return  # Lightning logs only batches that step the optimizer; telemetry follows it
        # Lightning logs this batch's metrics at ``_batches_that_stepped`` before it increments; match it.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._batch_logged_or_kept(trainer, "train", step, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_unlogged(trainer, "train")

    def _eval_end(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking or self.telemetry is None:
            return
        self._eval_batches += 1
        if self._stage != "fit":  # validation inside fit logs once, at its end, at the training step
            index = self._eval_batches - 1
            if _distributed():  # Note: [eval rows across ranks]
                self._unlogged = (stage, index)
            else:
                self._batch_logged_or_kept(trainer, stage, index, index)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runtime.set_weights_version(pl_module, trainer.global_step if self._stage == "fit" else None)
        if self._stage == "fit" and not trainer.sanity_checking:
            self._log_unlogged(trainer, "train")  # the validation's window holds validation only

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, batch, eval=True)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_end(trainer, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._stage == "fit":  # one row at the training step, only if the validation used the store
            self._log_now(trainer, "validate", trainer.fit_loop.epoch_loop._batches_that_stepped, if_active=True)
        else:
            self._log_eval_end(trainer, "validate")

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, batch, eval=True)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_end(trainer, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_eval_end(trainer, "test")

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, batch, eval=True)

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_end(trainer, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_eval_end(trainer, "predict")

    # ------------------------------------------------------------------ telemetry

    def _batch_logged_or_kept(self, trainer: pl.Trainer, stage: str, index: int, step: int) -> None:
        """Log at a due batch; remember any other, so the stage's end logs it at its own step (never one past)."""
        assert self.telemetry is not None
        if self.telemetry.due(index):
            self._log_now(trainer, stage, step)
        else:
            self._unlogged = (stage, step)

    def _log_unlogged(self, trainer: pl.Trainer, stage: str) -> None:
        """Log the window of ``stage``'s batches since the last row, if there are any, at the last one's step."""
        if self._unlogged is not None and self._unlogged[0] == stage:
            self._log_now(trainer, stage, self._unlogged[1])

    def _log_eval_end(self, trainer: pl.Trainer, stage: str) -> None:
        """The end of a stand-alone eval stage: its unlogged batches; under DDP always one reduced row.

        Note: [eval rows across ranks] eval ranks may run different numbers of batches (Lightning's predict
        sampler, ``use_distributed_sampler=False``, uneven iterables), so no batch is one every rank reaches and
        a per-batch reduce could wait forever. Under DDP, eval rows are therefore logged once, at the stage's end,
        which every rank reaches once: every rank reduces there, at rank zero's last batch.
        """
        if not _distributed():
            self._log_unlogged(trainer, stage)
            return
        kept = self._unlogged
        step = kept[1] if kept is not None and kept[0] == stage else max(self._eval_batches - 1, 0)
        self._log_now(trainer, stage, step)

    def _show_on_progress_bar(self, trainer: pl.Trainer) -> None:
        """Add the summary to the progress bar's ``get_metrics`` (its documented override point).

        Wrapping that one method, instead of ``self.log(..., prog_bar=True)``, costs nothing per step: logged
        keys would be carried through every later step's result processing.
        """
        bar = trainer.progress_bar_callback
        if not self.progress_bar or bar is None or self._bar_patch is not None:
            return
        original = bar.get_metrics
        values = self._bar_values

        def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            return {**original(trainer, pl_module), **values}

        self._bar_patch = (bar, "get_metrics" in vars(bar), vars(bar).get("get_metrics"))
        bar.get_metrics = get_metrics  # type: ignore[method-assign]

    def _hide_from_progress_bar(self) -> None:
        if self._bar_patch is None:
            return
        bar, had, value = self._bar_patch
        self._bar_patch = None
        if had:
            bar.get_metrics = value
        else:
            vars(bar).pop("get_metrics", None)

    def _log_now(self, trainer: pl.Trainer, stage: str, step: int, *, if_active: bool = False) -> None:
        """Sample, reduce across ranks (a collective: every rank gets here at the same step) and log.

        With ``if_active`` the row is logged only if the reduced values show work in the window (the same
        answer on every rank, so the event gather below stays a collective every rank joins or none does).
        """
        if self.telemetry is None or self.store is None:
            return
        self._unlogged = None
        rt = self.runtime
        train = stage == "train"
        values = self.telemetry.sample(
            rt.store,
            activations=rt.offloader if train else None,
            oom=rt.hook if rt.hook is not None and rt.hook.config.enabled else None,
            kv=None if train else rt.kv,
            oom_prefix="" if train else "eval_",
        )
        reduced = self.telemetry.reduce(values)
        # Note: [pay for telemetry] until a window shows work (entries put or read, an OOM retry, KV blocks),
        # nothing reaches a logger or the bar: a run the library does nothing for logs what it logs without it.
        # The reduced values are alike on every rank, so every rank decides alike (the gather below).
        worked = self.telemetry.active(reduced, stage)
        self._engaged = self._engaged or worked
        if not (worked if if_active else self._engaged):
            return
        self.last_metrics.update(reduced)
        self._show_on_progress_bar(trainer)
        if self._bar_patch is not None:
            self._bar_values["tc_hit_rate"] = round(reduced.get("tiercache/hit_rate", 1.0), 3)
            self._bar_values["tc_device_use"] = round(reduced.get("tiercache/device/budget_use", 0.0), 3)
            if "tiercache/oom/micro_batches" in reduced:
                self._bar_values["tc_micro_batches"] = int(reduced["tiercache/oom/micro_batches"])
        self.telemetry.log(trainer.loggers, reduced, step)
        # Every rank drains and joins the gather (a collective, like the reduce above); rank zero alone has
        # the loggers and the W&B bridge, so it logs every rank's events, each with its own rank.
        pairs = rt.drain_events()
        gathered = gather_events(pairs, device=trainer.strategy.root_device)
        for rank, source, event in gathered if trainer.is_global_zero else []:
            log.info(
                "tiercache %s event at step %d (rank %d): %s %s",
                source, step, rank, event.get("event"), event.get("detail"),
            )  # fmt: skip
            if self._wandb is not None:
                self._wandb.add_events([event], step=step, source=source, rank=rank)

    # ------------------------------------------------------------------ release

    def _release(self, keep_kv: bool = False) -> None:
        """Close every part and the store (spill files deleted; with ``keep_kv`` a store holding KV prefix
        blocks is kept for the next eval stage); keep the state for a later stage."""
        self._state = self.state_dict()
        if self.store is not None:
            self._final_stats = self.stats()
        self._unlogged = None
        self._eval_batches = 0
        wandb_bridge, self._wandb = self._wandb, None
        try:
            self._hide_from_progress_bar()
            self.runtime.close(keep_kv=keep_kv)
        finally:
            if self.copier is not None:
                self.copier.uninstall()
            if wandb_bridge is not None:
                wandb_bridge.flush()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _steps_optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> bool:
    """Whether this training batch ends with an optimizer step (Lightning logs only those, and manual steps)."""
    if not pl_module.automatic_optimization:
        return True
    every = max(1, int(trainer.accumulate_grad_batches))
    return (batch_idx + 1) % every == 0 or batch_idx + 1 == trainer.num_training_batches


@contextlib.contextmanager
def _named_as_arguments(names: dict[str, str]) -> Iterator[None]:
    """Re-raise a config's ``ValueError`` under the callback's argument name (``quant=`` -> ``kv_quant=``)."""
    try:
        yield
    except ValueError as err:
        text = str(err)
        m = re.match(r"(?:\w+Config\.)?(\w+)", text)
        if m is None or m.group(1) not in names:
            raise
        raise ValueError(names[m.group(1)] + text[m.end() :]) from None


_OOM_ARGUMENTS = {
    "enabled": "oom_recovery",
    "initial_micro_batches": "oom_initial_micro_batches",
    "max_micro_batches": "oom_max_micro_batches",
    "grow_back_after_steps": "oom_grow_back_after_steps",
    "loss_reduction": "oom_loss_reduction",
    "split_eval": "oom_split_eval",
    "split_fn": "split_fn",
    "merge_fn": "merge_fn",
}
_KV_ARGUMENTS = {
    "block_tokens": "kv_block_tokens",
    "offload": "kv_offload",
    "device_layers": "kv_device_layers",
    "persist_dir": "kv_persist_dir",
    "quant": "kv_quant",
}
