"""Gather the parts' notable events from every rank, so rank zero can log (and table) all of them.

Events travel as UTF-8 JSON in a ``uint8`` tensor over two ``all_gather`` calls (lengths, then padded
payloads): no pickle, so a peer can never make another rank run code while decoding.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["MAX_DETAIL_CHARS", "MAX_EVENTS_PER_RANK", "gather_events"]

log = logging.getLogger(__name__)

#: Events kept per rank and call; older ones are replaced by one ``events_dropped`` entry.
MAX_EVENTS_PER_RANK = 256
#: String values are cut to this many characters (the W&B table keeps 500 of ``detail``).
MAX_DETAIL_CHARS = 1000

_Pair = tuple[str, dict[str, Any]]


def gather_events(
    pairs: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    device: torch.device | None = None,
    group: Any = None,
    max_events: int = MAX_EVENTS_PER_RANK,
) -> list[tuple[int, str, dict[str, Any]]]:
    """All ranks' ``(source, event)`` pairs as ``(rank, source, event)`` triples, by rank then original order.

    Under an initialized process group of more than one rank this is a collective: every rank of ``group``
    must call it at the same point, also with no events, and every rank gets the full list. Otherwise it
    returns the local pairs tagged with this process's rank (0 without a group) and communicates nothing.

    Values that are not JSON scalars (``str``, ``int``, ``float``, ``bool``, ``None``) are converted with
    ``str()``, keys too; strings are cut to :data:`MAX_DETAIL_CHARS`. A rank with more than ``max_events``
    events sends only the newest ``max_events - 1`` after one ``("events", {"event": "events_dropped"})``
    entry, so a flood cannot blow up memory on the others.

    Args:
        pairs: this rank's events, as from ``TierRuntime.drain_events()``.
        device: where the tensors live for a backend that needs a device (NCCL: this rank's GPU, e.g.
            ``trainer.strategy.root_device``). Ignored for gloo and MPI (CPU tensors); ``None`` under NCCL
            uses the current CUDA device.
        group: the process group (``None``: the default group). Ranks in the result are global ranks.
        max_events: the per-rank cap (at least 1).

    Returns:
        ``(rank, source, event)`` triples, events as plain JSON-compatible dicts.

    Raises:
        ValueError: ``max_events`` is below 1.

    Example:
        >>> gather_events([("store", {"event": "spill", "detail": "first spill", "time": 1.0})])
        [(0, 'store', {'event': 'spill', 'detail': 'first spill', 'time': 1.0})]
    """
    if max_events < 1:
        raise ValueError(f"max_events={max_events!r} must be >= 1")
    local = _capped([(str(source), _jsonable(event)) for source, event in pairs], max_events)
    if not (dist.is_available() and dist.is_initialized()):
        return [(0, source, event) for source, event in local]
    world = dist.get_world_size(group)
    if world == 1:
        return [(dist.get_rank(), source, event) for source, event in local]

    dev = _device(device, group)
    payload = json.dumps(local, ensure_ascii=False, allow_nan=True).encode("utf-8")
    length = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n.item()) for n in lengths]
    # all_gather needs equal shapes: pad to the longest payload, cut each back to its own length.
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    padded = padded.to(dev)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)

    out: list[tuple[int, str, dict[str, Any]]] = []
    for i, (buf, size) in enumerate(zip(gathered, sizes, strict=True)):
        rank = i if group is None else dist.get_global_rank(group, i)
        decoded = json.loads(bytes(buf[:size].cpu().tolist()).decode("utf-8"))
        out += [(rank, str(source), dict(event)) for source, event in decoded]
    return out


def _device(device: torch.device | None, group: Any) -> torch.device:
    """The device whose tensors the group's backend can all_gather."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:  # CPU tensors work (also for a "cpu:gloo,cuda:nccl" group)
        return torch.device("cpu")
    if device is not None and device.type != "cpu":
        return device
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


def _jsonable(event: Mapping[str, Any]) -> dict[str, Any]:
    """``event`` with str keys and JSON scalar values (others through ``str()``), strings cut."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if value is None or isinstance(value, bool | int | float):
            out[str(key)] = value
        else:
            out[str(key)] = (value if isinstance(value, str) else str(value))[:MAX_DETAIL_CHARS]
    return out


def _capped(pairs: list[_Pair], max_events: int) -> list[_Pair]:
    """The newest ``max_events`` pairs; when some are dropped, the first one says how many."""
    if len(pairs) <= max_events:
        return pairs
    dropped = len(pairs) - (max_events - 1)
    log.warning("tiercache: %d older events dropped on this rank (over %d since the last log)", dropped, max_events)
    marker = {"event": "events_dropped", "detail": f"{dropped} older events dropped", "time": time.time()}
    return [("events", marker), *pairs[len(pairs) - (max_events - 1) :]]
