"""Snapshots of module buffers for a step that may be retried, at a cost that does not grow with buffer size.

A retried step must update BatchNorm statistics (and any other buffer it changes) once, not once per attempt.
Copying every buffer before every step would make a model with a large buffer (a MoCo-style queue of 256 MiB)
pay a copy of that size per step, OOM or not. So :class:`BufferSnapshot` splits the buffers once:

- small ones (at most ``copy_bytes`` each: norm statistics, counters) are copied before each step into storage
  allocated once, with one fused copy call;
- large ones are watched through their version counters, which every in-place change bumps. They are
  restored only if a failed attempt changed them; it cannot (nothing was copied), so :meth:`restore` warns
  once per buffer with its name and size, and the retried step starts from the changed value.

Plain PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["BufferSnapshot"]

log = logging.getLogger(__name__)


class BufferSnapshot:
    """Save and restore the buffers of one module around a step.

    Args:
        named: ``(name, buffer)`` pairs (``module.named_buffers()``), looked up once; a change of the module's
            buffers needs a new snapshot object.
        copy_bytes: buffers up to this size are copied before each step; larger ones are watched.

    Example::

        snap = BufferSnapshot(module.named_buffers())
        snap.save()
        try:
            step()
        except torch.OutOfMemoryError:
            snap.restore()  # as if the step had not run (warns for a large buffer it changed)
    """

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], copy_bytes: int = 2**20) -> None:
        named = list(named)
        small = [(n, b) for n, b in named if b.numel() * b.element_size() <= copy_bytes and not b.is_inference()]
        small_names = {n for n, _ in small}
        self.copy_bytes = copy_bytes
        self.small = [b for _, b in small]
        self.large = [(n, b) for n, b in named if n not in small_names]
        self._storage = [torch.empty_like(b) for b in self.small]
        self._versions: list[int] = []
        self._saved = False
        self._warned: set[str] = set()

    @property
    def copied_bytes(self) -> int:
        """Bytes copied by each :meth:`save`."""
        return sum(b.numel() * b.element_size() for b in self.small)

    def save(self) -> None:
        """Copy the small buffers and note the large ones' version counters."""
        if self.small:
            torch._foreach_copy_(self._storage, self.small)
        self._versions = [b._version if not b.is_inference() else -1 for _, b in self.large]
        self._saved = True

    def restore(self) -> None:
        """Put the small buffers back; warn for each large one a failed attempt changed in place."""
        if not self._saved:
            return
        if self.small:
            torch._foreach_copy_(self.small, self._storage)
        for (name, b), version in zip(self.large, self._versions, strict=True):
            # An inference tensor (version -1) cannot be changed in place outside inference mode.
            if version != -1 and b._version != version and name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "tiercache oom: buffer %r (%d bytes) was changed in place by a step that ran out of memory and "
                    "is too large to copy before every step (over %d bytes); the retried step starts from its "
                    "changed value. Raise OOMConfig.buffer_copy_bytes to copy it, or update it after the OOM-prone "
                    "part of the step.",
                    name,
                    b.numel() * b.element_size(),
                    self.copy_bytes,
                )
