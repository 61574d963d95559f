"""Tier budgets from what this machine has: device memory, host RAM and free disk space.

Explicit sizes in :class:`~lightning_tiercache.config.TierConfig` win; a ``None`` field is sized from the machine
when the store opens. Host RAM and the spill disk are shared by every process of a node, so a machine-sized
host or disk budget is this process's share: half of what is available, divided by the processes on this node
(:func:`local_world_size`). Available RAM is capped by the memory limit of this process's cgroup
(:func:`cgroup_free_bytes`), which ``psutil`` does not see: in a container, ``available`` is the host's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import torch

from lightning_tiercache.config import TierConfig
from lightning_tiercache.store.tiers import Tier

__all__ = ["cgroup_free_bytes", "host_free_bytes", "local_world_size", "resolve_budgets"]

#: Share of available host RAM and free disk the processes of a node take together.
NODE_SHARE = 0.5
#: Environment variables launchers set to the number of processes on this node (torchrun, SLURM, MPI).
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number close to 2**63


def local_world_size(explicit: int | None = None) -> int:
    """How many processes share this node's RAM and disk: ``explicit``, else the launcher's environment, else 1."""
    if explicit is not None:
        return explicit
    for name in LOCAL_SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _reclaimable(stat: Path, key: str) -> int:
    """Page cache the kernel drops before it fails an allocation (counted in cgroup usage)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_free_bytes(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the memory limits of this process's cgroup and its ancestors still allow; ``None``: no limit.

    Reads cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``); inactive page cache counts as free, as the kernel reclaims it first.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        level = base / path.strip().lstrip("/")
        for d in (level, *[p for p in level.parents if p.is_relative_to(base)]):
            limit, usage = _read_int(d / files[0]), _read_int(d / files[1])
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            free = max(0, limit - usage + _reclaimable(d / "memory.stat", files[2]))
            best = free if best is None else min(best, free)
    return best


def host_free_bytes() -> int:
    """Host RAM this process could still get: ``psutil``'s available memory, capped by its cgroup's limit."""
    avail = int(psutil.virtual_memory().available)
    capped = cgroup_free_bytes()
    return avail if capped is None else min(avail, capped)


def _disk_free_bytes(cfg: TierConfig) -> int:
    parent = cfg.spill_parent
    while not parent.exists():
        parent = parent.parent
    return int(shutil.disk_usage(parent).free)


def resolve_budgets(cfg: TierConfig, device: torch.device, local_size: int | None = None) -> dict[Tier, int]:
    """Budgets in bytes, filling ``None`` fields from what this machine has free.

    Args:
        cfg: the configured budgets; explicit sizes are used as given.
        device: the device whose memory the device tier stands for.
        local_size: processes on this node (``None``: :func:`local_world_size` of ``cfg.local_world_size``).
    """
    ranks = local_world_size(cfg.local_world_size if local_size is None else local_size)
    avail = host_free_bytes()
    if cfg.device_bytes is not None:
        dev = int(cfg.device_bytes)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        dev = int(free * 0.5)
    else:  # a RAM budget standing in for device memory: the node's RAM is shared by its processes too
        dev = int(avail * 0.25 / ranks)
    host = int(cfg.host_bytes) if cfg.host_bytes is not None else int(avail * NODE_SHARE / ranks)
    disk = int(cfg.disk_bytes) if cfg.disk_bytes is not None else int(_disk_free_bytes(cfg) * NODE_SHARE / ranks)
    return {Tier.DEVICE: dev, Tier.HOST: host, Tier.DISK: disk}
