"""The OOM flag carried by DDP's communication hook (Note: [carried flag]), on a one-process gloo group.

Two ranks are in ``test_oom_ddp.py`` and ``test_transparent_ddp.py``; here the hook's own contract: gradients
equal to DDP's without a hook, one flag per backward however many buckets (inside a small last bucket, or
beside a large one, which the step hook never registers the hook for: Note: [where the flag rides]), none
inside ``no_sync``, and the cases where the flag cannot ride along.
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


def _ddp(module: nn.Module) -> DistributedDataParallel:
    return DistributedDataParallel(module, bucket_cap_mb=0.5)  # 2 MiB of gradients: several buckets


@pytest.mark.parametrize("width", [512, 16], ids=["flag-beside-a-large-last-bucket", "flag-inside-a-small-one"])
def test_carried_flag_reduces_like_ddp_and_sends_one_flag_per_backward(
    one_rank: None, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    plain, carried = _ddp(_model(width)), _ddp(_model(width))
    flag = CarriedFlag()
    flag.register(carried)
    launched = []
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        launched.append("flag" if tensor.dtype == torch.int64 else "bucket")
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
        if width == 512:
            # From the second step DDP's rebuilt buckets are several; the flag's own all-reduce goes out once,
            # after the last one.
            assert launched[-1] == "flag" and launched.count("flag") == 1
            assert step == 0 or launched.count("bucket") > 1
        else:  # one small bucket: the flag is in it (Note: [flag inside the bucket])
            assert launched == ["bucket"]
        for a, b in zip(plain.parameters(), carried.parameters(), strict=True):
            assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_no_flag_inside_no_sync(one_rank: None) -> None:
    ddp = _ddp(_model())
    flag = CarriedFlag()
    flag.register(ddp)
    flag.arm(4)
    with ddp.no_sync():
        ddp(torch.randn(4, 512)).sum().backward()
    assert not flag.sent
    assert flag.collect() is None


def test_flag_rides_only_where_it_can_be_the_only_hook(one_rank: None) -> None:
    assert not can_carry_flag(_ddp(_model(512)))  # 2 MiB of gradients: the agreement goes after backward
    ddp = _ddp(_model(16))
    assert can_carry_flag(ddp)
    CarriedFlag().register(ddp)
    assert not can_carry_flag(ddp)  # a hook is registered (the module's own, or this one)
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    assert not can_carry_flag(DistributedDataParallel(copy.deepcopy(sparse)))
    compiled = _ddp(_model(16))
    compiled._use_python_reducer = True  # what DDP sets under compiled autograd's "python_reducer" mode
    assert not can_carry_flag(compiled)
    with pytest.raises(RuntimeError, match="only be called once"):
        CarriedFlag().register(ddp)
