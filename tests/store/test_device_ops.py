"""The CUDA backend of the device seam, checked where it can be without a GPU."""

from __future__ import annotations

from lightning_tiercache.store.tiers import device


def test_cuda_events_let_waiting_threads_sleep(monkeypatch):
    """Note: [blocking events] -- a non-blocking event's synchronize() spins a core for the whole copy."""
    made: list[dict] = []
    monkeypatch.setattr(device.torch.cuda, "Event", lambda **kw: made.append(kw))
    device.cuda_event()
    device.cuda_event(timing=True)
    assert [kw["blocking"] for kw in made] == [True, True]
    assert [kw["enable_timing"] for kw in made] == [False, True]


def test_a_cpu_device_moves_no_bytes_between_device_and_host():
    ops = device.make_ops(device.torch.device("cpu"))
    assert type(ops) is device.DeviceOps and not ops.moves_bytes
