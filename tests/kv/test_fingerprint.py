"""The weights fingerprint: sharded (DTensor) parameters, no host copy of the weights, any change detected."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch

from lightning_tiercache.kv.prefix import device_digest, weights_fingerprint
from tests.kv_models import tiny_model

ROOT = Path(__file__).resolve().parents[2]

_FSDP = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from lightning_tiercache.kv.prefix import weights_fingerprint
    from tests.kv_models import tiny_model
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", sys.argv[1]
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        plain = weights_fingerprint(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert isinstance(next(model.parameters()), DTensor)
        sharded = weights_fingerprint(model)
        with torch.no_grad():
            next(model.parameters()).to_local().view(-1)[0] += 1
        print(sharded == plain, weights_fingerprint(model) != sharded)
    finally:
        dist.destroy_process_group()
    """
)


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_fingerprint_reads_fsdp2_dtensor_parameters_on_a_one_rank_gloo_mesh():
    out = subprocess.run(
        [sys.executable, "-c", _FSDP, _free_port()], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True"]  # one rank: the shard is the whole tensor


def test_fingerprint_makes_no_host_copy_of_the_weights():
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    weights_fingerprint(model)  # warm up imports and caches
    tracemalloc.start()
    try:
        weights_fingerprint(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10  # Python-side allocations only; a copy of the weight's bytes would be 4 MiB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_device_digest_changes_with_any_element_and_not_with_layout(dtype):
    t = (torch.randn(3, 257) * 5).to(dtype)
    ref = device_digest(t)
    assert device_digest(t.clone()) == ref and len(ref) == 16
    assert device_digest(t.t().contiguous().t()) == ref  # same values, other strides
    for i in (0, 400, t.numel() - 1):
        changed = t.clone().view(-1)
        changed[i] = ~changed[i] if dtype == torch.bool else changed[i] + 1
        assert device_digest(changed.view_as(t)) != ref
    swapped = t.clone().view(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    assert torch.equal(swapped, t.view(-1)) or device_digest(swapped.view_as(t)) != ref


def test_fingerprint_changes_when_any_weight_changes():
    model = tiny_model("gpt2")
    ref = weights_fingerprint(model)
    assert weights_fingerprint(tiny_model("gpt2")) == ref
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1e-3
    assert weights_fingerprint(model) != ref
