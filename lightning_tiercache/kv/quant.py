"""Lossy group-wise int8/int4 quantization of KV blocks for the cold (prefix-reuse) copies.

Off by default. Each group of ``group`` consecutive values along the last dimension shares one float32 scale
(``absmax / qmax``); values are rounded to the nearest step. int4 packs two values per byte. The encoded
block is one flat ``uint8`` tensor (scales first, then codes), so it travels through the store and the
record format like any other tensor; decoding needs the original shape and dtype, which the caller knows.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["QUANT_MODES", "KVQuantizer"]

#: Accepted values of ``KVConfig.quant``.
QUANT_MODES = ("none", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


@dataclasses.dataclass(frozen=True)
class KVQuantizer:
    """Encodes and decodes blocks of a fixed ``shape`` and ``dtype``.

    Args:
        mode: ``"int8"`` or ``"int4"``.
        shape: the block shape (last dimension is the head dimension).
        dtype: the block's floating dtype, restored on decode.
        group: values per scale; reduced to a divisor of the last dimension when it does not divide it.
    """

    mode: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: int = 64

    def __post_init__(self) -> None:
        if self.mode not in _QMAX:
            raise ValueError(f"mode={self.mode!r} is not a quantized mode; one of {', '.join(_QMAX)}")
        last = self.shape[-1]
        g = max(1, min(self.group, last))
        while last % g:
            g -= 1
        object.__setattr__(self, "group", g)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def encoded_nbytes(self) -> int:
        """Bytes of one encoded block."""
        groups = self.numel // self.group
        codes = self.numel if self.mode == "int8" else (self.numel + 1) // 2
        return groups * 4 + codes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize ``x`` (of ``shape``) into a flat ``uint8`` tensor on ``x``'s device."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"block shape {tuple(x.shape)} does not match the quantizer's {self.shape}")
        qmax = _QMAX[self.mode]
        g = x.detach().to(torch.float32).reshape(-1, self.group)
        scale = g.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / qmax
        q = torch.round(g / scale).clamp_(-qmax, qmax).to(torch.int8).reshape(-1)
        if self.mode == "int8":
            codes = q.view(torch.uint8)
        else:
            u = (q + 8).to(torch.uint8)
            if u.numel() % 2:
                u = torch.cat([u, u.new_zeros(1)])
            codes = u[0::2] | (u[1::2] << 4)
        return torch.cat([scale.reshape(-1).view(torch.uint8), codes])

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        """The dequantized block (``shape``, ``dtype``) from :meth:`encode`'s output."""
        if buf.dtype != torch.uint8 or buf.numel() != self.encoded_nbytes:
            raise ValueError(
                f"encoded block has {buf.numel()} {buf.dtype} elements, expected {self.encoded_nbytes} uint8"
            )
        groups = self.numel // self.group
        scale = buf[: groups * 4].view(torch.float32).reshape(-1, 1)
        codes = buf[groups * 4 :]
        if self.mode == "int8":
            q = codes.view(torch.int8).to(torch.float32)
        else:
            lo = (codes & 0x0F).to(torch.int16) - 8
            hi = (codes >> 4).to(torch.int16) - 8
            q = torch.stack([lo, hi], dim=1).reshape(-1)[: self.numel].to(torch.float32)
        return (q.reshape(-1, self.group) * scale).reshape(self.shape).to(self.dtype)
