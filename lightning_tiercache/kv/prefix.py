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

__all__ = ["PersistDir", "block_keys", "model_identity", "namespace", "weights_fingerprint"]

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
    """An xxh3-128 digest of every parameter and buffer (name, dtype, shape, bytes).

    Reads all weights once (about memory bandwidth); use a global step as the model version when that is
    too slow.
    """
    h = xxhash.xxh3_128()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def namespace(fields: dict[str, str]) -> str:
    """The 32-hex-digit namespace digest of ``fields`` (order independent)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def block_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_tokens: int, root: str
) -> list[list[str]]:
    """Chained keys of every full block of every row of ``input_ids`` (``[batch, seq]``).

    Row ``r``'s list has ``seq // block_tokens`` keys; key ``j`` names tokens ``[0, (j + 1) * block_tokens)``
    of that row, their mask bits and the namespace ``root``.
    """
    ids = input_ids.detach().to("cpu", torch.int64)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    mask = (
        torch.ones_like(ids, dtype=torch.uint8)
        if attention_mask is None
        else attention_mask.detach().to("cpu").ne(0).to(torch.uint8)
    )
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    n = ids.shape[1] // block_tokens
    ids_np = ids[:, : n * block_tokens].contiguous().numpy()
    mask_np = mask[:, : n * block_tokens].contiguous().numpy()
    out: list[list[str]] = []
    for r in range(ids.shape[0]):
        parent = root.encode()
        keys: list[str] = []
        for j in range(n):
            s = slice(j * block_tokens, (j + 1) * block_tokens)
            h = xxhash.xxh3_128(parent)
            h.update(ids_np[r, s].astype("<i8").tobytes())
            h.update(mask_np[r, s].tobytes())
            parent = h.digest()
            keys.append(h.hexdigest())
        out.append(keys)
    return out


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
