"""A small pure-PyTorch GPT for tests and benchmarks, built from a config, with optional per-block checkpointing.

Also :class:`SavedBytes`, a ``saved_tensors_hooks`` context that counts what a plain forward saves for
backward: the baseline every activation-memory figure is compared with.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GPT", "GPTConfig", "GPTOutput", "SavedBytes"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`.

    Args:
        vocab_size: tokens in the vocabulary.
        seq_len: longest sequence (positions).
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``d_model``.
        d_model: width of the residual stream.
        mlp_ratio: MLP hidden width over ``d_model``.
        checkpoint: recompute each block in backward (``torch.utils.checkpoint``, non-reentrant).
    """

    vocab_size: int = 512
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: int = 4
    checkpoint: bool = False

    def __post_init__(self) -> None:
        for field in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an int >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_head={self.n_head}")


@dataclasses.dataclass
class GPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.out = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-norm blocks (causal attention + GELU MLP), a head.

    ``use_checkpoint`` (from the config) may be flipped between steps to compare both on the same weights.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_checkpoint = cfg.checkpoint
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:
            nn.init.normal_(typing.cast(_Block, b).out.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> GPTOutput:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return GPTOutput(logits, loss)

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random token ids and next-token targets of shape ``(batch_size, seq_len)``."""
        cfg = self.cfg
        ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=generator)
        device = self.head.weight.device
        return ids[:, :-1].to(device), ids[:, 1:].to(device)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts bytes saved for backward inside the block, once per storage, parameters excluded.

    Attributes:
        nbytes: bytes of distinct non-parameter storages saved.
        tensors: saved tensors seen (parameters included).
    """

    def __init__(self) -> None:
        self.nbytes = 0
        self.tensors = 0
        self._seen: set[int] = set()
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedBytes:  # type: ignore[override]
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        base = t._base if t._base is not None else t
        is_param = isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)
        storage = t.untyped_storage()
        if not is_param and storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return t

    @staticmethod
    def _unpack(t: Any) -> torch.Tensor:
        return typing.cast(torch.Tensor, t)
