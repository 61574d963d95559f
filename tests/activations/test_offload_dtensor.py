"""Activation offload under FSDP2 (``fully_shard``): DTensor parameters on a one-rank gloo mesh."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_tiercache import ActivationOffloader, offload_activations

fsdp = pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture
def one_rank_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(model: nn.Sequential, mesh) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer, mesh=mesh)  # the other layers' parameters stay DTensors during a forward
    fsdp.fully_shard(model, mesh=mesh)
    return model


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.full_tensor() for p in model.parameters()]


def test_fully_sharded_model_offloads_with_bit_exact_grads(one_rank_mesh, make_store):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    plain, model = _sharded(copy.deepcopy(base), one_rank_mesh), _sharded(copy.deepcopy(base), one_rank_mesh)
    assert any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    x = torch.randn(32, 64)
    plain(x).square().sum().backward()
    store = make_store(device_bytes="1KiB", host_bytes="64MiB", disk_bytes=0)
    off = ActivationOffloader(store, min_bytes=1024, module=model)
    with offload_activations(off):
        loss = model(x).square().sum()
    loss.backward()
    for a, b in zip(_grads(plain), _grads(model), strict=True):
        assert torch.equal(a, b)
    assert off.stats()["packed"] > 0
