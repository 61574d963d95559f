"""Prefix reuse for scoring: a forward that is served a prompt's stored blocks and computes only the rest.

Log-likelihood evals (multiple choice, perplexity) run a plain forward over few-shot contexts that repeat for
every choice and question. :func:`score_forward` serves the stored blocks of the prompt into a
:class:`~lightning_tiercache.kv.TieredKVCache`, runs the forward over the remaining columns with positions
counted from each row's first real token, and returns the logits of those columns. Blocks the forward
completes are stored for the next batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_tiercache.kv.cache import TieredKVCache, cache_kwarg
from lightning_tiercache.kv.prefix import mask_positions

__all__ = ["Scored", "score_forward"]


@dataclasses.dataclass(frozen=True)
class Scored:
    """The logits of a scoring forward.

    Attributes:
        logits: ``[batch, seq - start, vocab]``; ``logits[:, i]`` is the logit row of column ``start + i``.
        start: leading columns served from stored blocks, whose logits were not computed.
    """

    logits: torch.Tensor
    start: int

    def columns(self, lo: int, hi: int | None = None) -> torch.Tensor:
        """Logits of columns ``lo..hi`` of the prompt.

        Raises:
            ValueError: ``lo`` is a served column (pass ``logits_from=lo`` to :func:`score_forward`).
        """
        if lo < self.start:
            raise ValueError(
                f"column {lo} was served from stored KV blocks (the first {self.start} columns have no logits); "
                f"pass logits_from={lo} to score_forward"
            )
        end = None if hi is None else hi - self.start
        return self.logits[:, lo - self.start : end]


def score_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: TieredKVCache,
    logits_from: int | None = None,
    **forward_kwargs: Any,
) -> Scored:
    """Run ``model`` over a prompt batch, reusing stored prefix blocks; return the logits it computed.

    The logits equal, up to the rounding of other matmul shapes, those of
    ``model(input_ids, attention_mask=m, position_ids=mask_positions(m)).logits[:, start:]`` on real tokens.
    Without padding, or with right padding, that is the plain ``model(input_ids, attention_mask=m)``; with
    left padding it is what ``generate`` computes (HF's plain forward does not count positions from the
    first real token).

    Args:
        model: a ``transformers`` causal LM.
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]``, 0 on padding; ``None``: no padding.
        cache: an empty cache for ``model`` (closed by the caller).
        logits_from: the first column whose logits are needed (``None``: only the last column is sure to be
            computed). Columns before it may be served.
        forward_kwargs: passed on to ``model``.
    """
    n = cache.load_prefix(input_ids, attention_mask, max_columns=logits_from)
    kwargs: dict[str, Any] = {cache_kwarg(model): cache, "use_cache": True, **forward_kwargs}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = mask_positions(attention_mask)[:, n:]
    with torch.no_grad():
        out = model(input_ids[:, n:], **kwargs)
    return Scored(out.logits, n)
