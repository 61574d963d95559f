"""Prefix blocks of a KV cache: stable chained hashes, the model namespace, and on-disk persistence.

A prompt is cut into fixed-size token blocks. The key of block ``j`` hashes block ``j``'s token ids and
attention-mask bits together with the key of block ``j - 1``; block ``0`` chains from the *namespace*, a
digest of the model's identity (class and config), the KV dtype, the block size, the codec, the torch and
transformers versions and the **model version**. So one key names a whole prefix under one set of weights,
and KV computed under other weights can never be found. Hashes are xxh3-128 over bytes; Python's randomized
``hash`` is never used, so keys are the same in every process.

Persisted blocks live in ``persist_dir/<namespace>/``, one checksummed record per (block, layer) written
with :func:`lightning_tiercache.store.tiers.disk.write_record`. The folder holds a ``namespace.json`` naming what
the digest covers; a folder whose file does not match, a record whose checksum fails or whose shape or dtype
is not what this cache expects is ignored (counted and warned), never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import xxhash

from lightning_tiercache.errors import SpillError
from lightning_tiercache.store.tiers.disk import read_record, write_record

__all__ = [
    "PersistDir", "RowBlocks", "block_keys", "device_digest", "mask_positions", "model_identity", "namespace",
    "row_blocks", "weights_fingerprint",
]  # fmt: skip

log = logging.getLogger(__name__)


def model_identity(model: Any) -> str:
    """A stable description of a model's architecture: class name plus its config as sorted JSON.

    Args:
        model: a ``transformers`` ``PreTrainedModel``, a ``PretrainedConfig``, or any string.
    """
    if isinstance(model, str):
        return model
    config = getattr(model, "config", model)
    to_dict = getattr(config, "to_dict", None)
    body = json.dumps(to_dict() if callable(to_dict) else repr(config), sort_keys=True, default=str)
    return f"{type(model).__name__}:{body}"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (name, dtype, shape, bytes) that reads each tensor where it lives.

    Host tensors are hashed (xxh3-128) in place, without a copy. Tensors on an accelerator are reduced on
    their device by :func:`device_digest`, so only 16 bytes per tensor cross to the host, not the model.
    Distributed and wrapper tensors (``DTensor`` of FSDP2 / tensor parallel, other ``__tensor_flatten__``
    subclasses) are read through their local shards: under sharding each rank digests its own shards, so
    ranks name their versions differently, which is harmless because each rank keeps its own store.
    """
    h = xxhash.xxh3_128()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        for part in _local_parts(t.detach()):
            h.update(f"{part.dtype}:{tuple(part.shape)};".encode())
            if part.numel() == 0:
                continue
            if part.device.type == "cpu":
                h.update(_as_bytes(part).numpy().data)  # a view of the tensor's bytes, no copy
            else:
                h.update(device_digest(part))
    return h.hexdigest()


# Odd 64-bit mixing constants (splitmix64's): fixed, so digests are the same in every process.
_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)
_DIGEST_CHUNK = 1 << 22


def device_digest(t: torch.Tensor) -> bytes:
    """16 bytes that change whenever any element of ``t`` changes, computed on ``t``'s device.

    The bytes of ``t`` are read as integers, each mixed with its index (splitmix64-style multiply and
    xor-shift) and summed in two 64-bit lanes. Integer sums wrap and are associative, so the result does not
    depend on reduction order or device. Works through ``t`` in chunks, so at most a few chunk-sized
    temporaries exist at once.
    """
    ints = _as_ints(t)
    lanes = torch.zeros(2, dtype=torch.int64, device=t.device)
    c0, c1, c2 = (torch.tensor(c, dtype=torch.int64, device=t.device) for c in _MIX)
    for start in range(0, ints.numel(), _DIGEST_CHUNK):
        x = ints[start : start + _DIGEST_CHUNK].to(torch.int64)
        i = torch.arange(start, start + x.numel(), dtype=torch.int64, device=t.device)
        w = (i + 1) * c0
        w = (w ^ (w >> 31)) * c1
        y = (x + w) * c2
        y = y ^ (y >> 29)
        lanes[0] += y.sum()
        lanes[1] += (y * w).sum()
    return bytes(lanes.cpu().numpy().tobytes())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _as_ints(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().reshape(-1)
    size = flat.element_size()
    kinds = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if size in kinds and flat.dtype not in (torch.bool,):
        return flat.view(kinds[size])
    return flat.view(torch.uint8)


def _local_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data on this rank: itself, a DTensor's local shard, or the inner
    tensors of a wrapper subclass (its ``__tensor_flatten__``)."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        return _local_parts(to_local())
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) and callable(flatten):
        names, _ = flatten()
        return [p for n in names for p in _local_parts(getattr(t, n))]
    return [t]


def namespace(fields: dict[str, str]) -> str:
    """The 32-hex-digit namespace digest of ``fields`` (order independent)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """One prompt row's blocks: where its real tokens start and the chained keys of its full blocks.

    Block ``j`` covers columns ``[start + j * block_tokens, start + (j + 1) * block_tokens)`` of the row.
    ``end`` is the column after the row's first run of real (mask 1) tokens.
    """

    start: int
    end: int
    keys: tuple[str, ...]


def row_blocks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_tokens: int, root: str
) -> list[RowBlocks]:
    """Chained keys of the full blocks of every row of ``input_ids`` (``[batch, seq]``), padding ignored.

    A row's blocks start at its first real token and end at the end of that run of real tokens (a hole in
    the mask ends the row's keys). Key ``j`` hashes the token ids of blocks ``0..j`` and the namespace
    ``root``, so a left- or right-padded row has the keys of the same row without padding.
    """
    ids = input_ids.detach().to("cpu", torch.int64)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        bounds = [(0, ids.shape[1])] * ids.shape[0]
    else:
        mask = attention_mask.detach().to("cpu").ne(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        bounds = [_real_run(mask[r]) for r in range(ids.shape[0])]
    ids_np = ids.numpy()
    ones = bytes([1]) * block_tokens  # mask bits of a full real block: keys as before padding was ignored
    out: list[RowBlocks] = []
    for r, (lo, hi) in enumerate(bounds):
        parent = root.encode()
        keys: list[str] = []
        for j in range((hi - lo) // block_tokens):
            h = xxhash.xxh3_128(parent)
            h.update(ids_np[r, lo + j * block_tokens : lo + (j + 1) * block_tokens].astype("<i8").tobytes())
            h.update(ones)
            parent = h.digest()
            keys.append(h.hexdigest())
        out.append(RowBlocks(lo, hi, tuple(keys)))
    return out


def _real_run(mask: torch.Tensor) -> tuple[int, int]:
    """``(first, end)``: the columns of the first run of ``True`` in a 1-D mask (``(n, n)`` if none)."""
    n = mask.numel()
    real = mask.nonzero()
    if real.numel() == 0:
        return n, n
    first = int(real[0, 0])
    gaps = (~mask[first:]).nonzero()
    return first, first + int(gaps[0, 0]) if gaps.numel() else n


def block_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_tokens: int, root: str
) -> list[list[str]]:
    """The keys of :func:`row_blocks`, one list per row."""
    return [list(r.keys) for r in row_blocks(input_ids, attention_mask, block_tokens, root)]


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask as ``generate`` computes them: real tokens count from 0, padding 0.

    A forward over a padded batch must use these positions for its K/V to be the K/V of the unpadded rows,
    the K/V that prefix blocks hold.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class PersistDir:
    """One namespace's folder of persisted KV blocks.

    Args:
        parent: the ``persist_dir`` given by the user.
        fields: what the namespace digest covers; written to (and checked against) ``namespace.json``.
    """

    def __init__(self, parent: str | os.PathLike[str], fields: dict[str, str]) -> None:
        self.digest = namespace(fields)
        self.path = Path(parent).expanduser() / self.digest
        self.counts = {"persist_loads": 0, "persist_writes": 0, "persist_corrupt": 0, "persist_stale": 0}
        self._lock = threading.Lock()
        self._valid = self._check_or_init(fields)

    def _check_or_init(self, fields: dict[str, str]) -> bool:
        meta = self.path / "namespace.json"
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if meta.exists():
                found = json.loads(meta.read_text())
                if found != fields:
                    self._count("persist_stale")
                    self._warn(f"{meta} does not match this model's namespace; its blocks are ignored")
                    return False
                return True
            tmp = meta.with_name(f".namespace.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fields, sort_keys=True, indent=1))
            os.replace(tmp, meta)
            return True
        except (OSError, ValueError) as err:
            self._warn(f"persist_dir {self.path} is unusable ({err}); KV blocks will not persist")
            return False

    def file(self, key: str, layer: int) -> Path:
        return self.path / f"{key}-{layer}.ltc"

    def load(self, key: str, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The block record for ``(key, layer)``, or ``None`` when absent, corrupt or not of ``shape``/``dtype``."""
        if not self._valid:
            return None
        path = self.file(key, layer)
        if not path.exists():
            return None
        try:
            t = read_record(path)
        except SpillError as err:
            self._count("persist_corrupt")
            self._warn(f"ignoring a corrupt persisted KV block: {err}")
            path.unlink(missing_ok=True)
            return None
        if tuple(t.shape) != shape or t.dtype != dtype:
            self._count("persist_stale")
            self._warn(f"ignoring {path}: shape {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            return None
        self._count("persist_loads")
        return t

    def save(self, key: str, layer: int, tensor: torch.Tensor) -> None:
        """Write one block atomically unless it is already there. Failures are logged, not raised."""
        if not self._valid:
            return
        path = self.file(key, layer)
        if path.exists():
            return
        try:
            write_record(path, tensor.detach().to("cpu"), "none")
        except OSError as err:
            self._warn(f"could not persist a KV block to {path} ({err}); continuing without it")
            return
        self._count("persist_writes")

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    @staticmethod
    def _warn(message: str) -> None:
        log.warning(message)
        warnings.warn(f"tiercache: {message}", RuntimeWarning, stacklevel=3)
