"""Buffer snapshots cost nothing per byte of a large buffer; step calls keep their keyword arguments."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_tiercache.oom.buffers import BufferSnapshot
from lightning_tiercache.oom.microbatch import attempt


def test_small_buffers_are_restored_and_a_changed_large_one_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    stats, queue = torch.zeros(4), torch.zeros(1024)
    snap = BufferSnapshot([("stats", stats), ("queue", queue)], copy_bytes=64)
    assert snap.copied_bytes == 16  # the queue (4 KiB) is watched, not copied
    snap.save()
    stats.add_(1)
    queue[0] = 5.0
    with caplog.at_level(logging.WARNING):
        snap.restore()
    assert torch.equal(stats, torch.zeros(4))
    assert queue[0] == 5.0  # nothing to restore it from: reported instead
    assert "'queue' (4096 bytes) was changed in place" in caplog.text


def test_an_untouched_large_buffer_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    snap = BufferSnapshot([("queue", torch.zeros(1024))], copy_bytes=64)
    snap.save()
    with caplog.at_level(logging.WARNING):
        snap.restore()
    assert caplog.text == ""


def test_attempt_passes_keyword_arguments() -> None:
    assert attempt(lambda x, *, scale: x * scale, 2, scale=3) == (6, None)

    def oom(**kwargs: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    out, message = attempt(oom, scale=3)
    assert out is None and message is not None and message.startswith("OutOfMemoryError")
