"""The parts one process runs under :class:`~lightning_tiercache.TierCacheCallback`, without Lightning.

:class:`TierRuntime` owns one :class:`~lightning_tiercache.TierStore` and the parts built on it: the
activation offloader (fit), the OOM step hook, and the ``generate`` hook that gives HF models a
:class:`~lightning_tiercache.TieredKVCache`. The callback maps Lightning's hooks onto its methods; anything
else that drives a training loop can do the same.

Note: [KV across stages]
    Closing after an eval stage whose caches stored or were served prefix blocks keeps the store (cache entries only:
    every other part freed its entries) for the next eval :meth:`TierRuntime.open` with the same config, so
    two ``validate()`` calls on unchanged weights reuse the first one's blocks. Block keys name the weights
    by the fingerprint (or ``kv_model_version``) taken at each open, so blocks of other weights are never
    found. A stage that trains never gets a kept store (the blocks would only hold memory training may
    need, and a fit's blocks are never kept). A kept store is closed by the next open that does not reuse
    it, by ``close()`` without ``keep_kv``, or when the runtime is collected.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_tiercache.config import TierConfig
from lightning_tiercache.store.placement import TierStore

__all__ = ["TierRuntime", "batch_input_ids", "kv_config", "oom_config"]

log = logging.getLogger(__name__)


def oom_config(**fields: Any) -> Any:
    """An ``OOMConfig`` from its fields, validated now (its errors name the field)."""
    from lightning_tiercache.oom.recovery import OOMConfig

    return OOMConfig(**fields)


def kv_config(enabled: bool, **fields: Any) -> Any:
    """A ``KVConfig`` from its fields, or ``None`` when off or when ``transformers`` is not installed."""
    if not enabled or importlib.util.find_spec("transformers") is None:
        return None
    from lightning_tiercache.kv.layers import KVConfig

    return KVConfig(**fields)


class TierRuntime:
    """One rank's store and parts, from ``open`` to ``close``.

    Args:
        tier_config: the store's budgets and choices (``device=None``: the device given to :meth:`open`).
        offload: fields of the activation offloader's config, or ``None`` for no activation offload.
        oom: an ``OOMConfig`` (``enabled=False`` or ``None``: no OOM hook).
        kv: a ``KVConfig``, or ``None`` for no tiered KV cache.
        kv_model_version: names the weights in KV block keys; ``None``: a fingerprint of the weights.
    """

    def __init__(
        self,
        tier_config: TierConfig,
        *,
        offload: Mapping[str, Any] | None,
        oom: Any,
        kv: Any,
        kv_model_version: str | None = None,
    ) -> None:
        self.tier_config = tier_config
        self.offload_options = dict(offload) if offload is not None else None
        self.oom = oom
        self.kv_config = kv
        self.kv_model_version = kv_model_version
        self.store: TierStore | None = None
        self.offloader: Any = None
        self.hook: Any = None
        self.kv: Any = None
        self._kv_base: str | None = None
        self._kept: TierStore | None = None  # Note: [KV across stages]
        self._closer: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy holds the configuration only: the store and the parts (threads, locks, files) stay here."""
        state = dict(vars(self))
        state.update(store=None, offloader=None, hook=None, kv=None, _kv_base=None, _kept=None)
        return state

    def open(
        self,
        device: torch.device,
        module: torch.nn.Module,
        *,
        train: bool,
        state: Mapping[str, Any],
        local_world_size: int | None = None,
    ) -> None:
        """Open the store on ``device`` and build the parts (the OOM hook is built, not installed).

        ``local_world_size`` (processes on this node) divides machine-sized host and disk budgets among them,
        unless the tier config names its own.
        """
        cfg = self.tier_config
        if cfg.device is None:
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            cfg = TierConfig(**{**fields, "device": "cpu" if device.type == "cpu" else str(device)})
        if cfg.local_world_size is None and local_world_size is not None:
            cfg = dataclasses.replace(cfg, local_world_size=local_world_size)
        kept, self._kept = self._kept, None
        if kept is not None and (train or kept.config != cfg):
            kept.close()
            kept = None
        self.store = store = kept if kept is not None else TierStore(cfg)
        self._kv_base = None
        if train and self.offload_options is not None and _available("activations.offloader", "activation offload"):
            from lightning_tiercache.activations.offloader import ActivationOffloader

            self.offloader = ActivationOffloader(store, module=module, **self.offload_options)
            if state.get("activations"):
                self.offloader.load_state_dict(dict(state["activations"]))
        recover = self.oom is not None and self.oom.enabled
        # The step hook also enters the offloader around each training forward, so it is installed whenever
        # either part is on; with recovery off it only does that.
        if (recover or self.offloader is not None) and _available("lightning.step_hook", "OOM recovery"):
            from lightning_tiercache.lightning.step_hook import StepHook
            from lightning_tiercache.oom.recovery import OOMConfig

            config = self.oom if recover else dataclasses.replace(self.oom or OOMConfig(), enabled=False)
            self.hook = StepHook(config, store=store, forward_context=self._forward_context())
            if state.get("oom"):
                self.hook.load_state_dict(dict(state["oom"]))
        if self.kv_config is not None:
            from lightning_tiercache.kv.generate import find_hf_models, tier_generate

            models = find_hf_models(module)
            if models:
                self.kv = tier_generate(module, store, self.kv_config, model_version="unset", models=models)

    def _forward_context(self) -> Callable[[Any], Any] | None:
        if self.offloader is None:
            return None
        return self.offloader.context_for

    def set_weights_version(self, module: torch.nn.Module, step: int | None) -> None:
        """Name the current weights in KV block keys: the base version, plus ``step`` while training."""
        if self.kv is None:
            return
        if self._kv_base is None:
            from lightning_tiercache.kv.cache import TieredKVCache

            self._kv_base = self.kv_model_version or TieredKVCache.version_from_weights(module)[:16]
        version = self._kv_base if step is None else f"{self._kv_base}-step{step}"
        if str(self.kv.model_version) != version:
            self.kv.set_model_version(version)

    def batch_start(self, batch: Any, *, eval: bool) -> None:
        """Before an eval batch, settle the store and start bringing the batch's stored prompt blocks up the tiers.

        A training batch does not wait for the store: what is still in flight from the last step are writes of
        activations its backward already freed (skipped when their turn comes), and the store's backpressure
        bounds anything else.
        """
        if not eval:
            return
        if self.store is not None:
            self.store.settle()
        if self.kv is not None:
            ids = batch_input_ids(batch)
            if ids is not None:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                self.kv.prefetch_for(ids, mask if isinstance(mask, torch.Tensor) else None)

    def drain_events(self) -> list[tuple[str, dict[str, Any]]]:
        """Notable events of every part since the last call, as ``(source, event)`` pairs."""
        out: list[tuple[str, dict[str, Any]]] = []
        for name, part in (("store", self.store), ("oom", self.hook), ("activations", self.offloader)):
            drain = getattr(part, "drain_events", None)
            if callable(drain):
                out += [(name, e) for e in drain()]
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.hook is not None:
            state["oom"] = self.hook.state_dict()
        if self.offloader is not None:
            state["activations"] = self.offloader.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.hook is not None and state.get("oom"):
            self.hook.load_state_dict(dict(state["oom"]))
        if self.offloader is not None and state.get("activations"):
            self.offloader.load_state_dict(dict(state["activations"]))

    def close(self, keep_kv: bool = False) -> None:
        """Uninstall the hooks, close the parts and the store (its spill folder is deleted). Idempotent.

        Every step runs even if an earlier one raised; the first error is re-raised at the end.

        Args:
            keep_kv: keep the store for the next eval open when KV prefix blocks were stored or served
                (Note: [KV across stages]).
        """
        first: BaseException | None = None
        keep = keep_kv and self.kv is not None and self.store is not None and self.kv.used_blocks()
        if not keep_kv and self._kept is not None:
            self._kept.close()
            self._kept = None
        steps: list[Callable[[], Any]] = []
        if self.hook is not None:
            steps.append(self.hook.uninstall)
        if self.kv is not None:
            steps.append(self.kv.remove)
        if self.offloader is not None:
            steps.append(self.offloader.close)
        if self.store is not None and not keep:
            steps.append(self.store.close)
        for step in steps:
            try:
                step()
            except Exception as err:
                log.warning("tiercache: error while releasing %s: %s", step, err)
                first = first or err
        if keep and self.store is not None:
            self._kept = self.store
            held = self._closer.peek() if self._closer is not None else None
            if held is None or held[2][0] is not self.store:  # one finalizer per kept store
                self._closer = weakref.finalize(self, TierStore.close, self.store)
        self.store = self.offloader = self.hook = self.kv = None
        if first is not None:
            raise first


def _available(module: str, feature: str) -> bool:
    """Whether ``lightning_tiercache.<module>`` imports; a missing part turns its feature off with a warning."""
    name = f"lightning_tiercache.{module}"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lightning_tiercache."):
            raise
        warnings.warn(f"tiercache: {name} is not installed; {feature} is off", RuntimeWarning, stacklevel=3)
        return False
    return True


def batch_input_ids(batch: Any) -> torch.Tensor | None:
    """The token ids of a batch: ``batch["input_ids"]``, ``batch.input_ids``, or a lone 2-D int tensor."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    ids = getattr(batch, "input_ids", None)
    if isinstance(ids, torch.Tensor):
        return ids
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point() and batch.dim() == 2:
        return batch
    return None
