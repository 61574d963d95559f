"""Typed, validated configuration for the store. Sizes are int bytes; strings like ``"8GiB"`` are accepted."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path

__all__ = ["CODECS", "POLICIES", "TierConfig", "format_bytes", "parse_bytes"]

#: Codec names accepted by :class:`TierConfig`. ``auto`` picks per tensor by measured speed.
CODECS = ("auto", "none", "zstd", "byteplane")
#: Built-in eviction policy names (more can be registered, see :mod:`lightning_tiercache.store.policy`).
POLICIES = ("lru", "lfu", "s3fifo")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# The sign is part of the number, so "-1GiB" is reported as negative rather than as not a size.
_SIZE_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_BINARY = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def parse_bytes(value: int | float | str, field: str = "size") -> int:
    """Turn ``1024``, ``"512MiB"``, ``"1.5GB"`` into an int number of bytes.

    Raises:
        ValueError: on negative sizes or unknown units; the message names ``field`` and the value.
        TypeError: on values that are neither numbers nor strings.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{field} must be an int, a float or a string like '8GiB', got {value!r}")
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(
                f"{field}={value!r} is not a size; use bytes or a number with one of the units "
                f"{', '.join(u for u in _UNITS if u)} (e.g. '8GiB')"
            )
        number = float(m.group(1)) * _UNITS[unit]
    else:
        number = float(value)
    if number < 0 or number != number:
        raise ValueError(f"{field}={value!r} must be >= 0 bytes")
    return int(number)


def format_bytes(n: float) -> str:
    """A size for people: ``"1.75 GiB"``, ``"640 KiB"``, ``"512 B"`` (three significant digits)."""
    sign, n = ("-" if n < 0 else ""), abs(float(n))
    for unit, size in _BINARY:
        if n >= size:
            value = n / size
            return f"{sign}{value:,.{max(0, 2 - int(math.log10(value)))}f} {unit}"
    return f"{sign}{n:,.0f} B"


def _check_writable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"spill_dir={str(path)!r} exists and is not a directory; pass a directory path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"spill_dir={str(path)!r} is not writable by this user (checked {str(probe)!r}); "
            "pass a writable directory or None for a private folder in the system temp dir"
        )


@dataclasses.dataclass(frozen=True)
class TierConfig:
    """Budgets and choices of a :class:`~lightning_tiercache.TierStore`.

    Args:
        device_bytes: budget of the device tier (CUDA memory; a RAM budget that plays the same role on a
            CPU-only machine). On CUDA the budget is derived from the allocator when decisions are made (what
            the tier holds plus what new tensors could get, less a fifth of the device), and this caps it;
            ``None``: no cap. On a CPU-only machine ``None`` sizes it from RAM when the store opens.
        host_bytes: budget of the host tier (a pinned pool on CUDA). ``None``: from available RAM.
        disk_bytes: budget of the disk tier. ``0`` turns spilling off. ``None``: from free disk.
        spill_dir: parent folder for this process's private spill folder. ``None``: the system temp dir.
        codec: how spill files are encoded, one of :data:`CODECS`. All are lossless.
        policy: eviction policy name, one of the registered policies (:data:`POLICIES` built in).
        io_threads: worker threads for disk reads and writes.
        device: the device whose memory the device tier stands for. ``None``: CUDA if available, else CPU.
        pin_memory: use a pinned host pool. ``None``: on when the device is CUDA.
        zstd_level: compression level of the ``zstd`` and ``byteplane`` codecs.
        max_inflight_bytes: most bytes of device-to-host copies in flight at once. Past it, the compute stream
            waits for the oldest copy before it runs on, and that copy's device memory is released (backpressure
            when the link drains slower than a forward produces activations).
        local_world_size: processes on this node sharing its RAM and disk; machine-sized host and disk budgets
            are divided among them. ``None``: from the launcher (``LOCAL_WORLD_SIZE``, SLURM, MPI; the callback
            passes the trainer's devices per node), else 1.
    """

    device_bytes: int | str | None = None
    host_bytes: int | str | None = None
    disk_bytes: int | str | None = None
    spill_dir: str | os.PathLike[str] | None = None
    codec: str = "auto"
    policy: str = "lru"
    io_threads: int = 2
    device: str | None = None
    pin_memory: bool | None = None
    zstd_level: int = 1
    max_inflight_bytes: int | str = "256MiB"
    local_world_size: int | None = None

    def __post_init__(self) -> None:
        for field in ("device_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, parse_bytes(value, field))
        object.__setattr__(self, "max_inflight_bytes", parse_bytes(self.max_inflight_bytes, "max_inflight_bytes"))
        if self.codec not in CODECS:
            raise ValueError(f"codec={self.codec!r} is not one of {', '.join(CODECS)}")
        from lightning_tiercache.store.policy import registered_policies

        if self.policy not in registered_policies():
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(registered_policies())}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"io_threads={self.io_threads!r} must be an int >= 1")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level={self.zstd_level!r} must be between 1 and 22")
        n = self.local_world_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"local_world_size={n!r} must be None or an int >= 1")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device={self.device!r} is not a torch device string: {err}") from None
        if self.spill_dir is not None:
            path = Path(self.spill_dir).expanduser()
            _check_writable(path)
            object.__setattr__(self, "spill_dir", str(path))
        else:
            object.__setattr__(self, "spill_dir", None)

    @property
    def spill_parent(self) -> Path:
        """The folder under which this process's private spill folder is made."""
        return Path(self.spill_dir) if self.spill_dir is not None else Path(tempfile.gettempdir())
