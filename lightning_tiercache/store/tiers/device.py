"""Copies between the device tier and the host tier.

On CUDA, copies run on side streams and are fenced with events; on CPU the "device" tier is a RAM budget,
so a move between device and host changes only which budget the bytes count against.

Note: [stream lifetimes]
    A tensor handed to the store was produced on the caller's current stream, possibly by kernels still
    queued. ``mark_ready`` records an event there; the side stream waits for it before copying out, and the
    source tensor stays referenced until the copy's event has completed, so the caching allocator cannot hand
    its memory to another kernel mid-copy. A tensor brought back to the device is allocated on the side
    stream; before the caller uses it, ``hand_over`` makes the caller's stream wait for the copy and calls
    ``record_stream`` so the allocator will not reuse its memory while the caller's stream still reads it.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_tiercache.store.tiers.host import PinnedPool

__all__ = ["DeviceLink"]


class DeviceLink:
    """Moves tensors between ``device`` memory and host memory."""

    def __init__(self, device: torch.device, pool: PinnedPool | None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.pool = pool
        self._down: Any = None
        self._up: Any = None
        if self.is_cuda:
            self._down = torch.cuda.Stream(device=device)
            self._up = torch.cuda.Stream(device=device)

    def mark_ready(self, tensor: torch.Tensor) -> Any:
        """An event that completes once ``tensor``'s producing kernels finished (``None`` off CUDA)."""
        if not (self.is_cuda and tensor.is_cuda):
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        return event

    def to_host(self, tensor: torch.Tensor, ready: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """Start copying a device tensor to host memory.

        Returns the host tensor, an event to wait for (or ``None``) and the pool buffer backing it (or
        ``None``), which goes back to the pool when the entry leaves the host tier.
        """
        if not (self.is_cuda and tensor.is_cuda):
            return tensor, None, None
        nbytes = tensor.numel() * tensor.element_size()
        buf = self.pool.take(nbytes) if self.pool is not None else torch.empty(max(nbytes, 1), dtype=torch.uint8)
        host = (
            buf[:nbytes].view(tensor.dtype).view(tensor.shape)
            if nbytes
            else torch.empty(tensor.shape, dtype=tensor.dtype)
        )
        with torch.cuda.stream(self._down):
            if ready is not None:
                self._down.wait_event(ready)
            if nbytes:
                host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._down)
        return host, done, buf

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying a host tensor to the device. Returns the device tensor and its copy event."""
        if not self.is_cuda:
            return host, None
        with torch.cuda.stream(self._up):
            dev = host.to(self.device, non_blocking=host.is_pinned())
            done = torch.cuda.Event()
            done.record(self._up)
        return dev, done

    @staticmethod
    def wait(event: Any) -> None:
        """Block this host thread until ``event`` completed."""
        if event is not None:
            event.synchronize()

    def hand_over(self, tensor: torch.Tensor, event: Any) -> torch.Tensor:
        """Make ``tensor`` (made on a side stream) safe to use on the caller's current stream."""
        if self.is_cuda and tensor.is_cuda and event is not None:
            stream = torch.cuda.current_stream(tensor.device)
            stream.wait_event(event)
            tensor.record_stream(stream)
        return tensor
