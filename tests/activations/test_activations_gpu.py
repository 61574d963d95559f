"""Activation offload on CUDA: side streams, events, allocator reuse across streams, memory and exactness.

Run with ``pytest -m gpu tests/activations/test_activations_gpu.py`` on a machine with a CUDA device.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from lightning_tiercache import ActivationOffloader, TierStore
from lightning_tiercache.bench.gpt import GPT, GPTConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SLEEP_CYCLES = 200_000_000  # ~0.1 s of a spinning kernel on current GPUs


@pytest.fixture
def cuda_store(make_store):
    """``make_store`` (tests/conftest.py) on the CUDA device."""

    def make(**kw) -> TierStore:
        kw.setdefault("device", "cuda")
        return make_store(**kw)

    return make


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("tiers", ["host", "disk"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cuda_grads_bit_exact_over_steps(cuda_store, tiers, bf16):
    cfg = GPTConfig(vocab_size=256, seq_len=128, n_layer=2, n_head=4, d_model=128)
    plain = GPT(cfg).cuda()
    model = copy.deepcopy(plain)
    batches = [plain.batch(4) for _ in range(3)]
    kw = {"host_bytes": "64MiB", "disk_bytes": 0} if tiers == "host" else {"host_bytes": 0, "disk_bytes": "1GiB"}
    store = cuda_store(device_bytes="1MiB", **kw)
    off = ActivationOffloader(store, min_bytes=1024, tier=tiers)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, model)]
    for x, y in batches:
        losses = []
        for m, opt, ctx in ((plain, opts[0], None), (model, opts[1], off)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                if ctx is None:
                    loss = m(x, y).loss
                else:
                    with ctx:
                        loss = m(x, y).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        for a, b in zip(_grads(plain), _grads(model), strict=True):
            assert torch.equal(a, b)
        for opt in opts:
            opt.step()
    st = store.stats()
    assert st["bytes_to_host"] > 0 or st["spills"] > 0
    assert off.stats()["prefetches"] > 0


def test_copy_out_waits_for_a_delayed_producer_kernel(cuda_store):
    """The device-to-host copy runs on a side stream; it must wait for the kernel that writes the tensor."""
    store = cuda_store(host_bytes="1GiB", disk_bytes=0)
    off = ActivationOffloader(store, min_bytes=0, keep_tail_bytes=0)
    x = torch.randn(1 << 24, device="cuda", requires_grad=True)
    with off:
        torch.cuda._sleep(SLEEP_CYCLES)  # the producer below is queued behind a slow kernel
        y = x * 2
        z = y.sin()  # saves y, offloaded at once (no tail)
    z.sum().backward()
    torch.cuda.synchronize()
    assert torch.equal(x.grad, (x.detach() * 2).cos() * 2)
    store.settle()  # bytes_to_host counts a copy once its fence saw it land
    assert store.stats()["bytes_to_host"] > 0


class _SlowUse(torch.autograd.Function):
    """Saves its input; its backward queues a slow kernel before the kernel that reads the saved tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * 1.5

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        torch.cuda._sleep(SLEEP_CYCLES)
        return g * 1.5 + g * x  # reads x after the sleep: its memory must not have been reused meanwhile


def _chain(x: torch.Tensor, n: int) -> torch.Tensor:
    h = x
    for i in range(n):
        h = _SlowUse.apply(h + i)  # distinct storage and values per link
    return h.sum()


def test_reloaded_tensor_survives_allocator_reuse_behind_a_slow_compute_stream(cuda_store):
    """Note: [reload across streams]: an entry freed while queued kernels still read it is not reused early."""
    store = cuda_store(host_bytes="1GiB", disk_bytes=0)
    off = ActivationOffloader(store, min_bytes=0, keep_tail_bytes=0, lead_bytes="64MiB")
    x = torch.randn(1 << 22, device="cuda", requires_grad=True)
    _chain(x, 8).backward()
    ref = x.grad.clone()
    x.grad = None
    for _ in range(2):  # the second step runs on the measured plan
        with off:
            loss = _chain(x, 8)
        loss.backward()
        torch.cuda.synchronize()
        assert torch.equal(x.grad, ref)
        x.grad = None
    assert off.stats()["prefetches"] > 0


def test_offload_lowers_peak_memory_and_releases_everything(cuda_store):
    cfg = GPTConfig(vocab_size=512, seq_len=512, n_layer=4, n_head=8, d_model=512)
    model = GPT(cfg).cuda()
    x, y = model.batch(8)

    def peak(ctx) -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if ctx is None:
            model(x, y).loss.backward()
        else:
            with ctx:
                loss = model(x, y).loss
            loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak(None)
    store = cuda_store(host_bytes="4GiB", disk_bytes=0)
    off = ActivationOffloader(store, module=model)
    peak(off)  # measures
    ours = peak(off)
    assert ours < 0.7 * plain
    gc.collect()
    off.flush()
    store.settle()
    assert len(store) == 0
    assert off.state_dict()["h2d_bytes_per_s"] > 1e9


def test_the_bandwidth_probe_measures_pageable_memory_when_nothing_can_be_pinned(monkeypatch):
    """Note: [pinned memory is not a device OOM] -- the probe runs inside a step; a failed pin must not reach it."""
    from lightning_tiercache.activations import prefetch_plan
    from lightning_tiercache.errors import PinnedMemoryError

    def no_locked_memory(nbytes: int) -> torch.Tensor:
        raise PinnedMemoryError(f"could not pin {nbytes} bytes of host memory: CUDA error: out of memory")

    monkeypatch.setattr(prefetch_plan, "torch_pinned", no_locked_memory)
    assert prefetch_plan.probe_h2d_bytes_per_s(torch.device("cuda")) > 1e6
