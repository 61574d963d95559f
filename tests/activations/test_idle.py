"""IdleGate: forwards with nothing to offload skip the saved-tensor hooks, and only when that is safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tiercache import ActivationOffloader
from lightning_tiercache.activations.idle import IdleGate, batch_shapes, covers


def test_batch_shapes_and_covers() -> None:
    big = batch_shapes({"ids": torch.zeros(8, 128, dtype=torch.long), "n": 3})
    assert covers(big, batch_shapes({"ids": torch.zeros(8, 64, dtype=torch.long), "n": 3}))
    assert covers(big, big)
    assert not covers(big, batch_shapes({"ids": torch.zeros(4, 256, dtype=torch.long), "n": 3}))  # longer rows
    assert not covers(big, batch_shapes({"ids": torch.zeros(8, 64, dtype=torch.long), "n": 4}))  # other value
    assert not covers(big, batch_shapes({"ids": torch.zeros(8, 64, dtype=torch.complex128), "n": 3}))  # wider
    assert not covers(big, batch_shapes({"ids": torch.zeros(8, 1, 64, dtype=torch.long), "n": 3}))  # more dims
    assert not covers(big, batch_shapes([torch.zeros(8, 64, dtype=torch.long), 3]))  # another structure
    assert batch_shapes([torch.zeros(2), object()]) is None  # unknown leaf: never skip


def test_flat_batches_summarize_like_nested_ones() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(4, dtype=torch.long)
    leaf_a, leaf_b = batch_shapes(a), batch_shapes(b)
    assert batch_shapes([a, b]) == batch_shapes((a, b)) == ("seq", (leaf_a, leaf_b))
    assert batch_shapes({"a": a, "b": b}) == ("map", (("a", leaf_a), ("b", leaf_b)))
    # a flat start that meets a non-tensor falls back to the full walk
    assert batch_shapes([a, 3]) == ("seq", (leaf_a, ("value", 3)))
    assert batch_shapes({"a": a, "n": None}) == ("map", (("a", leaf_a), ("n", ("value", None))))
    assert batch_shapes([a, [b]]) == ("seq", (leaf_a, ("seq", (leaf_b,))))
    assert batch_shapes([]) == ("seq", ()) and batch_shapes({}) == ("map", ())


def test_gate_skips_covered_batches_and_probes_again() -> None:
    gate = IdleGate(probe_every=3)
    x = torch.zeros(4, 16)
    shapes, skip = gate.check(x)
    assert not skip  # nothing known yet
    gate.observe(shapes, stored=False)
    decisions = [gate.check(x)[1] for _ in range(8)]
    assert decisions == [True, True, True, False, True, True, True, False]
    assert not gate.check(torch.zeros(5, 16))[1]  # a larger batch runs with the hooks
    gate.observe(batch_shapes(x), stored=True)  # a probe that stored something forgets what it knew
    assert not gate.check(x)[1]
    assert IdleGate(0).check(x) == (None, False)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 64)
        self.b = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).square().mean()


def _step(off: ActivationOffloader, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with off.for_batch(x):
        loss = model(x)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("min_bytes", [1 << 20, 1024])
def test_offloader_goes_idle_only_when_nothing_is_offloaded(make_store, min_bytes: int) -> None:
    torch.manual_seed(0)
    model = Net()
    off = ActivationOffloader(make_store(device_bytes=0, host_bytes="64MiB"), module=model, min_bytes=min_bytes)
    small, large = torch.randn(8, 16), torch.randn(64, 16)
    plain = []
    for x in (small, small, small, large, small):
        model.zero_grad(set_to_none=True)
        model(x).backward()
        plain.append([p.grad.clone() for p in model.parameters()])
    got = [_step(off, model, x) for x in (small, small, small, large, small)]
    for a, b in zip(got, plain, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    st = off.stats()
    if min_bytes == 1024:  # 8 x 64 x 4 = 2 KiB saved: offloaded every step, never idle
        assert st["idle_steps"] == 0 and st["steps"] == 5 and st["packed"] > 0
    else:  # the first small forward stores nothing; the large one checks again; small ones after skip
        assert st["idle_steps"] == 3 and st["steps"] == 2 and st["packed"] == 0
