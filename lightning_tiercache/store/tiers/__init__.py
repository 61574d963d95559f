"""The three tiers below the store: device memory, host memory and disk."""

from __future__ import annotations

import enum

__all__ = ["Tier"]


class Tier(enum.IntEnum):
    """Where an entry's bytes live, fastest first."""

    DEVICE = 0
    HOST = 1
    DISK = 2

    @property
    def label(self) -> str:
        return self.name.lower()
