"""The OOM flag carried by DDP's communication hook (Note: [carried flag]), on a one-process gloo group.

Two ranks are in ``test_oom_ddp.py`` and ``test_transparent_ddp.py``; here the hook's own contract: gradients
equal to DDP's without a hook, one flag per backward inside the last bucket however many buckets, none inside
``no_sync``, and the cases where the flag cannot ride along (Note: [where the flag rides]).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_tiercache.oom.ddp import CarriedFlag, can_carry_flag


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = Path(tmp_path_factory.mktemp("pg")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model(width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def _ddp(module: nn.Module, bucket_cap_mb: float = 0.5) -> DistributedDataParallel:
    return DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb)


@pytest.mark.parametrize("width", [16, 64], ids=["one-bucket", "several-buckets"])
def test_carried_flag_reduces_like_ddp_and_sends_one_flag_per_backward(
    one_rank: None, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    # 64 wide: 8.6 k gradients (34 KiB) in 0.01 MB buckets, several once DDP rebuilt them after the first step
    plain, carried = _ddp(_model(width), 0.01), _ddp(_model(width), 0.01)
    flag = CarriedFlag()
    flag.register(carried)
    grads = sum(p.numel() for p in carried.parameters())
    launched: list[int] = []  # the number of elements of each all-reduce
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        launched.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    x = torch.randn(16, width)
    for step in range(3):
        launched.clear()
        flag.arm(16)
        assert not flag.sent
        if step == 2:
            flag.fail()
        plain(x).pow(2).sum().backward()
        assert launched == []  # DDP without a hook reduces in C++
        carried(x).pow(2).sum().backward()
        assert flag.sent
        assert flag.collect() == (step == 2, False, 16)
        assert flag.collect() is None  # collected once
        # Every gradient once, and the flag's 2 + world slots once, in the last bucket (Note: [flag inside the
        # bucket]); no all-reduce of its own.
        assert sum(launched) == grads + 3
        if width == 64 and step > 0:
            assert len(launched) > 1
        elif width == 16:
            assert len(launched) == 1
        for a, b in zip(plain.parameters(), carried.parameters(), strict=True):
            assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_no_flag_inside_no_sync(one_rank: None) -> None:
    ddp = _ddp(_model(16))
    flag = CarriedFlag()
    flag.register(ddp)
    flag.arm(4)
    with ddp.no_sync():
        ddp(torch.randn(4, 16)).sum().backward()
    assert not flag.sent
    assert flag.collect() is None


def test_flag_rides_only_where_it_can_be_the_only_hook(one_rank: None) -> None:
    large = _ddp(_model(512))
    assert not can_carry_flag(large)  # 2 MiB of gradients: the agreement goes after backward
    with pytest.raises(ValueError, match="cannot ride"):
        CarriedFlag().register(large)
    ddp = _ddp(_model(16))
    assert can_carry_flag(ddp)
    CarriedFlag().register(ddp)
    assert not can_carry_flag(ddp)  # a hook is registered (the module's own, or this one)
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    assert not can_carry_flag(DistributedDataParallel(copy.deepcopy(sparse)))
    compiled = _ddp(_model(16))
    compiled._use_python_reducer = True  # what DDP sets under compiled autograd's "python_reducer" mode
    assert not can_carry_flag(compiled)
    with pytest.raises(ValueError, match="cannot ride"):
        CarriedFlag().register(ddp)
