"""Tier budgets from what this machine has: device memory, host RAM and free disk space.

Explicit sizes in :class:`~lightning_tiercache.config.TierConfig` win; a ``None`` field is sized from the machine
when the store opens.
"""

from __future__ import annotations

import shutil

import psutil
import torch

from lightning_tiercache.config import TierConfig
from lightning_tiercache.store.tiers import Tier

__all__ = ["resolve_budgets"]


def resolve_budgets(cfg: TierConfig, device: torch.device) -> dict[Tier, int]:
    """Budgets in bytes, filling ``None`` fields from what this machine has free."""
    avail = psutil.virtual_memory().available
    if cfg.device_bytes is not None:
        dev = int(cfg.device_bytes)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        dev = int(free * 0.5)
    else:
        dev = int(avail * 0.25)
    host = int(cfg.host_bytes) if cfg.host_bytes is not None else int(avail * 0.5)
    if cfg.disk_bytes is not None:
        disk = int(cfg.disk_bytes)
    else:
        parent = cfg.spill_parent
        while not parent.exists():
            parent = parent.parent
        disk = int(shutil.disk_usage(parent).free * 0.5)
    return {Tier.DEVICE: dev, Tier.HOST: host, Tier.DISK: disk}
