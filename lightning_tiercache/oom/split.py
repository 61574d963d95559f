"""Split a batch into micro-batches along the sample dimension, and merge per-micro-batch outputs back.

A batch is a tree of containers (mappings, sequences, dataclasses, named tuples, Hugging Face
``BatchEncoding``) over leaves. Tensors (and numpy arrays) are split along dim 0 and must all have the same
leading size, the batch size. A list or tuple made only of plain scalars (``str``, numbers, ``None``) whose
length equals the batch size is a list of samples and is split too; any other sequence is a record of fields,
split field by field. 0-dim tensors and plain scalars are copied into every micro-batch. Anything else raises
:class:`~lightning_tiercache.errors.BatchSplitError`: pass a ``split_fn`` (a ``split_batch(batch, n)`` method on
the LightningModule, or ``OOMConfig(split_fn=...)``).

Micro-batch sizes follow ``torch.tensor_split``: they differ by at most one, larger ones first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_tiercache.errors import BatchSplitError

__all__ = ["MergeFn", "SplitFn", "batch_size_of", "chunk_sizes", "merge_outputs", "split_batch"]

SplitFn = Callable[[Any, int], Sequence[Any]]
"""``split_fn(batch, n)`` returns ``n`` (or fewer, never more) micro-batches covering the batch in order."""

MergeFn = Callable[[Sequence[Any], Sequence[int]], Any]
"""``merge_fn(outputs, sizes)`` combines per-micro-batch step outputs into the output of the whole batch."""

_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)
_HINT = (
    "pass a split function: define `split_batch(self, batch, n) -> list` on your LightningModule "
    "or give OOMConfig(split_fn=...)"
)


def _is_array(x: Any) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _is_batch_encoding(x: Any) -> bool:
    return type(x).__name__ == "BatchEncoding" and type(x).__module__.startswith("transformers")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_sample_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and not _is_namedtuple(x) and all(isinstance(v, _SCALARS) for v in x)


def _first_size(obj: Any) -> int | None:
    """Leading size of the first tensor or array with at least one dim, in container order."""
    if isinstance(obj, torch.Tensor) or _is_array(obj):
        return int(obj.shape[0]) if obj.ndim > 0 else None
    if isinstance(obj, Mapping) or _is_batch_encoding(obj):
        values: Any = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for v in values:
        size = _first_size(v)
        if size is not None:
            return size
    return None


def batch_size_of(batch: Any) -> int | None:
    """The number of samples in ``batch``: the leading size of its first tensor, else the length of a sample list.

    Returns ``None`` when neither exists.
    """
    size = _first_size(batch)
    if size is None and _is_sample_list(batch):
        return len(batch)
    return size


def chunk_sizes(total: int, n: int) -> list[int]:
    """Sizes of ``min(n, total)`` chunks covering ``total`` samples, as ``torch.tensor_split`` makes them."""
    n = max(1, min(n, total))
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def split_batch(batch: Any, n: int, split_fn: SplitFn | None = None) -> list[Any]:
    """Split ``batch`` into at most ``n`` micro-batches (fewer when it holds fewer samples).

    Args:
        batch: the batch, as the dataloader yields it.
        n: how many micro-batches to make (at least 1).
        split_fn: a user function that knows the batch's type; used instead of the built-in rules.

    Raises:
        BatchSplitError: the batch holds a type the rules do not cover, or tensors disagree on the batch size.
        ValueError: ``n`` is below 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if split_fn is not None:
        parts = list(split_fn(batch, n))
        if not parts or len(parts) > n:
            raise BatchSplitError(f"split_fn returned {len(parts)} micro-batches for n={n}; expected 1..{n}")
        return parts
    total = batch_size_of(batch)
    if total is None:
        raise BatchSplitError(f"cannot find the batch size of a {type(batch).__name__}: no tensor in it; {_HINT}")
    if n == 1 or total <= 1:
        return [batch]
    bounds: list[tuple[int, int]] = []
    start = 0
    for size in chunk_sizes(total, n):
        bounds.append((start, start + size))
        start += size
    return _split(batch, bounds, total, "batch")


def _split(obj: Any, bounds: list[tuple[int, int]], total: int, path: str) -> list[Any]:
    n = len(bounds)
    if isinstance(obj, torch.Tensor) or _is_array(obj):
        if obj.ndim == 0:
            return [obj] * n
        if obj.shape[0] != total:
            raise BatchSplitError(
                f"{path} has leading size {obj.shape[0]} but the batch size is {total}; every tensor in a batch "
                f"must be batch-first; {_HINT}"
            )
        return [obj[a:b] for a, b in bounds]
    if _is_batch_encoding(obj):
        return _split_batch_encoding(obj, bounds, total, path)
    if isinstance(obj, Mapping):
        cols = {k: _split(v, bounds, total, f"{path}[{k!r}]") for k, v in obj.items()}
        return [_rebuild_mapping(obj, {k: c[i] for k, c in cols.items()}, path) for i in range(n)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _split_dataclass(obj, bounds, total, path)
    if _is_namedtuple(obj):
        cols_t = [_split(v, bounds, total, f"{path}.{f}") for f, v in zip(type(obj)._fields, obj, strict=True)]
        return [type(obj)(*(c[i] for c in cols_t)) for i in range(n)]
    if isinstance(obj, (list, tuple)):
        if len(obj) == total and _is_sample_list(obj):
            return [type(obj)(obj[a:b]) for a, b in bounds]
        cols_s = [_split(v, bounds, total, f"{path}[{j}]") for j, v in enumerate(obj)]
        return [type(obj)(c[i] for c in cols_s) for i in range(n)]
    if isinstance(obj, _SCALARS):
        return [obj] * n
    raise BatchSplitError(f"cannot split {path} of type {type(obj).__qualname__}; {_HINT}")


def _rebuild_mapping(like: Mapping[Any, Any], items: dict[Any, Any], path: str) -> Any:
    if type(like) is dict:
        return items
    try:
        return type(like)(items)  # type: ignore[call-arg]
    except Exception as exc:
        raise BatchSplitError(f"cannot rebuild {path} of type {type(like).__qualname__} from a dict; {_HINT}") from exc


def _split_dataclass(obj: Any, bounds: list[tuple[int, int]], total: int, path: str) -> list[Any]:
    fields = dataclasses.fields(obj)
    cols = {f.name: _split(getattr(obj, f.name), bounds, total, f"{path}.{f.name}") for f in fields}
    out = []
    for i in range(len(bounds)):
        part = type(obj)(**{f.name: cols[f.name][i] for f in fields if f.init})
        for f in fields:
            if not f.init:
                object.__setattr__(part, f.name, cols[f.name][i])
        out.append(part)
    return out


def _split_batch_encoding(obj: Any, bounds: list[tuple[int, int]], total: int, path: str) -> list[Any]:
    data = _split(dict(obj.data), bounds, total, path)
    encodings = obj.encodings
    cls = type(obj)
    out = []
    for i, (a, b) in enumerate(bounds):
        enc = encodings[a:b] if encodings is not None and len(encodings) == total else encodings
        out.append(cls(data=data[i], encoding=enc, n_sequences=obj.n_sequences))
    return out


def merge_outputs(outputs: Sequence[Any], sizes: Sequence[int], merge_fn: MergeFn | None = None) -> Any:
    """Combine the outputs of consecutive micro-batches into the output of the whole batch.

    Batch-first tensors (leading size equal to the micro-batch size) and sample lists are concatenated; other
    floating tensors and floats are averaged weighted by micro-batch size (a mean loss stays a mean); integer
    tensors and ints are summed (counts); containers are merged field by field; ``None`` stays ``None``.

    Raises:
        BatchSplitError: the outputs differ in structure or hold a type the rules do not cover.
    """
    if merge_fn is not None:
        return merge_fn(list(outputs), list(sizes))
    if len(outputs) != len(sizes):
        raise ValueError(f"got {len(outputs)} outputs for {len(sizes)} sizes")
    if len(outputs) == 1:
        return outputs[0]
    return _merge(list(outputs), list(sizes), "output")


def _merge(parts: list[Any], sizes: list[int], path: str) -> Any:
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        raise BatchSplitError(f"{path} changes type between micro-batches; pass merge_fn to OOMConfig")
    total = sum(sizes)
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if all(p.ndim > 0 and p.shape[0] == s for p, s in zip(parts, sizes, strict=True)):
            return torch.cat(parts)
        if all(p.shape == first.shape for p in parts):
            if first.is_floating_point() or first.is_complex():
                acc = sum(p * (s / total) for p, s in zip(parts, sizes, strict=True))
                return acc.to(first.dtype) if isinstance(acc, torch.Tensor) else first
            return torch.stack(parts).sum(0).to(first.dtype)
        raise BatchSplitError(f"cannot merge {path}: shapes {[tuple(p.shape) for p in parts]}; pass merge_fn")
    if isinstance(first, bool):
        return all(parts)
    if isinstance(first, float):
        return sum(p * s for p, s in zip(parts, sizes, strict=True)) / total
    if isinstance(first, int):
        return sum(parts)
    if isinstance(first, Mapping) or _is_batch_encoding(first):
        keys = list(first.keys())
        merged = {k: _merge([p[k] for p in parts], sizes, f"{path}[{k!r}]") for k in keys}
        return merged if type(first) is dict else type(first)(merged)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = dataclasses.fields(first)
        vals = {f.name: _merge([getattr(p, f.name) for p in parts], sizes, f"{path}.{f.name}") for f in fields}
        return type(first)(**{k: v for k, v in vals.items() if any(f.name == k and f.init for f in fields)})
    if _is_namedtuple(first):
        return type(first)(*(_merge([p[j] for p in parts], sizes, f"{path}.{j}") for j in range(len(first))))
    if isinstance(first, (list, tuple)):
        if all(_is_sample_list(p) and len(p) == s for p, s in zip(parts, sizes, strict=True)):
            return type(first)(v for p in parts for v in p)
        if any(len(p) != len(first) for p in parts):
            raise BatchSplitError(f"cannot merge {path}: lengths differ between micro-batches; pass merge_fn")
        return type(first)(_merge([p[j] for p in parts], sizes, f"{path}[{j}]") for j in range(len(first)))
    if isinstance(first, _SCALARS) and all(p == first for p in parts):
        return first
    raise BatchSplitError(f"cannot merge {path} of type {type(first).__qualname__}; pass merge_fn to OOMConfig")
