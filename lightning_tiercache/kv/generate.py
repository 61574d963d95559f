"""Give Hugging Face models inside a module a :class:`TieredKVCache` by default in ``generate``.

:func:`tier_generate` finds the ``transformers`` ``PreTrainedModel`` submodules of a module (a
``LightningModule``, say) and wraps each one's ``generate``: when the caller passes no cache, a fresh
:class:`TieredKVCache` over one shared store is made, the prompt's stored prefix is loaded (reuse), and the
cache is passed on. The returned :class:`GenerateHook` undoes the wrapping, prefetches a coming batch's
prefix blocks, scores prompts with prefix reuse (:meth:`GenerateHook.score`) and bumps the model version
after weight updates.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch

from lightning_tiercache.kv.cache import COUNTERS, KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.scoring import Scored, score_forward
from lightning_tiercache.store.placement import TierStore

__all__ = ["GenerateHook", "find_hf_models", "tier_generate"]


def find_hf_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost ``transformers`` ``PreTrainedModel`` submodules with a ``generate`` (``module`` too)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers missing: nothing to wrap
        return []
    found: list[torch.nn.Module] = []
    inside: set[str] = set()
    for name, sub in module.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(sub, PreTrainedModel) and callable(getattr(sub, "generate", None)):
            found.append(sub)
            inside.add(name)
    return found


def _expand_size(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    sizes = [kwargs.get("num_beams"), kwargs.get("num_return_sequences")]
    sizes += [getattr(gc, "num_beams", None), getattr(gc, "num_return_sequences", None)] if gc is not None else []
    return max([1, *[int(s) for s in sizes if s]])


class GenerateHook:
    """Wrapped ``generate`` methods of some models, and the shared store and counters behind them.

    Args:
        models: the models whose ``generate`` to wrap.
        store: the store for every cache made (prefix blocks are shared through it).
        config: the caches' config.
        model_version: the initial model version.
    """

    def __init__(
        self, models: list[torch.nn.Module], store: TierStore, config: KVConfig, model_version: str | int = 0
    ) -> None:
        self.store = store
        self.config = config
        self.model_version: str | int = model_version
        self.counts: collections.Counter[str] = collections.Counter()
        self._models = models
        self._prefetchers: dict[int, TieredKVCache] = {}
        for m in models:
            self._wrap(m)

    def make_cache(self, model: torch.nn.Module) -> TieredKVCache:
        """A new cache for ``model`` over the shared store, counting into this hook's counters."""
        return TieredKVCache(self.store, self.config, model=model, model_version=self.model_version, counts=self.counts)

    def _wrap(self, model: Any) -> None:
        original = model.generate
        name = cache_kwarg(model)

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
                cache = self.make_cache(model)
                ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
                if isinstance(ids, torch.Tensor) and ids.dim() == 2 and _expand_size(model, kwargs) == 1:
                    cache.load_prefix(ids, kwargs.get("attention_mask"))
                kwargs[name] = cache
            return original(*args, **kwargs)

        generate.__tiercache_original__ = original  # type: ignore[attr-defined]
        model.generate = generate

    def prefetch_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Start bringing the next batch's hit blocks up the tiers for every wrapped model."""
        total = 0
        for m in self._models:
            cache = self._prefetchers.get(id(m))
            if cache is None or cache.model_version != str(self.model_version):
                cache = self._prefetchers[id(m)] = self.make_cache(m)
            total += cache.prefetch_for(input_ids, attention_mask)
        return total

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        model: torch.nn.Module | None = None,
        logits_from: int | None = None,
        **forward_kwargs: Any,
    ) -> Scored:
        """A forward over a prompt batch that is served its stored prefix blocks (see :func:`score_forward`).

        For log-likelihood evals: ``validation_step`` calls this instead of ``model(input_ids, ...)``; the
        few-shot context shared by choices and questions is computed once and served after that.

        Args:
            input_ids: ``[batch, seq]``.
            attention_mask: ``[batch, seq]``, 0 on padding (either side).
            model: which wrapped model to run; may be left out when the hook wraps one.
            logits_from: the first column whose logits are needed.
            forward_kwargs: passed on to the model.

        Raises:
            ValueError: ``model`` is left out and the hook wraps several models (or none).
        """
        if model is None:
            if len(self._models) != 1:
                raise ValueError(f"this hook wraps {len(self._models)} models; pass model= to score()")
            model = self._models[0]
        cache = self.make_cache(model)
        try:
            return score_forward(
                model, input_ids, attention_mask, cache=cache, logits_from=logits_from, **forward_kwargs
            )
        finally:
            cache.close()

    def used_blocks(self) -> bool:
        """Whether the caches of this hook stored or were served any prefix block."""
        return self.counts["stored_blocks"] + self.counts["hits"] > 0

    def set_model_version(self, version: str | int) -> None:
        """Caches made from now on use ``version``; blocks of older versions are never served."""
        self.model_version = version
        self._prefetchers.clear()

    def stats(self) -> dict[str, Any]:
        """Counters summed over every cache this hook made (see :meth:`TieredKVCache.stats`)."""
        out: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
        total = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / total if total else 0.0
        return out

    def remove(self) -> None:
        """Put the original ``generate`` methods back. Idempotent."""
        for m in self._models:
            wrapped = m.__dict__.get("generate")
            if wrapped is not None and hasattr(wrapped, "__tiercache_original__"):
                del m.generate
        self._models = []
        self._prefetchers.clear()


def tier_generate(
    module: torch.nn.Module,
    store: TierStore,
    config: KVConfig | None = None,
    model_version: str | int = 0,
    models: list[torch.nn.Module] | None = None,
) -> GenerateHook:
    """Wrap ``generate`` of the HF models in ``module`` to use a :class:`TieredKVCache` by default.

    Example::

        hook = tier_generate(lightning_module, store, KVConfig(block_tokens=64))
        ...  # lightning_module.model.generate(ids) now reuses stored prefixes
        hook.set_model_version(trainer.global_step)
        hook.remove()
    """
    targets = models if models is not None else find_hf_models(module)
    return GenerateHook(targets, store, config or KVConfig(), model_version)
